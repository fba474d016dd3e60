import Basics
import Synchronization

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// A qcow2 image opened as a block device.
///
/// Owns the image file, its validated header, the backing image (if any) and the image's
/// metadata (`QCOW2Metadata`: the L1 table, caches of L2 tables and refcount blocks, the
/// allocator), which sits behind a reader-writer lock. Safe to use from several threads at
/// once: lookups share the lock and data moves outside it, so reads, and writes into clusters
/// the image owns, run in parallel; writes that allocate take the lock alone for a moment at a
/// time and claim the guest clusters they change. Metadata reaches the file in the order
/// described in docs/disk-images.md ("Writing"): batched, with an fdatasync only where one
/// update depends on another, and on `flush`.
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
    let refcountCacheCapacity: Int
    /// L1, L2 tables, refcount blocks and allocator: shared by lookups, held alone to change.
    let metadata: SharedState<QCOW2Metadata>
    /// Held shared by every read and write from the lookup of a host cluster until its I/O is
    /// done; a flush waits for the holders (`waitForReaders`) before freed clusters can be
    /// handed out again, so no read or write ever lands in a cluster that changed owner.
    let hostIO = ReaderWriterLock()
    /// Guest clusters whose L2 entries a writer is changing.
    let claims = ClusterClaims()
    /// One metadata write-back at a time.
    let writebackLock = Mutex<Void>(())
    /// The file's size as this image knows it (it grows as clusters are written past the end).
    let fileSize: Atomic<UInt64>
    /// The most recently decompressed cluster, for small reads inside one compressed cluster.
    let lastCompressed = Mutex<(offset: UInt64, data: [UInt8])?>(nil)

    // L1/L2 entry bits.
    static let copiedFlag: UInt64 = 1 << 63
    static let compressedFlag: UInt64 = 1 << 62
    static let zeroFlag: UInt64 = 1
    static let offsetMask: UInt64 = 0x00ff_ffff_ffff_fe00
    static let l1ReservedMask: UInt64 = 0x7f00_0000_0000_01ff
    static let l2ReservedMask: UInt64 = 0x3f00_0000_0000_01fe
    /// Extended L2 bitmaps: every subcluster allocated, every subcluster zero.
    static let allAllocated: UInt64 = 0xffff_ffff
    static let allZero: UInt64 = 0xffff_ffff << 32

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
        self.refcountCacheCapacity = max(16, Int(4 * 1024 * 1024 / h.clusterSize))
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
        self.metadata = SharedState(QCOW2Metadata(l1: l1))
        self.fileSize = Atomic(fileSize)

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

    /// Writes what the caches hold that the file does not (best effort: a close cannot report).
    deinit {
        if !isReadOnly { try? flush() }
    }

    /// Most L2 tables kept in memory at once (at most 4 MiB, or 16 tables), unless more are
    /// waiting to be written.
    public var l2CacheLimit: Int { l2CacheCapacity }
    /// L2 tables in memory now.
    public var cachedL2Tables: Int { metadata.shared { $0.l2.count } }

    // MARK: Reading

    public func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws {
        try checkRange(offset, buffer.count, virtualSize)
        try hostIO.shared { try readRange(buffer, at: offset) }
    }

    /// `read` for a caller that holds `hostIO` (and has checked the range).
    func readRange(_ buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws {
        var done = 0
        while done < buffer.count {
            let guest = offset + UInt64(done)
            let index = guest >> clusterBits
            // One lookup for every cluster of the read in this L2 table.
            let last = (guest + UInt64(buffer.count - done) - 1) >> clusterBits
            let count = Int(min(last + 1, (index / l2Entries + 1) * l2Entries) - index)
            let maps = try mappings(from: index, count: count)
            var i = 0
            while i < maps.count {
                let position = offset + UInt64(done)
                let inCluster = position & (clusterSize - 1)
                var n = min(buffer.count - done, Int(clusterSize - inCluster))
                // Runs of clusters that are contiguous in the file, zero, or unallocated are read with one call.
                var next = i + 1
                while next < maps.count, done + n < buffer.count,
                      Self.continues(maps[i], maps[next], distance: UInt64(next - i), clusterSize: clusterSize) {
                    n += min(buffer.count - done - n, Int(clusterSize))
                    next += 1
                }
                let dest = UnsafeMutableRawBufferPointer(rebasing: buffer[done..<(done + n)])
                switch maps[i] {
                case .unallocated: try readBacking(dest, guestOffset: position)
                case .zero: dest.initializeMemory(as: UInt8.self, repeating: 0)
                case let .data(host): try file.readZeroFilled(into: dest, at: host + inCluster)
                default: try readMapped(dest, mapping: maps[i], guestOffset: position)
                }
                done += n
                i = next
            }
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

    /// The checked mappings of `count` guest clusters from `index`, all in one L2 table.
    func mappings(from index: UInt64, count: Int) throws -> [ClusterMapping] {
        let found = try entries(from: index, count: count)
        var maps: [ClusterMapping] = []
        maps.reserveCapacity(count)
        for (i, e) in found.enumerated() {
            maps.append(try mapping(entry: e.entry, bitmap: e.bitmap, guestCluster: index + UInt64(i)))
        }
        return maps
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
            let (host, size) = compressedRange(entry)
            let fileSize = fileSize.load(ordering: .relaxed)
            guard host >= clusterSize, host < fileSize else {
                throw DiskImageError.corruptMetadata(
                    "compressed data for guest cluster \(index) at 0x\(Hex.digits(host)) is outside the file")
            }
            return .compressed(offset: host, size: min(size - (host & 511), fileSize - host))
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

    /// The host byte offset of a compressed cluster's data and the bytes its sectors span
    /// from the start of the first sector (so `offset & ~511` and `size` cover whole sectors).
    func compressedRange(_ entry: UInt64) -> (offset: UInt64, size: UInt64) {
        let shift = 62 - (clusterBits - 8)
        let host = entry & ((1 << shift) - 1)
        let sectors = ((entry >> shift) & ((1 << (clusterBits - 8)) - 1)) + 1
        return (host, sectors * 512)
    }

    /// The raw L2 entry (and subcluster bitmap) for a guest cluster; zeros if it has no L2 table.
    func l2Entry(guestCluster: UInt64) throws -> (entry: UInt64, bitmap: UInt64) {
        try entries(from: guestCluster, count: 1)[0]
    }

    /// What a shared lookup found: entries, or a table to load first.
    private enum Lookup {
        case found([(entry: UInt64, bitmap: UInt64)])
        case miss(l1Entry: UInt64, removals: UInt64)
    }

    /// The raw L2 entries (and bitmaps) of `count` guest clusters from `index`, all in one L2
    /// table: zeros where there is no table. A table not in the cache is read from the file
    /// without holding the lock, then added, unless the cache changed meanwhile (it is then
    /// looked up again; after a few tries it is read under the lock).
    func entries(from index: UInt64, count: Int) throws -> [(entry: UInt64, bitmap: UInt64)] {
        let l1Index = Int(index / l2Entries)
        let first = Int(index % l2Entries)
        let step = extended ? 2 : 1
        let extended = self.extended
        var attempts = 0
        while true {
            let lookup = metadata.shared { m -> Lookup in
                guard l1Index < m.l1.count, case let l1Entry = m.l1[l1Index], l1Entry & Self.offsetMask != 0 else {
                    return .found(Array(repeating: (0, 0), count: count))
                }
                guard let table = m.l2[l1Entry & Self.offsetMask] else {
                    return .miss(l1Entry: l1Entry, removals: m.l2Removals)
                }
                table.lastUse.store(m.l2Clock, ordering: .relaxed)
                return table.entries.withUnsafeBufferPointer { t in
                    .found((0..<count).map { i in
                        let slot = (first + i) * step
                        return (t[slot], extended ? t[slot + 1] : 0)
                    })
                }
            }
            switch lookup {
            case let .found(result):
                return result
            case let .miss(l1Entry, removals):
                attempts += 1
                try loadL2(l1Index: l1Index, l1Entry: l1Entry, removals: removals, underLock: attempts > 3)
            }
        }
    }

    /// Reads the L2 table an L1 entry names and adds it to the cache.
    private func loadL2(l1Index: Int, l1Entry: UInt64, removals: UInt64, underLock: Bool) throws {
        let offset = try checkedL2Offset(l1Entry, index: l1Index)
        if underLock {
            _ = try metadata.exclusive { m in try cachedL2(at: offset, m: &m) }
            return
        }
        let table = try readEntries(at: offset, count: Int(clusterSize / 8))
        metadata.exclusive { m in
            guard m.l2[offset] == nil, m.l2Removals == removals, l1Index < m.l1.count, m.l1[l1Index] == l1Entry else { return }
            insertL2(table, at: offset, m: &m)
        }
    }

    /// The L2 table offset of an L1 entry, checked.
    func checkedL2Offset(_ l1Entry: UInt64, index: Int) throws -> UInt64 {
        guard l1Entry & Self.l1ReservedMask == 0 else {
            throw DiskImageError.corruptMetadata("L1 entry \(index) (0x\(Hex.digits(l1Entry))) has reserved bits set")
        }
        let offset = l1Entry & Self.offsetMask
        try checkClusterOffset(offset, "L2 table offset 0x\(Hex.digits(offset)) in L1 entry \(index)")
        return offset
    }

    /// The cached L2 table at `offset` (checked by the caller), read from the file if needed.
    func cachedL2(at offset: UInt64, m: inout QCOW2Metadata) throws -> CachedL2Table {
        if let table = m.l2[offset] {
            table.lastUse.store(m.l2Clock, ordering: .relaxed)
            return table
        }
        let entries = try readEntries(at: offset, count: Int(clusterSize / 8))
        return insertL2(entries, at: offset, m: &m)
    }

    /// Adds a table to the cache, evicting the least recently used clean table when full.
    /// Dirty tables are never evicted: a write-back makes them clean first.
    @discardableResult
    func insertL2(_ entries: [UInt64], at offset: UInt64, m: inout QCOW2Metadata) -> CachedL2Table {
        m.l2Clock += 1
        if m.l2.count >= l2CacheCapacity {
            var victim: (UInt64, UInt64)?
            for (o, t) in m.l2 where !t.dirty {
                let use = t.lastUse.load(ordering: .relaxed)
                if victim == nil || use < victim!.1 { victim = (o, use) }
            }
            if let (o, _) = victim {
                m.l2[o] = nil
                m.l2Removals += 1
            }
        }
        let table = CachedL2Table(entries: entries, clock: m.l2Clock)
        m.l2[offset] = table
        return table
    }

    /// A cluster offset read from the image must be cluster-aligned, past the header
    /// cluster and inside the file; `what` names it in the error.
    func checkClusterOffset(_ offset: UInt64, _ what: @autoclosure () -> String) throws {
        guard offset & (clusterSize - 1) == 0 else {
            throw DiskImageError.corruptMetadata("\(what()) is not cluster-aligned")
        }
        guard offset >= clusterSize, offset < fileSize.load(ordering: .relaxed) else {
            throw DiskImageError.corruptMetadata("\(what()) is outside the file")
        }
    }

    /// Records that the file now reaches at least `end`.
    func noteFileEnd(_ end: UInt64) {
        fileSize.max(end, ordering: .relaxed)
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
        let cached = lastCompressed.withLock { c -> [UInt8]? in
            if let c, c.offset == host { return c.data }
            return nil
        }
        var data: [UInt8]
        if let cached {
            data = cached
        } else {
            data = [UInt8](repeating: 0, count: Int(clusterSize))
            try data.withUnsafeMutableBytes { try decompressCluster(host: host, size: size, into: $0) }
            let copy = data
            lastCompressed.withLock { $0 = (host, copy) }
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
}
