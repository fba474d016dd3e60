@testable import DiskImage
import Compression
import Foundation
import Testing

/// The library side of `swiftlet image convert/check/info`.
@Suite("Convert, check and info")
struct ToolTests {
    @Test("convert to raw is byte-identical to qemu-img convert -O raw",
          .enabled(if: Support.hasQemuImg, Comment(rawValue: Support.noQemu)),
          arguments: ["v3-c64k.qcow2", "comp-zlib-c64k.qcow2", "comp-zstd-c16k.qcow2", "top.qcow2", "ext-l2-overlay.qcow2",
                      "c512.qcow2", "base.raw"])
    func convert(_ name: String) throws {
        let dir = try Support.TempDir()
        let ours = dir.file("ours.raw"), theirs = dir.file("theirs.raw")
        try Support.qemuImg("convert", "-O", "raw", Support.fixture(name), theirs)
        for threads in [1, 3] {
            try RawConverter.convert(try DiskImage.open(path: Support.fixture(name)), to: ours, threads: threads)
            #expect(try Support.readFile(ours) == (try Support.readFile(theirs)))
        }
    }

    @Test("convert onto an existing file (larger, smaller, full of data) gives qemu-img's bytes and holes",
          .enabled(if: Support.hasQemuImg, Comment(rawValue: Support.noQemu)),
          arguments: ["v3-c64k.qcow2", "comp-zlib-c64k.qcow2", "top.qcow2", "ext-l2-overlay.qcow2", "c512.qcow2"])
    func convertOntoExistingFile(_ name: String) throws {
        let dir = try Support.TempDir()
        let theirs = dir.file("theirs.raw"), fresh = dir.file("fresh.raw"), ours = dir.file("ours.raw")
        try Support.qemuImg("convert", "-O", "raw", Support.fixture(name), theirs)
        let expected = try Support.readFile(theirs)
        try RawConverter.convert(try DiskImage.open(path: Support.fixture(name)), to: fresh)
        for size in [expected.count * 2, expected.count / 2, expected.count] {
            try Data(repeating: 0xa5, count: size).write(to: URL(fileURLWithPath: ours))
            try RawConverter.convert(try DiskImage.open(path: Support.fixture(name)), to: ours, threads: 3)
            #expect(try Support.readFile(ours) == expected, "over an existing file of \(size) bytes")
            var a = stat(), b = stat()
            #expect(stat(ours, &a) == 0 && stat(fresh, &b) == 0)
            #expect(a.st_blocks <= b.st_blocks + 8, "zeros are holes, as in a new file: \(a.st_blocks) vs \(b.st_blocks) blocks")
        }
    }

    /// QEMU counts whole sectors: a qcow2 virtual size is rounded down (`header.size / 512`),
    /// a raw file's size up (its last partial sector reads as zeros), and `create` rounds up.
    @Test("sizes that are not a multiple of 512 give what qemu-img gives",
          .enabled(if: Support.hasQemuImg, Comment(rawValue: Support.noQemu)))
    func oddSizes() throws {
        let dir = try Support.TempDir()
        // A 4 MiB qcow2 whose header says one byte more.
        let odd = dir.file("odd.qcow2")
        try Support.qemuImg("create", "-q", "-f", "qcow2", odd, "4M")
        try Support.qemuIO("-f", "qcow2", "-c", "write -P 0x3c 4190208 4096", odd)
        let fd = open(odd, O_WRONLY)
        var size = (UInt64(4 << 20) + 1).bigEndian
        #expect(pwrite(fd, &size, 8, 24) == 8)
        close(fd)
        for (source, expectedSize) in [(odd, 4 << 20), (Support.fixture("base.raw"), -1)] {
            let ours = dir.file("ours.raw"), theirs = dir.file("theirs.raw")
            try Support.qemuImg("convert", "-O", "raw", source, theirs)
            try RawConverter.convert(try DiskImage.open(path: source), to: ours)
            #expect(try Support.readFile(ours) == (try Support.readFile(theirs)))
            if expectedSize >= 0 { #expect(try Support.readFile(ours).count == expectedSize) }
        }
        // A 1000-byte raw file is a 1024-byte disk for QEMU.
        let short = dir.file("short.raw")
        try Data((0..<1000).map { UInt8(truncatingIfNeeded: $0 * 7 + 1) }).write(to: URL(fileURLWithPath: short))
        #expect(try DiskImage.open(path: short).virtualSize == 1024)
        try RawConverter.convert(try DiskImage.open(path: short), to: dir.file("short-ours.raw"))
        try Support.qemuImg("convert", "-O", "raw", short, dir.file("short-theirs.raw"))
        #expect(try Support.readFile(dir.file("short-ours.raw")) == (try Support.readFile(dir.file("short-theirs.raw"))))
        #expect(try Support.readFile(dir.file("short-ours.raw")).count == 1024)
        // create rounds 1000 bytes up to 1024, like qemu-img create.
        try QCOW2Image.create(path: dir.file("c1000.qcow2"), size: 1000)
        try Support.qemuImg("create", "-q", "-f", "qcow2", dir.file("q1000.qcow2"), "1000")
        #expect(try DiskImage.open(path: dir.file("c1000.qcow2")).virtualSize == 1024)
        #expect(try DiskImage.info(path: dir.file("q1000.qcow2")).virtualSize == 1024)
    }

    @Test("a snapshot converts at the image's current size, like qemu-img convert -l",
          .enabled(if: Support.hasQemuImg, Comment(rawValue: Support.noQemu)))
    func snapshotAfterResize() throws {
        let dir = try Support.TempDir()
        let img = dir.file("grown.qcow2")
        try Support.qemuImg("create", "-q", "-f", "qcow2", img, "1M")
        try Support.qemuIO("-f", "qcow2", "-c", "write -P 7 0 64k", img)
        try Support.qemuImg("snapshot", "-c", "small", img)
        try Support.qemuImg("resize", "-q", img, "3M")
        try Support.qemuIO("-f", "qcow2", "-c", "write -P 9 2M 64k", img)
        let expected = try Support.qemuRaw(img, snapshot: "small", in: dir)
        #expect(expected.count == 3 << 20)
        #expect(try Support.readAll(try DiskImage.open(path: img, snapshot: "small")) == expected)
    }

    @Test("our check agrees with qemu-img check on every fixture",
          .enabled(if: Support.hasQemuImg, Comment(rawValue: Support.noQemu)), arguments: Support.qcow2Fixtures)
    func checkFixtures(_ name: String) throws {
        let q = try #require(try DiskImage.open(path: Support.fixture(name)) as? QCOW2Image)
        let result = try q.check()
        #expect(result.exitStatus == 0, "\(result.messages)")
        #expect(try Support.qemuImg("check", Support.fixture(name)).status == result.exitStatus)
    }

    /// Builds TestImage variants with a leak or a corruption and compares our verdict with QEMU's.
    @Test("check finds leaks and corruptions like qemu-img", .enabled(if: Support.hasQemuImg, Comment(rawValue: Support.noQemu)),
          arguments: [("clean", 0), ("leak", 3), ("refcount too low", 2), ("COPIED flag wrong", 2), ("L2 overlaps L1", 2)])
    func checkProblems(_ kind: String, _ status: Int32) throws {
        let dir = try Support.TempDir()
        let path = dir.file("img.qcow2")
        var img = TestImage()
        let cs = TestImage.clusterSize
        switch kind {
        case "leak":
            img.bytes += [UInt8](repeating: 0, count: cs)        // Cluster 8, referenced by nothing...
            img.put16(1, at: 2 * cs + 16)                          // ...but with refcount 1.
        case "refcount too low":
            img.put16(0, at: 2 * cs + 10)                          // Data cluster 5 has refcount 0.
        case "COPIED flag wrong":
            img.put64(UInt64(5 * cs), at: TestImage.l2EntryOffset)  // Refcount 1 without COPIED.
        case "L2 overlaps L1":
            img.put64(UInt64(3 * cs) | 1 << 63, at: 3 * cs)          // L1[0] points at the L1 table itself.
        default: break
        }
        try img.write(to: path)
        let ours = try #require(try DiskImage.open(path: path) as? QCOW2Image).check()
        let qemu = try Support.qemuImg("check", path)
        #expect(ours.exitStatus == status, "\(ours.messages)")
        #expect(qemu.status == status, "\(qemu.stdout)")
        #expect(ours.corruptions > 0 || status != 2)
        #expect(ours.leaks > 0 || status != 3)
    }

    @Test("info describes the chain, snapshots and features")
    func info() throws {
        let top = try DiskImage.info(path: Support.fixture("top.qcow2"))
        #expect(top.format == "qcow2")
        #expect(top.clusterSize == 4096)
        #expect(top.backingFile == "mid.qcow2")
        #expect(top.backing?.map(\.format) == ["qcow2", "raw"])
        let snaps = try DiskImage.info(path: Support.fixture("snapshots.qcow2"))
        #expect(snaps.snapshots?.map(\.name) == ["first", "second"])
        let zstd = try DiskImage.info(path: Support.fixture("comp-zstd-c16k.qcow2"))
        #expect(zstd.compressionType == "zstd")
        #expect(zstd.incompatibleFeatures == ["compression type"])
        #expect(try DiskImage.info(path: Support.fixture("lazy.qcow2")).compatibleFeatures == ["lazy refcounts"])
        #expect(try DiskImage.info(path: Support.fixture("ext-l2.qcow2")).extendedL2 == true)
        #expect(try DiskImage.info(path: Support.fixture("v2-c4k.qcow2")).version == 2)
    }
}

@Suite("Decompression back ends")
struct DecompressionTests {
    @Test("zlib and libdeflate (when present) inflate every cluster identically",
          arguments: ["comp-zlib-c16k.qcow2", "comp-zlib-c64k.qcow2", "comp-rewritten.qcow2"])
    func backendsAgree(_ name: String) throws {
        let q = try #require(try DiskImage.open(path: Support.fixture(name)) as? QCOW2Image)
        var compressed = 0
        for index in 0..<(q.virtualSize / q.clusterSize) {
            guard case let .compressed(host, size) = try q.resolve(index) else { continue }
            compressed += 1
            let input = try q.file.readBytes(Int(size), at: host, what: "test")
            var viaZlib = [UInt8](repeating: 0, count: Int(q.clusterSize))
            var viaDefault = [UInt8](repeating: 1, count: Int(q.clusterSize))
            try input.withUnsafeBytes { src in
                try viaZlib.withUnsafeMutableBytes {
                    try ClusterDecompressor.inflate(src, into: $0, hostOffset: host, allowLibDeflate: false)
                }
                try viaDefault.withUnsafeMutableBytes {
                    try ClusterDecompressor.inflate(src, into: $0, hostOffset: host)
                }
            }
            #expect(viaZlib == viaDefault, "cluster \(index)")
        }
        #expect(compressed > 0)
        if LibDeflate.shared == nil { print("note: libdeflate.so.0 not found; only zlib was exercised") }
    }
}

@Suite("Zero detection")
struct ZeroDetectionTests {
    @Test("isAllZero finds a single non-zero byte anywhere, including the tail")
    func allZero() {
        for size in [0, 1, 7, 8, 9, 4095, 4096, 4097, 8200] {
            var bytes = [UInt8](repeating: 0, count: size)
            #expect(bytes.withUnsafeBytes { RawConverter.isAllZero($0) })
            for position in Set([0, size / 2, size - 1]) where size > 0 {
                bytes[position] = 0x80
                #expect(!bytes.withUnsafeBytes { RawConverter.isAllZero($0) }, "size \(size), byte \(position)")
                bytes[position] = 0
            }
        }
    }

    @Test("ranges reported as known zero really read as zero", .enabled(if: Support.hasQemuImg, Comment(rawValue: Support.noQemu)),
          arguments: Support.qcow2Fixtures)
    func knownZeroIsZero(_ name: String) throws {
        let dir = try Support.TempDir()
        let expected = try Support.qemuRaw(Support.fixture(name), in: dir)
        let dev = try DiskImage.open(path: Support.fixture(name))
        var known = 0
        for piece in stride(from: 0, to: expected.count, by: 2048) {
            let n = min(2048, expected.count - piece)
            if try dev.isKnownZero(at: UInt64(piece), length: UInt64(n)) {
                known += 1
                #expect(expected[piece..<(piece + n)].allSatisfy { $0 == 0 }, "\(name): bytes at \(piece)")
            }
        }
        // Every fixture has unwritten space, except the fully compressed ones.
        #expect(known > 0 || name.hasPrefix("comp-"))
    }
}
