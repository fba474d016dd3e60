@testable import DiskImage
import Foundation
import Testing

/// `check` against what the read path refuses, and against `qemu-img check` on the same bytes.
@Suite("Check finds what reads refuse")
struct CheckTests {
    /// An image that opens but that a whole read refuses, and what QEMU says of it.
    struct ReadRefusal: Sendable, CustomTestStringConvertible {
        var name: String
        /// Writes the image into the folder and returns its path.
        var build: @Sendable (Support.TempDir) throws -> String
        /// `qemu-img check`'s exit status. Where it is 0, `qemu-img convert` must fail: QEMU
        /// cannot read the image either, it just does not look there when checking.
        var qemuCheck: Int32
        var testDescription: String { name }
    }

    static let cs = TestImage.clusterSize

    /// Writes a changed TestImage.
    static func testImage(_ change: @escaping @Sendable (inout TestImage) -> Void) -> @Sendable (Support.TempDir) throws -> String {
        { dir in
            var img = TestImage()
            change(&img)
            let path = dir.file("t.qcow2")
            try img.write(to: path)
            return path
        }
    }

    /// A copy of an extended-L2 image whose L2 entry `index` (of L1 entry 0) gets `entry` and `bitmap`.
    static func extendedImage(compressed: Bool, index: Int, entry: (@Sendable (UInt64) -> UInt64)? = nil,
                              bitmap: @escaping @Sendable (UInt64) -> UInt64) -> @Sendable (Support.TempDir) throws -> String {
        { dir in
            let path = dir.file("ext.qcow2")
            if compressed {
                try Support.qemuImg("convert", "-q", "-c", "-O", "qcow2", "-o", "cluster_size=32k,extended_l2=on",
                                    Support.fixture("base.raw"), path)
            } else {
                try Support.copy(Support.fixture("ext-l2.qcow2"), to: path)
            }
            var bytes = try Support.readFile(path)
            func be(_ o: Int) -> UInt64 { bytes[o..<(o + 8)].reduce(0) { $0 << 8 | UInt64($1) } }
            func put(_ v: UInt64, _ o: Int) { for i in 0..<8 { bytes[o + i] = UInt8(truncatingIfNeeded: v >> (8 * (7 - i))) } }
            let l1 = Int(be(40))
            let l2 = Int(be(l1) & 0x00ff_ffff_ffff_fe00)
            let at = l2 + 16 * index
            if let entry { put(entry(be(at)), at) }
            put(bitmap(be(at + 8)), at + 8)
            try Data(bytes).write(to: URL(fileURLWithPath: path))
            return path
        }
    }

    static let cases: [ReadRefusal] = [
        ReadRefusal(name: "L2 entry with reserved bits", build: testImage { $0.put64(5 * UInt64(cs) | 1 << 63 | 1 << 57, at: TestImage.l2EntryOffset) },
                    qemuCheck: 2),
        ReadRefusal(name: "L2 entry with reserved bits and no cluster", build: testImage { $0.put64(1 << 57, at: TestImage.l2EntryOffset + 24) },
                    qemuCheck: 2),
        ReadRefusal(name: "L1 entry with reserved bits", build: testImage { $0.put64(4 * UInt64(cs) | 1 << 63 | 1 << 60, at: 3 * cs) },
                    qemuCheck: 2),
        ReadRefusal(name: "L2 table misaligned", build: testImage { $0.put64(4 * UInt64(cs) + 512 | 1 << 63, at: 3 * cs) },
                    qemuCheck: 2),
        ReadRefusal(name: "L2 table past the end of the file", build: testImage { $0.put64(1 << 30 | 1 << 63, at: 3 * cs) },
                    qemuCheck: 2),
        ReadRefusal(name: "data cluster misaligned", build: testImage { $0.put64(5 * UInt64(cs) + 512 | 1 << 63, at: TestImage.l2EntryOffset) },
                    qemuCheck: 2),
        ReadRefusal(name: "preallocated zero cluster misaligned",
                    build: testImage { $0.put64(5 * UInt64(cs) + 512 | 1, at: TestImage.l2EntryOffset) }, qemuCheck: 2),
        ReadRefusal(name: "data cluster past the end of the file", build: testImage { $0.put64(1 << 30 | 1 << 63, at: TestImage.l2EntryOffset) },
                    qemuCheck: 2),
        ReadRefusal(name: "compressed data in the header cluster", build: testImage { img in
                        img.put64(1 << 62 | 1000, at: TestImage.l2EntryOffset + 24)  // 24 bytes at offset 1000.
                        img.put16(2, at: 2 * cs)                                      // The header's refcount covers it.
                    }, qemuCheck: 0),
        ReadRefusal(name: "compressed data just past the end of the file", build: testImage { img in
                        img.bytes.removeLast(cs - 100)                                 // The file ends 100 bytes into cluster 7.
                        img.put64(1 << 62 | UInt64(7 * cs + 200), at: TestImage.l2EntryOffset + 24)
                        img.put16(2, at: 2 * cs + 14)                                  // Cluster 7 is shared by two.
                    }, qemuCheck: 0),
        ReadRefusal(name: "compressed cluster with garbage",
                    build: testImage { $0.put8(0x07, at: Int(TestImage.compressedOffset)) }, qemuCheck: 0),
        ReadRefusal(name: "compressed cluster that inflates short", build: testImage { img in
                        img.put8(0x00, at: Int(TestImage.compressedOffset) + 1)
                        img.put8(0x08, at: Int(TestImage.compressedOffset) + 2)
                        img.put8(0xf7, at: Int(TestImage.compressedOffset) + 4)
                    }, qemuCheck: 0),
        ReadRefusal(name: "subclusters both allocated and zero",
                    build: extendedImage(compressed: false, index: 0, bitmap: { $0 | 1 << 32 | 1 }), qemuCheck: 2),
        ReadRefusal(name: "allocated subclusters without a cluster",
                    build: extendedImage(compressed: false, index: 10, entry: { _ in 0 }, bitmap: { _ in 1 << 3 }), qemuCheck: 2),
        ReadRefusal(name: "zero and allocated subclusters without a cluster",
                    build: extendedImage(compressed: false, index: 10, entry: { _ in 0 }, bitmap: { _ in 1 << 35 | 1 << 3 }),
                    qemuCheck: 2),
        ReadRefusal(name: "compressed cluster with a subcluster bitmap",
                    build: extendedImage(compressed: true, index: 0, bitmap: { _ in 1 }), qemuCheck: 2),
    ]

    @Test("check reports every image a read refuses, as corruption, like qemu-img check where it looks",
          .enabled(if: Support.hasQemuImg, Comment(rawValue: Support.noQemu)), arguments: cases)
    func readRefusals(_ c: ReadRefusal) throws {
        let dir = try Support.TempDir()
        let path = try c.build(dir)
        let dev = try DiskImage.open(path: path)
        #expect(throws: DiskImageError.self) { _ = try Support.readAll(dev) }
        let ours = try #require(try DiskImage.check(path: path))
        #expect(ours.exitStatus == 2, "\(ours.messages)")
        #expect(ours.corruptions > 0 && ours.messages.contains { $0.hasPrefix("ERROR") })
        let qemu = try Support.qemuImg("check", path)
        #expect(qemu.status == c.qemuCheck, "\(qemu.stdout)\(qemu.stderr)")
        if c.qemuCheck == 0 {
            #expect(try Support.qemuImg("convert", "-O", "raw", path, dir.file("out.raw")).status != 0)
        } else {
            // Where QEMU reports the problem, it does in the same words.
            let theirs = Set(qemu.stderr.split(separator: "\n").map(String.init))
            let shared = ours.messages.filter { theirs.contains($0) }
            #expect(!shared.isEmpty, "ours: \(ours.messages)\nqemu-img: \(qemu.stderr)")
        }
    }

    @Test("a sparse file too large to count is refused, not allocated for")
    func tooLargeToCheck() throws {
        let dir = try Support.TempDir()
        let path = dir.file("huge.qcow2")
        try TestImage().write(to: path)
        let clusters = CheckWalk.maxClusters + 1
        #expect(truncate(path, off_t(clusters * UInt64(Self.cs))) == 0)  // 512 GiB, all hole.
        #expect(throws: DiskImageError.tooLargeToCheck(clusters: clusters, limit: CheckWalk.maxClusters)) {
            _ = try DiskImage.check(path: path)
        }
    }

    @Test("check prints exactly what qemu-img check prints on every fixture",
          .enabled(if: Support.hasQemuImg, Comment(rawValue: Support.noQemu)), arguments: Support.qcow2Fixtures)
    func sameReportAsQemu(_ name: String) throws {
        let result = try #require(try DiskImage.check(path: Support.fixture(name)))
        let qemu = try Support.qemuImg("check", Support.fixture(name))
        #expect(result.summary.map { $0 + "\n" }.joined() == qemu.stdout)
        #expect(result.messages.map { $0 + "\n" }.joined() == qemu.stderr)
        #expect(result.exitStatus == qemu.status)
    }

    @Test("leaks, refcounts, COPIED flags, snapshot and refcount-table problems: same status and words as qemu-img",
          .enabled(if: Support.hasQemuImg, Comment(rawValue: Support.noQemu)),
          arguments: [
            ("leaked cluster", 3), ("refcount too low", 2), ("COPIED flag wrong", 2), ("refcount block misaligned", 1),
            ("refcount table entry with reserved bits", 2), ("refcount block outside the image", 2),
            ("snapshot L1 table misaligned", 2), ("snapshot entry without extra data", 2), ("no refcount table", 2),
          ])
    func sameVerdictAsQemu(_ kind: String, _ status: Int32) throws {
        let dir = try Support.TempDir()
        let path = dir.file("img.qcow2")
        var img = TestImage()
        let cs = Self.cs
        func addSnapshot(l1Offset: UInt64, extra: Int) {
            // One snapshot sharing the active L1 table's L2 table, its table in a new cluster 8.
            img.bytes += [UInt8](repeating: 0, count: 2 * cs)
            img.put16(1, at: 2 * cs + 16)                  // Cluster 8: the snapshot table.
            img.put16(1, at: 2 * cs + 18)                  // Cluster 9: the snapshot's L1 table.
            img.put64(UInt64(4 * cs), at: 9 * cs)          // Its L1[0] -> L2 (no COPIED: shared).
            img.put64(UInt64(4 * cs), at: 3 * cs)          // The active L1[0] loses COPIED too...
            img.put16(2, at: 2 * cs + 8)                   // ...as the L2 table now has refcount 2,
            img.put16(2, at: 2 * cs + 10)                  // and so has the data cluster,
            img.put64(UInt64(5 * cs), at: TestImage.l2EntryOffset)  // whose entry loses COPIED.
            img.put16(2, at: 2 * cs + 12)                  // The compressed cluster's two clusters: 2 each.
            img.put16(2, at: 2 * cs + 14)
            img.put32(1, at: TestImage.snapshotCount)
            img.put64(UInt64(8 * cs), at: TestImage.snapshotsOffset)
            let e = 8 * cs
            img.put64(l1Offset, at: e)
            img.put32(1, at: e + 8)
            img.put16(1, at: e + 12)                       // id "1"
            img.put16(1, at: e + 14)                       // name "s"
            img.put32(UInt32(extra), at: e + 36)
            if extra >= 16 { img.put64(TestImage.virtualSize, at: e + 48) }
            img.put8(0x31, at: e + 40 + extra)
            img.put8(0x73, at: e + 41 + extra)
        }
        switch kind {
        case "leaked cluster":
            img.bytes += [UInt8](repeating: 0, count: cs)
            img.put16(1, at: 2 * cs + 16)
        case "refcount too low":
            img.put16(0, at: 2 * cs + 10)
        case "COPIED flag wrong":
            img.put64(UInt64(5 * cs), at: TestImage.l2EntryOffset)
        case "refcount block misaligned":
            img.put64(UInt64(2 * cs + 512), at: cs)
        case "refcount table entry with reserved bits":
            img.put64(UInt64(2 * cs) | 1, at: cs)
        case "refcount block outside the image":
            img.put64(1 << 30, at: cs + 8)                 // Refcount table[1] points past the end of the file.
        case "snapshot L1 table misaligned":
            addSnapshot(l1Offset: UInt64(9 * cs + 512), extra: 16)
        case "snapshot entry without extra data":
            addSnapshot(l1Offset: UInt64(9 * cs), extra: 0)
        case "no refcount table":
            img.put32(0, at: TestImage.refcountTableClusters)
        default:
            Issue.record("unknown case \(kind)")
        }
        try img.write(to: path)
        let ours = try #require(try DiskImage.check(path: path))
        let qemu = try Support.qemuImg("check", path)
        #expect(qemu.status == status, "qemu-img: \(qemu.stdout)\(qemu.stderr)")
        #expect(ours.exitStatus == status, "ours: \(ours.messages)")
        let theirs = qemu.stderr.split(separator: "\n").map(String.init).filter { !$0.hasPrefix("qemu-img:") }
        #expect(Set(ours.messages) == Set(theirs),
                "ours: \(ours.messages)\nqemu-img: \(qemu.stderr)")
    }
}
