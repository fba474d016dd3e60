import Basics
/// The parsed and validated qcow2 header, its extensions, backing file name and snapshot table.
///
/// Owns no file: `parse` reads what it needs and checks every field the way
/// QEMU does before any guest data is read (see docs/disk-images.md).
public struct QCOW2Header: Sendable {
    public static let magic: UInt32 = 0x5146_49fb  // "QFI\xfb"

    // Limits, as QEMU's: they bound what a hostile header can make us allocate.
    public static let maxL1Entries: UInt64 = 32 * 1024 * 1024 / 8
    public static let maxRefcountTableBytes: UInt64 = 8 * 1024 * 1024
    public static let maxSnapshots: UInt32 = 65536
    public static let maxSnapshotExtraData: UInt32 = 1024
    public static let maxBackingNameLength: UInt32 = 1023
    public static let maxTotalSnapshotL1Entries: UInt64 = 1 << 27
    /// QEMU's limit on the snapshot table's total size (entries, extra data and names).
    public static let maxSnapshotTableBytes: UInt64 = 1024 * 65536
    public static let maxBitmaps: UInt32 = 65535
    public static let maxBitmapDirectoryBytes: UInt64 = 1024 * 65535

    // Header extension types.
    public static let extEnd: UInt32 = 0
    public static let extBackingFormat: UInt32 = 0xe279_2aca
    public static let extFeatureNames: UInt32 = 0x6803_f857
    public static let extBitmaps: UInt32 = 0x2385_2875
    public static let extEncryption: UInt32 = 0x0537_be77
    public static let extDataFile: UInt32 = 0x4441_5441

    // Feature bits.
    public static let incompatDirty: UInt64 = 1 << 0
    public static let incompatCorrupt: UInt64 = 1 << 1
    public static let incompatDataFile: UInt64 = 1 << 2
    public static let incompatCompression: UInt64 = 1 << 3
    public static let incompatExtendedL2: UInt64 = 1 << 4
    public static let compatLazyRefcounts: UInt64 = 1 << 0
    public static let autoclearBitmaps: UInt64 = 1 << 0
    public static let autoclearRawDataFile: UInt64 = 1 << 1

    public var version: UInt32
    public var backingFileOffset: UInt64
    public var backingFileSize: UInt32
    public var clusterBits: UInt32
    public var size: UInt64
    public var cryptMethod: UInt32
    public var l1Size: UInt32
    public var l1TableOffset: UInt64
    public var refcountTableOffset: UInt64
    public var refcountTableClusters: UInt32
    public var snapshotCount: UInt32
    public var snapshotsOffset: UInt64
    public var incompatibleFeatures: UInt64 = 0
    public var compatibleFeatures: UInt64 = 0
    public var autoclearFeatures: UInt64 = 0
    public var refcountOrder: UInt32 = 4
    public var headerLength: UInt32 = 72
    public var compressionType: UInt8 = 0

    // From the extensions and the rest of the first cluster.
    public var backingFile: String?
    public var backingFormat: String?
    public var featureNames: [FeatureName] = []
    public var bitmapCount: UInt32 = 0
    /// The bitmap directory, when the bitmaps extension is present and valid (autoclear bit 0 set).
    public var bitmapDirectoryOffset: UInt64 = 0
    public var bitmapDirectorySize: UInt64 = 0
    /// The checked bitmap directory (empty without valid bitmaps).
    var bitmapDirectory: [BitmapDirectoryEntry] = []
    public var unknownExtensions: [UInt32] = []
    /// The external data file named by its extension; only used when incompatible bit 2 is set
    /// (which Swiftlet refuses), ignored otherwise, as by QEMU.
    public var dataFileName: String?
    public var snapshots: [QCOW2Snapshot] = []
    /// Bytes from the start of the snapshot table to the end of its last entry.
    public var snapshotTableSize: UInt64 = 0

    /// One entry of the feature name table extension.
    public struct FeatureName: Sendable, Equatable {
        public var type: UInt8  // 0 incompatible, 1 compatible, 2 autoclear
        public var bit: UInt8
        public var name: String
    }

    public var clusterSize: UInt64 { 1 << UInt64(clusterBits) }
    public var extendedL2: Bool { incompatibleFeatures & Self.incompatExtendedL2 != 0 }
    /// Bytes per L2 entry: 8, or 16 with extended L2 entries (entry + subcluster bitmap).
    public var l2EntryBytes: UInt64 { extendedL2 ? 16 : 8 }
    public var l2Entries: UInt64 { clusterSize / l2EntryBytes }
    public var refcountBits: UInt64 { 1 << UInt64(refcountOrder) }
    public var isCorrupt: Bool { incompatibleFeatures & Self.incompatCorrupt != 0 }
    public var isDirty: Bool { incompatibleFeatures & Self.incompatDirty != 0 }
    /// The disk size QEMU uses: the header's size rounded down to whole 512-byte sectors
    /// (`bs->total_sectors = header.size / BDRV_SECTOR_SIZE`).
    public var diskSize: UInt64 { size & ~511 }
    public var compressionName: String { compressionType == 1 ? "zstd" : "zlib" }

    /// Name for a feature bit, from the image's own feature table or the spec.
    public func featureName(type: UInt8, bit: UInt8) -> String {
        if let f = featureNames.first(where: { $0.type == type && $0.bit == bit }), !f.name.isEmpty { return f.name }
        switch (type, bit) {
        case (0, 0): return "dirty bit"
        case (0, 1): return "corrupt bit"
        case (0, 2): return "external data file"
        case (0, 3): return "compression type"
        case (0, 4): return "extended L2 entries"
        case (1, 0): return "lazy refcounts"
        case (2, 0): return "bitmaps"
        case (2, 1): return "raw external data"
        default: return "bit \(bit)"
        }
    }

    /// Reads and validates the header of `file`.
    ///
    /// With `forCheck`, what `qemu-img check` opens but then reports is let through, as QEMU's
    /// check mode (`BDRV_O_CHECK`) does: a missing refcount table, and snapshots whose L1 table
    /// is misaligned or too large (checked by `QCOW2Image.check`).
    public static func parse(file: ImageFile, forCheck: Bool = false) throws -> QCOW2Header {
        let fileSize = try file.size()
        guard fileSize >= 72 else { throw DiskImageError.shortFile(path: file.path, needed: 72, size: fileSize) }
        let fixed = try file.readBytes(72, at: 0, what: "header")
        guard fixed.be(0, as: UInt32.self) == magic else { throw DiskImageError.notQcow2(path: file.path) }
        var h = QCOW2Header(
            version: fixed.be(4), backingFileOffset: fixed.be(8), backingFileSize: fixed.be(16),
            clusterBits: fixed.be(20), size: fixed.be(24), cryptMethod: fixed.be(32), l1Size: fixed.be(36),
            l1TableOffset: fixed.be(40), refcountTableOffset: fixed.be(48), refcountTableClusters: fixed.be(56),
            snapshotCount: fixed.be(60), snapshotsOffset: fixed.be(64))
        guard h.version == 2 || h.version == 3 else { throw DiskImageError.unsupportedVersion(h.version) }
        guard (9...21).contains(h.clusterBits) else { throw DiskImageError.clusterBitsOutOfRange(h.clusterBits) }
        let clusterSize = h.clusterSize

        // The whole first cluster (or the file, if shorter) holds the header, extensions and backing name.
        let firstLen = Int(min(clusterSize, fileSize))
        let first = try file.readBytes(firstLen, at: 0, what: "header cluster")

        if h.version == 3 {
            guard fileSize >= 104 else { throw DiskImageError.shortFile(path: file.path, needed: 104, size: fileSize) }
            h.incompatibleFeatures = first.be(72)
            h.compatibleFeatures = first.be(80)
            h.autoclearFeatures = first.be(88)
            h.refcountOrder = first.be(96)
            h.headerLength = first.be(100)
            guard h.headerLength >= 104 else { throw DiskImageError.headerTooShort(h.headerLength) }
            guard UInt64(h.headerLength) <= clusterSize else {
                throw DiskImageError.headerExceedsCluster(headerLength: h.headerLength, clusterSize: clusterSize)
            }
            guard h.headerLength % 8 == 0 else { throw DiskImageError.headerLengthMisaligned(h.headerLength) }
            guard UInt64(h.headerLength) <= fileSize else {
                throw DiskImageError.shortFile(path: file.path, needed: UInt64(h.headerLength), size: fileSize)
            }
            if h.headerLength > 104 { h.compressionType = first[104] }
            guard h.refcountOrder <= 6 else { throw DiskImageError.refcountOrderTooLarge(h.refcountOrder) }
        }

        // Backing file name location, then the extensions that sit between header and name.
        if h.backingFileOffset != 0 {
            guard h.backingFileOffset <= clusterSize else {
                throw DiskImageError.backingOffsetInvalid(offset: h.backingFileOffset, clusterSize: clusterSize)
            }
            guard h.backingFileSize <= maxBackingNameLength else {
                throw DiskImageError.backingNameTooLong(h.backingFileSize)
            }
            guard UInt64(h.backingFileSize) <= clusterSize - h.backingFileOffset,
                  h.backingFileOffset >= UInt64(h.headerLength) else {
                throw DiskImageError.backingOffsetInvalid(offset: h.backingFileOffset, clusterSize: clusterSize)
            }
        }
        let extEnd = h.backingFileOffset != 0 ? h.backingFileOffset : clusterSize
        try h.parseExtensions(first, from: UInt64(h.headerLength), to: extEnd, fileSize: fileSize)
        if h.backingFileOffset != 0 {
            let start = Int(h.backingFileOffset), len = Int(h.backingFileSize)
            guard start + len <= first.count else {
                throw DiskImageError.shortFile(path: file.path, needed: UInt64(start + len), size: fileSize)
            }
            // An empty name is no backing file, as in QEMU.
            if len > 0 { h.backingFile = String(decoding: first[start..<(start + len)], as: UTF8.self) }
        }

        // Features.
        switch h.cryptMethod {
        case 0: break
        case 1: throw DiskImageError.unsupportedFeature("encryption (AES, crypt_method 1)")
        case 2: throw DiskImageError.unsupportedFeature("encryption (LUKS, crypt_method 2)")
        default: throw DiskImageError.unsupportedFeature("encryption method \(h.cryptMethod)")
        }
        if h.incompatibleFeatures & incompatDataFile != 0 {
            throw DiskImageError.unsupportedFeature("external data file (incompatible bit 2)")
        }
        let known: UInt64 = 0x1f
        let unknown = h.incompatibleFeatures & ~known
        if unknown != 0 {
            let bit = UInt8(unknown.trailingZeroBitCount)
            throw DiskImageError.unsupportedFeature(
                "incompatible feature '\(h.featureName(type: 0, bit: bit))' (bit \(bit))")
        }
        switch h.compressionType {
        case 0:
            guard h.incompatibleFeatures & incompatCompression == 0 else {
                throw DiskImageError.compressionBitMismatch(
                    "compression type bit is set but compression_type is 0 (zlib)")
            }
        case 1:
            guard h.incompatibleFeatures & incompatCompression != 0 else {
                throw DiskImageError.compressionBitMismatch(
                    "compression_type is 1 (zstd) but the compression type feature bit is not set")
            }
        default:
            throw DiskImageError.unknownCompressionType(h.compressionType)
        }
        if h.extendedL2 && h.clusterBits < 14 {
            throw DiskImageError.extendedL2NeedsLargerClusters(clusterBits: h.clusterBits)
        }
        // QEMU: "data-file-raw requires a data file" (the raw-data-file bit without the data file bit).
        if h.autoclearFeatures & autoclearRawDataFile != 0 && h.incompatibleFeatures & incompatDataFile == 0 {
            throw DiskImageError.rawDataFileWithoutDataFile
        }

        // Tables.
        guard h.size <= UInt64(Int64.max) else { throw DiskImageError.virtualSizeTooLarge(h.size) }
        let bytesPerL1Entry = clusterSize * h.l2Entries
        let needed = h.size / bytesPerL1Entry + (h.size % bytesPerL1Entry == 0 ? 0 : 1)
        guard needed <= UInt64(Int32.max) else { throw DiskImageError.virtualSizeTooLarge(h.size) }
        guard UInt64(h.l1Size) <= maxL1Entries else {
            throw DiskImageError.tableTooLarge(table: "L1 table", entries: UInt64(h.l1Size), limit: maxL1Entries)
        }
        guard UInt64(h.l1Size) >= needed else { throw DiskImageError.l1TooSmall(entries: h.l1Size, needed: needed) }
        try validateTable("L1 table", offset: h.l1TableOffset, bytes: UInt64(h.l1Size) * 8,
                          clusterSize: clusterSize, fileSize: fileSize)
        guard h.refcountTableClusters > 0 || forCheck else { throw DiskImageError.noRefcountTable }
        let maxRefClusters = maxRefcountTableBytes / clusterSize
        guard UInt64(h.refcountTableClusters) <= maxRefClusters else {
            throw DiskImageError.tableTooLarge(table: "refcount table", entries: UInt64(h.refcountTableClusters) * clusterSize / 8,
                                               limit: maxRefcountTableBytes / 8)
        }
        try validateTable("refcount table", offset: h.refcountTableOffset,
                          bytes: UInt64(h.refcountTableClusters) * clusterSize,
                          clusterSize: clusterSize, fileSize: fileSize)
        guard h.snapshotCount <= maxSnapshots else { throw DiskImageError.tooManySnapshots(h.snapshotCount) }
        // Like QEMU, the offset must be valid even when there are no snapshots.
        try validateTable("snapshot table", offset: h.snapshotsOffset, bytes: UInt64(h.snapshotCount) * 40,
                          clusterSize: clusterSize, fileSize: fileSize)
        if h.snapshotCount > 0 {
            (h.snapshots, h.snapshotTableSize) = try QCOW2Snapshot.readTable(file: file, header: h, fileSize: fileSize,
                                                                             checkL1Tables: !forCheck)
            // Each snapshot's L1 table is bounded; so is their sum (1 GiB of entries), so walking them all stays cheap.
            let total = h.snapshots.lazy.map { UInt64($0.l1Size) }.filter { $0 <= maxL1Entries }.reduce(0, +)
            guard total <= maxTotalSnapshotL1Entries else {
                throw DiskImageError.tableTooLarge(table: "snapshot L1 tables (all together)", entries: total,
                                                   limit: maxTotalSnapshotL1Entries)
            }
        }
        // Persistent bitmaps are loaded (and so checked) by QEMU at every open.
        if h.bitmapCount > 0 {
            h.bitmapDirectory = try BitmapDirectoryEntry.load(file: file, header: h, diskSize: h.diskSize)
        }
        return h
    }

    /// Checks that a table is cluster-aligned, after the header, and inside the file. Like QEMU,
    /// the offset of an empty table must still be aligned and below 2^63.
    static func validateTable(_ name: String, offset: UInt64, bytes: UInt64, clusterSize: UInt64,
                              fileSize: UInt64) throws {
        guard offset & (clusterSize - 1) == 0 else { throw DiskImageError.tableMisaligned(table: name, offset: offset) }
        guard bytes > 0 else {
            guard offset <= UInt64(Int64.max) else { throw DiskImageError.tableOffsetTooLarge(table: name, offset: offset) }
            return
        }
        guard offset != 0 else { throw DiskImageError.tableOverlapsHeader(table: name) }
        let (end, overflow) = offset.addingReportingOverflow(bytes)
        // Tables may end inside the file's last, partly written cluster.
        let limit = (fileSize &+ (clusterSize - 1)) & ~(clusterSize - 1)
        guard !overflow, end <= UInt64(Int64.max), end <= limit else {
            throw DiskImageError.tableOutsideFile(table: name, offset: offset, length: bytes, fileSize: fileSize)
        }
    }

    mutating func parseExtensions(_ first: [UInt8], from start: UInt64, to end: UInt64, fileSize: UInt64) throws {
        var offset = start
        let end = min(end, UInt64(first.count))
        var seen = Set<UInt32>()
        while offset < end {
            guard end - offset >= 8 else { throw DiskImageError.extensionTooLarge(type: 0, length: 0) }
            let type: UInt32 = first.be(Int(offset))
            let length: UInt32 = first.be(Int(offset) + 4)
            offset += 8
            guard UInt64(length) <= end - offset else {
                throw DiskImageError.extensionTooLarge(type: type, length: length)
            }
            let data = Array(first[Int(offset)..<Int(offset + UInt64(length))])
            if type == Self.extEnd { return }
            guard seen.insert(type).inserted else {
                throw DiskImageError.badExtension(name: Self.extensionName(type), reason: "appears more than once")
            }
            switch type {
            case Self.extBackingFormat:
                guard length < 16 else {
                    throw DiskImageError.badExtension(name: "backing format", reason: "length \(length) is too long")
                }
                backingFormat = String(decoding: data.prefix { $0 != 0 }, as: UTF8.self)
            case Self.extFeatureNames:
                var i = 0
                while i + 48 <= data.count {
                    let nameBytes = data[(i + 2)..<(i + 48)].prefix { $0 != 0 }
                    featureNames.append(FeatureName(type: data[i], bit: data[i + 1],
                                                    name: String(decoding: nameBytes, as: UTF8.self)))
                    i += 48
                }
            case Self.extBitmaps:
                guard length == 24 else {
                    throw DiskImageError.badExtension(name: "bitmaps", reason: "length \(length) is not 24")
                }
                let count: UInt32 = data.be(0)
                let reserved: UInt32 = data.be(4)
                let dirSize: UInt64 = data.be(8)
                let dirOffset: UInt64 = data.be(16)
                // Without the autoclear bit, a program that does not know bitmaps has changed the
                // image since they were saved: QEMU ignores the extension, and so do we.
                if autoclearFeatures & Self.autoclearBitmaps != 0 {
                    guard reserved == 0 else {
                        throw DiskImageError.badExtension(name: "bitmaps", reason: "reserved field is \(reserved), not 0")
                    }
                    guard count <= Self.maxBitmaps else {
                        throw DiskImageError.badExtension(name: "bitmaps", reason: "\(count) bitmaps is more than 65535")
                    }
                    guard count > 0 else {
                        throw DiskImageError.badExtension(name: "bitmaps", reason: "it announces zero bitmaps")
                    }
                    guard dirOffset & (clusterSize - 1) == 0 else {
                        throw DiskImageError.badExtension(
                            name: "bitmaps", reason: "directory offset 0x\(Hex.digits(dirOffset)) is not cluster-aligned")
                    }
                    guard dirSize <= Self.maxBitmapDirectoryBytes else {
                        throw DiskImageError.badExtension(
                            name: "bitmaps", reason: "directory size \(dirSize) is more than \(Self.maxBitmapDirectoryBytes) bytes")
                    }
                    guard dirSize > 0 else {
                        throw DiskImageError.badExtension(name: "bitmaps", reason: "directory size is 0")
                    }
                    guard dirOffset <= fileSize, dirSize <= fileSize - dirOffset else {
                        throw DiskImageError.badExtension(
                            name: "bitmaps", reason: "directory at 0x\(Hex.digits(dirOffset)) runs past the end of the file")
                    }
                    bitmapCount = count
                    bitmapDirectoryOffset = dirOffset
                    bitmapDirectorySize = dirSize
                }
            case Self.extEncryption:
                throw DiskImageError.unsupportedFeature("full disk encryption header extension (LUKS)")
            case Self.extDataFile:
                // Only used with incompatible bit 2, which is refused as unsupported.
                dataFileName = String(decoding: data.prefix { $0 != 0 }, as: UTF8.self)
            default:
                unknownExtensions.append(type)  // The spec lets readers ignore unknown extensions.
            }
            offset += (UInt64(length) + 7) & ~7
        }
    }

    public static func extensionName(_ type: UInt32) -> String {
        switch type {
        case extBackingFormat: return "backing format"
        case extFeatureNames: return "feature name table"
        case extBitmaps: return "bitmaps"
        case extEncryption: return "full disk encryption header"
        case extDataFile: return "external data file name"
        default: return "0x" + Hex.digits(UInt64(type))
        }
    }
}

/// One entry of the internal snapshot table: a saved L1 table and its metadata.
public struct QCOW2Snapshot: Sendable, Equatable {
    public var id: String
    public var name: String
    public var l1TableOffset: UInt64
    public var l1Size: UInt32
    public var dateSeconds: UInt32
    public var vmStateSize: UInt64
    /// The virtual disk size when the snapshot was taken, if recorded (extra data).
    public var diskSize: UInt64?
    /// Bytes of extra data (version 3 images need at least 16: the large VM state size and the disk size).
    public var extraDataSize: UInt32 = 0

    /// Reads the snapshot table; returns the snapshots and the table's length. With `checkL1Tables`
    /// off (for `check`, which reports them), snapshot L1 tables are not validated here.
    static func readTable(file: ImageFile, header h: QCOW2Header, fileSize: UInt64,
                          checkL1Tables: Bool = true) throws -> ([QCOW2Snapshot], UInt64) {
        var result: [QCOW2Snapshot] = []
        var offset = h.snapshotsOffset
        var end = offset
        for index in 0..<Int(h.snapshotCount) {
            guard offset <= fileSize, fileSize - offset >= 40 else {
                throw DiskImageError.badSnapshot(index: index, reason: "entry at 0x\(Hex.digits(offset)) runs past the end of the file")
            }
            let fixed = try file.readBytes(40, at: offset, what: "snapshot entry")
            let idLen = UInt64(fixed.be(12, as: UInt16.self))
            let nameLen = UInt64(fixed.be(14, as: UInt16.self))
            let extraLen: UInt32 = fixed.be(36)
            guard extraLen <= QCOW2Header.maxSnapshotExtraData else {
                throw DiskImageError.badSnapshot(index: index, reason: "extra data size \(extraLen) is more than 1024")
            }
            let varLen = UInt64(extraLen) + idLen + nameLen
            // QEMU sums the entries (each but the last padded to 8 bytes) and stops at 64 MiB.
            let tableLength = offset - h.snapshotsOffset + 40 + varLen
            guard tableLength <= QCOW2Header.maxSnapshotTableBytes else {
                throw DiskImageError.snapshotTableTooLarge(entries: index + 1, bytes: tableLength)
            }
            guard fileSize - offset - 40 >= varLen else {
                throw DiskImageError.badSnapshot(index: index, reason: "entry at 0x\(Hex.digits(offset)) runs past the end of the file")
            }
            let rest = try file.readBytes(Int(varLen), at: offset + 40, what: "snapshot entry")
            var snap = QCOW2Snapshot(
                id: String(decoding: rest[Int(extraLen)..<Int(UInt64(extraLen) + idLen)], as: UTF8.self),
                name: String(decoding: rest[Int(UInt64(extraLen) + idLen)...], as: UTF8.self),
                l1TableOffset: fixed.be(0), l1Size: fixed.be(8), dateSeconds: fixed.be(16),
                vmStateSize: UInt64(fixed.be(32, as: UInt32.self)), diskSize: nil, extraDataSize: extraLen)
            if extraLen >= 8 { snap.vmStateSize = rest.be(0) }
            if extraLen >= 16 { snap.diskSize = rest.be(8) }
            end = offset + 40 + varLen
            result.append(snap)
            offset += (40 + varLen + 7) & ~7
            guard checkL1Tables else { continue }
            guard UInt64(snap.l1Size) <= QCOW2Header.maxL1Entries else {
                throw DiskImageError.badSnapshot(index: index, reason: "L1 table of \(snap.l1Size) entries is too large")
            }
            do {
                try QCOW2Header.validateTable("snapshot L1 table", offset: snap.l1TableOffset,
                                              bytes: UInt64(snap.l1Size) * 8, clusterSize: h.clusterSize,
                                              fileSize: fileSize)
            } catch {
                throw DiskImageError.badSnapshot(index: index, reason: "\(error)")
            }
            if let size = snap.diskSize {
                let perL1 = h.clusterSize * h.l2Entries
                guard size <= UInt64(Int64.max), UInt64(snap.l1Size) >= size / perL1 + (size % perL1 == 0 ? 0 : 1) else {
                    throw DiskImageError.badSnapshot(index: index, reason: "L1 table is too small for the disk size \(size)")
                }
            }
        }
        return (result, end - h.snapshotsOffset)
    }
}
