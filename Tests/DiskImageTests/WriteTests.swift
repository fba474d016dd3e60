@testable import DiskImage
import Foundation
import Testing

/// Writes through Swiftlet, then lets QEMU judge: `qemu-img check` must find no errors and
/// no leaks, and `qemu-img compare` must match a raw model that received the same writes.
@Suite("Writes are consistent for qemu-img")
struct WriteTests {
    static let writable = [
        "v3-c64k.qcow2", "v2-c4k.qcow2", "c512.qcow2", "refcount1.qcow2", "refcount2.qcow2", "refcount4.qcow2",
        "refcount8.qcow2", "refcount32.qcow2", "refcount64.qcow2", "comp-zlib-c16k.qcow2", "comp-zstd-c16k.qcow2",
        "comp-rewritten.qcow2", "ext-l2.qcow2", "ext-l2-overlay.qcow2", "top.qcow2", "snapshots.qcow2", "lazy.qcow2",
        "bitmaps.qcow2",
    ]

    /// Copies every fixture (so backing chains resolve) into a fresh folder.
    static func workspace() throws -> Support.TempDir {
        let dir = try Support.TempDir()
        for name in try FileManager.default.contentsOfDirectory(atPath: Support.fixtures)
        where name.hasSuffix(".qcow2") || name.hasSuffix(".raw") {
            try Support.copy(Support.fixture(name), to: dir.file(name))
        }
        return dir
    }

    /// Seeded random writes of 1 byte to 3 clusters, applied to the image and to `model`.
    static func randomWrites(_ dev: any BlockDevice, model: inout [UInt8], count: Int, maxLength: Int,
                             seed: UInt64) throws {
        var rng = SeededRandom(seed: seed)
        for i in 0..<count {
            let len = Int.random(in: 1...maxLength, using: &rng)
            let off = Int.random(in: 0...(model.count - len), using: &rng)
            let value = UInt8(truncatingIfNeeded: i &* 37 &+ 1)
            let data = (0..<len).map { value &+ UInt8(truncatingIfNeeded: $0 % 7) }
            try data.withUnsafeBytes { try dev.write($0, at: UInt64(off)) }
            model.replaceSubrange(off..<(off + len), with: data)
        }
        try dev.flush()
    }

    static func expectQemuHappy(_ path: String, model: [UInt8], in dir: Support.TempDir,
                                sourceLocation: SourceLocation = #_sourceLocation) throws {
        let check = try Support.qemuImg("check", path)
        #expect(check.status == 0, "qemu-img check: \(check.stdout)\(check.stderr)", sourceLocation: sourceLocation)
        #expect(!check.stdout.contains("leaked"), "\(check.stdout)", sourceLocation: sourceLocation)
        let modelPath = dir.file("model-\(UUID().uuidString).raw")
        try Data(model).write(to: URL(fileURLWithPath: modelPath))
        let cmp = try Support.qemuImg("compare", path, modelPath)
        #expect(cmp.status == 0, "qemu-img compare: \(cmp.stdout)\(cmp.stderr)", sourceLocation: sourceLocation)
    }

    @Test("random writes keep the image consistent and equal to the model",
          .enabled(if: Support.hasQemuImg, Comment(rawValue: Support.noQemu)), arguments: writable)
    func randomWrites(_ name: String) throws {
        let dir = try Self.workspace()
        let path = dir.file(name)
        var model = try Support.qemuRaw(path, in: dir)
        let snapshotsBefore = name == "snapshots.qcow2" ? try Support.qemuRaw(path, snapshot: "first", in: dir) : []
        do {
            let dev = try Support.open(path, readOnly: false)
            #expect(!dev.isReadOnly)
            let cluster = Int((dev as! QCOW2Image).clusterSize)
            try Self.randomWrites(dev, model: &model, count: 40, maxLength: min(3 * cluster, 100_000),
                                  seed: UInt64(name.utf8.count) &* 1_000_003)
            #expect(try Support.readAll(dev) == model)
            let ours = try (dev as! QCOW2Image).check()
            #expect(ours.exitStatus == 0, "\(ours.messages)")
        }
        try Self.expectQemuHappy(path, model: model, in: dir)
        if name == "snapshots.qcow2" {
            #expect(try Support.qemuRaw(path, snapshot: "first", in: dir) == snapshotsBefore)
        }
        // A fresh open reads back what was written.
        #expect(try Support.readAll(try Support.open(path)) == model)
    }

    @Test("a crash after any write leaves at worst leaked clusters",
          .enabled(if: Support.hasQemuImg, Comment(rawValue: Support.noQemu)),
          arguments: ["v3-c64k.qcow2", "comp-zlib-c16k.qcow2", "snapshots.qcow2", "ext-l2-overlay.qcow2", "c512.qcow2"])
    func crashAnywhere(_ name: String) throws {
        var budget = 0
        var completed = false
        while !completed && budget < 200 {
            let dir = try Self.workspace()
            let path = dir.file(name)
            let original = try Support.qemuRaw(path, in: dir)
            var model = original
            do {
                let dev = try #require(try Support.open(path, readOnly: false) as? QCOW2Image)
                dev.file.writeBudget.store(budget, ordering: .relaxed)
                let cs = Int(dev.clusterSize)
                // Touch: a new L2 table far out, a partial cluster, a compressed/shared cluster at 0.
                let writes: [(Int, Int)] = [(0, 100), (model.count - cs - 7, cs), (cs / 2, cs), (0, 1)]
                do {
                    for (i, (off, len)) in writes.enumerated() {
                        let data = [UInt8](repeating: UInt8(0xA0 + i), count: len)
                        try data.withUnsafeBytes { try dev.write($0, at: UInt64(off)) }
                        model.replaceSubrange(off..<(off + len), with: data)
                    }
                    try dev.flush()
                    completed = true
                } catch DiskImageError.io(let op, _, _) where op.contains("simulated crash") {
                    // The machine stopped here.
                }
            }
            let check = try Support.qemuImg("check", path)
            #expect(check.status == 0 || check.status == 3,
                    "crash after \(budget) writes: qemu-img check \(check.status): \(check.stdout)\(check.stderr)")
            if completed {
                try Self.expectQemuHappy(path, model: model, in: dir)
            }
            budget += 1
        }
        #expect(completed)
        #expect(budget > 3)
    }

    @Test("create makes an overlay qemu-img accepts; writes go to the overlay only",
          .enabled(if: Support.hasQemuImg, Comment(rawValue: Support.noQemu)),
          arguments: ["top.qcow2", "base.raw", "comp-zstd-c16k.qcow2"])
    func createOverlay(_ backing: String) throws {
        let dir = try Self.workspace()
        let overlay = dir.file("overlay.qcow2")
        try QCOW2Image.create(path: overlay, backing: backing)
        let check = try Support.qemuImg("check", overlay)
        #expect(check.status == 0, "\(check.stdout)\(check.stderr)")
        let info = try Support.qemuImg("info", "--output=json", overlay)
        #expect(info.stdout.contains("\"backing-filename\": \"\(backing)\""))
        let expectedFormat = backing.hasSuffix(".raw") ? "raw" : "qcow2"
        #expect(info.stdout.contains("\"backing-filename-format\": \"\(expectedFormat)\""))
        var model = try Support.qemuRaw(dir.file(backing), in: dir)
        let backingBytes = try Support.readFile(dir.file(backing))
        do {
            let dev = try Support.open(overlay, readOnly: false)
            #expect(try Support.readAll(dev) == model)
            try Self.randomWrites(dev, model: &model, count: 20, maxLength: 70_000, seed: 99)
        }
        try Self.expectQemuHappy(overlay, model: model, in: dir)
        #expect(try Support.readFile(dir.file(backing)) == backingBytes)
    }

    @Test("create with an explicit size and no backing", .enabled(if: Support.hasQemuImg, Comment(rawValue: Support.noQemu)))
    func createPlain() throws {
        let dir = try Support.TempDir()
        let path = dir.file("new.qcow2")
        try QCOW2Image.create(path: path, size: 5 * 1024 * 1024 + 512, clusterBits: 12)
        #expect(try Support.qemuImg("check", path).status == 0)
        var model = [UInt8](repeating: 0, count: 5 * 1024 * 1024 + 512)
        do {
            let dev = try Support.open(path, readOnly: false)
            #expect(dev.virtualSize == UInt64(model.count))
            try Self.randomWrites(dev, model: &model, count: 30, maxLength: 20_000, seed: 5)
        }
        try Self.expectQemuHappy(path, model: model, in: dir)
        #expect(throws: DiskImageError.io(operation: "open", path: path, errno: EEXIST)) {
            try QCOW2Image.create(path: path, size: 1024)
        }
    }

    @Test("the refcount table grows when the file outgrows it", .enabled(if: Support.hasQemuImg, Comment(rawValue: Support.noQemu)),
          arguments: [(64, 4 << 20), (32, 6 << 20)])
    func refcountTableGrows(_ refcountBits: Int, _ size: Int) throws {
        // 512-byte clusters: one table cluster (64 blocks) of 64-bit refcounts describes 2 MiB of file,
        // of 32-bit refcounts 4 MiB.
        let dir = try Support.TempDir()
        let path = dir.file("grow.qcow2")
        try Support.qemuImg("create", "-q", "-f", "qcow2", "-o", "cluster_size=512,refcount_bits=\(refcountBits)", path, "\(size)")
        var model = [UInt8](repeating: 0, count: size)
        do {
            let dev = try #require(try Support.open(path, readOnly: false) as? QCOW2Image)
            let tableBefore = dev.header.refcountTableOffset
            // Sequential 64 KiB writes fill the disk, so the file must grow past what the table covers.
            for off in stride(from: 0, to: size, by: 65536) {
                let data = [UInt8](repeating: UInt8(truncatingIfNeeded: off >> 16 | 1), count: 65536)
                try data.withUnsafeBytes { try dev.write($0, at: UInt64(off)) }
                model.replaceSubrange(off..<(off + 65536), with: data)
            }
            try dev.flush()
            let header = try QCOW2Header.parse(file: dev.file)  // Another open would conflict with our lock.
            #expect(header.refcountTableOffset != tableBefore)
            #expect(try dev.check().exitStatus == 0)
        }
        try Self.expectQemuHappy(path, model: model, in: dir)
    }

    @Test("a crash while the refcount table grows leaves at worst leaks",
          .enabled(if: Support.hasQemuImg, Comment(rawValue: Support.noQemu)))
    func crashWhileGrowing() throws {
        let dir = try Support.TempDir()
        let seed = dir.file("seed.qcow2")
        try Support.qemuImg("create", "-q", "-f", "qcow2", "-o", "cluster_size=512,refcount_bits=64", seed, "4M")
        // Fill until the next allocation needs a larger table: 2 MiB of file is the limit here.
        var filled = 0
        do {
            let dev = try #require(try Support.open(seed, readOnly: false) as? QCOW2Image)
            let data = [UInt8](repeating: 0x5a, count: 512)
            while try dev.file.size() < (2 << 20) - 2048 {
                try data.withUnsafeBytes { try dev.write($0, at: UInt64(filled)) }
                filled += 512
            }
        }
        #expect(try Support.qemuImg("check", seed).status == 0)
        var budget = 0, completed = false, sawGrowth = false
        while !completed && budget < 400 {
            let path = dir.file("crash-\(budget).qcow2")
            try Support.copy(seed, to: path)
            do {
                let dev = try #require(try Support.open(path, readOnly: false) as? QCOW2Image)
                let before = dev.header.refcountTableOffset
                dev.file.writeBudget.store(budget, ordering: .relaxed)
                do {
                    let data = [UInt8](repeating: 0xc3, count: 8192)
                    try data.withUnsafeBytes { try dev.write($0, at: UInt64(filled)) }
                    try dev.flush()
                    completed = true
                    sawGrowth = try QCOW2Header.parse(file: dev.file).refcountTableOffset != before
                } catch DiskImageError.io(let op, _, _) where op.contains("simulated crash") {}
            }
            let check = try Support.qemuImg("check", path)
            #expect(check.status == 0 || check.status == 3, "crash after \(budget) writes: \(check.stdout)")
            try? FileManager.default.removeItem(atPath: path)
            budget += 1
        }
        #expect(completed && sawGrowth)
    }

    @Test("an image QEMU left dirty (lazy refcounts, killed) is repaired, then written",
          .enabled(if: Support.hasQemuImg, Comment(rawValue: Support.noQemu)))
    func qemuDirtyImage() throws {
        let dir = try Support.TempDir()
        let path = dir.file("lazy.qcow2")
        try Support.qemuImg("create", "-q", "-f", "qcow2", "-o", "cluster_size=4k,lazy_refcounts=on", path, "1M")
        // qemu-io dies before it can write the refcounts back: the image is dirty and its refcounts too low.
        _ = try Support.qemuIO("-f", "qcow2", "-c", "write -P 0x5a 0 64k", "-c", "write -P 0x6b 512k 8k",
                               "-c", "sigraise 9", path)
        let dirty = try QCOW2Header.parse(file: try ImageFile(path: path, writable: false, lock: .unlocked))
        try #require(dirty.isDirty, "qemu-io did not leave the image dirty")
        #expect(try Support.qemuImg("check", path).status != 0)
        var model = try Support.readAll(try Support.open(path))
        #expect(model[0] == 0x5a && model[512 * 1024] == 0x6b)
        do {
            let dev = try Support.open(path, readOnly: false)
            try Self.randomWrites(dev, model: &model, count: 10, maxLength: 10000, seed: 11)
        }
        #expect(try QCOW2Header.parse(file: try ImageFile(path: path, writable: false, lock: .unlocked)).isDirty == false)
        try Self.expectQemuHappy(path, model: model, in: dir)
    }

    @Test("persistent bitmaps are kept but marked in use once we write",
          .enabled(if: Support.hasQemuImg, Comment(rawValue: Support.noQemu)))
    func bitmapsMarkedInUse() throws {
        let dir = try Self.workspace()
        let path = dir.file("bitmaps.qcow2")
        #expect(!(try Support.qemuImg("info", "--output=json", path).stdout.contains("in-use")))
        do {
            let dev = try Support.open(path, readOnly: false)
            let data = [UInt8](repeating: 7, count: 4096)
            try data.withUnsafeBytes { try dev.write($0, at: 300 * 1024) }
        }
        let info = try Support.qemuImg("info", "--output=json", path)
        #expect(info.stdout.contains("\"in-use\""), "\(info.stdout)")
        #expect(info.stdout.contains("backup0"))
        #expect(try Support.qemuImg("check", path).status == 0)
    }

    @Test("autoclear bits are cleared when opening for writing")
    func autoclearCleared() throws {
        let dir = try Support.TempDir()
        let path = dir.file("autoclear.qcow2")
        var img = TestImage()
        img.put64(1 << 5, at: TestImage.autoclear)  // A bit no version of QEMU knows.
        try img.write(to: path)
        _ = try Support.open(path, readOnly: false)
        let header = try QCOW2Header.parse(file: try ImageFile(path: path, writable: false, lock: .unlocked))
        #expect(header.autoclearFeatures == 0)
    }

    @Test("raw images write in place")
    func rawWrites() throws {
        let dir = try Support.TempDir()
        let path = dir.file("disk.raw")
        try Data(count: 65536).write(to: URL(fileURLWithPath: path))
        var model = [UInt8](repeating: 0, count: 65536)
        do {
            let dev = try Support.open(path, readOnly: false)
            try Self.randomWrites(dev, model: &model, count: 20, maxLength: 5000, seed: 3)
        }
        #expect(try Support.readFile(path) == model)
    }
}
