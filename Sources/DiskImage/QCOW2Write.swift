import Basics

// Writing guest data. A write takes one of three paths per cluster:
//
// - In place: the cluster is this image's alone (COPIED, or allocated subclusters of such a
//   cluster). The data is written with `pwrite`; no metadata changes, nothing is claimed.
// - Into its own cluster: a zero cluster that kept its host cluster, or subclusters of an
//   owned cluster that are not allocated yet. The cluster is claimed, the data (merged with
//   the current contents) written, then its L2 entry changed in the cache.
// - Allocation: anything else (unallocated, zero, compressed, shared with a snapshot). The
//   clusters are claimed, host clusters allocated (refcount 1 in the cached refcount block,
//   reusing freed clusters), the data written (partial clusters merged with their current
//   contents), and only then the cached L2 entries switched to them; the old host clusters
//   are freed once that switch is on disk (`deferFree`).
//
// The cached changes reach the file in `writeBack`, in the order that keeps the image
// consistent at any crash (docs/disk-images.md, "Writing").
extension QCOW2Image {
    var refcountEntriesPerBlock: UInt64 { clusterSize * 8 / header.refcountBits }

    /// Loads the refcount table and clears autoclear feature bits we do not maintain.
    func prepareForWriting() throws {
        let h = header
        guard h.refcountTableClusters > 0 else {
            throw DiskImageError.corruptMetadata("image has no refcount table, so it cannot be written")
        }
        let table = try readEntries(at: h.refcountTableOffset, count: Int(UInt64(h.refcountTableClusters) * clusterSize / 8))
        let end = (fileSize.load(ordering: .relaxed) + clusterSize - 1) & ~(clusterSize - 1)
        metadata.exclusive { m in
            m.refcountTable = table
            m.refcountTableOffset = h.refcountTableOffset
            m.l1TableOffset = h.l1TableOffset
            m.endOfFile = end
            m.freeHint = 1
        }
        // The spec: a writer that does not maintain an autoclear feature must clear its bit first.
        // Persistent bitmaps are kept instead, marked in use (possibly stale, as QEMU marks them
        // while it has an image open), so their clusters stay referenced and QEMU knows not to trust them.
        var keep: UInt64 = 0
        if h.autoclearFeatures & QCOW2Header.autoclearBitmaps != 0 && h.bitmapCount > 0 {
            for e in h.bitmapDirectory where !e.isInUse {
                var flags = [UInt8](repeating: 0, count: 4)
                flags.setBE(e.flags | BitmapDirectoryEntry.inUse, at: 0)
                try file.write(bytes: flags, at: e.entryOffset + 12)
            }
            keep = QCOW2Header.autoclearBitmaps
        }
        if h.version == 3 && h.autoclearFeatures & ~keep != 0 {
            var bits = [UInt8](repeating: 0, count: 8)
            bits.setBE(h.autoclearFeatures & keep, at: 0)
            try file.write(bytes: bits, at: 88)
        }
        try file.sync()
    }

    public func write(_ buffer: UnsafeRawBufferPointer, at offset: UInt64) throws {
        guard !isReadOnly else { throw DiskImageError.readOnly(path: file.path) }
        try checkRange(offset, buffer.count, virtualSize)
        try hostIO.shared { try writeRange(buffer, at: offset) }
        try relieveCachePressure()
    }

    /// `write` for a caller that holds `hostIO` (and has checked the range).
    func writeRange(_ buffer: UnsafeRawBufferPointer, at offset: UInt64) throws {
        var done = 0
        while done < buffer.count {
            done += try writeStep(buffer, from: done, at: offset)
        }
    }

    /// How a write reaches one cluster.
    enum WritePath: Equatable {
        /// The cluster at this host offset is ours: write in place.
        case inPlace(UInt64)
        /// Subclusters of our cluster at this host offset that are not allocated: fill them, then mark them.
        case fillSubclusters(host: UInt64, allocated: UInt32, zero: UInt32)
        /// A zero cluster that kept our host cluster: write the whole cluster there, then clear the flag.
        case reuseZeroCluster(UInt64)
        /// Needs a new host cluster.
        case allocate
    }

    /// The path for a write of bytes `[from, to)` of a cluster with this L2 entry.
    func writePath(entry: UInt64, mapping: ClusterMapping, from: Int, to: Int) -> WritePath {
        let owned = entry & Self.copiedFlag != 0
        switch mapping {
        case let .data(host) where owned:
            return .inPlace(host)
        case let .subclusters(host, allocated, zero) where owned && host != 0:
            let scSize = Int(clusterSize / 32)
            let mask = Self.subclusterMask(from: from / scSize, through: (to - 1) / scSize)
            return allocated & mask == mask ? .inPlace(host) : .fillSubclusters(host: host, allocated: allocated, zero: zero)
        case .zero where owned && entry & Self.offsetMask != 0:
            return .reuseZeroCluster(entry & Self.offsetMask)
        default:
            return .allocate
        }
    }

    /// Bits `first...last` of a subcluster bitmap.
    static func subclusterMask(from first: Int, through last: Int) -> UInt32 {
        UInt32(truncatingIfNeeded: ((UInt64(1) << UInt64(last + 1)) - 1) ^ ((UInt64(1) << UInt64(first)) - 1))
    }

    /// The paths of the clusters a write of `remaining` bytes at `guest` touches in one L2 table.
    private func writePaths(at guest: UInt64, remaining: Int) throws -> [WritePath] {
        let index = guest >> clusterBits
        let last = (guest + UInt64(remaining) - 1) >> clusterBits
        let count = Int(min(last + 1, (index / l2Entries + 1) * l2Entries) - index)
        let found = try entries(from: index, count: count)
        var paths: [WritePath] = []
        paths.reserveCapacity(count)
        for (i, e) in found.enumerated() {
            let inCluster = Int(guest & (clusterSize - 1))
            let start = i == 0 ? inCluster : 0
            let end = min(Int(clusterSize), inCluster + remaining - i * Int(clusterSize))
            let m = try mapping(entry: e.entry, bitmap: e.bitmap, guestCluster: index + UInt64(i))
            paths.append(writePath(entry: e.entry, mapping: m, from: start, to: end))
        }
        return paths
    }

    /// Writes a first piece of `buffer[done...]` (at most to the end of one L2 table) and returns
    /// how many bytes it wrote: 0 when the clusters changed while it waited, to be looked up again.
    func writeStep(_ buffer: UnsafeRawBufferPointer, from done: Int, at offset: UInt64) throws -> Int {
        let guest = offset + UInt64(done)
        let index = guest >> clusterBits
        let inCluster = Int(guest & (clusterSize - 1))
        let remaining = buffer.count - done
        let paths = try writePaths(at: guest, remaining: remaining)

        // In place, over a run of our clusters contiguous in the file.
        if case let .inPlace(host) = paths[0] {
            var n = min(remaining, Int(clusterSize) - inCluster)
            var i = 1
            while i < paths.count, n < remaining, paths[i] == .inPlace(host + UInt64(i) * clusterSize) {
                n += min(remaining - n, Int(clusterSize))
                i += 1
            }
            try file.write(UnsafeRawBufferPointer(rebasing: buffer[done..<(done + n)]), at: host + UInt64(inCluster))
            return n
        }

        // Everything else changes L2 entries: claim the clusters, then look again (another
        // writer may have changed them while this one waited).
        var count = 1
        if paths[0] == .allocate {
            while count < paths.count, paths[count] == .allocate { count += 1 }
        }
        let claimed = index..<(index + UInt64(count))
        return try claims.with(claimed) {
            let now = try writePaths(at: guest, remaining: min(remaining, count * Int(clusterSize) - inCluster))
            guard now[0] == paths[0] else { return 0 }
            let source = UnsafeRawBufferPointer(rebasing: buffer[done...])
            switch now[0] {
            case let .fillSubclusters(host, allocated, zero):
                return try fillSubclusters(source, at: guest, host: host, allocated: allocated, zero: zero)
            case let .reuseZeroCluster(host):
                return try rewriteZeroCluster(source, at: guest, host: host)
            default:
                var n = 1
                while n < now.count, now[n] == .allocate { n += 1 }
                return try allocateAndWrite(source, at: guest, clusters: n)
            }
        }
    }

    /// Writes the start of `source` into `clusters` claimed guest clusters from `guest` that need
    /// host clusters: allocates them (contiguous where free space allows), writes the data (the
    /// first and last cluster merged with their current contents when only partly written), then
    /// points the cached L2 entries at them. Returns the bytes written.
    private func allocateAndWrite(_ source: UnsafeRawBufferPointer, at guest: UInt64, clusters: Int) throws -> Int {
        let index = guest >> clusterBits
        let inCluster = Int(guest & (clusterSize - 1))
        let cs = Int(clusterSize)
        let l1Index = Int(index / l2Entries)
        let (host, got, fresh) = try metadata.exclusive { m -> (UInt64, Int, Bool) in
            _ = try writableL2(l1Index: l1Index, m: &m)
            let run = try allocateClusters(upTo: UInt64(clusters), m: &m)
            // Past the end of the file: never written, so it reads as zeros already.
            let fresh = run.offset >= fileSize.load(ordering: .relaxed)
            noteFileEnd(run.offset + run.count * clusterSize)
            return (run.offset, Int(run.count), fresh)
        }
        let bytes = min(source.count, got * cs - inCluster)
        do {
            // The clusters this write covers only in part: current contents, merged; when they
            // read as zeros and the new cluster is fresh space, only the new bytes are written.
            let headPartial = inCluster != 0 || bytes < cs
            let lastCluster = (inCluster + bytes - 1) / cs
            let tailPartial = lastCluster > 0 && (inCluster + bytes) % cs != 0
            if headPartial {
                let part = UnsafeRawBufferPointer(rebasing: source[0..<min(bytes, cs - inCluster)])
                if try fresh && isKnownZero(at: index << clusterBits, length: clusterSize) {
                    try file.write(part, at: host + UInt64(inCluster))
                } else {
                    try writeMerged(part, guestCluster: index, at: inCluster, host: host)
                }
            }
            let middleStart = headPartial ? 1 : 0
            let middleEnd = tailPartial ? lastCluster : lastCluster + 1
            if middleEnd > middleStart {
                let from = middleStart * cs - inCluster, to = middleEnd * cs - inCluster
                try file.write(UnsafeRawBufferPointer(rebasing: source[from..<to]), at: host + UInt64(middleStart * cs))
            }
            if tailPartial {
                let part = UnsafeRawBufferPointer(rebasing: source[(lastCluster * cs - inCluster)..<bytes])
                let tail = index + UInt64(lastCluster)
                if try fresh && isKnownZero(at: tail << clusterBits, length: clusterSize) {
                    try file.write(part, at: host + UInt64(lastCluster * cs))
                } else {
                    try writeMerged(part, guestCluster: tail, at: 0, host: host + UInt64(lastCluster * cs))
                }
            }
        } catch {
            // Nothing points at the new clusters yet: they are free again at once.
            try? metadata.exclusive { m in
                for c in 0..<UInt64(got) { try setRefcount(cluster: (host >> clusterBits) + c, 0, m: &m) }
                m.freeHint = min(m.freeHint, host >> clusterBits)
            }
            throw error
        }
        let written = (inCluster + bytes + cs - 1) / cs
        try metadata.exclusive { m in
            let table = try writableL2(l1Index: l1Index, m: &m)
            let step = extended ? 2 : 1
            let first = Int(index % l2Entries)
            for i in 0..<written {
                let slot = (first + i) * step
                let bitmap = extended ? table.entries[slot + 1] : 0
                if let old = try hostRange(entry: table.entries[slot], bitmap: bitmap, guestCluster: index + UInt64(i)) {
                    deferFree(HostRange(start: old.start, length: old.length), m: &m)
                }
                table.entries[slot] = (host + UInt64(i * cs)) | Self.copiedFlag
                if extended { table.entries[slot + 1] = Self.allAllocated }
            }
            markDirty(table, m: &m)
            m.needsBarrier = true
        }
        return bytes
    }

    /// Writes `bytes` at `inCluster` of guest cluster `index` into the whole host cluster at
    /// `host`: the cluster's current contents with the bytes put in.
    private func writeMerged(_ bytes: UnsafeRawBufferPointer, guestCluster index: UInt64, at inCluster: Int, host: UInt64) throws {
        var full = [UInt8](repeating: 0, count: Int(clusterSize))
        try full.withUnsafeMutableBytes { buf in
            try readInCluster(buf, guestOffset: index << clusterBits)
            UnsafeMutableRawBufferPointer(rebasing: buf[inCluster..<(inCluster + bytes.count)]).copyMemory(from: bytes)
            try file.write(UnsafeRawBufferPointer(buf), at: host)
        }
    }

    /// Fills the subclusters of our cluster at `host` that the write touches (merged with their
    /// current contents), then marks them allocated. Returns the bytes written.
    private func fillSubclusters(_ source: UnsafeRawBufferPointer, at guest: UInt64, host: UInt64,
                                 allocated: UInt32, zero: UInt32) throws -> Int {
        let index = guest >> clusterBits
        let inCluster = Int(guest & (clusterSize - 1))
        let bytes = min(source.count, Int(clusterSize) - inCluster)
        let scSize = Int(clusterSize / 32)
        let firstSC = inCluster / scSize, lastSC = (inCluster + bytes - 1) / scSize
        let mask = Self.subclusterMask(from: firstSC, through: lastSC)
        let spanStart = firstSC * scSize, spanLength = (lastSC + 1 - firstSC) * scSize
        var span = [UInt8](repeating: 0, count: spanLength)
        try span.withUnsafeMutableBytes { buf in
            try readInCluster(buf, guestOffset: (index << clusterBits) + UInt64(spanStart))
            UnsafeMutableRawBufferPointer(rebasing: buf[(inCluster - spanStart)..<(inCluster - spanStart + bytes)])
                .copyMemory(from: UnsafeRawBufferPointer(rebasing: source[0..<bytes]))
            try file.write(UnsafeRawBufferPointer(buf), at: host + UInt64(spanStart))
        }
        noteFileEnd(host + UInt64(spanStart + spanLength))
        try metadata.exclusive { m in
            let table = try writableL2(l1Index: Int(index / l2Entries), m: &m)
            let slot = Int(index % l2Entries) * 2
            let bitmap = table.entries[slot + 1]
            let nowAllocated = UInt32(truncatingIfNeeded: bitmap) | mask
            let nowZero = UInt32(truncatingIfNeeded: bitmap >> 32) & ~mask
            table.entries[slot + 1] = UInt64(nowAllocated) | UInt64(nowZero) << 32
            markDirty(table, m: &m)
            m.needsBarrier = true
        }
        return bytes
    }

    /// Writes into a zero cluster that kept its host cluster: the whole cluster (zeros with the
    /// new bytes), then the zero flag is cleared. Returns the bytes written.
    private func rewriteZeroCluster(_ source: UnsafeRawBufferPointer, at guest: UInt64, host: UInt64) throws -> Int {
        let index = guest >> clusterBits
        let inCluster = Int(guest & (clusterSize - 1))
        let bytes = min(source.count, Int(clusterSize) - inCluster)
        if bytes == Int(clusterSize) {
            try file.write(UnsafeRawBufferPointer(rebasing: source[0..<bytes]), at: host)
        } else {
            try writeMerged(UnsafeRawBufferPointer(rebasing: source[0..<bytes]), guestCluster: index, at: inCluster, host: host)
        }
        noteFileEnd(host + clusterSize)
        try metadata.exclusive { m in
            let table = try writableL2(l1Index: Int(index / l2Entries), m: &m)
            let slot = Int(index % l2Entries)
            table.entries[slot] = host | Self.copiedFlag
            markDirty(table, m: &m)
            m.needsBarrier = true
        }
        return bytes
    }

    /// Marks a cached L2 table changed.
    func markDirty(_ table: CachedL2Table, m: inout QCOW2Metadata) {
        table.version += 1
        if !table.dirty {
            table.dirty = true
            m.dirtyL2Tables += 1
        }
    }

    /// The cached L2 table for `l1Index` that this image owns (refcount 1), making one if there
    /// is none (a new table, written as zeros now) or copying one shared with a snapshot (the
    /// copy written now). The L1 entry is changed in the cache; a shared table's reference is
    /// dropped once that change is on disk.
    @discardableResult
    func writableL2(l1Index: Int, m: inout QCOW2Metadata) throws -> CachedL2Table {
        let l1Entry = m.l1[l1Index]
        let old = l1Entry & Self.offsetMask
        if old != 0 && l1Entry & Self.copiedFlag != 0 {
            return try cachedL2(at: try checkedL2Offset(l1Entry, index: l1Index), m: &m)
        }
        var table = [UInt64](repeating: 0, count: Int(clusterSize / 8))
        if old != 0 {
            // Shared with a snapshot: copy it. The data clusters it points to keep their refcounts
            // (each L1 path counts once), and their COPIED flags are already clear.
            table = try cachedL2(at: try checkedL2Offset(l1Entry, index: l1Index), m: &m).entries
        }
        let new = try allocateClusters(upTo: 1, m: &m).offset
        var bytes = [UInt8](repeating: 0, count: Int(clusterSize))
        for (i, e) in table.enumerated() where e != 0 { bytes.setBE(e, at: i * 8) }
        try file.write(bytes: bytes, at: new)
        noteFileEnd(new + clusterSize)
        m.l1[l1Index] = new | Self.copiedFlag
        m.l1Dirty.insert(l1Index)
        m.needsBarrier = true
        m.protectedClusters?.insert(new >> clusterBits)
        if old != 0 {
            if m.l2.removeValue(forKey: old) != nil { m.l2Removals += 1 }
            deferFree(HostRange(start: old, length: clusterSize), m: &m)
        }
        return insertL2(table, at: new, m: &m)
    }

    // MARK: Allocation

    /// Allocates up to `wanted` host clusters, contiguous, at the first free cluster at or after
    /// the free hint (QEMU's `alloc_clusters_noref`): a cluster freed earlier, or past the end of
    /// the file. Sets their refcounts to 1 in the cache and returns the first offset and the count.
    func allocateClusters(upTo wanted: UInt64, m: inout QCOW2Metadata) throws -> (offset: UInt64, count: UInt64) {
        let end = m.endOfFile >> clusterBits
        var c = max(m.freeHint, 1)
        func free(_ c: UInt64) throws -> Bool {
            try refcount(cluster: c, m: &m) == 0 && !isProtected(c, m: &m)
        }
        // Past the end of the file every cluster should be free; a refcount structure that says
        // otherwise for this many clusters is broken, and scanning further would only waste time.
        while try !free(c) {
            c += 1
            guard c < end + 65536 else {
                throw DiskImageError.corruptMetadata("no free cluster in the 65536 clusters after the end of the file")
            }
        }
        var count: UInt64 = 1
        while count < wanted, try free(c + count) { count += 1 }
        // Claim the run first: refcount blocks made for it go after it.
        m.endOfFile = max(m.endOfFile, (c + count) << clusterBits)
        for i in 0..<count { try setRefcount(cluster: c + i, 1, m: &m) }
        m.freeHint = c + count
        return (c << clusterBits, count)
    }

    /// Allocates `count` consecutive clusters after the end of the file (refcount 1 each) and
    /// returns the first one's offset: for tables, which need contiguous room.
    func allocateRun(clusters count: UInt64, m: inout QCOW2Metadata) throws -> UInt64 {
        let start = m.endOfFile
        m.endOfFile += count * clusterSize
        for i in 0..<count {
            let cluster = (start >> clusterBits) + i
            guard try refcount(cluster: cluster, m: &m) == 0 else {
                throw DiskImageError.corruptMetadata("host cluster \(cluster) past the end of the file is already in use")
            }
            try setRefcount(cluster: cluster, 1, m: &m)
        }
        return start
    }

    /// True for a cluster that holds metadata the header or the L1 table points to: a hostile
    /// image can give such a cluster refcount 0, and handing it out for guest data would let the
    /// guest write the header (its backing file name) or the tables. QEMU's overlap checks
    /// guard the same structures.
    func isProtected(_ cluster: UInt64, m: inout QCOW2Metadata) throws -> Bool {
        guard cluster < m.endOfFile >> clusterBits else { return false }
        if m.protectedClusters == nil { m.protectedClusters = try protectedClusters(m) }
        return m.protectedClusters!.contains(cluster)
    }

    /// The header cluster, the active L1 table and its L2 tables, the refcount table and blocks,
    /// the snapshot table and the snapshots' L1 tables, and the bitmap directory and tables.
    private func protectedClusters(_ m: QCOW2Metadata) throws -> Set<UInt64> {
        var set: Set<UInt64> = [0]
        func add(_ offset: UInt64, _ length: UInt64) {
            guard length > 0, offset <= UInt64(Int64.max) - length else { return }
            var c = offset >> clusterBits
            while c <= (offset + length - 1) >> clusterBits {
                set.insert(c)
                c += 1
            }
        }
        // The header as it is now: snapshots and bitmaps may have changed since the open.
        let h = try QCOW2Header.parse(file: file)
        add(m.l1TableOffset, UInt64(m.l1.count) * 8)
        for e in m.l1 where e & Self.offsetMask != 0 { add(e & Self.offsetMask, 1) }
        add(m.refcountTableOffset, UInt64(m.refcountTable.count) * 8)
        for e in m.refcountTable where e != 0 { add(e & ~(clusterSize - 1), 1) }
        add(h.snapshotsOffset, h.snapshotTableSize)
        for s in h.snapshots { add(s.l1TableOffset, UInt64(s.l1Size) * 8) }
        add(h.bitmapDirectoryOffset, h.bitmapDirectorySize)
        for b in h.bitmapDirectory { add(b.tableOffset, UInt64(b.tableEntries) * 8) }
        return set
    }

    // MARK: Refcounts

    /// Whether refcount block `t` exists; loads it into the cache (checked) if it does.
    func loadRefcountBlock(_ t: Int, m: inout QCOW2Metadata) throws -> Bool {
        m.refcountClock += 1
        if m.refcountBlocks[t] != nil {
            m.refcountBlocks[t]!.lastUse = m.refcountClock
            return true
        }
        let e = m.refcountTable[t]
        let offset = e & ~(clusterSize - 1)
        guard e & 0x1ff == 0 else {
            throw DiskImageError.corruptMetadata("refcount table entry \(t) (0x\(Hex.digits(e))) is not cluster-aligned")
        }
        guard offset != 0 else { return false }
        try checkClusterOffset(offset, "refcount block 0x\(Hex.digits(offset))")
        var bytes = [UInt8](repeating: 0, count: Int(clusterSize))
        try bytes.withUnsafeMutableBytes { try file.readZeroFilled(into: $0, at: offset) }
        if m.refcountBlocks.count >= refcountCacheCapacity,
           let victim = m.refcountBlocks.filter({ !$0.value.dirty }).min(by: { $0.value.lastUse < $1.value.lastUse })?.key {
            m.refcountBlocks[victim] = nil
        }
        m.refcountBlocks[t] = CachedRefcountBlock(bytes: bytes, lastUse: m.refcountClock)
        return true
    }

    func refcount(cluster: UInt64, m: inout QCOW2Metadata) throws -> UInt64 {
        let t = cluster / refcountEntriesPerBlock
        guard t < UInt64(m.refcountTable.count), try loadRefcountBlock(Int(t), m: &m) else { return 0 }
        return decodeRefcount(m.refcountBlocks[Int(t)]!.bytes, index: cluster % refcountEntriesPerBlock)
    }

    /// Decodes entry `index` of a refcount block.
    func decodeRefcount(_ block: [UInt8], index: UInt64) -> UInt64 {
        let bits = header.refcountBits
        if bits >= 8 {
            let width = Int(bits / 8), at = Int(index) * width
            var v: UInt64 = 0
            for i in 0..<width { v = v << 8 | UInt64(block[at + i]) }
            return v
        }
        let shift = (index * bits) % 8
        return (UInt64(block[Int(index * bits / 8)]) >> shift) & ((1 << bits) - 1)
    }

    /// Sets a cluster's refcount in the cached refcount block (made first if the cluster has none).
    func setRefcount(cluster: UInt64, _ value: UInt64, m: inout QCOW2Metadata) throws {
        let bits = header.refcountBits
        guard bits == 64 || value < (UInt64(1) << bits) else { throw DiskImageError.refcountOverflow(cluster: cluster) }
        let perBlock = refcountEntriesPerBlock
        let t = cluster / perBlock
        if t >= UInt64(m.refcountTable.count) { try growRefcountTable(covering: t, m: &m) }
        if try !loadRefcountBlock(Int(t), m: &m) {
            guard value != 0 else { return }
            try makeRefcountBlock(Int(t), m: &m)
        }
        encodeRefcount(&m.refcountBlocks[Int(t)]!.bytes, index: cluster % perBlock, value: value)
        markRefcountBlockDirty(Int(t), m: &m)
    }

    func markRefcountBlockDirty(_ t: Int, m: inout QCOW2Metadata) {
        m.refcountBlocks[t]!.version += 1
        if !m.refcountBlocks[t]!.dirty {
            m.refcountBlocks[t]!.dirty = true
            m.dirtyRefcountBlocks += 1
        }
    }

    /// Makes refcount block `t`, after the end of the file, describing itself if it can. A
    /// structural change, made synchronously: the block (and its own refcount, if another block
    /// holds it) is written and synced before the refcount table entry points to it, and that
    /// entry is synced before anything counted in the block can be referenced.
    private func makeRefcountBlock(_ t: Int, m: inout QCOW2Metadata) throws {
        let perBlock = refcountEntriesPerBlock
        let block = m.endOfFile
        m.endOfFile += clusterSize
        var bytes = [UInt8](repeating: 0, count: Int(clusterSize))
        let selfCluster = block >> clusterBits
        if selfCluster / perBlock == UInt64(t) {
            encodeRefcount(&bytes, index: selfCluster % perBlock, value: 1)
        } else {
            try setRefcount(cluster: selfCluster, 1, m: &m)
            try writeRefcountBlock(Int(selfCluster / perBlock), m: &m)
        }
        try file.write(bytes: bytes, at: block)
        noteFileEnd(block + clusterSize)
        try file.sync()
        var entry = [UInt8](repeating: 0, count: 8)
        entry.setBE(block, at: 0)
        try file.write(bytes: entry, at: m.refcountTableOffset + UInt64(t) * 8)
        try file.sync()
        m.refcountTable[t] = block
        m.refcountClock += 1
        m.refcountBlocks[t] = CachedRefcountBlock(bytes: bytes, lastUse: m.refcountClock)
        m.protectedClusters?.insert(selfCluster)
    }

    /// Writes cached refcount block `t` to the file now (refcount blocks can be written at any
    /// time: see `deferFree`).
    func writeRefcountBlock(_ t: Int, m: inout QCOW2Metadata) throws {
        guard let block = m.refcountBlocks[t], block.dirty else { return }
        try file.write(bytes: block.bytes, at: m.refcountTable[t] & ~(clusterSize - 1))
        m.refcountBlocks[t]!.dirty = false
        m.dirtyRefcountBlocks -= 1
    }

    /// Lowers by one the refcount of every host cluster overlapping `[start, start+length)`.
    func releaseRange(start: UInt64, length: UInt64, m: inout QCOW2Metadata) throws {
        var cluster = start >> clusterBits
        let last = (start + length - 1) >> clusterBits
        while cluster <= last {
            let rc = try refcount(cluster: cluster, m: &m)
            guard rc > 0 else {
                throw DiskImageError.corruptMetadata("host cluster \(cluster) is in use but its refcount is 0")
            }
            try setRefcount(cluster: cluster, rc - 1, m: &m)
            if rc == 1 { m.freeHint = min(m.freeHint, cluster) }
            cluster += 1
        }
    }

    /// Replaces the refcount table with a larger copy placed after the end of the file.
    ///
    /// Order: new refcount blocks and the new table are written (describing themselves and
    /// everything the old table described), synced; then the header's two table fields are
    /// switched in one write, synced; then the old table's clusters are released. A crash
    /// before the switch leaves unreferenced clusters past the old table's reach; after it, a leak.
    func growRefcountTable(covering needed: UInt64, m: inout QCOW2Metadata) throws {
        let perBlock = refcountEntriesPerBlock
        let perTableCluster = clusterSize / 8
        let oldCount = UInt64(m.refcountTable.count)
        // Enough entries for `needed`, for everything up to the end of the file, and for the new
        // table and its blocks themselves, with room to spare.
        let endCluster = m.endOfFile >> clusterBits
        var entries = max(needed + 1, oldCount * 2, (endCluster + 2 * perTableCluster) / perBlock + 2)
        entries = (entries + perTableCluster - 1) / perTableCluster * perTableCluster
        let tableClusters = entries / perTableCluster
        guard tableClusters * clusterSize <= QCOW2Header.maxRefcountTableBytes else {
            throw DiskImageError.refcountTableFull
        }
        var table = m.refcountTable + [UInt64](repeating: 0, count: Int(entries - oldCount))
        let tableOffset = m.endOfFile
        m.endOfFile += tableClusters * clusterSize

        // Refcounts for the new table's clusters and for any new blocks, kept in memory until written.
        var newBlocks: [Int: [UInt8]] = [:]
        var touched = Set<Int>()
        var pending = (0..<tableClusters).map { (tableOffset >> clusterBits) + $0 }
        while let cluster = pending.popLast() {
            let t = Int(cluster / perBlock)
            guard t < table.count else { throw DiskImageError.refcountTableFull }
            if table[t] == 0 {
                let block = m.endOfFile
                m.endOfFile += clusterSize
                table[t] = block
                newBlocks[t] = [UInt8](repeating: 0, count: Int(clusterSize))
                pending.append(block >> clusterBits)
            }
            let index = cluster % perBlock
            if newBlocks[t] != nil {
                encodeRefcount(&newBlocks[t]!, index: index, value: 1)
            } else {
                // An existing block: raising a refcount early can only leak.
                guard try loadRefcountBlock(t, m: &m) else { throw DiskImageError.refcountTableFull }
                encodeRefcount(&m.refcountBlocks[t]!.bytes, index: index, value: 1)
                markRefcountBlockDirty(t, m: &m)
                touched.insert(t)
            }
        }
        for t in touched { try writeRefcountBlock(t, m: &m) }
        for (t, bytes) in newBlocks {
            try file.write(bytes: bytes, at: table[t])
            noteFileEnd(table[t] + clusterSize)
        }
        var tableBytes = [UInt8](repeating: 0, count: Int(tableClusters * clusterSize))
        for (i, e) in table.enumerated() where e != 0 { tableBytes.setBE(e, at: i * 8) }
        try file.write(bytes: tableBytes, at: tableOffset)
        noteFileEnd(tableOffset + tableClusters * clusterSize)
        try file.sync()

        // Switch: refcount_table_offset (48) and refcount_table_clusters (56) in one 12-byte write.
        var fields = [UInt8](repeating: 0, count: 12)
        fields.setBE(tableOffset, at: 0)
        fields.setBE(UInt32(tableClusters), at: 8)
        try file.write(bytes: fields, at: 48)
        try file.sync()
        let oldOffset = m.refcountTableOffset
        let oldBytes = oldCount * 8
        m.refcountTable = table
        m.refcountTableOffset = tableOffset
        m.refcountClock += 1
        for (t, bytes) in newBlocks { m.refcountBlocks[t] = CachedRefcountBlock(bytes: bytes, lastUse: m.refcountClock) }
        m.protectedClusters = nil
        if oldBytes > 0 { try releaseRange(start: oldOffset, length: oldBytes, m: &m) }
    }

    /// Stores `value` for entry `index` into a refcount block's bytes.
    func encodeRefcount(_ bytes: inout [UInt8], index: UInt64, value: UInt64) {
        let bits = header.refcountBits
        let byte = Int(index * bits / 8)
        if bits >= 8 {
            let width = Int(bits / 8)
            for i in 0..<width { bytes[byte + i] = UInt8(truncatingIfNeeded: value >> UInt64(8 * (width - 1 - i))) }
        } else {
            let shift = (index * bits) % 8
            let mask = UInt8(truncatingIfNeeded: ((1 << bits) - 1) << shift)
            bytes[byte] = (bytes[byte] & ~mask) | (UInt8(truncatingIfNeeded: value << shift) & mask)
        }
    }
}
