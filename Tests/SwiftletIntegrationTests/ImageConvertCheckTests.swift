import Foundation
import Testing

/// `swiftlet image convert` and `check` through the real binary, next to `qemu-img` on the same files.
@Suite("swiftlet image convert and check")
struct ImageConvertCheckTests {
    static let hasQemuImg = FileManager.default.isExecutableFile(atPath: "/usr/bin/qemu-img")
    static let noQemu = "qemu-img is not installed (apt-get install qemu-utils)"

    /// A scratch folder, removed when released.
    final class Scratch {
        let url = FileManager.default.temporaryDirectory.appendingPathComponent("swiftlet-image-\(UUID().uuidString)")
        init() throws { try FileManager.default.createDirectory(at: url, withIntermediateDirectories: true) }
        deinit { try? FileManager.default.removeItem(at: url) }
        func file(_ name: String) -> String { url.appendingPathComponent(name).path }
    }

    @discardableResult
    static func tool(_ program: String, _ args: [String]) throws -> Swiftlet.Result {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: program)
        p.arguments = args
        let out = Pipe(), err = Pipe()
        p.standardOutput = out
        p.standardError = err
        try p.run()
        let o = out.fileHandleForReading.readDataToEndOfFile()
        let e = err.fileHandleForReading.readDataToEndOfFile()
        p.waitUntilExit()
        return Swiftlet.Result(status: p.terminationStatus, stdout: String(decoding: o, as: UTF8.self),
                               stderr: String(decoding: e, as: UTF8.self))
    }

    /// A 1 MiB qcow2 image (64 KiB clusters: header, refcount table, refcount block, L1, L2, then
    /// data at cluster 5) with one cluster of data, made by qemu-img and qemu-io.
    static func makeImage(_ path: String) throws {
        try tool("/usr/bin/qemu-img", ["create", "-q", "-f", "qcow2", path, "1M"])
        try tool("/usr/bin/qemu-io", ["-f", "qcow2", "-c", "write -P 0x5a 0 64k", path])
    }

    static func patch(_ path: String, at offset: UInt64, _ bytes: [UInt8]) throws {
        let h = try FileHandle(forUpdating: URL(fileURLWithPath: path))
        try h.seek(toOffset: offset)
        try h.write(contentsOf: Data(bytes))
        try h.close()
    }

    @Test("convert X X fails with one line and leaves X as it was",
          .enabled(if: hasQemuImg, Comment(rawValue: noQemu)))
    func convertOntoItself() throws {
        let dir = try Scratch()
        let image = dir.file("disk.qcow2")
        try Self.makeImage(image)
        let before = try Data(contentsOf: URL(fileURLWithPath: image))
        let result = try Swiftlet.run(["image", "convert", image, image])
        #expect(result.status == 1)
        #expect(result.stderr == "swiftlet: \(image): this is the image being converted; writing it would destroy what is being read\n")
        #expect(try Data(contentsOf: URL(fileURLWithPath: image)) == before)
        #expect(try Self.tool("/usr/bin/qemu-img", ["check", image]).status == 0)
    }

    /// Runs convert -p with standard error on a pseudo-terminal and prints what arrived there.
    static let ptyScript = #"""
    import os, pty, subprocess, sys
    master, slave = pty.openpty()
    p = subprocess.Popen(sys.argv[1:], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=slave)
    os.close(slave)
    seen = b""
    while True:
        try:
            chunk = os.read(master, 4096)
        except OSError:
            break
        if not chunk:
            break
        seen += chunk
    p.wait()
    sys.stdout.write(f"status={p.returncode}\n" + seen.decode())
    """#

    @Test("convert -p draws qemu-img's progress line on a terminal, and nothing elsewhere",
          .enabled(if: hasQemuImg, Comment(rawValue: noQemu)))
    func progress() throws {
        let dir = try Scratch()
        let image = dir.file("disk.qcow2")
        try Self.tool("/usr/bin/qemu-img", ["create", "-q", "-f", "qcow2", image, "64M"])
        try Self.tool("/usr/bin/qemu-io", ["-f", "qcow2", "-c", "write -P 1 0 64M", image])
        let onTerminal = try Self.tool("/usr/bin/env", ["python3", "-c", Self.ptyScript, Swiftlet.binary.path,
                                                        "image", "convert", "-p", "--threads", "1", image, dir.file("a.raw")])
        let text = onTerminal.stdout.replacingOccurrences(of: "\r\n", with: "\n")  // The terminal's newline.
        #expect(text.hasPrefix("status=0\n    (0.00/100%)\r"), "\(text.debugDescription)")
        #expect(text.hasSuffix("    (100.00/100%)\r\n"), "\(text.debugDescription)")
        let steps = text.split(separator: "\r").dropFirst().dropLast()
        #expect(steps.count >= 20, "\(steps)")  // 2 MiB chunks of 64 MiB: a line for every few percent.
        let notTerminal = try Swiftlet.run(["image", "convert", "-p", image, dir.file("b.raw")])
        #expect(notTerminal.status == 0)
        #expect(notTerminal.stderr.isEmpty)
        #expect(try Data(contentsOf: URL(fileURLWithPath: dir.file("a.raw"))) == Data(contentsOf: URL(fileURLWithPath: dir.file("b.raw"))))
    }

    @Test("check: the same report and exit status as qemu-img check",
          .enabled(if: hasQemuImg, Comment(rawValue: noQemu)),
          arguments: ["clean", "leak", "corruption", "reserved bits", "raw"])
    func check(_ kind: String) throws {
        let dir = try Scratch()
        var image = dir.file("disk.qcow2")
        let cs: UInt64 = 65536
        try Self.makeImage(image)
        switch kind {
        case "leak":
            try Self.patch(image, at: 6 * cs, [UInt8](repeating: 0, count: Int(cs)))  // Cluster 6: referenced by nothing,
            try Self.patch(image, at: 2 * cs + 12, [0, 1])                             // but with refcount 1.
        case "corruption":
            try Self.patch(image, at: 2 * cs + 10, [0, 0])                             // The data cluster's refcount is 0.
        case "reserved bits":
            try Self.patch(image, at: 4 * cs + 8, [0x02, 0, 0, 0, 0, 0, 0, 0])         // An unallocated entry with bit 57.
        case "raw":
            image = dir.file("disk.raw")
            try Data(count: 4096).write(to: URL(fileURLWithPath: image))
        default:
            break
        }
        let ours = try Swiftlet.run(["image", "check", image])
        let theirs = try Self.tool("/usr/bin/qemu-img", ["check", image])
        #expect(ours.status == theirs.status)
        #expect(ours.status == ["clean": 0, "leak": 3, "corruption": 2, "reserved bits": 2, "raw": 63][kind])
        if kind == "raw" {
            #expect(ours.stderr == "swiftlet: \(image): raw images have no metadata to check\n")
        } else {
            #expect(ours.stdout == theirs.stdout)
            #expect(ours.stderr == theirs.stderr.replacingOccurrences(of: "qemu-img: Check failed\n", with: ""))
        }
    }
}
