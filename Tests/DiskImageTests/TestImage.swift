import DiskImage
import Foundation

/// Builds a small, valid qcow2 v3 image in memory, so a test can corrupt one field and
/// check that Swiftlet refuses the result with the right error.
///
/// Layout (4 KiB clusters, 1 MiB virtual size, 16-bit refcounts):
///   cluster 0  header (length 112) + extensions
///   cluster 1  refcount table -> cluster 2
///   cluster 2  refcount block: clusters 0...7 have refcount 1
///   cluster 3  L1 table, 1 entry -> cluster 4
///   cluster 4  L2 table: [0] data at cluster 5, [1] compressed at cluster 6, [2] zero flag
///   cluster 5  data: bytes 0xAB
///   cluster 6-7  a deflate "stored" block holding 4096 bytes of `i % 251`
struct TestImage {
    static let clusterSize = 4096
    static let virtualSize: UInt64 = 1 << 20
    var bytes = [UInt8](repeating: 0, count: 8 * TestImage.clusterSize)

    // Header field offsets.
    static let version = 4, backingOffset = 8, backingSize = 16, clusterBits = 20, size = 24
    static let cryptMethod = 32, l1Size = 36, l1Offset = 40, refcountTableOffset = 48
    static let refcountTableClusters = 56, snapshotCount = 60, snapshotsOffset = 64
    static let incompatible = 72, compatible = 80, autoclear = 88, refcountOrder = 96
    static let headerLength = 100, compressionType = 104

    static let l2EntryOffset = 4 * clusterSize
    static let compressedOffset: UInt64 = 6 * 4096

    /// The guest contents of the valid image.
    static var expectedContents: [UInt8] {
        var out = [UInt8](repeating: 0, count: Int(virtualSize))
        for i in 0..<clusterSize { out[i] = 0xAB }
        for i in 0..<clusterSize { out[clusterSize + i] = UInt8(i % 251) }
        return out
    }

    init() {
        let cs = Self.clusterSize
        put32(0x5146_49fb, at: 0)
        put32(3, at: Self.version)
        put32(12, at: Self.clusterBits)
        put64(Self.virtualSize, at: Self.size)
        put32(1, at: Self.l1Size)
        put64(UInt64(3 * cs), at: Self.l1Offset)
        put64(UInt64(1 * cs), at: Self.refcountTableOffset)
        put32(1, at: Self.refcountTableClusters)
        put32(4, at: Self.refcountOrder)
        put32(112, at: Self.headerLength)
        // Extensions: none yet, just the end marker (zeros) at 112.
        put64(UInt64(2 * cs), at: cs)                        // Refcount table[0].
        for c in 0..<8 { put16(1, at: 2 * cs + 2 * c) }      // Refcount block.
        put64(UInt64(4 * cs) | 1 << 63, at: 3 * cs)           // L1[0], COPIED.
        put64(UInt64(5 * cs) | 1 << 63, at: Self.l2EntryOffset)  // L2[0]: data, COPIED.
        // L2[1]: compressed; 4101 bytes from offset 6*4096 need 9 sectors, 8 beyond the first.
        put64(1 << 62 | 8 << 58 | Self.compressedOffset, at: Self.l2EntryOffset + 8)
        put64(1, at: Self.l2EntryOffset + 16)                // L2[2]: zero flag.
        for i in 0..<cs { bytes[5 * cs + i] = 0xAB }
        // Deflate stored block: BFINAL=1, BTYPE=00, LEN=4096, NLEN=~4096, then the bytes.
        let z = 6 * cs
        bytes[z] = 0x01
        bytes[z + 1] = 0x00; bytes[z + 2] = 0x10
        bytes[z + 3] = 0xff; bytes[z + 4] = 0xef
        for i in 0..<cs { bytes[z + 5 + i] = UInt8(i % 251) }
    }

    mutating func put8(_ v: UInt8, at o: Int) { bytes[o] = v }
    mutating func put16(_ v: UInt16, at o: Int) { for i in 0..<2 { bytes[o + i] = UInt8(truncatingIfNeeded: v >> (8 * (1 - i))) } }
    mutating func put32(_ v: UInt32, at o: Int) { for i in 0..<4 { bytes[o + i] = UInt8(truncatingIfNeeded: v >> (8 * (3 - i))) } }
    mutating func put64(_ v: UInt64, at o: Int) { for i in 0..<8 { bytes[o + i] = UInt8(truncatingIfNeeded: v >> (8 * (7 - i))) } }

    /// Writes header extensions (type, payload) starting at 112, followed by the end marker.
    mutating func setExtensions(_ exts: [(UInt32, [UInt8])]) {
        var o = 112
        for (type, data) in exts {
            put32(type, at: o)
            put32(UInt32(data.count), at: o + 4)
            for (i, b) in data.enumerated() { bytes[o + 8 + i] = b }
            o += 8 + (data.count + 7) / 8 * 8
        }
        put64(0, at: o)
    }

    /// Names a backing file (placed at offset 2048 of the header cluster) with an optional format.
    mutating func setBacking(_ name: String, format: String?) {
        if let format { setExtensions([(0xe279_2aca, Array(format.utf8))]) }
        let nameBytes = Array(name.utf8)
        for (i, b) in nameBytes.enumerated() { bytes[2048 + i] = b }
        put64(2048, at: Self.backingOffset)
        put32(UInt32(nameBytes.count), at: Self.backingSize)
    }

    /// One persistent bitmap's directory entry, valid by default for the 1 MiB disk: its table
    /// (1 entry, all zeros: no data clusters) is cluster 9, granularity 64 KiB.
    struct Bitmap {
        var tableOffset = UInt64(9 * TestImage.clusterSize)
        var tableEntries: UInt32 = 1
        var flags: UInt32 = 0
        var type: UInt8 = 1
        var granularityBits: UInt8 = 16
        var name = Array("b0".utf8)
        var extra: [UInt8] = []
        var nameSize: UInt16? = nil

        var bytes: [UInt8] {
            var e = [UInt8](repeating: 0, count: 24)
            for i in 0..<8 { e[i] = UInt8(truncatingIfNeeded: tableOffset >> (8 * (7 - i))) }
            for i in 0..<4 { e[8 + i] = UInt8(truncatingIfNeeded: tableEntries >> (8 * (3 - i))) }
            for i in 0..<4 { e[12 + i] = UInt8(truncatingIfNeeded: flags >> (8 * (3 - i))) }
            e[16] = type
            e[17] = granularityBits
            let n = nameSize ?? UInt16(name.count)
            e[18] = UInt8(n >> 8); e[19] = UInt8(n & 0xff)
            let x = UInt32(extra.count)
            for i in 0..<4 { e[20 + i] = UInt8(truncatingIfNeeded: x >> (8 * (3 - i))) }
            e += extra + name
            while e.count % 8 != 0 { e.append(0) }
            return e
        }
    }

    /// Adds persistent bitmaps: the directory in a new cluster 8 and a zeroed bitmap table in a
    /// new cluster 9 (both with refcount 1), the bitmaps extension and autoclear bit 0. The
    /// extension's fields can be overridden to break it.
    mutating func setBitmaps(_ bitmaps: [Bitmap], announced: UInt32? = nil, reserved: UInt32 = 0,
                             directorySize: UInt64? = nil, directoryOffset: UInt64 = UInt64(8 * TestImage.clusterSize)) {
        let cs = Self.clusterSize
        if bytes.count < 10 * cs { bytes += [UInt8](repeating: 0, count: 10 * cs - bytes.count) }
        let dir = bitmaps.flatMap(\.bytes)
        precondition(dir.count <= cs)
        for (i, b) in dir.enumerated() { bytes[8 * cs + i] = b }
        put16(1, at: 2 * cs + 16)  // Refcounts of clusters 8 and 9.
        put16(1, at: 2 * cs + 18)
        var ext = [UInt8](repeating: 0, count: 24)
        let count = announced ?? UInt32(bitmaps.count)
        let size = directorySize ?? UInt64(dir.count)
        for i in 0..<4 { ext[i] = UInt8(truncatingIfNeeded: count >> (8 * (3 - i))) }
        for i in 0..<4 { ext[4 + i] = UInt8(truncatingIfNeeded: reserved >> (8 * (3 - i))) }
        for i in 0..<8 { ext[8 + i] = UInt8(truncatingIfNeeded: size >> (8 * (7 - i))) }
        for i in 0..<8 { ext[16 + i] = UInt8(truncatingIfNeeded: directoryOffset >> (8 * (7 - i))) }
        setExtensions([(0x2385_2875, ext)])
        put64(1, at: Self.autoclear)
    }

    func write(to path: String) throws {
        try Data(bytes).write(to: URL(fileURLWithPath: path))
    }

    /// A feature name table entry (48 bytes).
    static func featureEntry(type: UInt8, bit: UInt8, name: String) -> [UInt8] {
        var e = [UInt8](repeating: 0, count: 48)
        e[0] = type
        e[1] = bit
        for (i, b) in name.utf8.prefix(46).enumerated() { e[2 + i] = b }
        return e
    }
}
