import Foundation
import Testing

// The virtio-blk teaching guest (guests/virtio-blk, built as guests/build/virtio-blk.elf) is
// a small polled virtio-blk driver. Its `crc` job reads the whole disk and prints
// "disk: N sectors, crc32 xxxxxxxx"; its `write SEED` job fills the disk with a documented
// pattern and flushes. These tests make real images (raw, and qcow2 made by qemu-img: plain,
// with a backing file, with compressed clusters), run the guest, and check what it says
// against the image as the host sees it.
//
// The same scenarios run under two VMMs:
//   - QEMU (microvm with virtio-blk-device, pc with virtio-blk-pci): proof that the driver,
//     and so the test, follows the virtio specification rather than one device's quirks;
//   - Swiftlet (`--disk`, `--virtio-transport mmio|pci`): those tests switch themselves on
//     once `swiftlet run --help` lists `--disk`.

/// Where the guest and the host tools are, and whether the QEMU half can run here.
enum VirtioBlockGuest {
    /// The guest with both a Multiboot header and a PVH note (what Swiftlet and QEMU boot).
    static let kernel = Swiftlet.packageRoot.appendingPathComponent("guests/build/virtio-blk.elf").path
    /// The same program without the Multiboot header: loaders that prefer Multiboot (QEMU)
    /// then take the PVH entry.
    static let pvhKernel = Swiftlet.packageRoot.appendingPathComponent("guests/build/virtio-blk-pvh.elf").path

    static func tool(_ name: String) -> String? {
        ["/usr/bin", "/usr/local/bin", "/bin"].map { "\($0)/\(name)" }.first { FileManager.default.isExecutableFile(atPath: $0) }
    }

    static let qemu = tool("qemu-system-x86_64")
    static let qemuImg = tool("qemu-img")
    static let qemuIO = tool("qemu-io")

    /// QEMU with KVM, and the tools that make and judge images.
    static let qemuAvailable = qemu != nil && qemuImg != nil && qemuIO != nil
        && FileManager.default.isWritableFile(atPath: "/dev/kvm")

    /// Swiftlet's virtio-blk has landed when `swiftlet run --help` mentions `--disk`.
    static let swiftletHasDisk: Bool = {
        guard let help = try? Swiftlet.run(["run", "--help"]) else { return false }
        return help.stdout.contains("--disk")
    }()
}

/// A program's exit status and output.
struct HostToolResult {
    let status: Int32
    let stdout: String
    let stderr: String
}

/// Runs `executable` with `arguments`, standard input from /dev/null, killed after
/// `timeout` seconds (util-linux's timeout), output collected in files (no pipe to fill).
func runHostTool(_ executable: String, _ arguments: [String], timeout: Int = 120) throws -> HostToolResult {
    let scratch = FileManager.default.temporaryDirectory.appendingPathComponent("tool-\(UUID().uuidString)")
    try FileManager.default.createDirectory(at: scratch, withIntermediateDirectories: true)
    defer { try? FileManager.default.removeItem(at: scratch) }
    let outURL = scratch.appendingPathComponent("stdout"), errURL = scratch.appendingPathComponent("stderr")
    _ = FileManager.default.createFile(atPath: outURL.path, contents: nil)
    _ = FileManager.default.createFile(atPath: errURL.path, contents: nil)
    let process = Process()
    process.executableURL = URL(fileURLWithPath: "/usr/bin/timeout")
    process.arguments = ["-s", "KILL", "\(timeout)", executable] + arguments
    process.standardInput = FileHandle(forReadingAtPath: "/dev/null")
    process.standardOutput = try FileHandle(forWritingTo: outURL)
    process.standardError = try FileHandle(forWritingTo: errURL)
    try process.run()
    process.waitUntilExit()
    return HostToolResult(status: process.terminationStatus,
                          stdout: String(decoding: (try? Data(contentsOf: outURL)) ?? Data(), as: UTF8.self),
                          stderr: String(decoding: (try? Data(contentsOf: errURL)) ?? Data(), as: UTF8.self))
}

// MARK: - What the guest computes, recomputed on the host

/// CRC-32 as zlib's crc32() computes it: reflected polynomial 0xEDB88320, initial value and
/// final XOR 0xFFFFFFFF.
enum ZlibCRC32 {
    static let table: [UInt32] = (0..<256).map { n in
        var c = UInt32(n)
        for _ in 0..<8 { c = c & 1 != 0 ? 0xEDB8_8320 ^ (c >> 1) : c >> 1 }
        return c
    }

    static func checksum(_ bytes: [UInt8]) -> UInt32 {
        var c: UInt32 = 0xFFFF_FFFF
        for byte in bytes { c = table[Int((c ^ UInt32(byte)) & 0xFF)] ^ (c >> 8) }
        return c ^ 0xFFFF_FFFF
    }
}

/// The `write SEED` pattern (guests/README.md): sector s holds 128 little-endian words of a
/// xorshift32 stream started at SEED ^ (s * 0x9E3779B9), or at 0x9E3779B9 if that is 0.
enum GuestWritePattern {
    static func sector(seed: UInt32, sector: UInt64) -> [UInt8] {
        var x = seed ^ (UInt32(truncatingIfNeeded: sector) &* 0x9E37_79B9)
        if x == 0 { x = 0x9E37_79B9 }
        var bytes = [UInt8]()
        bytes.reserveCapacity(512)
        for _ in 0..<128 {
            x ^= x << 13
            x ^= x >> 17
            x ^= x << 5
            withUnsafeBytes(of: x.littleEndian) { bytes.append(contentsOf: $0) }
        }
        return bytes
    }

    static func disk(seed: UInt32, sectors: Int) -> [UInt8] {
        var bytes = [UInt8]()
        bytes.reserveCapacity(sectors * 512)
        for s in 0..<sectors { bytes.append(contentsOf: sector(seed: seed, sector: UInt64(s))) }
        return bytes
    }
}

/// Reproducible pseudo-random bytes (SplitMix64), so that a failure can be replayed.
struct ReproducibleBytes {
    private var state: UInt64
    init(seed: UInt64) { state = seed }

    mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }

    mutating func random(_ count: Int) -> [UInt8] {
        var bytes = [UInt8]()
        bytes.reserveCapacity(count + 8)
        while bytes.count < count { withUnsafeBytes(of: next()) { bytes.append(contentsOf: $0) } }
        return Array(bytes.prefix(count))
    }

    /// Data with every kind of qcow2 cluster once converted with `qemu-img convert -c`
    /// (64 KiB clusters): all zero (left unallocated), random (does not compress: stored
    /// as is), and runs of one byte value (compressed).
    mutating func mixed(clusters: Int) -> [UInt8] {
        var bytes = [UInt8]()
        for cluster in 0..<clusters {
            switch cluster % 4 {
            case 0: bytes += [UInt8](repeating: 0, count: 65536)
            case 1: bytes += random(65536)
            default:
                for _ in 0..<128 { bytes += [UInt8](repeating: UInt8(truncatingIfNeeded: next()), count: 512) }
            }
        }
        return bytes
    }
}

// MARK: - Images

/// A scratch directory of disk images, removed at the end of a test.
final class ScratchImages {
    let url: URL

    init() throws {
        url = FileManager.default.temporaryDirectory.appendingPathComponent("virtio-blk-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: url, withIntermediateDirectories: true)
    }

    deinit { try? FileManager.default.removeItem(at: url) }

    func path(_ name: String) -> String { url.appendingPathComponent(name).path }

    /// Writes `bytes` as a raw image.
    func raw(_ name: String, _ bytes: [UInt8]) throws -> String {
        let file = path(name)
        try Data(bytes).write(to: URL(fileURLWithPath: file))
        return file
    }

    /// Runs qemu-img and requires success.
    @discardableResult
    func qemuImg(_ arguments: [String]) throws -> String {
        let result = try runHostTool(VirtioBlockGuest.qemuImg!, arguments)
        try #require(result.status == 0, "qemu-img \(arguments.joined(separator: " ")): \(result.stderr)")
        return result.stdout
    }

    /// Runs qemu-io commands on a qcow2 image and requires success.
    func qemuIO(_ image: String, _ commands: [String]) throws {
        let result = try runHostTool(VirtioBlockGuest.qemuIO!, ["-f", "qcow2"] + commands.flatMap { ["-c", $0] } + [image])
        try #require(result.status == 0 && !result.stdout.contains("error"), "qemu-io \(commands): \(result.stdout)\(result.stderr)")
    }

    /// What a guest sees of `image`: qemu-img converts it to raw.
    func contents(_ image: String, format: GuestDiskFormat) throws -> [UInt8] {
        if format == .raw { return Array(try Data(contentsOf: URL(fileURLWithPath: image))) }
        let raw = path("contents-\(UUID().uuidString).raw")
        defer { try? FileManager.default.removeItem(atPath: raw) }
        try qemuImg(["convert", "-f", "qcow2", "-O", "raw", image, raw])
        return Array(try Data(contentsOf: URL(fileURLWithPath: raw)))
    }

    /// `qemu-img check` finds nothing wrong with a qcow2 image.
    func expectClean(_ image: String) throws {
        let result = try runHostTool(VirtioBlockGuest.qemuImg!, ["check", "-f", "qcow2", image])
        #expect(result.status == 0, "qemu-img check: \(result.stdout)\(result.stderr)")
        #expect(result.stdout.contains("No errors were found on the image."), "qemu-img check: \(result.stdout)")
    }
}

enum GuestDiskFormat: String, Sendable {
    case raw, qcow2
}

enum VirtioTransport: String, Sendable, CaseIterable, CustomTestStringConvertible {
    case mmio, pci
    var testDescription: String { rawValue == "mmio" ? "virtio-mmio" : "virtio-pci" }
}

// MARK: - Running the guest

/// A VMM that can run the guest on one disk.
enum GuestVMM: Sendable {
    case qemu
    case swiftlet

    /// Runs the guest on `image` with `job` ("crc", "write 7", "id") as its command line.
    func run(job cmdline: String, image: String, format: GuestDiskFormat, transport: VirtioTransport,
             readOnly: Bool = false, serial: String? = nil) throws -> HostToolResult {
        switch self {
        case .qemu:
            var drive = "file=\(image),format=\(format.rawValue),if=none,id=disk0"
            if readOnly { drive += ",readonly=on" }
            var device = transport == .mmio ? "virtio-blk-device,drive=disk0" : "virtio-blk-pci,drive=disk0,disable-legacy=on"
            if let serial { device += ",serial=\(serial)" }
            return try runQEMU(machine: transport == .mmio ? .microvm : .pc, kernel: VirtioBlockGuest.kernel,
                               drive: drive, device: device, cmdline: cmdline)
        case .swiftlet:
            var disk = "\(image),format=\(format.rawValue)"
            if readOnly { disk += ",readonly" }
            if let serial { disk += ",serial=\(serial)" }
            let result = try Swiftlet.run(["run", "--kernel", VirtioBlockGuest.kernel, "--disk", disk,
                                           "--virtio-transport", transport.rawValue, "--memory", "64M",
                                           "--timeout", "120", "--cmdline", cmdline])
            return HostToolResult(status: result.status, stdout: result.stdout, stderr: result.stderr)
        }
    }
}

enum QEMUMachine {
    /// microvm without ACPI: eight virtio-mmio slots at 0xFEB00000 + 512 * i, IRQ 5 + i; the
    /// first device goes to the last slot (0xFEB00E00, IRQ 12). QEMU adds
    /// virtio_mmio.device=512@0xfeb00e00:12 to the command line itself only for a kernel it
    /// boots through PVH; for a Multiboot kernel the test passes it.
    case microvm
    /// i440FX PC with qboot as its firmware: qboot boots the Multiboot kernel but assigns no
    /// BARs, so the guest places them itself, as it must under Swiftlet (no firmware).
    case pc
    /// i440FX PC with SeaBIOS, which assigns the BARs before the multiboot option ROM runs.
    case pcSeaBIOS
    /// Q35 with SeaBIOS.
    case q35SeaBIOS
}

/// Boots `kernel` under QEMU with KVM, one disk, the isa-debug-exit device at 0xF4 (exit
/// status = code * 2 + 1, as with Swiftlet) and the guest's serial port on stdout.
func runQEMU(machine: QEMUMachine, kernel: String, drive: String, device: String, cmdline: String,
             autoCommandLine: Bool = false) throws -> HostToolResult {
    var arguments = ["-accel", "kvm", "-m", "64M", "-nodefaults", "-no-user-config", "-display", "none",
                     "-serial", "stdio", "-no-reboot", "-device", "isa-debug-exit,iobase=0xf4,iosize=0x04",
                     "-drive", drive, "-device", device, "-kernel", kernel]
    var line = cmdline
    switch machine {
    case .microvm:
        // virtio-mmio version 2 (QEMU defaults to the legacy version 1 layout).
        arguments += ["-M", "microvm,acpi=off", "-global", "virtio-mmio.force-legacy=false"]
        if !autoCommandLine { line += " virtio_mmio.device=512@0xfeb00e00:12" }
    case .pc: arguments += ["-M", "pc", "-bios", "qboot.rom"]
    case .pcSeaBIOS: arguments += ["-M", "pc"]
    case .q35SeaBIOS: arguments += ["-M", "q35"]
    }
    return try runHostTool(VirtioBlockGuest.qemu!, arguments + ["-append", line])
}

/// The guest's one result line, "disk: N sectors, crc32 xxxxxxxx", parsed.
func guestCRCLine(_ output: String) -> (sectors: Int, crc: UInt32)? {
    let lines = output.split(whereSeparator: { $0 == "\n" || $0 == "\r" }).filter { $0.hasPrefix("disk: ") }
    guard lines.count == 1, let match = lines[0].wholeMatch(of: /disk: (\d+) sectors, crc32 ([0-9a-f]{8})/),
          let sectors = Int(match.1), let crc = UInt32(match.2, radix: 16) else { return nil }
    return (sectors, crc)
}

/// A bench job's result line, "bench KIND: depth D, R requests of B bytes, N bytes in T us".
struct GuestBenchLine {
    let kind: String
    let depth: Int
    let requests: Int
    let requestBytes: Int
    let bytes: Int
    let micros: Int
    /// ", flush T us" after seqwrite.
    let flushMicros: Int?

    init?(_ output: String) {
        let lines = output.split(whereSeparator: { $0 == "\n" || $0 == "\r" }).filter { $0.hasPrefix("bench ") }
        guard lines.count == 1,
              let match = lines[0].wholeMatch(of: /bench (\w+): depth (\d+), (\d+) requests of (\d+) bytes, (\d+) bytes in (\d+) us(?:, flush (\d+) us)?/),
              let depth = Int(match.2), let requests = Int(match.3), let requestBytes = Int(match.4),
              let bytes = Int(match.5), let micros = Int(match.6) else { return nil }
        kind = String(match.1)
        self.depth = depth
        self.requests = requests
        self.requestBytes = requestBytes
        self.bytes = bytes
        self.micros = micros
        flushMicros = match.7.flatMap { Int($0) }
    }
}

/// The guest's TSC line: its frequency in MHz and where it came from.
func guestTSCLine(_ output: String) -> (mhz: Double, source: String)? {
    guard let match = output.firstMatch(of: /TSC at (\d+\.\d+) MHz \(([^)]*)\)/), let mhz = Double(match.1) else { return nil }
    return (mhz, String(match.2))
}

// MARK: - Scenarios, shared by the QEMU and Swiftlet suites

enum VirtioBlockScenario {
    /// The guest reads `image` and reports the CRC of what qemu-img says the guest sees.
    static func expectCRC(_ vmm: GuestVMM, _ images: ScratchImages, image: String, format: GuestDiskFormat,
                          transport: VirtioTransport) throws {
        let expected = try images.contents(image, format: format)
        let result = try vmm.run(job: "crc", image: image, format: format, transport: transport)
        #expect(result.status == 1, "guest output: \(result.stdout)\(result.stderr)")
        let line = guestCRCLine(result.stdout)
        #expect(line?.sectors == expected.count / 512, "guest output: \(result.stdout)")
        #expect(line?.crc == ZlibCRC32.checksum(expected), "guest output: \(result.stdout)")
    }

    /// The guest writes the pattern of `seed`; the image then holds exactly that.
    static func expectWrite(_ vmm: GuestVMM, _ images: ScratchImages, image: String, format: GuestDiskFormat,
                            transport: VirtioTransport, seed: UInt32) throws {
        let sectors = try images.contents(image, format: format).count / 512
        let result = try vmm.run(job: "write \(seed)", image: image, format: format, transport: transport)
        #expect(result.status == 1, "guest output: \(result.stdout)\(result.stderr)")
        #expect(result.stdout.contains("written: \(sectors) sectors\n"), "guest output: \(result.stdout)")
        let written = try images.contents(image, format: format)
        let pattern = GuestWritePattern.disk(seed: seed, sectors: sectors)
        if written != pattern {
            let firstBad = zip(written, pattern).enumerated().first { $0.element.0 != $0.element.1 }?.offset
            Issue.record("the image (\(written.count) bytes) differs from the pattern (\(pattern.count) bytes) first in sector \((firstBad ?? min(written.count, pattern.count)) / 512)")
        }
        if format == .qcow2 { try images.expectClean(image) }
    }

    static func crcRaw(_ vmm: GuestVMM, _ transport: VirtioTransport) throws {
        let images = try ScratchImages()
        var bytes = ReproducibleBytes(seed: 1)
        // 8 MiB: 128 requests of 64 KiB, 8 at a time.
        let image = try images.raw("disk.raw", bytes.random(8 << 20))
        try expectCRC(vmm, images, image: image, format: .raw, transport: transport)
    }

    static func crcOddSize(_ vmm: GuestVMM, _ transport: VirtioTransport) throws {
        let images = try ScratchImages()
        var bytes = ReproducibleBytes(seed: 2)
        // 2001 sectors: the last request is 81 sectors, not a whole 128-sector chunk.
        let image = try images.raw("odd.raw", bytes.random(2001 * 512))
        try expectCRC(vmm, images, image: image, format: .raw, transport: transport)
    }

    static func crcQcow2(_ vmm: GuestVMM, _ transport: VirtioTransport) throws {
        let images = try ScratchImages()
        var bytes = ReproducibleBytes(seed: 3)
        let raw = try images.raw("source.raw", bytes.mixed(clusters: 64))
        let image = images.path("disk.qcow2")
        try images.qemuImg(["convert", "-f", "raw", "-O", "qcow2", raw, image])
        try expectCRC(vmm, images, image: image, format: .qcow2, transport: transport)
    }

    /// An overlay over a shorter backing file: clusters from the overlay, from the backing
    /// file, zeroed in the overlay, and past the backing file's end (zeros).
    static func makeOverlay(_ images: ScratchImages, seed: UInt64) throws -> (overlay: String, backing: String) {
        var bytes = ReproducibleBytes(seed: seed)
        let baseRaw = try images.raw("base.raw", bytes.random(3 << 20))
        let backing = images.path("base.qcow2")
        try images.qemuImg(["convert", "-f", "raw", "-O", "qcow2", baseRaw, backing])
        let overlay = images.path("overlay.qcow2")
        try images.qemuImg(["create", "-f", "qcow2", "-b", backing, "-F", "qcow2", overlay, "4M"])
        try images.qemuIO(overlay, ["write -P 0xab 64k 128k", "write -P 0x5a 1000k 100k", "write -z 2M 64k",
                                    "write -P 0x33 3584k 64k"])
        return (overlay, backing)
    }

    static func crcBackingFile(_ vmm: GuestVMM, _ transport: VirtioTransport) throws {
        let images = try ScratchImages()
        let (overlay, _) = try makeOverlay(images, seed: 4)
        try expectCRC(vmm, images, image: overlay, format: .qcow2, transport: transport)
    }

    static func makeCompressed(_ images: ScratchImages, seed: UInt64) throws -> String {
        var bytes = ReproducibleBytes(seed: seed)
        let raw = try images.raw("source.raw", bytes.mixed(clusters: 64))
        let image = images.path("compressed.qcow2")
        try images.qemuImg(["convert", "-c", "-f", "raw", "-O", "qcow2", raw, image])
        // qemu-img check counts them: "... = 75.00% allocated, ..., 50.00% compressed clusters".
        let check = try images.qemuImg(["check", "-f", "qcow2", image])
        let compressed = check.firstMatch(of: /([0-9.]+)% compressed clusters/).flatMap { Double($0.1) } ?? 0
        try #require(compressed > 0, "qemu-img made no compressed clusters: \(check)")
        return image
    }

    static func crcCompressed(_ vmm: GuestVMM, _ transport: VirtioTransport) throws {
        let images = try ScratchImages()
        let image = try makeCompressed(images, seed: 5)
        try expectCRC(vmm, images, image: image, format: .qcow2, transport: transport)
    }

    static func writeRaw(_ vmm: GuestVMM, _ transport: VirtioTransport) throws {
        let images = try ScratchImages()
        var bytes = ReproducibleBytes(seed: 6)
        let image = try images.raw("disk.raw", bytes.random(4 << 20))
        try expectWrite(vmm, images, image: image, format: .raw, transport: transport, seed: 0x1234_5678)
    }

    static func writeQcow2(_ vmm: GuestVMM, _ transport: VirtioTransport) throws {
        let images = try ScratchImages()
        let image = images.path("empty.qcow2")
        try images.qemuImg(["create", "-f", "qcow2", image, "4M"])
        try expectWrite(vmm, images, image: image, format: .qcow2, transport: transport, seed: 7)
    }

    static func writeBackingFile(_ vmm: GuestVMM, _ transport: VirtioTransport) throws {
        let images = try ScratchImages()
        let (overlay, backing) = try makeOverlay(images, seed: 8)
        let backingBefore = try Data(contentsOf: URL(fileURLWithPath: backing))
        try expectWrite(vmm, images, image: overlay, format: .qcow2, transport: transport, seed: 0xFFFF_FFFF)
        #expect(try Data(contentsOf: URL(fileURLWithPath: backing)) == backingBefore, "the backing file changed")
    }

    static func writeCompressed(_ vmm: GuestVMM, _ transport: VirtioTransport) throws {
        let images = try ScratchImages()
        let image = try makeCompressed(images, seed: 9)
        try expectWrite(vmm, images, image: image, format: .qcow2, transport: transport, seed: 0)
    }

    /// A read-only disk: the guest refuses the write job (VIRTIO_BLK_F_RO) and the image
    /// stays as it was.
    static func readOnly(_ vmm: GuestVMM, _ transport: VirtioTransport) throws {
        let images = try ScratchImages()
        var bytes = ReproducibleBytes(seed: 10)
        let content = bytes.random(1 << 20)
        let image = try images.raw("ro.raw", content)
        let result = try vmm.run(job: "write 1", image: image, format: .raw, transport: transport, readOnly: true)
        #expect(result.status == 3)
        #expect(result.stdout.contains("the device is read-only (VIRTIO_BLK_F_RO)"), "guest output: \(result.stdout)")
        #expect(Array(try Data(contentsOf: URL(fileURLWithPath: image))) == content)
    }

    /// The bench jobs run for the time asked and report what they did; returns the TSC line
    /// of the last one.
    @discardableResult
    static func bench(_ vmm: GuestVMM, _ transport: VirtioTransport) throws -> (mhz: Double, source: String)? {
        let images = try ScratchImages()
        let image = try images.raw("bench.raw", [UInt8](repeating: 0, count: 4 << 20))
        var tsc: (mhz: Double, source: String)?
        for (job, depth, size) in [("seqread", 8, 65536), ("randread", 4, 4096), ("seqwrite", 8, 65536)] {
            let result = try vmm.run(job: "bench \(job) \(depth) 1", image: image, format: .raw, transport: transport)
            #expect(result.status == 1, "guest output: \(result.stdout)\(result.stderr)")
            let line = try #require(GuestBenchLine(result.stdout), "guest output: \(result.stdout)")
            #expect(line.kind == job && line.depth == depth && line.requestBytes == size)
            #expect(line.requests > depth && line.bytes == line.requests * size)
            // Time-based: no new request after 1 s, the last ones done soon after.
            #expect(line.micros >= 1_000_000 && line.micros < 3_000_000, "\(line.micros) us")
            #expect((line.flushMicros != nil) == (job == "seqwrite"))
            tsc = guestTSCLine(result.stdout)
            #expect(tsc != nil, "guest output: \(result.stdout)")
        }
        // seqwrite wrote its pattern over the whole 4 MiB disk (it wraps around).
        #expect(try images.contents(image, format: .raw).allSatisfy { $0 == 0 } == false)
        return tsc
    }

    /// VIRTIO_BLK_T_GET_ID returns the serial, NUL-padded to 20 bytes.
    static func serial(_ vmm: GuestVMM, _ transport: VirtioTransport) throws {
        let images = try ScratchImages()
        let image = try images.raw("id.raw", [UInt8](repeating: 0, count: 1 << 20))
        let result = try vmm.run(job: "id", image: image, format: .raw, transport: transport, serial: "swiftlet-disk-7")
        #expect(result.status == 1, "guest output: \(result.stdout)\(result.stderr)")
        #expect(result.stdout.contains("serial: \"swiftlet-disk-7\"\n"), "guest output: \(result.stdout)")
    }
}

// MARK: - The suites

@Suite("virtio-blk guest: what it computes")
struct VirtioBlockGuestReferenceTests {
    @Test("CRC-32 is zlib's (the standard check value of \"123456789\")")
    func crcCheckValue() {
        #expect(ZlibCRC32.checksum(Array("123456789".utf8)) == 0xCBF4_3926)
        #expect(ZlibCRC32.checksum([]) == 0)
    }

    @Test("The write pattern starts as guests/README.md says")
    func patternValues() {
        func words(_ seed: UInt32, _ sector: UInt64) -> [UInt32] {
            let bytes = GuestWritePattern.sector(seed: seed, sector: sector)
            return (0..<4).map { i in (0..<4).reduce(UInt32(0)) { $0 | UInt32(bytes[i * 4 + $1]) << (8 * $1) } }
        }
        #expect(words(0x1234_5678, 0) == [0x8798_5AA5, 0x155B_24A3, 0x4820_F4C4, 0x81B3_AC98])
        #expect(words(0x1234_5678, 1) == [0xD694_1CBC, 0xF575_719D, 0x3399_7BFE, 0x8030_042D])
        #expect(words(0, 0) == [0x510C_4619, 0xE02E_553E, 0x7BB9_8F3A, 0x0183_A8B5]) // x = 0: 0x9E3779B9
    }

    @Test("The guest is built with both boot headers")
    func headers() throws {
        let bytes = Array(try Data(contentsOf: URL(fileURLWithPath: VirtioBlockGuest.kernel)))
        #expect(bytes.starts(with: [0x7F, 0x45, 0x4C, 0x46, 1])) // ELF32: what Multiboot loaders take
        let magic: [UInt8] = [0x02, 0xB0, 0xAD, 0x1B]                 // 0x1BADB002, little-endian
        let header = (0..<min(8192, bytes.count) - 4).first { $0 % 4 == 0 && Array(bytes[$0..<$0 + 4]) == magic }
        #expect(header != nil, "no Multiboot header in the first 8 KiB")
        let note: [UInt8] = [4, 0, 0, 0, 4, 0, 0, 0, 18, 0, 0, 0] + Array("Xen\0".utf8)
        #expect(bytes.firstRange(of: note) != nil, "no XEN_ELFNOTE_PHYS32_ENTRY note")
        let pvh = Array(try Data(contentsOf: URL(fileURLWithPath: VirtioBlockGuest.pvhKernel)))
        #expect(pvh.firstRange(of: magic) == nil, "virtio-blk-pvh.elf must not have a Multiboot header")
        #expect(pvh.firstRange(of: note) != nil)
    }
}

@Suite("virtio-blk guest under QEMU", .enabled(if: VirtioBlockGuest.qemuAvailable, "needs qemu-system-x86_64, qemu-img, qemu-io and /dev/kvm"))
struct VirtioBlockGuestQEMUTests {
    @Test("crc of an 8 MiB raw image", arguments: VirtioTransport.allCases)
    func crcRaw(transport: VirtioTransport) throws { try VirtioBlockScenario.crcRaw(.qemu, transport) }

    @Test("crc of a raw image whose size is no multiple of the request size", arguments: VirtioTransport.allCases)
    func crcOddSize(transport: VirtioTransport) throws { try VirtioBlockScenario.crcOddSize(.qemu, transport) }

    @Test("crc of a qcow2 image", arguments: VirtioTransport.allCases)
    func crcQcow2(transport: VirtioTransport) throws { try VirtioBlockScenario.crcQcow2(.qemu, transport) }

    @Test("crc of a qcow2 overlay over a shorter backing file", arguments: VirtioTransport.allCases)
    func crcBackingFile(transport: VirtioTransport) throws { try VirtioBlockScenario.crcBackingFile(.qemu, transport) }

    @Test("crc of a qcow2 image with compressed clusters", arguments: VirtioTransport.allCases)
    func crcCompressed(transport: VirtioTransport) throws { try VirtioBlockScenario.crcCompressed(.qemu, transport) }

    @Test("write SEED on a raw image", arguments: VirtioTransport.allCases)
    func writeRaw(transport: VirtioTransport) throws { try VirtioBlockScenario.writeRaw(.qemu, transport) }

    @Test("write SEED on an empty qcow2 image", arguments: VirtioTransport.allCases)
    func writeQcow2(transport: VirtioTransport) throws { try VirtioBlockScenario.writeQcow2(.qemu, transport) }

    @Test("write SEED on a qcow2 overlay leaves its backing file alone", arguments: VirtioTransport.allCases)
    func writeBackingFile(transport: VirtioTransport) throws { try VirtioBlockScenario.writeBackingFile(.qemu, transport) }

    @Test("write SEED over compressed clusters", arguments: VirtioTransport.allCases)
    func writeCompressed(transport: VirtioTransport) throws { try VirtioBlockScenario.writeCompressed(.qemu, transport) }

    @Test("A read-only disk refuses the write job", arguments: VirtioTransport.allCases)
    func readOnly(transport: VirtioTransport) throws { try VirtioBlockScenario.readOnly(.qemu, transport) }

    @Test("id prints the serial", arguments: VirtioTransport.allCases)
    func serial(transport: VirtioTransport) throws { try VirtioBlockScenario.serial(.qemu, transport) }

    @Test("PVH entry on microvm: QEMU puts virtio_mmio.device= on the command line itself")
    func pvhEntry() throws {
        let images = try ScratchImages()
        var bytes = ReproducibleBytes(seed: 11)
        let content = bytes.random(1 << 20)
        let image = try images.raw("pvh.raw", content)
        let result = try runQEMU(machine: .microvm, kernel: VirtioBlockGuest.pvhKernel,
                                 drive: "file=\(image),format=raw,if=none,id=disk0", device: "virtio-blk-device,drive=disk0",
                                 cmdline: "crc", autoCommandLine: true)
        #expect(result.status == 1, "guest output: \(result.stdout)\(result.stderr)")
        #expect(result.stdout.contains("booted by PVH"))
        #expect(result.stdout.contains("command line \"crc virtio_mmio.device=512@0xfeb00e00:12\""), "guest output: \(result.stdout)")
        #expect(guestCRCLine(result.stdout)?.crc == ZlibCRC32.checksum(content))
    }

    @Test("virtio-pci without firmware: the guest places the BARs from 0xE0000000")
    func barsPlacedByGuest() throws {
        let images = try ScratchImages()
        var bytes = ReproducibleBytes(seed: 13)
        let content = bytes.random(1 << 20)
        let image = try images.raw("qboot.raw", content)
        let result = try runQEMU(machine: .pc, kernel: VirtioBlockGuest.kernel,
                                 drive: "file=\(image),format=raw,if=none,id=disk0",
                                 device: "virtio-blk-pci,drive=disk0,disable-legacy=on", cmdline: "crc")
        #expect(result.status == 1, "guest output: \(result.stdout)\(result.stderr)")
        #expect(result.stdout.contains("BAR4 at 0xe0004000 (placed here: it was unassigned)"), "guest output: \(result.stdout)")
        #expect(guestCRCLine(result.stdout)?.crc == ZlibCRC32.checksum(content))
    }

    @Test("virtio-pci with SeaBIOS: the driver keeps the firmware's BARs")
    func barsPlacedByFirmware() throws {
        let images = try ScratchImages()
        var bytes = ReproducibleBytes(seed: 14)
        let content = bytes.random(1 << 20)
        let image = try images.raw("seabios.raw", content)
        let result = try runQEMU(machine: .pcSeaBIOS, kernel: VirtioBlockGuest.kernel,
                                 drive: "file=\(image),format=raw,if=none,id=disk0",
                                 device: "virtio-blk-pci,drive=disk0,disable-legacy=on", cmdline: "crc")
        #expect(result.status == 1, "guest output: \(result.stdout)\(result.stderr)")
        #expect(result.stdout.contains("(placed by firmware)"), "guest output: \(result.stdout)")
        #expect(guestCRCLine(result.stdout)?.crc == ZlibCRC32.checksum(content))
    }

    @Test("virtio-pci: a transitional device (1af4:1001) on q35, BARs moved by pci.bar=")
    func transitionalDeviceMovedBARs() throws {
        let images = try ScratchImages()
        var bytes = ReproducibleBytes(seed: 12)
        let content = bytes.random(1 << 20)
        let image = try images.raw("q35.raw", content)
        let result = try runQEMU(machine: .q35SeaBIOS, kernel: VirtioBlockGuest.kernel,
                                 drive: "file=\(image),format=raw,if=none,id=disk0", device: "virtio-blk-pci,drive=disk0",
                                 cmdline: "crc pci.bar=0xd0000000")
        #expect(result.status == 1, "guest output: \(result.stdout)\(result.stderr)")
        #expect(result.stdout.contains("1af4:1001"), "guest output: \(result.stdout)")
        #expect(result.stdout.contains("at 0xd0004000 (placed here: pci.bar)"), "guest output: \(result.stdout)")
        #expect(result.stdout.contains("MSI-X with 2 vectors left disabled"))
        #expect(guestCRCLine(result.stdout)?.crc == ZlibCRC32.checksum(content))
    }

    @Test("bench jobs; without CPUID 0x40000010 the guest calibrates its TSC against the PIT",
          arguments: VirtioTransport.allCases)
    func bench(transport: VirtioTransport) throws {
        let tsc = try #require(try VirtioBlockScenario.bench(.qemu, transport))
        #expect(tsc.source == "calibrated against the PIT")
        // Against the frequency KVM gives Swiftlet's guests (the same host TSC), within 1%.
        if VirtioBlockGuest.swiftletHasDisk {
            let images = try ScratchImages()
            let image = try images.raw("tsc.raw", [UInt8](repeating: 0, count: 1 << 20))
            let result = try GuestVMM.swiftlet.run(job: "bench randread 1 1", image: image, format: .raw, transport: transport)
            if let reference = guestTSCLine(result.stdout), reference.source == "CPUID 0x40000010" {
                #expect(abs(tsc.mhz - reference.mhz) < reference.mhz / 100, "PIT \(tsc.mhz) MHz, CPUID \(reference.mhz) MHz")
            }
        }
    }

    @Test("No disk: one error line and status 3")
    func noDevice() throws {
        let result = try runHostTool(VirtioBlockGuest.qemu!, ["-accel", "kvm", "-M", "microvm,acpi=off", "-m", "64M", "-nodefaults",
                                                          "-no-user-config", "-display", "none", "-serial", "stdio",
                                                          "-device", "isa-debug-exit,iobase=0xf4,iosize=0x04",
                                                          "-kernel", VirtioBlockGuest.kernel, "-append", "crc"])
        #expect(result.status == 3)
        #expect(result.stdout.contains("virtio-blk: error: no virtio block device found"), "guest output: \(result.stdout)")
    }
}

@Suite("virtio-blk guest under Swiftlet", .enabled(if: VirtioBlockGuest.swiftletHasDisk, "swiftlet run has no --disk yet"),
       .enabled(if: VirtioBlockGuest.qemuImg != nil && VirtioBlockGuest.qemuIO != nil, "needs qemu-img and qemu-io"))
struct VirtioBlockGuestSwiftletTests {
    @Test("crc of an 8 MiB raw image", arguments: VirtioTransport.allCases)
    func crcRaw(transport: VirtioTransport) throws { try VirtioBlockScenario.crcRaw(.swiftlet, transport) }

    @Test("crc of a raw image whose size is no multiple of the request size", arguments: VirtioTransport.allCases)
    func crcOddSize(transport: VirtioTransport) throws { try VirtioBlockScenario.crcOddSize(.swiftlet, transport) }

    @Test("crc of a qcow2 image", arguments: VirtioTransport.allCases)
    func crcQcow2(transport: VirtioTransport) throws { try VirtioBlockScenario.crcQcow2(.swiftlet, transport) }

    @Test("crc of a qcow2 overlay over a shorter backing file", arguments: VirtioTransport.allCases)
    func crcBackingFile(transport: VirtioTransport) throws { try VirtioBlockScenario.crcBackingFile(.swiftlet, transport) }

    @Test("crc of a qcow2 image with compressed clusters", arguments: VirtioTransport.allCases)
    func crcCompressed(transport: VirtioTransport) throws { try VirtioBlockScenario.crcCompressed(.swiftlet, transport) }

    @Test("write SEED on a raw image", arguments: VirtioTransport.allCases)
    func writeRaw(transport: VirtioTransport) throws { try VirtioBlockScenario.writeRaw(.swiftlet, transport) }

    @Test("write SEED on an empty qcow2 image", arguments: VirtioTransport.allCases)
    func writeQcow2(transport: VirtioTransport) throws { try VirtioBlockScenario.writeQcow2(.swiftlet, transport) }

    @Test("write SEED on a qcow2 overlay leaves its backing file alone", arguments: VirtioTransport.allCases)
    func writeBackingFile(transport: VirtioTransport) throws { try VirtioBlockScenario.writeBackingFile(.swiftlet, transport) }

    @Test("write SEED over compressed clusters", arguments: VirtioTransport.allCases)
    func writeCompressed(transport: VirtioTransport) throws { try VirtioBlockScenario.writeCompressed(.swiftlet, transport) }

    @Test("A read-only disk refuses the write job", arguments: VirtioTransport.allCases)
    func readOnly(transport: VirtioTransport) throws { try VirtioBlockScenario.readOnly(.swiftlet, transport) }

    @Test("id prints the serial", arguments: VirtioTransport.allCases)
    func serial(transport: VirtioTransport) throws { try VirtioBlockScenario.serial(.swiftlet, transport) }

    @Test("bench jobs, timed with the TSC frequency from CPUID 0x40000010", arguments: VirtioTransport.allCases)
    func bench(transport: VirtioTransport) throws {
        let tsc = try #require(try VirtioBlockScenario.bench(.swiftlet, transport))
        // Swiftlet fills the leaf when KVM knows the TSC rate (KVM_GET_TSC_KHZ), which it
        // does on any host with a constant TSC.
        #expect(tsc.source == "CPUID 0x40000010")
    }

    @Test("bench with a wrong kind, depth or time: one error line and status 3", arguments: [
        ("bench", "bench needs a KIND"), ("bench copy", "bench needs a KIND"),
        ("bench randread 33", "DEPTH \"33\" must be a number from 1 to 32"),
        ("bench randread 0", "DEPTH \"0\" must be"), ("bench seqread 8 0", "SECONDS \"0\" must be"),
        ("bench seqread 8 1 2", "bench needs a KIND"),
    ])
    func benchArguments(cmdline: String, message: String) throws {
        let images = try ScratchImages()
        let image = try images.raw("args.raw", [UInt8](repeating: 0, count: 1 << 20))
        let result = try GuestVMM.swiftlet.run(job: cmdline, image: image, format: .raw, transport: .pci)
        #expect(result.status == 3)
        #expect(result.stdout.contains("virtio-blk: error: bench"), "guest output: \(result.stdout)")
        #expect(result.stdout.contains(message), "guest output: \(result.stdout)")
    }

    /// A kernel entered through PVH may be Linux, which finds virtio-mmio devices in the
    /// ACPI DSDT; with `acpi=off` (QEMU's microvm does the same with its acpi=off) Swiftlet
    /// names them on the command line instead.
    @Test("PVH entry with acpi=off: Swiftlet names the virtio-mmio device on the command line, as QEMU does")
    func pvhEntry() throws {
        let images = try ScratchImages()
        var bytes = ReproducibleBytes(seed: 15)
        let content = bytes.random(1 << 20)
        let image = try images.raw("pvh.raw", content)
        let result = try Swiftlet.run(["run", "--kernel", VirtioBlockGuest.pvhKernel, "--disk", "\(image),format=raw",
                                       "--virtio-transport", "mmio", "--memory", "64M", "--timeout", "120",
                                       "--cmdline", "crc acpi=off"])
        #expect(result.status == 1, "guest output: \(result.stdout)\(result.stderr)")
        #expect(result.stdout.contains("booted by PVH"))
        #expect(result.stdout.contains("virtio_mmio.device="), "guest output: \(result.stdout)")
        #expect(guestCRCLine(result.stdout)?.crc == ZlibCRC32.checksum(content))
    }
}
