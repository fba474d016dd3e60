import Boot
import Glibc
import RateLimit
import SwiftletKit

/// Turns the API's configuration (Firecracker's resources) into a SwiftletKit
/// ``VMConfiguration``. Pure apart from reading the kernel's first bytes to tell a flat
/// binary from a kernel: testable without /dev/kvm.
public enum VMMapping {
    /// Largest file taken as a flat binary: it is loaded at 0x7C00 and must fit below the
    /// EBDA/VGA hole at 0x9FC00 anyway.
    static let flatLimit = 0x9FC00 - 0x7C00

    /// The boot-source as a ``VMConfiguration/Boot``: a file with a kernel format
    /// (bzImage, ELF vmlinux, Multiboot) boots as a kernel; a small file with none is a
    /// flat binary entered in real mode at 0x7C00 (Swiftlet's teaching guests).
    public static func boot(_ source: BootSource, commandLine: String?) throws(APIError) -> VMConfiguration.Boot {
        let descriptor = open(source.kernelImagePath, O_RDONLY | O_NONBLOCK | O_CLOEXEC)
        guard descriptor >= 0 else {
            throw APIError("Cannot open kernel image `\(source.kernelImagePath)`: \(String(cString: strerror(errno)))")
        }
        defer { close(descriptor) }
        var status = stat()
        guard fstat(descriptor, &status) == 0, (status.st_mode & S_IFMT) == S_IFREG else {
            throw APIError("kernel_image_path `\(source.kernelImagePath)` is not a regular file")
        }
        // The first flatLimit + 1 bytes: enough to tell a kernel format, and to know a
        // flat binary fits.
        var bytes = [UInt8](repeating: 0, count: flatLimit + 1)
        var filled = 0
        while filled < bytes.count {
            let count = bytes[filled...].withUnsafeMutableBytes { read(descriptor, $0.baseAddress, $0.count) }
            if count < 0 && errno == EINTR { continue }
            guard count > 0 else { break }
            filled += count
        }
        bytes.removeSubrange(filled...)
        if bytes.count <= flatLimit, KernelImage.detect(bytes) == .unknown {
            guard source.initrdPath == nil else { throw APIError("initrd_path needs a kernel; `\(source.kernelImagePath)` is a flat binary") }
            return .flat(.file(source.kernelImagePath))
        }
        return .kernel(.file(source.kernelImagePath), initrd: source.initrdPath.map { .file($0) }, commandLine: commandLine)
    }

    /// The kernel command line: `boot_args` (or Swiftlet's default Linux line), with
    /// `root=` for the root drive as Firecracker adds it (`/dev/vda`, or
    /// `PARTUUID=...` when the drive has one; `ro` or `rw`).
    public static func commandLine(bootArgs: String?, drives: [Drive]) -> String? {
        guard let root = drives.first(where: \.isRootDevice) else { return bootArgs }
        var line = bootArgs ?? VMConfiguration.defaultLinuxCommandLine
        let device = root.partuuid.map { "PARTUUID=\($0)" } ?? "/dev/vda"
        line += " root=\(device) \(root.isReadOnly == true ? "ro" : "rw")"
        return line
    }

    /// The drives in the guest's order: the root drive first (/dev/vda), then the others
    /// in the order they were added.
    static func ordered(_ drives: [Drive]) -> [Drive] {
        drives.filter(\.isRootDevice) + drives.filter { !$0.isRootDevice }
    }

    /// The whole configuration. The root drive goes first (the guest's /dev/vda), the
    /// others follow in the order they were added.
    public static func configuration(machine: MachineConfig, boot source: BootSource, drives: [Drive],
                                     networks: [NetworkInterface]) throws(APIError) -> VMConfiguration {
        let ordered = Self.ordered(drives)
        var configuration = VMConfiguration(boot: try boot(source, commandLine: commandLine(bootArgs: source.bootArgs, drives: ordered)))
        configuration.memorySize = UInt64(machine.memSizeMib) << 20
        configuration.cpus = machine.vcpuCount
        configuration.transparentHugePages = machine.hugePages == "Transparent"
        configuration.trackDirtyPages = machine.trackDirtyPages ?? false
        configuration.disks = ordered.map { drive in
            VMConfiguration.Disk(path: drive.pathOnHost, readOnly: drive.isReadOnly ?? false,
                                 format: drive.format.flatMap(VMConfiguration.Disk.Format.init(rawValue:)), serial: drive.driveId)
        }
        configuration.networks = networks.map { VMConfiguration.Network(tap: $0.hostDevName, mac: $0.guestMac) }
        applyRateLimiters(to: &configuration, drives: ordered, networks: networks)
        return configuration
    }

    // MARK: - Rate limiters

    /// Where the API hands `rate_limiter` (drives) and `rx_rate_limiter`/`tx_rate_limiter`
    /// (network interfaces) to the VM configuration (the `RateLimit` module's types).
    static func applyRateLimiters(to configuration: inout VMConfiguration, drives: [Drive], networks: [NetworkInterface]) {
        for (index, drive) in drives.enumerated() {
            configuration.disks[index].rateLimiter = drive.rateLimiter.map(RateLimiterConfiguration.init)
        }
        for (index, interface) in networks.enumerated() {
            configuration.networks[index].rxRateLimiter = interface.rxRateLimiter.map(RateLimiterConfiguration.init)
            configuration.networks[index].txRateLimiter = interface.txRateLimiter.map(RateLimiterConfiguration.init)
        }
    }

    /// `PATCH /drives/{id}` and `PATCH /network-interfaces/{id}` while running: the
    /// library's calls that change a running device's limiters.
    static func updateRateLimiters(vm: VM, driveIndex: Int?, networkIndex: Int?, limiter: RateLimiter?,
                                   rx: RateLimiter?, tx: RateLimiter?) throws(APIError) {
        do throws(SwiftletError) {
            if let driveIndex {
                try vm.updateRateLimiter(disk: driveIndex, limiter.map(RateLimiterConfiguration.init))
            }
            if let networkIndex {
                try vm.updateRateLimiters(networkInterface: networkIndex, rx: rx.map(RateLimiterConfiguration.init),
                                          tx: tx.map(RateLimiterConfiguration.init))
            }
        } catch {
            throw APIError("Cannot update the rate limiter: \(error.message)")
        }
    }
}

extension RateLimiterConfiguration {
    /// The API's (strictly decoded, validated) limiter as the `RateLimit` module's.
    init(_ limiter: RateLimiter) {
        func bucket(_ bucket: TokenBucket?) -> TokenBucketConfiguration? {
            bucket.map { TokenBucketConfiguration(size: $0.size, oneTimeBurst: $0.oneTimeBurst, refillTime: $0.refillTime) }
        }
        self.init(bandwidth: bucket(limiter.bandwidth), ops: bucket(limiter.ops))
    }
}
