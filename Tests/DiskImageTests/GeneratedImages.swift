@testable import DiskImage
import Foundation
import Testing

/// Images made at test time with `qemu-img` and `qemu-io`, for the corners the committed fixtures
/// do not reach: sparse and odd-sized raw files, zero clusters over a backing file, subclusters,
/// metadata preallocation, many L2 tables, compressed clusters next to plain ones, chains.
enum GeneratedImages {
    /// Every image `make` builds, in build order (later ones use earlier ones as backing files).
    static let names = ["sparse.raw", "odd.raw", "b4.raw", "overlay.qcow2", "subclusters.qcow2", "prealloc.qcow2",
                        "falloc.qcow2", "many-l2.qcow2", "many-l2-top.qcow2", "compressed.qcow2", "empty.qcow2",
                        "discarded.qcow2"]

    /// Builds them all in `dir`, next to copies of the committed fixtures.
    static func make(in dir: Support.TempDir) throws {
        for name in try FileManager.default.contentsOfDirectory(atPath: Support.fixtures)
        where name.hasSuffix(".qcow2") || name.hasSuffix(".raw") {
            try Support.copy(Support.fixture(name), to: dir.file(name))
        }
        func img(_ args: String...) throws {
            let r = try Support.run(Support.qemuImgPath!, args, cwd: dir.path)
            #expect(r.status == 0, "qemu-img \(args): \(r.stderr)")
        }
        func io(_ format: String, _ file: String, _ commands: String...) throws {
            var args = ["-f", format]
            for c in commands { args += ["-c", c] }
            let r = try Support.run("/usr/bin/qemu-io", args + [file], cwd: dir.path)
            #expect(r.status == 0, "qemu-io \(commands): \(r.stderr)")
        }
        try img("create", "-q", "-f", "raw", "sparse.raw", "8M")
        try io("raw", "sparse.raw", "write -P 1 1M 64k", "write -P 2 5M 4k")
        var odd = [UInt8](repeating: 0, count: 1001)
        odd[0] = 0x61; odd[1000] = 0x78
        try Data(odd).write(to: URL(fileURLWithPath: dir.file("odd.raw")))
        try img("create", "-q", "-f", "raw", "b4.raw", "4M")
        try io("raw", "b4.raw", "write -P 0x55 0 4M")
        try img("create", "-q", "-f", "qcow2", "-b", "b4.raw", "-F", "raw", "overlay.qcow2", "8M")
        try io("qcow2", "overlay.qcow2", "write -z 64k 64k", "write -P 7 1M 4k", "write -z 5M 64k", "write -P 8 6M 64k")
        try img("create", "-q", "-f", "qcow2", "-o", "extended_l2=on", "-b", "b4.raw", "-F", "raw", "subclusters.qcow2", "4M")
        try io("qcow2", "subclusters.qcow2", "write -P 3 0 64k", "discard 4k 8k", "write -z 128k 2k", "write -P 4 200k 1k",
               "write -z -u 256k 64k")
        try img("create", "-q", "-f", "qcow2", "-o", "preallocation=metadata,cluster_size=4k", "prealloc.qcow2", "2M")
        try io("qcow2", "prealloc.qcow2", "write -P 9 8k 4k", "write -P 9 1M 100k")
        try img("create", "-q", "-f", "qcow2", "-o", "preallocation=falloc,cluster_size=16k", "falloc.qcow2", "1M")
        try io("qcow2", "falloc.qcow2", "write -P 9 8k 4k")
        try img("create", "-q", "-f", "qcow2", "-o", "cluster_size=4k", "many-l2.qcow2", "64M")
        try io("qcow2", "many-l2.qcow2", "write -P 1 0 4k", "write -P 2 2M 8k", "write -P 3 4092k 8k", "write -P 4 63M 1M",
               "write -z 10M 2M")
        try img("create", "-q", "-f", "qcow2", "-o", "cluster_size=16k", "-b", "many-l2.qcow2", "-F", "qcow2",
                "many-l2-top.qcow2", "80M")
        try io("qcow2", "many-l2-top.qcow2", "write -P 5 3M 1M", "write -z 63M 16k")
        var text = [UInt8]()
        var n = 0
        while text.count < 2 << 20 { text += Array("\(n)\n".utf8); n += 1 }
        try Data(text[0..<(2 << 20)]).write(to: URL(fileURLWithPath: dir.file("text.raw")))
        try img("convert", "-q", "-c", "-O", "qcow2", "-f", "raw", "text.raw", "compressed.qcow2")
        try io("qcow2", "compressed.qcow2", "write -P 1 64k 64k")
        try img("create", "-q", "-f", "qcow2", "empty.qcow2", "0")
        try img("create", "-q", "-f", "qcow2", "-b", "b4.raw", "-F", "raw", "discarded.qcow2", "4M")
        try io("qcow2", "discarded.qcow2", "write -P 1 0 64k", "discard 0 64k")
    }

    /// qemu-img's JSON map, without the "compressed" key newer versions print (7.2 does not).
    static func qemuMap(_ path: String, _ extra: [String] = [], cwd: String) throws -> String {
        let r = try Support.run(Support.qemuImgPath!, ["map", "--output=json"] + extra + [path], cwd: cwd)
        #expect(r.status == 0, "\(r.stderr)")
        return r.stdout.replacingOccurrences(of: #", "compressed": (true|false)"#, with: "", options: .regularExpression)
    }

    /// Our JSON map of `path`, opened as the command line opens it.
    static func ourMap(_ path: String, start: UInt64 = 0, maxLength: UInt64? = nil) throws -> String {
        ImageMap.json(try ImageMap.entries(try DiskImage.open(path: path), start: start, maxLength: maxLength))
    }

    /// True if `qemu-img check` finds the image clean, or finds only what a crash in a safe order
    /// may leave: leaked clusters, and COPIED flags that are clear although the refcount is 1.
    static func onlySafeLeftovers(_ check: Support.Run) -> Bool {
        if check.status == 0 || check.status == 3 { return true }
        guard check.status == 2 else { return false }
        let errors = (check.stdout + check.stderr).split(separator: "\n").filter { $0.hasPrefix("ERROR") }
        return !errors.isEmpty && errors.allSatisfy { $0.contains("OFLAG_COPIED") && $0.hasSuffix("refcount=1") }
    }
}
