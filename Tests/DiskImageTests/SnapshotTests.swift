@testable import DiskImage
import Foundation
import Testing

/// Internal snapshots, cross-checked with `qemu-img snapshot`, `qemu-img convert -l` and
/// `qemu-img check`: what we create QEMU reads and applies, what QEMU creates we apply and delete.
@Suite("Snapshots agree with qemu-img")
struct SnapshotTests {
    static let qemu = Comment(rawValue: Support.noQemu)

    static func qemuSnapshot(_ path: String, _ name: String, in dir: Support.TempDir) throws -> [UInt8] {
        try Support.qemuRaw(path, snapshot: name, in: dir)
    }

    static func expectClean(_ path: String, _ what: String, sourceLocation: SourceLocation = #_sourceLocation) throws {
        let check = try Support.qemuImg("check", path)
        #expect(check.status == 0, "\(what): \(check.stdout)\(check.stderr)", sourceLocation: sourceLocation)
    }

    @Test("create, then change the disk; apply reverts it; delete keeps it; qemu-img agrees at every step",
          .enabled(if: Support.hasQemuImg, qemu),
          arguments: ["v3-c64k.qcow2", "snapshots.qcow2", "ext-l2-overlay.qcow2", "comp-zlib-c16k.qcow2", "v2-c4k.qcow2",
                      "refcount2.qcow2", "top.qcow2", "c512.qcow2", "bitmaps.qcow2"])
    func lifecycle(_ name: String) throws {
        let dir = try WriteTests.workspace()
        let path = dir.file(name)
        let before = try Support.qemuRaw(path, in: dir)
        let older = try DiskImage.snapshots(path: path)
        let olderContents = try older.map { try Self.qemuSnapshot(path, $0.name, in: dir) }

        let record = try DiskImage.createSnapshot(path: path, name: "mine")
        try Self.expectClean(path, "after create")
        let listed = try Support.qemuImg("snapshot", "-l", path).stdout
        #expect(listed.contains(record.listLine), "\(listed)")
        #expect(try Self.qemuSnapshot(path, "mine", in: dir) == before)
        #expect(try DiskImage.snapshots(path: path) == older + [record])

        // Change the disk through QEMU, then revert with ours.
        try Support.qemuIO("-f", "qcow2", "-c", "write -P 0xee 0 100k", "-c", "write -P 0xef 200k 8k", path)
        #expect(try Support.qemuRaw(path, in: dir) != before)
        try DiskImage.applySnapshot(path: path, name: "mine")
        try Self.expectClean(path, "after apply")
        #expect(try Support.qemuRaw(path, in: dir) == before)

        // Writes after applying must not reach the snapshot.
        do {
            let dev = try DiskImage.open(path: path, readOnly: false)
            let data = [UInt8](repeating: 0x3c, count: 70_000)
            try data.withUnsafeBytes { try dev.write($0, at: 1000) }
        }
        try Self.expectClean(path, "after writing")
        #expect(try Self.qemuSnapshot(path, "mine", in: dir) == before)

        try DiskImage.deleteSnapshot(path: path, name: "mine")
        try Self.expectClean(path, "after delete")
        #expect(try DiskImage.snapshots(path: path) == older)
        for (s, contents) in zip(older, olderContents) {
            #expect(try Self.qemuSnapshot(path, s.name, in: dir) == contents, "snapshot \(s.name)")
        }
    }

    @Test("a snapshot QEMU made is applied by us, and one we made is applied and deleted by QEMU",
          .enabled(if: Support.hasQemuImg, qemu))
    func interoperate() throws {
        let dir = try WriteTests.workspace()
        let path = dir.file("snapshots.qcow2")
        let first = try Self.qemuSnapshot(path, "first", in: dir)
        let second = try Self.qemuSnapshot(path, "second", in: dir)
        try DiskImage.applySnapshot(path: path, name: "first")
        try Self.expectClean(path, "apply first")
        #expect(try Support.qemuRaw(path, in: dir) == first)
        try DiskImage.applySnapshot(path: path, name: "2")  // By ID.
        #expect(try Support.qemuRaw(path, in: dir) == second)

        let other = dir.file("v3-c64k.qcow2")
        let original = try Support.qemuRaw(other, in: dir)
        try DiskImage.createSnapshot(path: other, name: "ours")
        try Support.qemuIO("-f", "qcow2", "-c", "write -P 1 0 1M", other)
        #expect(try Support.qemuImg("snapshot", "-a", "ours", other).status == 0)
        try Self.expectClean(other, "qemu applied ours")
        #expect(try Support.qemuRaw(other, in: dir) == original)
        #expect(try Support.qemuImg("snapshot", "-d", "ours", other).status == 0)
        try Self.expectClean(other, "qemu deleted ours")
    }

    @Test("applying a snapshot of another size resizes the disk back", .enabled(if: Support.hasQemuImg, qemu))
    func applyOtherSize() throws {
        let dir = try WriteTests.workspace()
        let path = dir.file("v3-c64k.qcow2")
        let small = try Support.qemuRaw(path, in: dir)
        try DiskImage.createSnapshot(path: path, name: "small")
        try DiskImage.resize(path: path, to: .grow(by: 3 << 20), allowShrink: false)
        try Support.qemuIO("-f", "qcow2", "-c", "write -P 2 6M 64k", path)
        let large = try Support.qemuRaw(path, in: dir)
        try DiskImage.createSnapshot(path: path, name: "large")
        try DiskImage.applySnapshot(path: path, name: "small")
        try Self.expectClean(path, "apply small")
        #expect(try Support.qemuRaw(path, in: dir) == small)
        try DiskImage.applySnapshot(path: path, name: "large")
        try Self.expectClean(path, "apply large")
        #expect(try Support.qemuRaw(path, in: dir) == large)
    }

    @Test("an image QEMU left dirty (lazy refcounts, killed) is repaired, then snapshotted",
          .enabled(if: Support.hasQemuImg, qemu))
    func dirtyImage() throws {
        let dir = try Support.TempDir()
        let path = dir.file("lazy.qcow2")
        try Support.qemuImg("create", "-q", "-f", "qcow2", "-o", "cluster_size=4k,lazy_refcounts=on", path, "1M")
        _ = try Support.qemuIO("-f", "qcow2", "-c", "write -P 0x5a 0 64k", "-c", "sigraise 9", path)
        try #require(try QCOW2Header.parse(file: try ImageFile(path: path, writable: false)).isDirty)
        let contents = try Support.readAll(try DiskImage.open(path: path))
        try DiskImage.createSnapshot(path: path, name: "after-crash")
        try Self.expectClean(path, "snapshot of a repaired image")
        #expect(try Self.qemuSnapshot(path, "after-crash", in: dir) == contents)
    }

    @Test("the list is qemu-img snapshot -l's, line for line", .enabled(if: Support.hasQemuImg, qemu))
    func list() throws {
        let records = try DiskImage.snapshots(path: Support.fixture("snapshots.qcow2"))
        let ours = (["Snapshot list:", SnapshotRecord.listHeader] + records.map(\.listLine)).joined(separator: "\n") + "\n"
        #expect(ours == (try Support.qemuImg("snapshot", "-l", Support.fixture("snapshots.qcow2")).stdout))
        #expect(try DiskImage.snapshots(path: Support.fixture("base.raw")).isEmpty)
        #expect(SnapshotRecord.sizeString(0) == "0 B")
        #expect(SnapshotRecord.sizeString(1536 * 1024) == "1.5 MiB")
        #expect(SnapshotRecord.sizeString(1000 * 1024) == "0.977 MiB")
    }

    @Test("what cannot be done is refused before anything is written")
    func refusals() throws {
        let dir = try WriteTests.workspace()
        let r1 = dir.file("refcount1.qcow2")
        let before = try Support.readFile(r1)
        #expect(throws: ImageEditError.refcountsTooNarrow(bits: 1)) { try DiskImage.createSnapshot(path: r1, name: "x") }
        #expect(try Support.readFile(r1) == before)
        let snaps = dir.file("snapshots.qcow2")
        #expect(throws: DiskImageError.snapshotNotFound("nope")) { try DiskImage.applySnapshot(path: snaps, name: "nope") }
        // Delete finds by name only, as qemu-img does.
        #expect(throws: DiskImageError.snapshotNotFound("1")) { try DiskImage.deleteSnapshot(path: snaps, name: "1") }
        #expect(throws: ImageEditError.notQcow2(operation: "have internal snapshots")) {
            try DiskImage.createSnapshot(path: dir.file("base.raw"), name: "x")
        }
        let long = String(repeating: "n", count: 256)
        #expect(throws: ImageEditError.snapshotNameTooLong(256)) { try DiskImage.createSnapshot(path: snaps, name: long) }
    }

    /// Runs `operation` on a copy of `image` with the writes stopped after 0, 1, 2, ... of them
    /// until one run completes. After each crash, `qemu-img check` may find only leaks or a
    /// clear COPIED flag on a cluster whose refcount is 1 (both harmless, and `check -r all`
    /// fixes them), the disk must read as `before` or `after`, and every snapshot as before.
    func crashEverywhere(_ image: String, before: [UInt8], after: [UInt8], in dir: Support.TempDir,
                         _ operation: (QCOW2Image) throws -> Void) throws -> Int {
        let snapshots = try DiskImage.snapshots(path: dir.file(image))
        var contents: [String: [UInt8]] = [:]
        for s in snapshots { contents[s.name] = try Self.qemuSnapshot(dir.file(image), s.name, in: dir) }
        var budget = 0, completed = false
        while !completed && budget < 300 {
            let path = dir.file("crash-\(budget)-\(image)")
            try Support.copy(dir.file(image), to: path)
            do {
                let q = try #require(try DiskImage.open(path: path, readOnly: false) as? QCOW2Image)
                q.file.writeBudget.store(budget, ordering: .relaxed)
                do {
                    try operation(q)
                    completed = true
                } catch DiskImageError.io(let op, _, _) where op.contains("simulated crash") {}
            }
            let check = try Support.qemuImg("check", path)
            #expect(GeneratedImages.onlySafeLeftovers(check), "crash after \(budget) writes: \(check.stdout)\(check.stderr)")
            let now = try Support.qemuRaw(path, in: dir)
            #expect(now == before || now == after, "crash after \(budget) writes")
            for s in try DiskImage.snapshots(path: path) where contents[s.name] != nil {
                #expect(try Self.qemuSnapshot(path, s.name, in: dir) == contents[s.name], "snapshot \(s.name), crash after \(budget)")
            }
            let repair = try Support.qemuImg("check", "-r", "all", path)
            #expect(repair.status == 0, "crash after \(budget) writes, repaired: \(repair.stdout)")
            try? FileManager.default.removeItem(atPath: path)
            budget += 1
        }
        #expect(completed)
        return budget
    }

    @Test("a crash while creating, applying or deleting a snapshot leaves the disk and the snapshots intact",
          .enabled(if: Support.hasQemuImg, qemu))
    func crashes() throws {
        let dir = try WriteTests.workspace()
        let image = "snapshots.qcow2"
        let current = try Support.qemuRaw(dir.file(image), in: dir)
        let first = try Self.qemuSnapshot(dir.file(image), "first", in: dir)
        #expect(try crashEverywhere(image, before: current, after: current, in: dir) { q in
            _ = try q.createSnapshot(name: "new")
        } > 5)
        #expect(try crashEverywhere(image, before: current, after: first, in: dir) { q in
            try q.applySnapshot(name: "first")
        } > 5)
        #expect(try crashEverywhere(image, before: current, after: current, in: dir) { q in
            try q.deleteSnapshot(name: "second")
        } > 5)
    }
}
