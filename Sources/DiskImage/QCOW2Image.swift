import Basics
import Synchronization

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// A qcow2 image opened as a block device.
///
/// Owns the image file, its validated header, the active (or snapshot) L1 table,
/// a bounded cache of L2 tables, the backing image (if any), and — when writable —
/// the allocator state used by `write`. Safe to use from several threads.
public final class QCOW2Image: BlockDevice {
    public let file: ImageFile
    public let header: QCOW2Header
    public let virtualSize: UInt64
    public let isReadOnly: Bool
    public let backing: (any BlockDevice)?
    /// The snapshot this view shows, if opened by snapshot name.
    public let snapshot: QCOW2Snapshot?

    let clusterBits: UInt64
    let clusterSize: UInt64
    let l2Entries: UInt64
    let extended: Bool
    let l2CacheCapacity: Int
    let state: Mutex<State>
    let writer: Mutex<WriterState>

    // L1/L2 entry bits.
    static let copiedFlag: UInt64 = 1 << 63
    static let compressedFlag: UInt64 = 1 << 62
    static let zeroFlag: UInt64 = 1
    static let offsetMask: UInt64 = 0x00ff_ffff_ffff_fe00
    static let l1ReservedMask: UInt64 = 0x7f00_0000_0000_01ff
    static let l2ReservedMask: UInt64 = 0x3f00_0000_0000_01fe

    /// Mutable metadata shared by readers and the writer.
    struct State: Sendable {
        var l1: [UInt64]
        var l2Cache: [UInt64: CachedL2] = [:]
        var tick: UInt64 = 0
        var fileSize: UInt64
        var lastCompressed: (offset: UInt64, data: [UInt8])?
    }

    /// One cached L2 table (decoded entries) and when it was last used, for LRU eviction.
    struct CachedL2: Sendable {
        var entries: [UInt64]
        var lastUse: UInt64
    }

    /// Opens a validated qcow2 image and its backing chain.
    init(file: ImageFile, snapshot snapshotName: String?, chain: inout BackingChainState, forCheck: Bool = false) throws {
        let h = try QCOW2Header.parse(file: file, forCheck: forCheck)
        self.file = file
        self.header = h
        self.clusterBits = UInt64(h.clusterBits)
        self.clusterSize = h.clusterSize
        self.l2Entries = h.l2Entries
        self.extended = h.extendedL2
        self.l2CacheCapacity = min(128, max(16, Int(4 * 1024 * 1024 / h.clusterSize)))
        let fileSize = try file.size()

        if file.writable {
            guard !h.isCorrupt else { throw DiskImageError.imageCorrupt(path: file.path) }
        }
        self.isReadOnly = !file.writable

        var l1Offset = h.l1TableOffset
        var l1Count = UInt64(h.l1Size)
        if let snapshotName {
            guard let snap = h.snapshots.first(where: { $0.name == snapshotName })
                ?? h.snapshots.first(where: { $0.id == snapshotName }) else {
                throw DiskImageError.snapshotNotFound(snapshotName)
            }
            // Like `qemu-img convert -l`: the snapshot's L1 table in place of the active one, at the
            // image's current size (clusters past the snapshot's L1 table are unallocated).
            self.snapshot = snap
            l1Offset = snap.l1TableOffset
            l1Count = UInt64(snap.l1Size)
        } else {
            self.snapshot = nil
        }
        // QEMU counts whole 512-byte sectors: a partial last sector is not part of the disk.
        self.virtualSize = h.diskSize

        // The L1 table was bounds-checked against the file and the 32 MiB limit by parse().
        var l1 = [UInt64](repeating: 0, count: Int(l1Count))
        if l1Count > 0 {
            try l1.withUnsafeMutableBytes { try file.readZeroFilled(into: $0, at: l1Offset) }
            for i in l1.indices { l1[i] = UInt64(bigEndian: l1[i]) }
        }
        self.state = Mutex(State(l1: l1, fileSize: fileSize))
        self.writer = Mutex(WriterState())

        if let name = h.backingFile {
            self.backing = try DiskImage.openBacking(name: name, format: h.backingFormat, imagePath: file.path,
                                                     chain: &chain)
        } else {
            self.backing = nil
        }
        if file.writable {
            try prepareForWriting()
            if h.isDirty { try repairDirtyImage() }
        }
    }

    /// Most L2 tables kept in memory at once (at most 4 MiB, or 16 tables).
    public var l2CacheLimit: Int { l2CacheCapacity }
    /// L2 tables in memory now.
    public var cachedL2Tables: Int { state.withLock { $0.l2Cache.count } }

    // MARK: Reading

    public func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws {
        try checkRange(offset, buffer.count, virtualSize)
        var done = 0
        while done < buffer.count {
            let guest = offset + UInt64(done)
            let index = guest >> clusterBits
            let inCluster = guest & (clusterSize - 1)
            var n = min(buffer.count - done, Int(clusterSize - inCluster))
            let first = try resolve(index)
            // Runs of clusters that are contiguous in the file, zero, or unallocated are read with one call.
            var next = index + 1
            while done + n < buffer.count {
                let m = try resolve(next)
                guard Self.continues(first, m, distance: next - index, clusterSize: clusterSize) else { break }
                n += min(buffer.count - done - n, Int(clusterSize))
                next += 1
            }
            let dest = UnsafeMutableRawBufferPointer(rebasing: buffer[done..<(done + n)])
            switch first {
            case .unallocated: try readBacking(dest, guestOffset: guest)
            case .zero: dest.initializeMemory(as: UInt8.self, repeating: 0)
            case let .data(host): try file.readZeroFilled(into: dest, at: host + inCluster)
            default: try readMapped(dest, mapping: first, guestOffset: guest)
            }
            done += n
        }
    }

    /// True if cluster `distance` places after one mapped as `first` can be read in the same call.
    static func continues(_ first: ClusterMapping, _ m: ClusterMapping, distance: UInt64, clusterSize: UInt64) -> Bool {
        switch (first, m) {
        case let (.data(a), .data(b)): return b == a + distance * clusterSize
        case (.zero, .zero), (.unallocated, .unallocated): return true
        default: return false
        }
    }

    /// The checked mapping of guest cluster `index`.
    func resolve(_ index: UInt64) throws -> ClusterMapping {
        let (entry, bitmap) = try l2Entry(guestCluster: index)
        return try mapping(entry: entry, bitmap: bitmap, guestCluster: index)
    }

    /// How one guest cluster is stored, decoded from its L2 entry.
    enum ClusterMapping: Equatable {
        case unallocated          // Read from the backing image, or zeros.
        case zero                 // Reads as zeros (zero flag).
        case data(UInt64)         // Host offset of the cluster.
        case compressed(offset: UInt64, size: UInt64)
        case subclusters(host: UInt64, allocated: UInt32, zero: UInt32)  // Extended L2 entry.
    }

    /// Decodes and checks an L2 entry for guest cluster `index`.
    func mapping(entry: UInt64, bitmap: UInt64, guestCluster index: UInt64) throws -> ClusterMapping {
        if entry & Self.compressedFlag != 0 {
            if extended && bitmap != 0 {
                throw DiskImageError.corruptMetadata(
                    "compressed cluster for guest cluster \(index) has a non-zero subcluster bitmap")
            }
            let shift = 62 - (clusterBits - 8)
            let host = entry & ((1 << shift) - 1)
            let sectors = ((entry >> shift) & ((1 << (clusterBits - 8)) - 1)) + 1
            let size = sectors * 512 - (host & 511)
            let fileSize = state.withLock { $0.fileSize }
            guard host >= clusterSize, host < fileSize else {
                throw DiskImageError.corruptMetadata(
                    "compressed data for guest cluster \(index) at 0x\(Hex.digits(host)) is outside the file")
            }
            return .compressed(offset: host, size: min(size, fileSize - host))
        }
        if entry & Self.l2ReservedMask != 0 {
            throw DiskImageError.corruptMetadata(
                "L2 entry 0x\(Hex.digits(entry)) for guest cluster \(index) has reserved bits set")
        }
        let host = entry & Self.offsetMask
        if host != 0 {
            try checkClusterOffset(host, "data cluster offset 0x\(Hex.digits(host)) for guest cluster \(index)")
        }
        if extended {
            let allocated = UInt32(truncatingIfNeeded: bitmap)
            let zero = UInt32(truncatingIfNeeded: bitmap >> 32)
            guard allocated & zero == 0 else {
                throw DiskImageError.corruptMetadata(
                    "subclusters of guest cluster \(index) are marked both allocated and zero")
            }
            guard host != 0 || allocated == 0 else {
                throw DiskImageError.corruptMetadata(
                    "guest cluster \(index) has allocated subclusters but no host cluster")
            }
            return .subclusters(host: host, allocated: allocated, zero: zero)
        }
        if entry & Self.zeroFlag != 0 { return .zero }
        return host == 0 ? .unallocated : .data(host)
    }

    /// The raw L2 entry (and subcluster bitmap) for a guest cluster; zeros if it has no L2 table.
    func l2Entry(guestCluster: UInt64) throws -> (entry: UInt64, bitmap: UInt64) {
        let l1Index = guestCluster / l2Entries
        let l2Index = Int(guestCluster % l2Entries)
        let (l1Entry, cached) = state.withLock { s -> (UInt64, [UInt64]?) in
            guard l1Index < UInt64(s.l1.count) else { return (0, nil) }
            let e = s.l1[Int(l1Index)]
            let off = e & Self.offsetMask
            if off != 0, s.l2Cache[off] != nil {
                s.tick += 1
                s.l2Cache[off]!.lastUse = s.tick
                return (e, s.l2Cache[off]!.entries)
            }
            return (e, nil)
        }
        let l2Offset = l1Entry & Self.offsetMask
        guard l2Offset != 0 else { return (0, 0) }
        let table = try cached ?? loadL2(offset: l2Offset, l1Entry: l1Entry, l1Index: l1Index)
        if extended { return (table[2 * l2Index], table[2 * l2Index + 1]) }
        return (table[l2Index], 0)
    }

    /// A cluster offset read from the image must be cluster-aligned, past the header
    /// cluster and inside the file; `what` names it in the error.
    func checkClusterOffset(_ offset: UInt64, _ what: @autoclosure () -> String) throws {
        guard offset & (clusterSize - 1) == 0 else {
            throw DiskImageError.corruptMetadata("\(what()) is not cluster-aligned")
        }
        let fileSize = state.withLock { $0.fileSize }
        guard offset >= clusterSize, offset < fileSize else {
            throw DiskImageError.corruptMetadata("\(what()) is outside the file")
        }
    }

    /// Reads, checks and caches the L2 table at `offset`.
    func loadL2(offset: UInt64, l1Entry: UInt64, l1Index: UInt64) throws -> [UInt64] {
        guard l1Entry & Self.l1ReservedMask == 0 else {
            throw DiskImageError.corruptMetadata("L1 entry \(l1Index) (0x\(Hex.digits(l1Entry))) has reserved bits set")
        }
        try checkClusterOffset(offset, "L2 table offset 0x\(Hex.digits(offset)) in L1 entry \(l1Index)")
        var table = [UInt64](repeating: 0, count: Int(clusterSize / 8))
        try table.withUnsafeMutableBytes { try file.readZeroFilled(into: $0, at: offset) }
        for i in table.indices { table[i] = UInt64(bigEndian: table[i]) }
        cacheL2(offset: offset, entries: table)
        return table
    }

    func cacheL2(offset: UInt64, entries: [UInt64]) {
        state.withLock { s in
            s.tick += 1
            if s.l2Cache[offset] == nil && s.l2Cache.count >= l2CacheCapacity,
               let victim = s.l2Cache.min(by: { $0.value.lastUse < $1.value.lastUse })?.key {
                s.l2Cache[victim] = nil
            }
            s.l2Cache[offset] = CachedL2(entries: entries, lastUse: s.tick)
        }
    }

    /// Reads bytes that all lie within one guest cluster.
    func readInCluster(_ dest: UnsafeMutableRawBufferPointer, guestOffset: UInt64) throws {
        try readMapped(dest, mapping: try resolve(guestOffset >> clusterBits), guestOffset: guestOffset)
    }

    /// Reads bytes within one guest cluster whose mapping is known.
    func readMapped(_ dest: UnsafeMutableRawBufferPointer, mapping: ClusterMapping, guestOffset: UInt64) throws {
        let inCluster = guestOffset & (clusterSize - 1)
        switch mapping {
        case .unallocated:
            try readBacking(dest, guestOffset: guestOffset)
        case .zero:
            dest.initializeMemory(as: UInt8.self, repeating: 0)
        case let .data(host):
            try file.readZeroFilled(into: dest, at: host + inCluster)
        case let .compressed(host, size):
            try readCompressed(dest, host: host, size: size, inCluster: Int(inCluster))
        case let .subclusters(host, allocated, zero):
            let scSize = clusterSize / 32
            var done = 0
            while done < dest.count {
                let pos = inCluster + UInt64(done)
                let sc = Int(pos / scSize)
                let n = min(dest.count - done, Int(scSize - pos % scSize))
                let part = UnsafeMutableRawBufferPointer(rebasing: dest[done..<(done + n)])
                if zero & (1 << sc) != 0 {
                    part.initializeMemory(as: UInt8.self, repeating: 0)
                } else if allocated & (1 << sc) != 0 {
                    try file.readZeroFilled(into: part, at: host + pos)
                } else {
                    try readBacking(part, guestOffset: guestOffset + UInt64(done))
                }
                done += n
            }
        }
    }

    /// Reads guest bytes not allocated in this image: from the backing image, zeros past its end.
    func readBacking(_ dest: UnsafeMutableRawBufferPointer, guestOffset: UInt64) throws {
        guard let backing, guestOffset < backing.virtualSize else {
            dest.initializeMemory(as: UInt8.self, repeating: 0)
            return
        }
        let n = Int(min(UInt64(dest.count), backing.virtualSize - guestOffset))
        try backing.read(into: UnsafeMutableRawBufferPointer(rebasing: dest[0..<n]), at: guestOffset)
        if n < dest.count {
            UnsafeMutableRawBufferPointer(rebasing: dest[n...]).initializeMemory(as: UInt8.self, repeating: 0)
        }
    }

    func readCompressed(_ dest: UnsafeMutableRawBufferPointer, host: UInt64, size: UInt64, inCluster: Int) throws {
        if dest.count == Int(clusterSize) {
            try decompressCluster(host: host, size: size, into: dest)
            return
        }
        let cached = state.withLock { s -> [UInt8]? in
            if let c = s.lastCompressed, c.offset == host { return c.data }
            return nil
        }
        var data: [UInt8]
        if let cached {
            data = cached
        } else {
            data = [UInt8](repeating: 0, count: Int(clusterSize))
            try data.withUnsafeMutableBytes { try decompressCluster(host: host, size: size, into: $0) }
            let copy = data
            state.withLock { $0.lastCompressed = (host, copy) }
        }
        data.withUnsafeBytes { src in
            dest.copyMemory(from: UnsafeRawBufferPointer(rebasing: src[inCluster..<(inCluster + dest.count)]))
        }
    }

    /// Decompresses the whole cluster whose compressed bytes are at `host` into `output`.
    func decompressCluster(host: UInt64, size: UInt64, into output: UnsafeMutableRawBufferPointer) throws {
        // `size` is at most two clusters by the L2 entry encoding, so this allocation is bounded.
        var input = [UInt8](repeating: 0, count: Int(size))
        let n = try input.withUnsafeMutableBytes { try file.read(into: $0, at: host) }
        try input.withUnsafeBytes { raw in
            let src = UnsafeRawBufferPointer(rebasing: raw[0..<n])
            if header.compressionType == 1 {
                try ClusterDecompressor.zstd(src, into: output, hostOffset: host)
            } else {
                try ClusterDecompressor.inflate(src, into: output, hostOffset: host)
            }
        }
    }

    public func flush() throws {
        if !isReadOnly { try file.sync() }
    }
}
