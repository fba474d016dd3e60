import DiskImage
import Foundation
import Testing

/// Paths, temporary folders and the real `qemu-img`, shared by the DiskImage tests.
enum Support {
    static let fixtures: String = {
        let here = URL(fileURLWithPath: #filePath).deletingLastPathComponent()
        return here.appendingPathComponent("Fixtures").path
    }()

    /// All committed qcow2 fixtures, sorted by name.
    static let qcow2Fixtures: [String] = {
        let names = (try? FileManager.default.contentsOfDirectory(atPath: fixtures)) ?? []
        return names.filter { $0.hasSuffix(".qcow2") }.sorted()
    }()

    static func fixture(_ name: String) -> String { fixtures + "/" + name }

    /// Where `qemu-img` is, if installed.
    static let qemuImgPath: String? = {
        let dirs = (ProcessInfo.processInfo.environment["PATH"] ?? "/usr/bin:/bin").split(separator: ":")
        for d in dirs + ["/usr/bin", "/usr/local/bin"] {
            let p = "\(d)/qemu-img"
            if FileManager.default.isExecutableFile(atPath: p) { return p }
        }
        return nil
    }()

    static var hasQemuImg: Bool { qemuImgPath != nil }
    static let noQemu = "qemu-img is not installed (apt-get install qemu-utils); cross-checks against QEMU cannot run"

    /// A fresh temporary folder, removed when the returned object is released.
    final class TempDir: Sendable {
        let path: String
        init() throws {
            var template = Array((NSTemporaryDirectory() + "/swiftlet-disk-XXXXXX").utf8CString)
            guard let p = template.withUnsafeMutableBufferPointer({ mkdtemp($0.baseAddress!) }) else {
                throw DiskImageError.invalidArgument("mkdtemp failed")
            }
            path = String(cString: p)
        }
        deinit { try? FileManager.default.removeItem(atPath: path) }
        func file(_ name: String) -> String { path + "/" + name }
    }

    struct Run {
        var status: Int32
        var stdout: String
        var stderr: String
    }

    /// Runs a program and waits for it. A qemu-img or qemu-io that fails on an image lock is
    /// run again (for up to 2 s) unless `lockConflictExpected`: see `open`.
    @discardableResult
    static func run(_ program: String, _ args: [String], cwd: String? = nil, lockConflictExpected: Bool = false) throws -> Run {
        var attempts = 0
        while true {
            let r = try runOnce(program, args, cwd: cwd)
            attempts += 1
            guard !lockConflictExpected, r.status != 0, r.stderr.contains("Failed to get"), r.stderr.contains("lock"),
                  attempts < 200 else { return r }
            usleep(10_000)
        }
    }

    /// `DiskImage.open`, waiting (for up to 2 s) for a lock that outlives a close in this process.
    ///
    /// Tests run in parallel in one process, and a child process that another test is starting
    /// holds copies of all our descriptors from its fork until its exec closes them; with them,
    /// the open file description locks of an image this test has just closed live on for that
    /// moment. Only a test process that starts children from many threads sees this.
    static func open(_ path: String, readOnly: Bool = true, snapshot: String? = nil) throws -> any BlockDevice {
        var attempts = 0
        while true {
            do {
                return try DiskImage.open(path: path, readOnly: readOnly, snapshot: snapshot)
            } catch DiskImageError.imageInUse where attempts < 200 {
                attempts += 1
                usleep(10_000)
            }
        }
    }

    static func runOnce(_ program: String, _ args: [String], cwd: String? = nil) throws -> Run {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: program)
        p.arguments = args
        if let cwd { p.currentDirectoryURL = URL(fileURLWithPath: cwd) }
        let out = Pipe(), err = Pipe()
        p.standardOutput = out
        p.standardError = err
        try p.run()
        let o = out.fileHandleForReading.readDataToEndOfFile()
        let e = err.fileHandleForReading.readDataToEndOfFile()
        p.waitUntilExit()
        return Run(status: p.terminationStatus, stdout: String(decoding: o, as: UTF8.self),
                   stderr: String(decoding: e, as: UTF8.self))
    }

    @discardableResult
    static func qemuImg(_ args: String...) throws -> Run {
        guard let q = qemuImgPath else { throw DiskImageError.invalidArgument(noQemu) }
        return try run(q, args)
    }

    @discardableResult
    static func qemuIO(_ args: String...) throws -> Run {
        try run("/usr/bin/qemu-io", args)
    }

    /// qemu-img or qemu-io run once, for tests that expect it to fail on a lock.
    @discardableResult
    static func qemuExpectingLockConflict(_ program: String, _ args: String...) throws -> Run {
        try run(program == "qemu-img" ? (qemuImgPath ?? "/usr/bin/qemu-img") : "/usr/bin/qemu-io", args,
                lockConflictExpected: true)
    }

    /// The guest-visible bytes of an image according to QEMU.
    static func qemuRaw(_ path: String, snapshot: String? = nil, in dir: TempDir) throws -> [UInt8] {
        let out = dir.file("qemu-\(UUID().uuidString).raw")
        var args = ["convert", "-O", "raw"]
        if let snapshot { args += ["-l", "snapshot.name=\(snapshot)"] }
        args += [path, out]
        let r = try run(qemuImgPath!, args)
        #expect(r.status == 0, "qemu-img convert failed: \(r.stderr)")
        return [UInt8](try Data(contentsOf: URL(fileURLWithPath: out)))
    }

    /// Every byte of a block device, read in chunks of `chunk` bytes.
    static func readAll(_ dev: any BlockDevice, chunk: Int = 1 << 20) throws -> [UInt8] {
        var all = [UInt8](repeating: 0, count: Int(dev.virtualSize))
        try all.withUnsafeMutableBytes { buf in
            var off = 0
            while off < buf.count {
                let n = min(chunk, buf.count - off)
                try dev.read(into: UnsafeMutableRawBufferPointer(rebasing: buf[off..<(off + n)]), at: UInt64(off))
                off += n
            }
        }
        return all
    }

    static func readFile(_ path: String) throws -> [UInt8] {
        [UInt8](try Data(contentsOf: URL(fileURLWithPath: path)))
    }

    static func copy(_ from: String, to: String) throws {
        try FileManager.default.copyItem(atPath: from, toPath: to)
    }
}

/// A small deterministic pseudo-random generator (SplitMix64), so failures reproduce.
struct SeededRandom: RandomNumberGenerator {
    var state: UInt64
    init(seed: UInt64) { state = seed }
    mutating func next() -> UInt64 {
        state &+= 0x9e37_79b9_7f4a_7c15
        var z = state
        z = (z ^ (z >> 30)) &* 0xbf58_476d_1ce4_e5b9
        z = (z ^ (z >> 27)) &* 0x94d0_49bb_1331_11eb
        return z ^ (z >> 31)
    }
}
