import Basics
/// Reference-count changes to apply together: host cluster index -> signed change.
///
/// Built while walking tables, then checked and written one refcount block at a time by
/// `QCOW2Image.apply(_:w:)`, so nothing is written unless every change fits.
struct RefcountChanges {
    private(set) var deltas: [UInt64: Int64] = [:]

    var isEmpty: Bool { deltas.isEmpty }

    mutating func add(cluster: UInt64, _ delta: Int64) {
        deltas[cluster, default: 0] += delta
    }

    /// Changes every host cluster that overlaps `[start, start + length)`.
    mutating func add(range start: UInt64, length: UInt64, clusterBits: UInt64, _ delta: Int64) {
        guard length > 0 else { return }
        var c = start >> clusterBits
        let last = (start + length - 1) >> clusterBits
        while c <= last {
            add(cluster: c, delta)
            c += 1
        }
    }
}

/// How `syncCopiedFlags` may change COPIED flags (bit 63 of L1 and L2 entries, "refcount is 1,
/// write in place"). Clearing a flag is always safe (the next write copies the cluster); setting
/// it is only right once the refcount is 1 on disk.
enum CopiedFlagUpdate {
    /// Clear every flag: the clusters are about to become shared.
    case clearAll
    /// Set the flag exactly where the stored refcount is 1, clear it elsewhere.
    case matchRefcounts
}

// Metadata editing shared by resize and snapshot. All of it runs with the metadata lock held
// alone (`m`), on an image opened for writing that nobody else uses, and leaves the caller to
// `commit` (write the cached changes in order, fdatasync) at the points its crash-safe order needs.
extension QCOW2Image {
    /// Reads `count` big-endian table entries at `offset`.
    func readEntries(at offset: UInt64, count: Int) throws -> [UInt64] {
        guard count > 0 else { return [] }
        var t = [UInt64](repeating: 0, count: count)
        try t.withUnsafeMutableBytes { try file.readZeroFilled(into: $0, at: offset) }
        return t.map { UInt64(bigEndian: $0) }
    }

    /// Writes table entries big-endian at `offset`.
    func writeEntries(_ entries: [UInt64], at offset: UInt64) throws {
        guard !entries.isEmpty else { return }
        var bytes = [UInt8](repeating: 0, count: entries.count * 8)
        for (i, e) in entries.enumerated() where e != 0 { bytes.setBE(e, at: i * 8) }
        try file.write(bytes: bytes, at: offset)
        noteFileEnd(offset + UInt64(bytes.count))
    }

    /// Clusters needed for a table of `entries` 8-byte entries.
    func clusters(forEntries entries: UInt64) -> UInt64 {
        max(1, (entries * 8 + clusterSize - 1) >> clusterBits)
    }

    /// The L2 table an L1 entry points to, checked, or nil if the entry is empty.
    func l2Table(of l1Entry: UInt64, index: Int) throws -> UInt64? {
        let l2 = l1Entry & Self.offsetMask
        guard l2 != 0 else { return nil }
        guard l1Entry & Self.l1ReservedMask == 0 else {
            throw DiskImageError.corruptMetadata("L1 entry \(index) (0x\(Hex.digits(l1Entry))) has reserved bits set")
        }
        try checkClusterOffset(l2, "L2 table offset 0x\(Hex.digits(l2)) in L1 entry \(index)")
        return l2
    }

    /// Host clusters (or compressed byte ranges) an L2 entry refers to, after checking it.
    /// Returns nil for an entry without host storage.
    func hostRange(entry: UInt64, bitmap: UInt64, guestCluster: UInt64) throws -> (start: UInt64, length: UInt64)? {
        let mapping = try mapping(entry: entry, bitmap: bitmap, guestCluster: guestCluster)
        if case .compressed = mapping {
            let (offset, size) = compressedRange(entry)
            return (offset & ~511, size)
        }
        let host = entry & Self.offsetMask
        return host == 0 ? nil : (host, clusterSize)
    }

    /// Adds `delta` for every path from the L1 table `l1` through an L2 table to a host cluster:
    /// the L2 tables themselves, their data clusters and compressed ranges. qcow2 counts one
    /// reference per path, so a data cluster under an L2 table two L1 tables share counts twice.
    func collectReferences(l1: [UInt64], delta: Int64, into changes: inout RefcountChanges) throws {
        let step = extended ? 2 : 1
        for (i, e) in l1.enumerated() {
            guard let l2 = try l2Table(of: e, index: i) else { continue }
            changes.add(cluster: l2 >> clusterBits, delta)
            let table = try readEntries(at: l2, count: Int(clusterSize / 8))
            for j in stride(from: 0, to: table.count, by: step) {
                let guest = UInt64(i) * l2Entries + UInt64(j / step)
                let bitmap = extended ? table[j + 1] : 0
                if let (start, length) = try hostRange(entry: table[j], bitmap: bitmap, guestCluster: guest) {
                    changes.add(range: start, length: length, clusterBits: clusterBits, delta)
                }
            }
        }
    }

    /// Checks that every change fits: no refcount would go below zero or past the refcount width,
    /// and every cluster changed has a refcount block. Reads only, so it works on an image opened
    /// read-only (with a reader over the table on disk) before anything is written.
    func validate(_ changes: RefcountChanges, reader: RefcountReader) throws {
        let perBlock = reader.entriesPerBlock
        let bits = header.refcountBits
        let maxValue: UInt64 = bits == 64 ? .max : (1 << bits) - 1
        var byBlock: [Int: [(UInt64, Int64)]] = [:]
        for (cluster, delta) in changes.deltas where delta != 0 {
            byBlock[Int(cluster / perBlock), default: []].append((cluster, delta))
        }
        for (t, list) in byBlock {
            guard t < reader.table.count, let values = try reader.block(t) else {
                throw DiskImageError.corruptMetadata(
                    "host cluster \(list[0].0) is referenced but has no refcount block (its refcount is 0)")
            }
            for (cluster, delta) in list {
                let old = values[Int(cluster % perBlock)]
                if delta < 0 {
                    guard old >= UInt64(-delta) else {
                        throw DiskImageError.corruptMetadata(
                            "host cluster \(cluster) is referenced more often than its refcount \(old) says")
                    }
                } else {
                    guard old > 0 else {
                        throw DiskImageError.corruptMetadata("host cluster \(cluster) is referenced but its refcount is 0")
                    }
                    guard maxValue - old >= UInt64(delta) else { throw DiskImageError.refcountOverflow(cluster: cluster) }
                }
            }
        }
    }

    /// Validates `changes`, then (unless `dryRun`) makes them in the cached refcount blocks.
    /// Nothing changes if any change does not fit. The caller commits them.
    func apply(_ changes: RefcountChanges, dryRun: Bool = false, m: inout QCOW2Metadata) throws {
        guard !changes.isEmpty else { return }
        try validate(changes, reader: RefcountReader(image: self, metadata: m))
        guard !dryRun else { return }
        for (cluster, delta) in changes.deltas.sorted(by: { $0.key < $1.key }) where delta != 0 {
            let old = try refcount(cluster: cluster, m: &m)
            try setRefcount(cluster: cluster, delta < 0 ? old - UInt64(-delta) : old + UInt64(delta), m: &m)
            if delta < 0 && old == UInt64(-delta) { m.freeHint = min(m.freeHint, cluster) }
        }
    }

    /// Brings the COPIED flags of the tables reachable from the L1 table at `l1Offset` in line
    /// with `update`, writing only the L2 tables and L1 entries that change.
    func syncCopiedFlags(l1Offset: UInt64, l1: inout [UInt64], _ update: CopiedFlagUpdate,
                         m: inout QCOW2Metadata) throws {
        let reader = RefcountReader(image: self, metadata: m)
        var blocks: [Int: [UInt64]] = [:]
        func exclusive(_ offset: UInt64) throws -> Bool {
            let cluster = offset >> clusterBits
            let t = Int(cluster / reader.entriesPerBlock)
            guard t < reader.table.count else { return false }
            if blocks[t] == nil { blocks[t] = try reader.block(t) ?? [] }
            let b = blocks[t]!
            let i = Int(cluster % reader.entriesPerBlock)
            return i < b.count && b[i] == 1
        }
        let step = extended ? 2 : 1
        var l1Changed = false
        for (i, e) in l1.enumerated() {
            guard let l2 = try l2Table(of: e, index: i) else { continue }
            var table = try readEntries(at: l2, count: Int(clusterSize / 8))
            var changed = false
            for j in stride(from: 0, to: table.count, by: step) {
                let entry = table[j]
                guard entry & Self.compressedFlag == 0, entry & Self.offsetMask != 0 else { continue }
                let want = try update == .matchRefcounts && exclusive(entry & Self.offsetMask)
                let new = want ? entry | Self.copiedFlag : entry & ~Self.copiedFlag
                if new != entry { table[j] = new; changed = true }
            }
            if changed { try writeEntries(table, at: l2) }
            let want = try update == .matchRefcounts && exclusive(l2)
            let new = want ? e | Self.copiedFlag : e & ~Self.copiedFlag
            if new != e { l1[i] = new; l1Changed = true }
        }
        if l1Changed { try writeEntries(l1, at: l1Offset) }
    }

    /// Writes `bytes` into the header at `offset` (a few adjacent fields, one write) and syncs.
    func writeHeaderFields(_ bytes: [UInt8], at offset: UInt64) throws {
        try file.write(bytes: bytes, at: offset)
        try file.sync()
    }

    /// Forgets cached L2 tables and reloads the active L1 table after tables changed on disk.
    /// The caller has committed every cached change.
    func reloadTables(l1Offset: UInt64, count: Int, m: inout QCOW2Metadata) throws {
        m.l1 = try readEntries(at: l1Offset, count: count)
        m.l1Dirty = []
        m.l2 = [:]
        m.dirtyL2Tables = 0
        m.l2Removals += 1
        m.protectedClusters = nil
        lastCompressed.withLock { $0 = nil }
    }

    /// Replaces the active L1 table with a larger copy of `count` entries after the end of the
    /// file: written and synced first, then the header's `l1_size` and `l1_table_offset` are
    /// switched in one 12-byte write, and only then are the old table's clusters released.
    /// The caller has committed every cached change.
    func growL1(to count: UInt64, m: inout QCOW2Metadata) throws {
        let old = m.l1
        guard count > UInt64(old.count) else { return }
        guard count <= QCOW2Header.maxL1Entries else {
            throw DiskImageError.tableTooLarge(table: "L1 table", entries: count, limit: QCOW2Header.maxL1Entries)
        }
        let newOffset = try allocateRun(clusters: clusters(forEntries: count), m: &m)
        let table = old + [UInt64](repeating: 0, count: Int(count) - old.count)
        try writeEntries(table, at: newOffset)
        // The rest of the last cluster: zeros, so the file holds whole clusters.
        let end = newOffset + clusters(forEntries: count) * clusterSize
        let written = newOffset + count * 8
        if end > written { try file.write(bytes: [UInt8](repeating: 0, count: Int(end - written)), at: written) }
        noteFileEnd(end)
        try commit(&m)
        var fields = [UInt8](repeating: 0, count: 12)
        fields.setBE(UInt32(count), at: 0)
        fields.setBE(newOffset, at: 4)
        try writeHeaderFields(fields, at: 36)
        let oldOffset = m.l1TableOffset
        m.l1TableOffset = newOffset
        m.l1 = table
        m.protectedClusters = nil
        if !old.isEmpty && oldOffset != 0 {
            try releaseRange(start: oldOffset, length: UInt64(old.count) * 8, m: &m)
        }
    }
}

extension RefcountReader {
    /// A reader over the writer's refcount table and cached blocks (newer than the file's).
    init(image: QCOW2Image, metadata m: borrowing QCOW2Metadata) {
        self.image = image
        self.table = m.refcountTable
        self.cachedBlocks = m.refcountBlocks.mapValues(\.bytes)
    }
}
