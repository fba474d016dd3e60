import Basics
/// Everything that can go wrong opening, reading, writing or checking a disk image.
///
/// Each case carries the values that identify the problem, and `description`
/// renders it as one line that names the field or structure at fault, so a user
/// can tell a hostile or damaged image from a bug in Swiftlet.
public enum DiskImageError: Error, Equatable, Sendable, CustomStringConvertible {
    // Files and arguments.
    case io(operation: String, path: String, errno: Int32)
    case shortFile(path: String, needed: UInt64, size: UInt64)
    case outOfRange(offset: UInt64, length: UInt64, virtualSize: UInt64)
    case readOnly(path: String)
    case invalidArgument(String)
    case notQcow2(path: String)
    case imageInUse(path: String, reason: String)
    case sameFile(source: String, destination: String)

    // qcow2 header validation (before any data is read).
    case unsupportedVersion(UInt32)
    case clusterBitsOutOfRange(UInt32)
    case headerTooShort(UInt32)
    case headerLengthMisaligned(UInt32)
    case headerExceedsCluster(headerLength: UInt32, clusterSize: UInt64)
    case refcountOrderTooLarge(UInt32)
    case tableMisaligned(table: String, offset: UInt64)
    case tableOutsideFile(table: String, offset: UInt64, length: UInt64, fileSize: UInt64)
    case tableTooLarge(table: String, entries: UInt64, limit: UInt64)
    case tableOverlapsHeader(table: String)
    case tableOffsetTooLarge(table: String, offset: UInt64)
    case noRefcountTable
    case l1TooSmall(entries: UInt32, needed: UInt64)
    case virtualSizeTooLarge(UInt64)
    case backingNameTooLong(UInt32)
    case backingOffsetInvalid(offset: UInt64, clusterSize: UInt64)
    case extensionTooLarge(type: UInt32, length: UInt32)
    case badExtension(name: String, reason: String)
    case unsupportedFeature(String)
    case unknownCompressionType(UInt8)
    case compressionBitMismatch(String)
    case extendedL2NeedsLargerClusters(clusterBits: UInt32)
    case tooManySnapshots(UInt32)
    case badSnapshot(index: Int, reason: String)
    case snapshotTableTooLarge(entries: Int, bytes: UInt64)
    case rawDataFileWithoutDataFile
    case badBitmapDirectory(String)
    case badBitmap(index: Int, name: String, reason: String)
    case snapshotNotFound(String)

    // State bits that forbid writing.
    case imageCorrupt(path: String)

    // Metadata read at run time.
    case corruptMetadata(String)
    case decompressionFailed(hostOffset: UInt64, reason: String)
    case tooLargeToCheck(clusters: UInt64, limit: UInt64)

    // Backing chains.
    case backingChainTooDeep(limit: Int)
    case backingLoop(path: String)
    case backingMissing(path: String, errno: Int32)
    case unknownBackingFormat(String)

    // Writing.
    case refcountTableFull
    case refcountOverflow(cluster: UInt64)

    public var description: String {
        switch self {
        case let .io(op, path, err):
            return "\(path): \(op) failed: \(String(cString: strerror(err)))"
        case let .shortFile(path, needed, size):
            return "\(path): file is \(size) bytes, too short for the \(needed)-byte header"
        case let .outOfRange(offset, length, size):
            return "access of \(length) bytes at offset \(offset) is beyond the virtual size \(size)"
        case let .readOnly(path):
            return "\(path): image is open read-only"
        case let .invalidArgument(what):
            return what
        case let .imageInUse(path, reason):
            return "\(path): the image is in use by another process, which \(reason)"
        case let .sameFile(source, destination):
            let what = source == destination ? "the image being converted" : "the same file as \(source), which is being converted"
            return "\(destination): this is \(what); writing it would destroy what is being read"
        case let .notQcow2(path):
            return "\(path): not a qcow2 image (no QFI\\xfb magic)"
        case let .unsupportedVersion(v):
            return "qcow2 header: version \(v) is not supported (only 2 and 3)"
        case let .clusterBitsOutOfRange(bits):
            return "qcow2 header: cluster_bits \(bits) is outside 9...21"
        case let .headerTooShort(len):
            return "qcow2 header: header_length \(len) is shorter than the 104 bytes of a version 3 header"
        case let .headerLengthMisaligned(len):
            return "qcow2 header: header_length \(len) is not a multiple of 8"
        case let .headerExceedsCluster(len, cs):
            return "qcow2 header: header_length \(len) exceeds the cluster size \(cs)"
        case let .refcountOrderTooLarge(order):
            return "qcow2 header: refcount_order \(order) is above 6 (refcounts wider than 64 bits)"
        case let .tableMisaligned(table, offset):
            return "qcow2 header: \(table) offset 0x\(Hex.digits(offset)) is not cluster-aligned"
        case let .tableOutsideFile(table, offset, length, fileSize):
            return "qcow2 header: \(table) at 0x\(Hex.digits(offset)) (\(length) bytes) lies outside the \(fileSize)-byte file"
        case let .tableTooLarge(table, entries, limit):
            return "qcow2 header: \(table) has \(entries) entries, more than the limit of \(limit)"
        case let .tableOverlapsHeader(table):
            return "qcow2 header: \(table) overlaps the header cluster"
        case let .tableOffsetTooLarge(table, offset):
            return "qcow2 header: \(table) offset 0x\(Hex.digits(offset)) is beyond 2^63 (the table is empty, but QEMU refuses it too)"
        case .noRefcountTable:
            return "qcow2 header: refcount_table_clusters is 0, so the image has no reference count table"
        case let .l1TooSmall(entries, needed):
            return "qcow2 header: L1 table has \(entries) entries but the virtual size needs \(needed)"
        case let .virtualSizeTooLarge(size):
            return "qcow2 header: virtual size \(size) is too large"
        case let .backingNameTooLong(len):
            return "qcow2 header: backing file name length \(len) exceeds 1023 bytes"
        case let .backingOffsetInvalid(offset, cs):
            return "qcow2 header: backing file name at 0x\(Hex.digits(offset)) does not fit in the first cluster (\(cs) bytes)"
        case let .extensionTooLarge(type, length):
            return "qcow2 header extension 0x\(Hex.digits(UInt64(type))): length \(length) runs past the end of the header area"
        case let .badExtension(name, reason):
            return "qcow2 header extension '\(name)': \(reason)"
        case let .unsupportedFeature(what):
            return "qcow2: unsupported feature: \(what)"
        case let .unknownCompressionType(t):
            return "qcow2 header: unknown compression_type \(t) (0 is zlib, 1 is zstd)"
        case let .compressionBitMismatch(reason):
            return "qcow2 header: \(reason)"
        case let .extendedL2NeedsLargerClusters(bits):
            return "qcow2 header: extended L2 entries need clusters of at least 16 KiB, cluster_bits is \(bits)"
        case let .tooManySnapshots(n):
            return "qcow2 header: \(n) snapshots is more than the limit of 65536"
        case let .badSnapshot(index, reason):
            return "qcow2 snapshot table entry \(index): \(reason)"
        case let .snapshotTableTooLarge(entries, bytes):
            return "qcow2 snapshot table: its first \(entries) entries take \(bytes) bytes, more than the limit of 64 MiB"
        case .rawDataFileWithoutDataFile:
            return "qcow2 header: autoclear bit 1 (raw external data) is set, but the image has no external data file"
        case let .badBitmapDirectory(reason):
            return "qcow2 bitmap directory: \(reason)"
        case let .badBitmap(index, name, reason):
            return "qcow2 bitmap directory entry \(index) ('\(name)'): \(reason)"
        case let .snapshotNotFound(name):
            return "qcow2: no snapshot named '\(name)'"
        case let .imageCorrupt(path):
            return "\(path): image is marked corrupt; it can only be opened read-only (repair: qemu-img check -r all)"
        case let .corruptMetadata(what):
            return "qcow2 metadata is corrupt: \(what)"
        case let .tooLargeToCheck(clusters, limit):
            return "qcow2 check: the file has \(clusters) clusters, more than the \(limit) a check can count"
        case let .decompressionFailed(offset, reason):
            return "qcow2: compressed cluster at host offset 0x\(Hex.digits(offset)) cannot be decompressed: \(reason)"
        case let .backingChainTooDeep(limit):
            return "backing chain is deeper than \(limit) images"
        case let .backingLoop(path):
            return "backing chain loops back to \(path)"
        case let .backingMissing(path, err):
            return "backing file \(path) cannot be opened: \(String(cString: strerror(err)))"
        case let .unknownBackingFormat(name):
            return "backing format '\(name)' is not supported (only raw and qcow2)"
        case .refcountTableFull:
            return "qcow2: the refcount table is full; growing it is not supported"
        case let .refcountOverflow(cluster):
            return "qcow2: refcount of host cluster \(cluster) would overflow"
        }
    }
}


#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif
