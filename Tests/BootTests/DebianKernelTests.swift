import Boot
import Foundation
import Memory
import Testing

/// Tests against Debian's real cloud kernel, when `guests/linux/fetch-debian-kernel.sh`
/// has put it in the cache (`SWIFTLET_KERNEL_CACHE`, default /var/cache/swiftlet/linux).
@Suite("Debian's linux-image-cloud-amd64")
struct DebianKernelTests {
    static let cache = ProcessInfo.processInfo.environment["SWIFTLET_KERNEL_CACHE"] ?? "/var/cache/swiftlet/linux"
    static var bzImagePath: String { cache + "/vmlinuz" }
    static var vmlinuxPath: String { cache + "/vmlinux" }
    static var haveKernel: Bool { FileManager.default.fileExists(atPath: bzImagePath) }

    static func read(_ path: String) throws -> [UInt8] {
        [UInt8](try Data(contentsOf: URL(fileURLWithPath: path)))
    }

    @Test(.enabled(if: haveKernel, "no Debian kernel in the cache: run guests/linux/fetch-debian-kernel.sh"))
    func parsesTheRealSetupHeader() throws {
        let image = try Self.read(Self.bzImagePath)
        #expect(KernelImage.detect(image) == .bzImage)
        let header = try SetupHeader(image)
        #expect(header.version >= 0x020F)
        #expect(header.has64BitEntry)
        #expect(header.relocatable)
        #expect(header.cmdlineSize == 2047)
        #expect(header.initrdAddrMax == 0x7FFF_FFFF)
        #expect(header.prefAddress == 0x100_0000)
        #expect(header.initSize > header.payloadLength)
        #expect(PayloadDecompressor.detect(header.payload(of: image)) != nil)
    }

    @Test(.enabled(if: haveKernel, "no Debian kernel in the cache: run guests/linux/fetch-debian-kernel.sh"))
    func decompressesOnTheHostAndLoads() throws {
        let image = try Self.read(Self.bzImagePath)
        let header = try SetupHeader(image)
        let payload = header.payload(of: image)
        let clock = ContinuousClock()
        var output: [UInt8] = []
        let elapsed = try clock.measure {
            output = try PayloadDecompressor.decompress(payload, limit: Int(header.initSize) + (16 << 20)).1
        }
        // The kernel build appends the uncompressed size to the payload.
        let trailer = payload.suffix(4).reversed().reduce(UInt32(0)) { $0 << 8 | UInt32($1) }
        #expect(output.count == Int(trailer))
        print("host decompression of \(payload.count) bytes (\(PayloadDecompressor.detect(payload)!.rawValue)) -> \(output.count) bytes in \(elapsed)")
        if FileManager.default.fileExists(atPath: Self.vmlinuxPath) {
            #expect(output == (try Self.read(Self.vmlinuxPath)))
        }
        let elf = try ELFImage(output)
        #expect(elf.pvhEntry != nil)

        let memory = try GuestMemory(size: 256 << 20, transparentHugePages: false)
        let loaded = try KernelImage.load(image, into: memory, options: BootOptions(cmdline: "console=ttyS0", cpuCount: 2))
        #expect(loaded.decompressedOnHost != nil)
        #expect(loaded.bootProtocol == .pvh)
        #expect(loaded.entry.rip == UInt64(elf.pvhEntry!))
        #expect(loaded.kernelStart == 0x100_0000)
        print(loaded.summary)

        let guest = try KernelImage.load(image, into: memory, options: BootOptions(decompressOnHost: false))
        #expect(guest.bootProtocol == .linux64)
        #expect(guest.entry.rip == 0x100_0200)
        print(guest.summary)
    }

    @Test(.enabled(if: haveKernel, "no Debian kernel in the cache: run guests/linux/fetch-debian-kernel.sh"))
    func refusesAnOversizedCommandLineAndInitrd() throws {
        let image = try Self.read(Self.bzImagePath)
        let memory = try GuestMemory(size: 128 << 20, transparentHugePages: false)
        #expect(throws: BootError.cmdlineTooLong(length: 2048, maximum: 2047)) {
            try KernelImage.load(image, into: memory, options: BootOptions(cmdline: String(repeating: "x", count: 2048),
                                                                           decompressOnHost: false))
        }
        let error = #expect(throws: BootError.self) {
            try KernelImage.load(image, into: memory, options: BootOptions(initrd: [UInt8](repeating: 0, count: 64 << 20),
                                                                           decompressOnHost: false))
        }
        guard case .initrdTooLarge = error else { Issue.record("got \(String(describing: error))"); return }
    }
}
