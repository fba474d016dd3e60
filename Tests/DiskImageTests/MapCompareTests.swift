@testable import DiskImage
import Foundation
import Testing

/// `map` and `compare` against the real `qemu-img map` and `qemu-img compare`, output for output.
@Suite("Map and compare agree with qemu-img")
struct MapCompareTests {
    static let qemu = Comment(rawValue: Support.noQemu)

    @Test("map --output=json is qemu-img's, on every fixture and generated image",
          .enabled(if: Support.hasQemuImg, qemu))
    func jsonMap() throws {
        let dir = try Support.TempDir()
        try GeneratedImages.make(in: dir)
        let names = Support.qcow2Fixtures + ["base.raw"] + GeneratedImages.names
        for name in names {
            #expect(try GeneratedImages.ourMap(dir.file(name)) == GeneratedImages.qemuMap(name, cwd: dir.path), "\(name)")
            // A window that starts and ends inside runs.
            let window = try GeneratedImages.ourMap(dir.file(name), start: 65536, maxLength: 3_000_000)
            #expect(window == (try GeneratedImages.qemuMap(name, ["--start-offset", "65536", "--max-length", "3000000"],
                                                           cwd: dir.path)), "\(name), window")
        }
    }

    @Test("the human map is qemu-img's; compressed clusters cannot be shown in it",
          .enabled(if: Support.hasQemuImg, qemu))
    func humanMap() throws {
        let dir = try Support.TempDir()
        try GeneratedImages.make(in: dir)
        for name in Support.qcow2Fixtures + ["base.raw"] + GeneratedImages.names {
            let qemu = try Support.run(Support.qemuImgPath!, ["map", name], cwd: dir.path)
            var lines = [ImageMap.humanHeader]
            var failed = false
            do {
                try ImageMap.forEachEntry(try DiskImage.open(path: dir.file(name))) { e, _ in
                    if let line = try ImageMap.humanLine(e) { lines.append(line) }
                }
            } catch DiskImageError.invalidArgument(let why) {
                failed = true
                #expect(why.hasPrefix("File contains external, encrypted or compressed clusters"))
            }
            #expect(failed == (qemu.status != 0), "\(name): \(qemu.stderr)")
            // Our paths are absolute; qemu-img was given relative names from the same folder.
            let ours = lines.joined(separator: "\n").replacingOccurrences(of: dir.path + "/", with: "") + "\n"
            if !failed { #expect(ours == qemu.stdout, "\(name)") }
        }
    }

    @Test("map reports where data lives in each image of a chain, and how deep")
    func chainDepths() throws {
        let entries = try ImageMap.entries(try DiskImage.open(path: Support.fixture("top.qcow2")))
        // top.qcow2 over mid.qcow2 over base.raw: its own data at depth 0, mid's at 1, base's at 2.
        #expect(Set(entries.filter(\.data).map(\.depth)) == [0, 1, 2])
        #expect(entries.first { $0.depth == 2 }?.filename?.hasSuffix("/base.raw") == true)
        #expect(entries.last?.present == false && entries.last?.zero == true)
        #expect(entries.reduce(UInt64(0)) { $0 + $1.length } == 2 << 20)
    }

    static let pairs: [(String, String)] = [
        ("overlay.qcow2", "overlay.raw"), ("overlay.qcow2", "overlay-copy.qcow2"), ("overlay.qcow2", "overlay-1byte.raw"),
        ("overlay-1byte.raw", "overlay.qcow2"), ("many-l2-top.qcow2", "many-l2-top.raw"), ("many-l2-top.qcow2", "longer.raw"),
        ("longer-1byte.raw", "many-l2-top.qcow2"), ("overlay.raw", "shorter.raw"), ("shorter.raw", "overlay.qcow2"),
        ("empty8.qcow2", "empty8.raw"), ("empty8.qcow2", "zeroed8.qcow2"), ("subclusters.qcow2", "b4.raw"),
        ("overlay.qcow2", "overlay.qcow2"), ("compressed.qcow2", "text.raw"), ("prealloc.qcow2", "falloc.qcow2"),
        ("sparse.raw", "empty8.raw"), ("overlay.raw", "overlay-same.raw"), ("top.qcow2", "mid.qcow2"),
    ]

    @Test("compare prints what qemu-img compare prints and exits the same, strict or not",
          .enabled(if: Support.hasQemuImg, qemu))
    func comparePairs() throws {
        let dir = try Support.TempDir()
        try GeneratedImages.make(in: dir)
        func img(_ args: String...) throws { try Support.run(Support.qemuImgPath!, args, cwd: dir.path) }
        func poke(_ file: String, at offset: Int) throws {
            let h = try FileHandle(forUpdating: URL(fileURLWithPath: dir.file(file)))
            try h.seek(toOffset: UInt64(offset))
            h.write(Data([0x99]))
            try h.close()
        }
        try img("convert", "-O", "raw", "overlay.qcow2", "overlay.raw")
        try img("convert", "-O", "qcow2", "overlay.qcow2", "overlay-copy.qcow2")
        try Support.copy(dir.file("overlay.raw"), to: dir.file("overlay-1byte.raw"))
        try poke("overlay-1byte.raw", at: 3_000_001)
        try Support.copy(dir.file("overlay.raw"), to: dir.file("overlay-same.raw"))
        try img("convert", "-O", "raw", "many-l2-top.qcow2", "many-l2-top.raw")
        try Support.copy(dir.file("many-l2-top.raw"), to: dir.file("longer.raw"))
        try FileHandle(forUpdating: URL(fileURLWithPath: dir.file("longer.raw"))).truncate(atOffset: 90 << 20)
        try Support.copy(dir.file("longer.raw"), to: dir.file("longer-1byte.raw"))
        try poke("longer-1byte.raw", at: 85 << 20)
        try Support.copy(dir.file("overlay.raw"), to: dir.file("shorter.raw"))
        try FileHandle(forUpdating: URL(fileURLWithPath: dir.file("shorter.raw"))).truncate(atOffset: 5 << 20)
        try img("create", "-q", "-f", "qcow2", "empty8.qcow2", "8M")
        try img("create", "-q", "-f", "raw", "empty8.raw", "8M")
        try img("create", "-q", "-f", "qcow2", "zeroed8.qcow2", "8M")
        try Support.run("/usr/bin/qemu-io", ["-f", "qcow2", "-c", "write -z 0 8M", "zeroed8.qcow2"], cwd: dir.path)

        for (a, b) in Self.pairs {
            for strict in [false, true] {
                let qemu = try Support.run(Support.qemuImgPath!, ["compare"] + (strict ? ["-s"] : []) + [a, b], cwd: dir.path)
                let result = try ImageComparison.compare(try DiskImage.open(path: dir.file(a)), named: a,
                                                         try DiskImage.open(path: dir.file(b)), named: b, strict: strict)
                #expect(result.lines.joined(separator: "\n") + "\n" == qemu.stdout, "\(a) vs \(b), strict: \(strict)")
                #expect((result.identical ? 0 : 1) == qemu.status, "\(a) vs \(b), strict: \(strict)")
            }
        }
    }

    @Test("the first difference is reported by its 512-byte sector")
    func sectorOffsets() throws {
        let dir = try Support.TempDir()
        let a = dir.file("a.raw"), b = dir.file("b.raw")
        let zeros = [UInt8](repeating: 0, count: 1 << 20)
        try Data(zeros).write(to: URL(fileURLWithPath: a))
        var other = zeros
        other[700_001] = 1
        try Data(other).write(to: URL(fileURLWithPath: b))
        let result = try ImageComparison.compare(try DiskImage.open(path: a), named: "a", try DiskImage.open(path: b), named: "b")
        #expect(result.verdict == .contentMismatch(offset: 700_001 / 512 * 512))
        #expect(result.lines == ["Content mismatch at offset 699904!"])
    }
}
