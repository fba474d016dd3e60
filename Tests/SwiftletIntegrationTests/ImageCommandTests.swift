import Foundation
import Testing

/// `swiftlet image resize|snapshot|rebase|compare|map` as a user runs them, next to `qemu-img`.
@Suite("swiftlet image subcommands like qemu-img's")
struct ImageCommandTests {
    static let fixtures = Swiftlet.packageRoot.appendingPathComponent("Tests/DiskImageTests/Fixtures").path
    static let qemuImg = ["/usr/bin/qemu-img", "/usr/local/bin/qemu-img"].first { FileManager.default.isExecutableFile(atPath: $0) }
    static let noQemu = Comment(rawValue: "qemu-img is not installed (apt-get install qemu-utils)")

    /// A scratch folder holding copies of the fixtures.
    static func workspace() throws -> URL {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("swiftlet-image-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        for name in try FileManager.default.contentsOfDirectory(atPath: fixtures) where !name.hasSuffix(".sh") {
            try FileManager.default.copyItem(atPath: fixtures + "/" + name, toPath: dir.appendingPathComponent(name).path)
        }
        return dir
    }

    static func qemu(_ args: [String]) throws -> (status: Int32, stdout: String) {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: qemuImg!)
        p.arguments = args
        let out = Pipe()
        p.standardOutput = out
        p.standardError = FileHandle.nullDevice
        try p.run()
        let data = out.fileHandleForReading.readDataToEndOfFile()
        p.waitUntilExit()
        return (p.terminationStatus, String(decoding: data, as: UTF8.self))
    }

    @Test("map prints what qemu-img map prints", .enabled(if: qemuImg != nil, noQemu))
    func map() throws {
        let top = Self.fixtures + "/top.qcow2"
        for format in ["json", "human"] {
            let ours = try Swiftlet.run(["image", "map", "--output=\(format)", top])
            #expect(ours.status == 0)
            #expect(ours.stdout == (try Self.qemu(["map", "--output=\(format)", top]).stdout))
        }
        let compressed = try Swiftlet.run(["image", "map", Self.fixtures + "/comp-zlib-c16k.qcow2"])
        #expect(compressed.status == 1)
        #expect(compressed.stderr.hasPrefix("swiftlet: File contains external, encrypted or compressed clusters"))
    }

    @Test("compare: 0 identical, 1 different with the offset, 2 for an image that cannot be opened",
          .enabled(if: qemuImg != nil, noQemu))
    func compare() throws {
        let dir = try Self.workspace()
        defer { try? FileManager.default.removeItem(at: dir) }
        let mid = dir.appendingPathComponent("mid.qcow2").path, raw = dir.appendingPathComponent("mid.raw").path
        #expect(try Self.qemu(["convert", "-O", "raw", mid, raw]).status == 0)
        let same = try Swiftlet.run(["image", "compare", mid, raw])
        #expect(same.status == 0 && same.stdout == "Images are identical.\n")
        let h = try FileHandle(forUpdating: URL(fileURLWithPath: raw))
        try h.seek(toOffset: 700_000)
        h.write(Data([0xff]))
        try h.close()
        let differ = try Swiftlet.run(["image", "compare", mid, raw])
        #expect(differ.status == 1 && differ.stdout == "Content mismatch at offset 699904!\n")
        #expect(try Self.qemu(["compare", mid, raw]).stdout == differ.stdout)
        let missing = try Swiftlet.run(["image", "compare", mid, dir.appendingPathComponent("none").path])
        #expect(missing.status == 2 && missing.stderr.split(separator: "\n").count == 1)
    }

    @Test("resize needs --shrink to shrink, takes -SIZE without '--', and says 'Image resized.'",
          .enabled(if: qemuImg != nil, noQemu))
    func resize() throws {
        let dir = try Self.workspace()
        defer { try? FileManager.default.removeItem(at: dir) }
        let image = dir.appendingPathComponent("v3-c64k.qcow2").path
        let refused = try Swiftlet.run(["image", "resize", image, "-1M"])
        #expect(refused.status == 1)
        #expect(refused.stderr.hasPrefix("swiftlet: ") && refused.stderr.contains("--shrink"))
        #expect(refused.stderr.split(separator: "\n").count == 1)
        let shrunk = try Swiftlet.run(["image", "resize", "--shrink", image, "-1M"])
        #expect(shrunk.status == 0 && shrunk.stdout == "Image resized.\n")
        #expect(try Self.qemu(["info", "--output=json", image]).stdout.contains("\"virtual-size\": 3145728,"))
        #expect(try Self.qemu(["check", image]).status == 0)
        let bad = try Swiftlet.run(["image", "resize", image, "12X"])
        #expect(bad.status == 1 && bad.stderr.contains("is not a size"))
    }

    @Test("snapshot -c then qemu-img lists it; -l prints qemu-img's list", .enabled(if: qemuImg != nil, noQemu))
    func snapshot() throws {
        let dir = try Self.workspace()
        defer { try? FileManager.default.removeItem(at: dir) }
        let image = dir.appendingPathComponent("snapshots.qcow2").path
        #expect(try Swiftlet.run(["image", "snapshot", "-c", "third", image]).status == 0)
        let theirs = try Self.qemu(["snapshot", "-l", image]).stdout
        #expect(theirs.contains(" third "))
        #expect(try Swiftlet.run(["image", "snapshot", "-l", image]).stdout == theirs)
        #expect(try Swiftlet.run(["image", "snapshot", "-a", "first", "-d", "second", image]).status == 2)
        let missing = try Swiftlet.run(["image", "snapshot", "-d", "nope", image])
        #expect(missing.status == 1 && missing.stderr == "swiftlet: qcow2: no snapshot named 'nope'\n")
        #expect(try Swiftlet.run(["image", "snapshot", "-d", "third", image]).status == 0)
        #expect(try Self.qemu(["check", image]).status == 0)
    }

    @Test("rebase -b \"\" keeps the contents and drops the backing file", .enabled(if: qemuImg != nil, noQemu))
    func rebase() throws {
        let dir = try Self.workspace()
        defer { try? FileManager.default.removeItem(at: dir) }
        let top = dir.appendingPathComponent("top.qcow2").path
        let noFormat = try Swiftlet.run(["image", "rebase", "-b", "base.raw", top])
        #expect(noFormat.status == 1 && noFormat.stderr.contains("-F"))
        let result = try Swiftlet.run(["image", "rebase", "-b", "", top])
        #expect(result.status == 0)
        #expect(try Self.qemu(["compare", top, Self.fixtures + "/top.qcow2"]).status == 0)
        #expect(!(try Self.qemu(["info", top]).stdout.contains("backing file")))
    }

    @Test("each new subcommand's --help explains it with an example",
          arguments: ["resize", "snapshot", "rebase", "compare", "map"])
    func help(_ name: String) throws {
        let result = try Swiftlet.run(["image", name, "--help"])
        #expect(result.status == 0)
        #expect(result.stdout.contains("qemu-img"))
        #expect(result.stdout.contains("Example"))
        #expect(result.stdout.contains("swiftlet image \(name) "))
    }
}
