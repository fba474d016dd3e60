import DiskImage
import Foundation
import Testing

/// Reads every fixture through Swiftlet and compares with what `qemu-img convert -O raw` produces.
@Suite("Reads match qemu-img")
struct CrossCheckTests {
    @Test("fixtures exist")
    func fixturesExist() {
        #expect(Support.qcow2Fixtures.count >= 15, "run Tests/DiskImageTests/Fixtures/make-fixtures.sh")
    }

    @Test("whole-image read equals qemu-img convert", .enabled(if: Support.hasQemuImg, Comment(rawValue: Support.noQemu)),
          arguments: Support.qcow2Fixtures)
    func wholeImage(_ name: String) throws {
        let dir = try Support.TempDir()
        let path = Support.fixture(name)
        let expected = try Support.qemuRaw(path, in: dir)
        let dev = try DiskImage.open(path: path)
        #expect(dev.virtualSize == UInt64(expected.count))
        #expect(try Support.readAll(dev) == expected)
        // Odd-sized chunks cross cluster and subcluster boundaries in every way.
        #expect(try Support.readAll(dev, chunk: 3000) == expected)
    }

    @Test("random small reads equal qemu-img convert", .enabled(if: Support.hasQemuImg, Comment(rawValue: Support.noQemu)),
          arguments: Support.qcow2Fixtures)
    func randomReads(_ name: String) throws {
        let dir = try Support.TempDir()
        let path = Support.fixture(name)
        let expected = try Support.qemuRaw(path, in: dir)
        let dev = try DiskImage.open(path: path)
        var rng = SeededRandom(seed: UInt64(name.utf8.reduce(7) { $0 &* 31 &+ UInt64($1) }))
        for _ in 0..<200 {
            let len = Int.random(in: 1...20000, using: &rng)
            let off = Int.random(in: 0...(expected.count - len), using: &rng)
            var buf = [UInt8](repeating: 0xEE, count: len)
            try buf.withUnsafeMutableBytes { try dev.read(into: $0, at: UInt64(off)) }
            #expect(buf[...] == expected[off..<(off + len)], "read of \(len) at \(off)")
        }
    }

    @Test("snapshots read as qemu-img shows them", .enabled(if: Support.hasQemuImg, Comment(rawValue: Support.noQemu)),
          arguments: ["first", "second"])
    func snapshot(_ name: String) throws {
        let dir = try Support.TempDir()
        let path = Support.fixture("snapshots.qcow2")
        let expected = try Support.qemuRaw(path, snapshot: name, in: dir)
        let dev = try DiskImage.open(path: path, snapshot: name)
        #expect(dev.isReadOnly)
        #expect(try Support.readAll(dev) == expected)
        #expect(try Support.readAll(dev) != (try Support.readAll(try DiskImage.open(path: path))))
    }

    @Test("the backing chain is followed with relative names")
    func chain() throws {
        let top = try #require(try DiskImage.open(path: Support.fixture("top.qcow2")) as? QCOW2Image)
        let mid = try #require(top.backing as? QCOW2Image)
        #expect(mid.backing is RawImage)
        #expect(top.header.backingFormat == "qcow2")
        #expect(mid.header.backingFile == "base.raw")
    }

    @Test("large clusters (2 MiB) and compressed 2 MiB clusters",
          .enabled(if: Support.hasQemuImg, Comment(rawValue: Support.noQemu)))
    func largeClusters() throws {
        let dir = try Support.TempDir()
        let img = dir.file("c2m.qcow2")
        try Support.qemuImg("create", "-q", "-f", "qcow2", "-o", "cluster_size=2M", img, "8M")
        let io = try Support.qemuIO("-f", "qcow2", "-c", "write -P 0x5a 1M 3M", "-c", "write -z 6M 1M", img)
        #expect(io.status == 0)
        #expect(try Support.readAll(try DiskImage.open(path: img)) == (try Support.qemuRaw(img, in: dir)))
        let comp = dir.file("c2m-comp.qcow2")
        try Support.qemuImg("convert", "-c", "-O", "qcow2", "-o", "cluster_size=2M", img, comp)
        #expect(try Support.readAll(try DiskImage.open(path: comp)) == (try Support.qemuRaw(img, in: dir)))
    }

    @Test("formats are detected by content, and --format raw never probes")
    func formatDetection() throws {
        let dir = try Support.TempDir()
        // A qcow2 file with a misleading name is still qcow2.
        let misnamed = dir.file("disk.raw")
        try Support.copy(Support.fixture("v3-c64k.qcow2"), to: misnamed)
        #expect(try DiskImage.detectFormat(path: misnamed) == .qcow2)
        #expect(try DiskImage.open(path: misnamed) is QCOW2Image)
        // Forced raw: the qcow2 bytes are the disk.
        let raw = try DiskImage.open(path: misnamed, format: .raw)
        #expect(raw is RawImage)
        var head = [UInt8](repeating: 0, count: 4)
        try head.withUnsafeMutableBytes { try raw.read(into: $0, at: 0) }
        #expect(head == [0x51, 0x46, 0x49, 0xfb])
        // A broken qcow2 header opened as raw is just bytes.
        var broken = TestImage()
        broken.put32(40, at: TestImage.clusterBits)
        try broken.write(to: dir.file("b.img"))
        #expect(try DiskImage.open(path: dir.file("b.img"), format: .raw).virtualSize == UInt64(broken.bytes.count))
        // Forced qcow2 on a raw file is refused.
        #expect(throws: DiskImageError.notQcow2(path: Support.fixture("base.raw"))) {
            _ = try DiskImage.open(path: Support.fixture("base.raw"), format: .qcow2)
        }
        #expect(try DiskImage.detectFormat(path: Support.fixture("base.raw")) == .raw)
    }

    @Test("reads outside the disk are refused")
    func outOfRange() throws {
        let dev = try DiskImage.open(path: Support.fixture("v3-c64k.qcow2"))
        var buf = [UInt8](repeating: 0, count: 16)
        #expect(throws: DiskImageError.outOfRange(offset: dev.virtualSize - 8, length: 16, virtualSize: dev.virtualSize)) {
            try buf.withUnsafeMutableBytes { try dev.read(into: $0, at: dev.virtualSize - 8) }
        }
        #expect(throws: DiskImageError.readOnly(path: Support.fixture("v3-c64k.qcow2"))) {
            try buf.withUnsafeBytes { try dev.write($0, at: 0) }
        }
    }

    @Test("the L2 cache stays bounded")
    func l2CacheBounded() throws {
        let dir = try Support.TempDir()
        let img = dir.file("many-l2.qcow2")
        // 512-byte clusters: each L2 table maps 32 KiB, so 8 MiB needs 256 tables.
        try Support.qemuImg("create", "-q", "-f", "qcow2", "-o", "cluster_size=512", img, "8M")
        var args = ["-f", "qcow2"]
        for i in stride(from: 0, to: 8 << 20, by: 32 << 10) { args += ["-c", "write -P \(i / (32 << 10) % 250 + 1) \(i) 512"] }
        args.append(img)
        _ = try Support.run("/usr/bin/qemu-io", args)
        let dev = try #require(try DiskImage.open(path: img) as? QCOW2Image)
        let expected = try Support.qemuRaw(img, in: dir)
        #expect(try Support.readAll(dev, chunk: 4096) == expected)
        #expect(dev.cachedL2Tables <= dev.l2CacheLimit)
        #expect(dev.l2CacheLimit < 256)
    }
}
