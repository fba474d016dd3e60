import DiskImage
import RateLimit

/// virtio-blk feature bits (virtio 1.2, 5.2.3). Swiftlet offers the ones marked "offered".
public enum VirtioBlockFeature {
    /// `size_max` bounds one segment (offered).
    public static let sizeMaximum: UInt64 = 1 << 1
    /// `seg_max` bounds the segments of one request (offered).
    public static let segmentMaximum: UInt64 = 1 << 2
    /// Legacy CHS geometry (not offered).
    public static let geometry: UInt64 = 1 << 4
    /// The disk is read-only (offered for read-only disks).
    public static let readOnly: UInt64 = 1 << 5
    /// `blk_size` is the logical block size (offered: 512).
    public static let blockSize: UInt64 = 1 << 6
    /// VIRTIO_BLK_T_FLUSH exists; writes are volatile until flushed (offered).
    public static let flush: UInt64 = 1 << 9
    /// Physical block topology (not offered).
    public static let topology: UInt64 = 1 << 10
    /// The driver may switch the write cache (not offered).
    public static let configWriteCache: UInt64 = 1 << 11
    /// `num_queues` request queues (offered with more than one queue).
    public static let multiQueue: UInt64 = 1 << 12
    /// VIRTIO_BLK_T_DISCARD (offered).
    public static let discard: UInt64 = 1 << 13
    /// VIRTIO_BLK_T_WRITE_ZEROES (offered).
    public static let writeZeroes: UInt64 = 1 << 14
    /// VIRTIO_BLK_T_GET_LIFETIME (not offered).
    public static let lifetime: UInt64 = 1 << 15
    /// VIRTIO_BLK_T_SECURE_ERASE (not offered).
    public static let secureErase: UInt64 = 1 << 16
}

/// Request types: the `type` field of a request header (virtio 1.2, 5.2.6).
public enum VirtioBlockRequestType {
    public static let read: UInt32 = 0          // VIRTIO_BLK_T_IN
    public static let write: UInt32 = 1         // VIRTIO_BLK_T_OUT
    public static let flush: UInt32 = 4
    public static let getID: UInt32 = 8
    public static let getLifetime: UInt32 = 10
    public static let discard: UInt32 = 11
    public static let writeZeroes: UInt32 = 13
    public static let secureErase: UInt32 = 14
}

/// The status byte the device writes at the end of each request (virtio 1.2, 5.2.6).
public enum VirtioBlockStatus {
    public static let ok: UInt8 = 0
    public static let ioError: UInt8 = 1
    public static let unsupported: UInt8 = 2
}

/// Sizes the virtio-blk protocol fixes.
public enum VirtioBlockLayout {
    /// The unit of `capacity` and of every `sector` field, whatever `blk_size` says.
    public static let sectorSize: UInt64 = 512
    /// The request header: le32 type, le32 reserved, le64 sector.
    public static let headerSize: UInt64 = 16
    /// One discard / write-zeroes segment: le64 sector, le32 num_sectors, le32 flags.
    public static let rangeSize: UInt64 = 16
    /// The `unmap` bit of a segment's flags; the other 31 bits are reserved.
    public static let rangeFlagUnmap: UInt32 = 1
    /// A device ID (VIRTIO_BLK_T_GET_ID): ASCII, NUL-padded, no NUL when all 20 are used.
    public static let idSize = 20
}

/// How a virtio-blk device presents its disk: everything `--disk` says besides the image.
public struct VirtioBlockOptions: Sendable, Equatable {
    /// Present the disk read-only (`VIRTIO_BLK_F_RO`) even when the image is writable.
    public var readOnly: Bool
    /// The device ID the guest reads with VIRTIO_BLK_T_GET_ID (Linux shows it as
    /// /sys/block/vdX/serial): at most 20 printable ASCII characters. `nil` gives
    /// ``VirtioBlock/defaultSerial(diskIndex:)``.
    public var serial: String?
    /// Which `--disk` this is (0 for the first), for the default serial and thread names.
    public var diskIndex: Int
    /// Request queues (more than one offers `VIRTIO_BLK_F_MQ`): 1 to 16.
    public var queueCount: Int
    /// The largest size of each queue: a power of two from 4 to 32768.
    public var queueSize: UInt16
    /// I/O worker threads per queue, so that requests in flight reach the disk in
    /// parallel: 1 to 64.
    public var workersPerQueue: Int
    /// The rate limiter's buckets (`nil`: unlimited); changed while the device runs with
    /// ``VirtioBlock/updateRateLimiter(_:)``.
    public var rateLimiter: RateLimiterConfiguration?

    public init(readOnly: Bool = false, serial: String? = nil, diskIndex: Int = 0, queueCount: Int = 1,
                queueSize: UInt16 = 256, workersPerQueue: Int = 4, rateLimiter: RateLimiterConfiguration? = nil) {
        self.rateLimiter = rateLimiter
        self.readOnly = readOnly
        self.serial = serial
        self.diskIndex = diskIndex
        self.queueCount = queueCount
        self.queueSize = queueSize
        self.workersPerQueue = workersPerQueue
    }
}

/// The device configuration space (virtio 1.2, 5.2.4), little-endian, fixed once the
/// device is made: offsets and sizes as `struct virtio_blk_config`.
struct BlockConfigurationSpace: Sendable, Equatable {
    /// Byte offsets of the fields.
    enum Offset {
        static let capacity = 0                     // le64, in 512-byte sectors
        static let sizeMax = 8                      // le32
        static let segMax = 12                      // le32
        static let geometry = 16                    // le16 cylinders, u8 heads, u8 sectors
        static let blkSize = 20                     // le32
        static let topology = 24                    // u8, u8, le16, le32
        static let writeback = 32                   // u8, then u8 unused0
        static let numQueues = 34                   // le16
        static let maxDiscardSectors = 36           // le32
        static let maxDiscardSeg = 40               // le32
        static let discardSectorAlignment = 44      // le32
        static let maxWriteZeroesSectors = 48       // le32
        static let maxWriteZeroesSeg = 52           // le32
        static let writeZeroesMayUnmap = 56         // u8, then u8 unused1[3]
        static let maxSecureEraseSectors = 60       // le32 (secure erase is not offered)
        static let maxSecureEraseSeg = 64           // le32
        static let secureEraseSectorAlignment = 68  // le32
    }
    /// The size of `struct virtio_blk_config` in virtio 1.2.
    static let size = 72

    var capacity: UInt64 = 0
    var sizeMax: UInt32 = 0
    var segMax: UInt32 = 0
    var blkSize: UInt32 = 0
    var numQueues: UInt16 = 0
    var maxDiscardSectors: UInt32 = 0
    var maxDiscardSeg: UInt32 = 0
    var discardSectorAlignment: UInt32 = 0
    var maxWriteZeroesSectors: UInt32 = 0
    var maxWriteZeroesSeg: UInt32 = 0
    var writeZeroesMayUnmap: Bool = false

    /// The bytes the driver reads.
    var bytes: [UInt8] {
        var bytes = [UInt8](repeating: 0, count: Self.size)
        func put<T: FixedWidthInteger>(_ value: T, at offset: Int) {
            bytes.withUnsafeMutableBytes { $0.storeBytes(of: value.littleEndian, toByteOffset: offset, as: T.self) }
        }
        put(capacity, at: Offset.capacity)
        put(sizeMax, at: Offset.sizeMax)
        put(segMax, at: Offset.segMax)
        put(blkSize, at: Offset.blkSize)
        put(numQueues, at: Offset.numQueues)
        put(maxDiscardSectors, at: Offset.maxDiscardSectors)
        put(maxDiscardSeg, at: Offset.maxDiscardSeg)
        put(discardSectorAlignment, at: Offset.discardSectorAlignment)
        put(maxWriteZeroesSectors, at: Offset.maxWriteZeroesSectors)
        put(maxWriteZeroesSeg, at: Offset.maxWriteZeroesSeg)
        put(UInt8(writeZeroesMayUnmap ? 1 : 0), at: Offset.writeZeroesMayUnmap)
        return bytes
    }
}

/// The limits Swiftlet advertises, and the ones it enforces on discard and write-zeroes.
enum BlockLimits {
    /// `size_max`: the largest segment a driver should build (advertised, not enforced: a
    /// longer segment is served all the same).
    static let segmentSize: UInt32 = 1 << 20
    /// Sectors in one discard or write-zeroes segment (2 GiB); more is VIRTIO_BLK_S_IOERR.
    static let zeroingSectors: UInt32 = 1 << 22
    /// Segments in one discard or write-zeroes request; more is VIRTIO_BLK_S_IOERR.
    static let zeroingSegments: UInt32 = 32
    /// Bytes a discard or write-zeroes hands to the disk at once: the device checks for a
    /// reset between pieces, so that a reset does not wait for gigabytes of zeros.
    static let zeroingPiece: UInt64 = 64 << 20
}
