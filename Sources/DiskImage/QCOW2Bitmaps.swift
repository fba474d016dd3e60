import Basics
/// One entry of the persistent-bitmap directory (a dirty bitmap QEMU keeps for incremental backup).
///
/// Swiftlet never uses bitmap contents, but QEMU refuses to open an image whose bitmap
/// directory or tables break the rules below (`qcow2-bitmap.c`, `bitmap_list_load` and
/// `load_bitmap`), so `BitmapDirectoryEntry.load` checks the same at open.
struct BitmapDirectoryEntry: Sendable, Equatable {
    var entryOffset: UInt64   // Host offset of this directory entry (flags are at +12).
    var tableOffset: UInt64
    var tableEntries: UInt32
    var flags: UInt32
    var type: UInt8
    var granularityBits: UInt8
    var name: String
    /// The name's bytes up to the first NUL, as QEMU compares them.
    var nameBytes: [UInt8]

    /// Flag bit 0: the bitmap may be out of date (it was not saved after the disk changed).
    static let inUse: UInt32 = 1
    /// Flag bit 1: QEMU enables the bitmap when it opens the image.
    static let auto: UInt32 = 2
    static let reservedFlags: UInt32 = ~(inUse | auto)
    static let maxTableEntries: UInt32 = 0x800_0000
    static let maxBitmapBytes: UInt64 = 0x2000_0000  // 512 MiB of bitmap per bitmap.
    static let maxNameLength = 1023
    static let granularityBits: ClosedRange<UInt8> = 9...31
    static let dirtyTrackingType: UInt8 = 1
    /// Bitmap table entries: bits 9-55 are the data cluster offset, bit 0 "all ones" when there is none.
    static let tableEntryReserved: UInt64 = 0xff00_0000_0000_01fe
    static let tableEntryOffsetMask: UInt64 = 0x00ff_ffff_ffff_fe00
    static let tableEntryAllOnes: UInt64 = 1

    var isInUse: Bool { flags & Self.inUse != 0 }

    /// Reads the directory the header extension points to and checks it as QEMU does at open:
    /// the directory's structure and entry count, each entry's fields, duplicate names, and for
    /// each bitmap not in use, its table's entries and that the table fits the disk size exactly.
    /// `diskSize` is the disk size QEMU sees (the virtual size rounded down to 512 bytes).
    static func load(file: ImageFile, header h: QCOW2Header, diskSize: UInt64) throws -> [BitmapDirectoryEntry] {
        guard h.bitmapCount > 0 else { return [] }
        let dir = try file.readBytes(Int(h.bitmapDirectorySize), at: h.bitmapDirectoryOffset, what: "bitmap directory")
        let cs = h.clusterSize
        var entries: [BitmapDirectoryEntry] = []
        var pos = 0
        while pos < dir.count {
            let index = entries.count
            guard dir.count - pos >= 24 else {
                throw DiskImageError.badBitmapDirectory("entry \(index) runs past the end of the directory")
            }
            guard index < Int(h.bitmapCount) else {
                throw DiskImageError.badBitmapDirectory(
                    "it holds more entries than the \(h.bitmapCount) the header extension announces")
            }
            let nameSize = Int(dir.be(pos + 18, as: UInt16.self))
            let extraSize = UInt64(dir.be(pos + 20, as: UInt32.self))
            let length = (24 + UInt64(nameSize) + extraSize + 7) & ~7
            guard length <= UInt64(dir.count - pos) else {
                throw DiskImageError.badBitmapDirectory("entry \(index) runs past the end of the directory")
            }
            let nameStart = pos + 24 + Int(extraSize)
            let nameBytes = dir[nameStart..<(nameStart + nameSize)].prefix { $0 != 0 }
            let e = BitmapDirectoryEntry(
                entryOffset: h.bitmapDirectoryOffset + UInt64(pos), tableOffset: dir.be(pos), tableEntries: dir.be(pos + 8),
                flags: dir.be(pos + 12), type: dir[pos + 16], granularityBits: dir[pos + 17],
                name: String(decoding: nameBytes, as: UTF8.self), nameBytes: Array(nameBytes))
            func bad(_ reason: String) -> DiskImageError { .badBitmap(index: index, name: e.name, reason: reason) }
            guard extraSize == 0 else { throw bad("it has \(extraSize) bytes of extra data, which QEMU does not support") }
            guard e.tableEntries > 0 else { throw bad("its bitmap table has no entries") }
            guard e.tableOffset != 0 else { throw bad("its bitmap table is at offset 0") }
            guard e.tableOffset & (cs - 1) == 0 else {
                throw bad("its bitmap table at 0x\(Hex.digits(e.tableOffset)) is not cluster-aligned")
            }
            guard e.tableEntries <= maxTableEntries else {
                throw bad("its bitmap table has \(e.tableEntries) entries, more than \(maxTableEntries)")
            }
            guard granularityBits.contains(e.granularityBits) else {
                throw bad("granularity 2^\(e.granularityBits) is outside 2^9...2^31")
            }
            guard e.flags & reservedFlags == 0 else { throw bad("reserved flag bits 0x\(Hex.digits(UInt64(e.flags))) are set") }
            guard nameSize <= maxNameLength else { throw bad("its name is \(nameSize) bytes, more than \(maxNameLength)") }
            guard e.type == dirtyTrackingType else { throw bad("type \(e.type) is not 1 (dirty tracking)") }
            let bitmapBytes = UInt64(e.tableEntries) * cs
            guard bitmapBytes <= maxBitmapBytes else {
                throw bad("its bitmap table of \(e.tableEntries) clusters is more than 512 MiB of bitmap")
            }
            guard e.isInUse || diskSize <= (bitmapBytes * 8) << UInt64(e.granularityBits) else {
                throw bad("its bitmap table of \(e.tableEntries) clusters cannot cover the \(diskSize)-byte disk")
            }
            entries.append(e)
            pos += Int(length)
        }
        guard entries.count == Int(h.bitmapCount) else {
            throw DiskImageError.badBitmapDirectory(
                "it holds \(entries.count) entries, fewer than the \(h.bitmapCount) the header extension announces")
        }

        // Loading: names must be unique (an in-use duplicate of a loaded name is skipped), and a
        // bitmap that is not in use must have a table of exactly the right size with valid entries.
        let fileSize = try file.size()
        var names = Set<[UInt8]>()
        var checked = TableEntryCache()
        for (index, e) in entries.enumerated() {
            if e.isInUse && names.contains(e.nameBytes) { continue }
            guard names.insert(e.nameBytes).inserted else {
                throw DiskImageError.badBitmap(index: index, name: e.name, reason: "another bitmap has the same name")
            }
            guard !e.isInUse else { continue }
            let needed = tableClusters(diskSize: diskSize, granularityBits: e.granularityBits, clusterSize: cs)
            guard UInt64(e.tableEntries) == needed else {
                throw DiskImageError.badBitmap(
                    index: index, name: e.name,
                    reason: "its bitmap table has \(e.tableEntries) entries but the disk needs exactly \(needed)")
            }
            let bytes = UInt64(e.tableEntries) * 8
            guard e.tableOffset <= fileSize, bytes <= fileSize - e.tableOffset else {
                throw DiskImageError.badBitmap(
                    index: index, name: e.name, reason: "its bitmap table at 0x\(Hex.digits(e.tableOffset)) runs past the end of the file")
            }
            if let bad = try checked.firstBadEntry(file: file, offset: e.tableOffset, count: UInt64(e.tableEntries),
                                                   clusterSize: cs) {
                throw DiskImageError.badBitmap(
                    index: index, name: e.name,
                    reason: "bitmap table entry \(bad.index) (0x\(Hex.digits(bad.entry))) \(tableEntryProblem(bad.entry, clusterSize: cs) ?? "")")
            }
        }
        return entries
    }

    /// Clusters of bitmap data QEMU expects for a disk of `diskSize` bytes at this granularity:
    /// one bit per granule, stored in whole 64-bit words.
    static func tableClusters(diskSize: UInt64, granularityBits: UInt8, clusterSize: UInt64) -> UInt64 {
        guard diskSize > 0 else { return 0 }
        let words = (((diskSize - 1) >> UInt64(granularityBits)) >> 6) + 1
        return (words * 8 + clusterSize - 1) / clusterSize
    }

    /// Why a bitmap table entry is invalid, or nil if it is valid (QEMU's `check_table_entry`).
    static func tableEntryProblem(_ entry: UInt64, clusterSize: UInt64) -> String? {
        if entry & tableEntryReserved != 0 { return "has reserved bits set" }
        let offset = entry & tableEntryOffsetMask
        guard offset != 0 else { return nil }
        if entry & tableEntryAllOnes != 0 { return "has both a data offset and the all-ones flag" }
        if offset & (clusterSize - 1) != 0 { return "points at 0x\(Hex.digits(offset)), which is not cluster-aligned" }
        return nil
    }

    /// Remembers how many leading entries of each table cluster were found valid, so that tables
    /// sharing clusters (as a hostile directory can make thousands of them do) are read once.
    struct TableEntryCache {
        var validPrefix: [UInt64: UInt64] = [:]

        mutating func firstBadEntry(file: ImageFile, offset: UInt64, count: UInt64,
                                    clusterSize: UInt64) throws -> (index: UInt64, entry: UInt64)? {
            let perCluster = clusterSize / 8
            var done: UInt64 = 0
            while done < count {
                let base = offset + done * 8
                let want = min(perCluster, count - done)
                let have = validPrefix[base] ?? 0
                if have < want {
                    let bytes = try file.readBytes(Int((want - have) * 8), at: base + have * 8, what: "bitmap table")
                    for i in 0..<Int(want - have) {
                        let entry: UInt64 = bytes.be(i * 8)
                        if tableEntryProblem(entry, clusterSize: clusterSize) != nil {
                            return (done + have + UInt64(i), entry)
                        }
                    }
                    validPrefix[base] = want
                }
                done += want
            }
            return nil
        }
    }
}
