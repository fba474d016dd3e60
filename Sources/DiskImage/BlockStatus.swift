import Basics
#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// What one image of a chain says about the guest bytes `[start, start + length)`: the
/// allocation status QEMU calls block status, which `map`, `compare` and `rebase` are built on.
///
/// The rules are QEMU's (`bdrv_co_block_status` and `qcow2_co_block_status`), so that our
/// answers match `qemu-img map` and `qemu-img compare` run for run:
/// - qcow2 data clusters are `data` with a host offset; zero clusters are `zero` (with a host
///   offset when they keep a preallocated cluster); compressed clusters are `data` and
///   `compressed`, without an offset; an unallocated cluster is `zero` when nothing below can
///   supply it (no backing file, or past the backing file's end), else neither.
/// - `allocated` ("present" in `qemu-img map`) is set when this image itself decides the
///   contents (`data` or `zero`).
/// - A raw image reports the file's own extents (`SEEK_DATA`/`SEEK_HOLE`): data, or zero for holes.
/// - qcow2 images that look metadata-preallocated (more clusters in use than the file has
///   blocks) also consult the file's extents under their data clusters, as QEMU does.
public struct BlockStatus: Sendable, Equatable {
    public var start: UInt64
    public var length: UInt64
    public var data = false
    public var zero = false
    public var allocated = false
    public var compressed = false
    /// Host offset in `file` where the bytes live (QEMU's `BDRV_BLOCK_OFFSET_VALID`).
    public var hostOffset: UInt64?
    /// The file `hostOffset` refers to.
    public var file: String?
    /// The range reaches the end of the image.
    public var eof = false
    /// The image is metadata-preallocated and the file's extents were consulted (`BDRV_BLOCK_RECURSE`).
    public var recurse = false
    /// Images below the top one that were consulted to find this answer (0: the top image).
    public var depth = 0

    /// The status bits QEMU compares in `qemu-img compare -s`.
    var flags: [Bool] { [data, zero, hostOffset != nil, allocated, eof, recurse] }
}

/// Answers block-status questions about one opened image and its backing chain.
///
/// Owns per-image facts learnt on the way (whether a qcow2 image is metadata-preallocated),
/// so one instance serves a whole `map` or `compare` run. Not thread-safe: one caller at a time.
public final class BlockStatusReader {
    public let top: any BlockDevice
    private var preallocated: [ObjectIdentifier: Bool] = [:]

    public init(_ top: any BlockDevice) { self.top = top }

    /// The length QEMU gives the image: qcow2 rounds the virtual size down to whole 512-byte
    /// sectors, a raw file's size is rounded up to them.
    public static func length(of dev: any BlockDevice) -> UInt64 {
        if dev is RawImage { return (dev.virtualSize + 511) & ~511 }
        return dev.virtualSize & ~511
    }

    /// The status of one image only, with QEMU's generic rules applied (`bdrv_block_status`).
    /// `length` is clipped to the image; the answer covers a prefix of the range.
    public func status(of dev: any BlockDevice, at offset: UInt64, length: UInt64) throws -> BlockStatus {
        let total = Self.length(of: dev)
        guard offset < total else { return BlockStatus(start: offset, length: 0, eof: true) }
        let bytes = min(length, total - offset)
        var st: BlockStatus
        if let raw = dev as? RawImage {
            st = try Self.fileStatus(raw.file, at: offset, length: bytes, total: total)
            st.hostOffset = offset
            st.file = raw.file.path
        } else if let q = dev as? QCOW2Image {
            st = try qcow2Status(q, at: offset, length: bytes)
        } else {
            st = BlockStatus(start: offset, length: bytes, data: true)
        }
        if st.data || st.zero {
            st.allocated = true
        } else if let q = dev as? QCOW2Image {
            if let backing = q.backing {
                if offset >= Self.length(of: backing) { st.zero = true }
            } else {
                st.zero = true
            }
        }
        if st.recurse, st.data, !st.zero, let host = st.hostOffset, let q = dev as? QCOW2Image {
            let fileSize = try q.file.size()
            let f = try Self.fileStatus(q.file, at: host, length: st.length, total: (fileSize + 511) & ~511)
            if f.eof && (f.length == 0 || f.zero) {
                st.zero = true
            } else {
                st.length = f.length
                st.zero = st.zero || f.zero
            }
        }
        st.eof = offset + st.length == total
        return st
    }

    /// The status of the whole chain (`bdrv_block_status_above` down to the bottom): the first
    /// image that decides the range answers; ranges no image decides read as zeros.
    public func statusAbove(at offset: UInt64, length: UInt64) throws -> BlockStatus {
        var st = try status(of: top, at: offset, length: length)
        if st.length == 0 || st.allocated { return st }
        let eofEnd: UInt64? = st.eof ? offset + st.length : nil
        var bytes = st.length
        var layer = Self.backing(of: top)
        var depth = 0
        while let dev = layer {
            depth += 1
            let below = try status(of: dev, at: offset, length: bytes)
            if below.length == 0 {
                // This image ends here: what the image above defers to it reads as zeros.
                st = BlockStatus(start: offset, length: bytes, zero: true, allocated: true, depth: depth)
                break
            }
            st = below
            st.depth = depth
            if below.allocated {
                st.eof = false
                break
            }
            bytes = below.length
            layer = Self.backing(of: dev)
        }
        if let eofEnd, offset + st.length == eofEnd { st.eof = true }
        return st
    }

    /// The status `qemu-img map` reports: walk down the chain until an image has data or zeros
    /// there, counting the images passed (`depth`).
    public func mapStatus(at offset: UInt64, length: UInt64) throws -> BlockStatus {
        var dev = top
        var bytes = length
        var depth = 0
        while true {
            var st = try status(of: dev, at: offset, length: bytes)
            bytes = st.length
            if st.data || st.zero {
                st.depth = depth
                return st
            }
            guard let below = Self.backing(of: dev) else {
                return BlockStatus(start: offset, length: bytes, depth: depth)
            }
            dev = below
            depth += 1
        }
    }

    static func backing(of dev: any BlockDevice) -> (any BlockDevice)? {
        (dev as? QCOW2Image)?.backing
    }

    // MARK: qcow2

    /// How one guest subcluster is stored (QEMU's `QCow2SubclusterType`).
    enum SubclusterType: Equatable {
        case normal, zeroAlloc, unallocatedAlloc, zeroPlain, unallocatedPlain, compressed

        /// Types whose host offsets must be consecutive for clusters to form one run.
        var hasHostOffset: Bool { self == .normal || self == .zeroAlloc || self == .unallocatedAlloc }
    }

    /// A cluster's checked mapping and the host cluster its L2 entry names (kept by zero clusters).
    typealias Cluster = (mapping: QCOW2Image.ClusterMapping, host: UInt64)

    func cluster(_ q: QCOW2Image, _ index: UInt64) throws -> Cluster {
        let (entry, bitmap) = try q.l2Entry(guestCluster: index)
        return (try q.mapping(entry: entry, bitmap: bitmap, guestCluster: index), entry & QCOW2Image.offsetMask)
    }

    /// The type of subcluster `sc` of a cluster, from its checked mapping.
    static func type(of c: Cluster, subcluster sc: Int) -> (SubclusterType, UInt64) {
        switch c.mapping {
        case .unallocated: return (.unallocatedPlain, 0)
        case .zero: return c.host == 0 ? (.zeroPlain, 0) : (.zeroAlloc, c.host)
        case let .data(host): return (.normal, host)
        case .compressed: return (.compressed, 0)
        case let .subclusters(host, allocated, zero):
            if host == 0 { return (zero & (1 << sc) != 0 ? .zeroPlain : .unallocatedPlain, 0) }
            if allocated & (1 << sc) != 0 { return (.normal, host) }
            return (zero & (1 << sc) != 0 ? .zeroAlloc : .unallocatedAlloc, host)
        }
    }

    /// The run of guest bytes from `offset` that share one subcluster type (and, for types with
    /// a host cluster, consecutive host offsets), within one L2 table: `qcow2_get_host_offset`.
    func qcow2Status(_ q: QCOW2Image, at offset: UInt64, length: UInt64) throws -> BlockStatus {
        let cs = q.clusterSize
        let scPerCluster: UInt64 = q.extended ? 32 : 1
        let scBits = q.clusterBits - (q.extended ? 5 : 0)
        let inCluster = offset & (cs - 1)
        let index = offset >> q.clusterBits
        let l2Index = index % q.l2Entries
        let needed = min(inCluster + length, (q.l2Entries - l2Index) << q.clusterBits)

        let l1Index = index / q.l2Entries
        let hasL2 = q.metadata.shared { m in l1Index < UInt64(m.l1.count) && m.l1[Int(l1Index)] & QCOW2Image.offsetMask != 0 }
        var result = BlockStatus(start: offset, length: needed - inCluster)
        guard hasL2 else { return result }

        // Count subclusters of the same type, as QEMU's count_contiguous_subclusters does.
        let firstSC = Int((offset & (cs - 1)) >> scBits)
        let firstMapping = try cluster(q, index)
        let (type, firstHost) = Self.type(of: firstMapping, subcluster: firstSC)
        let clusters = (needed + cs - 1) >> q.clusterBits
        var count: UInt64 = 0
        var i: UInt64 = 0
        while i < clusters {
            let mapping = i == 0 ? firstMapping : try cluster(q, index + i)
            let from = i == 0 ? firstSC : 0
            let (t, host) = Self.type(of: mapping, subcluster: from)
            if i == 0 && t == .compressed {
                count = scPerCluster - UInt64(from)
                break
            }
            if i > 0 {
                if t != type { break }
                if type.hasHostOffset && host != firstHost + i * cs { break }
            }
            var same = 1
            while from + same < Int(scPerCluster), Self.type(of: mapping, subcluster: from + same).0 == t { same += 1 }
            count += UInt64(same)
            if from + same < Int(scPerCluster) { break }
            i += 1
        }
        let available = min((count + UInt64(firstSC)) << scBits, needed)
        result.length = available - inCluster

        switch type {
        case .normal:
            result.data = true
            result.hostOffset = firstHost + inCluster
            result.file = q.file.path
            result.recurse = try isMetadataPreallocated(q)
        case .zeroAlloc:
            result.zero = true
            result.hostOffset = firstHost + inCluster
            result.file = q.file.path
        case .unallocatedAlloc:
            result.hostOffset = firstHost + inCluster
            result.file = q.file.path
        case .zeroPlain:
            result.zero = true
        case .unallocatedPlain:
            break
        case .compressed:
            result.data = true
            result.compressed = true
        }
        return result
    }

    /// QEMU's `qcow2_detect_metadata_preallocation`: an image with more clusters in use than the
    /// file has blocks allocated (allowing 10% or two clusters) was preallocated, and its data
    /// clusters may be holes in the file. Errors count as "no", as in QEMU.
    func isMetadataPreallocated(_ q: QCOW2Image) throws -> Bool {
        let key = ObjectIdentifier(q)
        if let known = preallocated[key] { return known }
        var answer = false
        var st = stat()
        if fstat(q.file.fd, &st) == 0, let reader = try? RefcountReader(image: q) {
            let realClusters = UInt64(max(0, st.st_blocks)) * 512 / q.clusterSize
            let threshold = max(realClusters * 10 / 9, realClusters + 2)
            let endCluster = (UInt64(max(0, st.st_size)) + q.clusterSize - 1) >> q.clusterBits
            if let used = try? reader.countInUse(below: endCluster, stopAbove: threshold) {
                answer = used > threshold
            }
        }
        preallocated[key] = answer
        return answer
    }

    // MARK: Files

    /// The extents of a file (`SEEK_DATA`/`SEEK_HOLE`) as QEMU's file driver reports them:
    /// data, a hole (zero), or past the end. `total` is the file's length rounded up to sectors.
    static func fileStatus(_ file: ImageFile, at offset: UInt64, length: UInt64, total: UInt64) throws -> BlockStatus {
        guard offset < total else { return BlockStatus(start: offset, length: 0, eof: true) }
        let bytes = min(length, total - offset)
        var st = BlockStatus(start: offset, length: bytes)
        let seekData: Int32 = 3, seekHole: Int32 = 4  // Linux values; Glibc's module does not export them.
        let data = lseek(file.fd, off_t(offset), seekData)
        if data < 0 {
            if errno == ENXIO {
                st.zero = true  // A hole up to the end of the file.
            } else {
                st.data = true  // No information: everything is data.
            }
        } else if UInt64(data) > offset {
            st.zero = true
            st.length = min(bytes, UInt64(data) - offset)
        } else {
            let hole = lseek(file.fd, off_t(offset), seekHole)
            st.data = true
            if hole > Int64(offset) { st.length = min(bytes, UInt64(hole) - offset) }
        }
        st.eof = offset + st.length == total
        return st
    }
}

/// Reads refcounts of a qcow2 image straight from its refcount table and blocks, one block at a
/// time, without the writer's state (so it works on images opened read-only).
struct RefcountReader {
    let image: QCOW2Image
    let table: [UInt64]
    /// Blocks by table index that are read from memory instead of the file (a writer's cache).
    var cachedBlocks: [Int: [UInt8]] = [:]

    init(image q: QCOW2Image) throws {
        // The header may have moved the table since the image was opened; read it again.
        let h = try QCOW2Header.parse(file: q.file)
        let bytes = UInt64(h.refcountTableClusters) * q.clusterSize
        var t = [UInt64](repeating: 0, count: Int(bytes / 8))
        try t.withUnsafeMutableBytes { try q.file.readZeroFilled(into: $0, at: h.refcountTableOffset) }
        table = t.map { UInt64(bigEndian: $0) }
        image = q
    }

    var entriesPerBlock: UInt64 { image.refcountEntriesPerBlock }

    /// The refcount block at table index `t`, decoded, or nil if there is none.
    func block(_ t: Int) throws -> [UInt64]? {
        if let bytes = cachedBlocks[t] { return decode(bytes) }
        let e = table[t]
        let offset = e & ~(image.clusterSize - 1)
        guard offset != 0 else { return nil }
        guard e & 0x1ff == 0 else {
            throw DiskImageError.corruptMetadata("refcount table entry \(t) (0x\(Hex.digits(e))) is not cluster-aligned")
        }
        try image.checkClusterOffset(offset, "refcount block 0x\(Hex.digits(offset))")
        var raw = [UInt8](repeating: 0, count: Int(image.clusterSize))
        try raw.withUnsafeMutableBytes { try image.file.readZeroFilled(into: $0, at: offset) }
        return decode(raw)
    }

    func decode(_ raw: [UInt8]) -> [UInt64] {
        let bits = image.header.refcountBits
        var out = [UInt64](repeating: 0, count: Int(entriesPerBlock))
        raw.withUnsafeBytes { b in
            for i in 0..<out.count {
                if bits >= 8 {
                    let width = Int(bits / 8)
                    var v: UInt64 = 0
                    for k in 0..<width { v = v << 8 | UInt64(b[i * width + k]) }
                    out[i] = v
                } else {
                    let bit = UInt64(i) * bits
                    out[i] = (UInt64(b[Int(bit / 8)]) >> (bit % 8)) & ((1 << bits) - 1)
                }
            }
        }
        return out
    }

    /// Clusters below `end` with a non-zero refcount, counting no further than `stopAbove + 1`.
    func countInUse(below end: UInt64, stopAbove limit: UInt64) throws -> UInt64 {
        var count: UInt64 = 0
        let per = entriesPerBlock
        var t = 0
        while t < table.count && UInt64(t) * per < end && count <= limit {
            if let b = try block(t) {
                let n = Int(min(per, end - UInt64(t) * per))
                for i in 0..<n where b[i] != 0 { count += 1 }
            }
            t += 1
        }
        return count
    }
}
