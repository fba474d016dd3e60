@testable import DiskImage
import Foundation
import Testing

/// Image locks as QEMU takes them (OFD locks on bytes 100+ and 200+), within one process and
/// against real `qemu-io`/`qemu-img`, and `convert` refusing to overwrite what it reads.
@Suite("Image locks and same-file conversion")
struct LockTests {
    static func image(in dir: Support.TempDir, _ name: String = "disk.qcow2") throws -> String {
        let path = dir.file(name)
        try Support.copy(Support.fixture("v3-c64k.qcow2"), to: path)
        return path
    }

    static func inUse(_ path: String, _ reason: String) -> DiskImageError {
        .imageInUse(path: path, reason: reason)
    }

    @Test("two opens in one process: readers share, a writer excludes readers and writers")
    func inOneProcess() throws {
        let dir = try Support.TempDir()
        let path = try Self.image(in: dir)
        do {
            let a = try DiskImage.open(path: path)
            let b = try DiskImage.open(path: path)
            #expect(a.virtualSize == b.virtualSize)
            #expect(throws: Self.inUse(path, "does not let others write to it")) {
                _ = try DiskImage.open(path: path, readOnly: false)
            }
        }
        do {
            let w = try Support.open(path, readOnly: false)
            #expect(!w.isReadOnly)
            #expect(throws: Self.inUse(path, "is writing to it")) { _ = try DiskImage.open(path: path) }
            #expect(throws: Self.inUse(path, "does not let others write to it")) {
                _ = try DiskImage.open(path: path, readOnly: false)
            }
        }
        // Closing drops the locks.
        _ = try Support.open(path, readOnly: false)
        _ = try Support.open(path, readOnly: false)
    }

    @Test("a backing file in use by an open overlay cannot be opened for writing")
    func backingLocked() throws {
        let dir = try WriteTests.workspace()
        let top = try DiskImage.open(path: dir.file("top.qcow2"), readOnly: false)
        #expect(!top.isReadOnly)
        #expect(throws: Self.inUse(dir.file("base.raw"), "does not let others write to it")) {
            _ = try DiskImage.open(path: dir.file("base.raw"), readOnly: false)
        }
        _ = try DiskImage.open(path: dir.file("base.raw"))  // Reading it too is fine.
    }

    /// Runs `qemu-io` holding `path` (read-only with `-r`) until it is killed; waits for its locks.
    static func qemuHolding(_ path: String, readOnly: Bool) throws -> Process {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: "/usr/bin/qemu-io")
        p.arguments = (readOnly ? ["-r"] : []) + ["-f", "qcow2", "-c", "sleep 60000", path]
        p.standardOutput = FileHandle.nullDevice
        p.standardError = FileHandle.nullDevice
        try p.run()
        var st = stat()
        #expect(stat(path, &st) == 0)
        let needle = ":\(st.st_ino) "
        for _ in 0..<500 {
            if let locks = try? String(contentsOfFile: "/proc/locks", encoding: .utf8),
               locks.split(separator: "\n").contains(where: { $0.contains(needle) && $0.contains(" 100 ") }) { return p }
            usleep(20_000)
        }
        Issue.record("qemu-io did not lock \(path)")
        return p
    }

    static func stop(_ p: Process) {
        kill(p.processIdentifier, SIGKILL)
        p.waitUntilExit()
    }

    @Test("an image qemu-io writes is neither read nor written by Swiftlet; one it reads is not written",
          .enabled(if: Support.hasQemuImg, Comment(rawValue: Support.noQemu)))
    func qemuHoldsIt() throws {
        let dir = try Support.TempDir()
        let path = try Self.image(in: dir)
        let writer = try Self.qemuHolding(path, readOnly: false)
        #expect(throws: Self.inUse(path, "is writing to it")) { _ = try DiskImage.open(path: path) }
        #expect(throws: Self.inUse(path, "does not let others write to it")) { _ = try DiskImage.open(path: path, readOnly: false) }
        #expect(throws: Self.inUse(path, "does not let others write to it")) {
            try RawConverter.convert(try DiskImage.open(path: Support.fixture("base.raw")), to: path)
        }
        Self.stop(writer)

        let reader = try Self.qemuHolding(path, readOnly: true)
        do {
            let dev = try DiskImage.open(path: path)
            #expect(try Support.readAll(dev) == (try Support.qemuRaw(Support.fixture("v3-c64k.qcow2"), in: dir)))
        }
        #expect(throws: Self.inUse(path, "does not let others write to it")) { _ = try DiskImage.open(path: path, readOnly: false) }
        Self.stop(reader)
        _ = try Support.open(path, readOnly: false)
    }

    @Test("qemu-img and qemu-io respect Swiftlet's locks",
          .enabled(if: Support.hasQemuImg, Comment(rawValue: Support.noQemu)))
    func swiftletHoldsIt() throws {
        let dir = try Support.TempDir()
        let path = try Self.image(in: dir)
        do {
            let writer = try DiskImage.open(path: path, readOnly: false)
            #expect(!writer.isReadOnly)
            let info = try Support.qemuExpectingLockConflict("qemu-img", "info", path)
            #expect(info.status != 0)
            #expect(info.stderr.contains("Failed to get shared \"write\" lock"), "\(info.stderr)")
            let write = try Support.qemuExpectingLockConflict("qemu-io", "-f", "qcow2", "-c", "write 0 512", path)
            #expect(write.stderr.contains("Failed to get \"write\" lock"), "\(write.stderr)")
        }
        do {
            let reader = try Support.open(path)
            #expect(reader.isReadOnly)
            #expect(try Support.qemuImg("info", path).status == 0)
            #expect(try Support.qemuImg("convert", "-O", "raw", path, dir.file("copy.raw")).status == 0)
            let write = try Support.qemuExpectingLockConflict("qemu-io", "-f", "qcow2", "-c", "write 0 512", path)
            #expect(write.stderr.contains("Failed to get \"write\" lock"), "\(write.stderr)")
            let onto = try Support.qemuExpectingLockConflict("qemu-img", "convert", "-O", "qcow2", Support.fixture("base.raw"), path)
            #expect(onto.status != 0, "qemu-img convert overwrote an image Swiftlet reads")
        }
        #expect(try Support.qemuImg("check", path).status == 0)
    }

    /// Names under which `convert` would write the file it reads.
    static let sameFileNames = ["the same path", "a hard link", "a symbolic link", "a /proc/self/fd path",
                                "the source's backing file"]

    @Test("convert refuses to write the file it reads, under any name", arguments: sameFileNames)
    func convertOntoItself(_ how: String) throws {
        let dir = try WriteTests.workspace()
        var source = dir.file("v3-c64k.qcow2")
        var target = source
        var keep: Int32 = -1
        defer { if keep >= 0 { close(keep) } }
        switch how {
        case "a hard link":
            target = dir.file("link.qcow2")
            #expect(link(source, target) == 0)
        case "a symbolic link":
            target = dir.file("symlink.raw")
            #expect(symlink(source, target) == 0)
        case "a /proc/self/fd path":
            keep = open(source, O_RDONLY)
            target = "/proc/self/fd/\(keep)"
        case "the source's backing file":
            source = dir.file("top.qcow2")
            target = dir.file("mid.qcow2")
        default:
            break
        }
        let before = try Support.readFile(target)
        let expectedSource = how == "the source's backing file" ? dir.file("mid.qcow2") : source
        #expect(throws: DiskImageError.sameFile(source: expectedSource, destination: target)) {
            try RawConverter.convert(try DiskImage.open(path: source), to: target)
        }
        #expect(try Support.readFile(target) == before)
        #expect(try DiskImage.open(path: source).virtualSize > 0)
    }
}
