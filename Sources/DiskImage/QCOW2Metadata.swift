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

// Metadata editing shared by resize, snapshot and rebase. All of it runs under the writer lock
// (`w`), on an image opened for writing, and leaves the caller to `fdatasync` at the points its
// crash-safe order needs.
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

    /// Allocates `count` consecutive clusters after the end of the file (refcount 1 each) and
    /// returns the first one's offset. Refcount blocks this needs go after the run.
    func allocateRun(clusters count: UInt64, w: inout WriterState) throws -> UInt64 {
        let start = w.nextFree
        w.nextFree += count * clusterSize
        for i in 0..<count {
            let cluster = (start >> clusterBits) + i
            guard try refcount(cluster: cluster, w: &w) == 0 else {
                throw DiskImageError.corruptMetadata("host cluster \(cluster) past the end of the file is already in use")
            }
            try setRefcount(cluster: cluster, 1, w: &w)
        }
        return start
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
            let shift = 62 - (clusterBits - 8)
            let coffset = entry & ((1 << shift) - 1)
            let sectors = ((entry >> shift) & ((1 << (clusterBits - 8)) - 1)) + 1
            return (coffset & ~511, sectors * 512)
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

    /// Validates `changes`, then (unless `dryRun`) writes each changed refcount block once.
    /// Nothing is written if any change does not fit.
    func apply(_ changes: RefcountChanges, dryRun: Bool = false, w: inout WriterState) throws {
        guard !changes.isEmpty else { return }
        try validate(changes, reader: RefcountReader(image: self, table: w.refcountTable))
        guard !dryRun else { return }
        let perBlock = refcountEntriesPerBlock
        var byBlock: [Int: [(UInt64, Int64)]] = [:]
        for (cluster, delta) in changes.deltas where delta != 0 {
            byBlock[Int(cluster / perBlock), default: []].append((cluster, delta))
        }
        let reader = RefcountReader(image: self, table: w.refcountTable)
        for (t, list) in byBlock.sorted(by: { $0.key < $1.key }) {
            let block = try refcountBlock(t, w: &w)
            var bytes = [UInt8](repeating: 0, count: Int(clusterSize))
            try bytes.withUnsafeMutableBytes { try file.readZeroFilled(into: $0, at: block) }
            let values = reader.decode(bytes)
            for (cluster, delta) in list {
                let index = cluster % perBlock
                let old = values[Int(index)]
                encodeRefcount(&bytes, index: index, value: delta < 0 ? old - UInt64(-delta) : old + UInt64(delta))
            }
            try file.write(bytes: bytes, at: block)
        }
    }

    /// Brings the COPIED flags of the tables reachable from the L1 table at `l1Offset` in line
    /// with `update`, writing only the L2 tables and L1 entries that change.
    func syncCopiedFlags(l1Offset: UInt64, l1: inout [UInt64], _ update: CopiedFlagUpdate,
                         w: inout WriterState) throws {
        let reader = RefcountReader(image: self, table: w.refcountTable)
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
    func reloadTables(l1Offset: UInt64, count: Int) throws {
        let l1 = try readEntries(at: l1Offset, count: count)
        state.withLock { s in
            s.l1 = l1
            s.l2Cache = [:]
            s.lastCompressed = nil
        }
    }

    /// Replaces the active L1 table with a larger copy of `count` entries after the end of the
    /// file: written and synced first, then the header's `l1_size` and `l1_table_offset` are
    /// switched in one 12-byte write, and only then are the old table's clusters released.
    func growL1(to count: UInt64, w: inout WriterState) throws {
        let old = state.withLock { $0.l1 }
        guard count > UInt64(old.count) else { return }
        guard count <= QCOW2Header.maxL1Entries else {
            throw DiskImageError.tableTooLarge(table: "L1 table", entries: count, limit: QCOW2Header.maxL1Entries)
        }
        let newOffset = try allocateRun(clusters: clusters(forEntries: count), w: &w)
        let table = old + [UInt64](repeating: 0, count: Int(count) - old.count)
        try writeEntries(table, at: newOffset)
        // The rest of the last cluster: zeros, so the file holds whole clusters.
        let end = newOffset + clusters(forEntries: count) * clusterSize
        let written = newOffset + count * 8
        if end > written { try file.write(bytes: [UInt8](repeating: 0, count: Int(end - written)), at: written) }
        noteFileEnd(end)
        try file.sync()
        var fields = [UInt8](repeating: 0, count: 12)
        fields.setBE(UInt32(count), at: 0)
        fields.setBE(newOffset, at: 4)
        try writeHeaderFields(fields, at: 36)
        let oldOffset = w.l1TableOffset
        w.l1TableOffset = newOffset
        let grown = table
        state.withLock { $0.l1 = grown }
        if !old.isEmpty && oldOffset != 0 {
            try releaseRange(start: oldOffset, length: UInt64(old.count) * 8, w: &w)
        }
    }

    /// Makes the guest range `[start, end)` read as zeros with zero flags, keeping any host
    /// cluster a zeroed cluster had (QEMU's `qcow2_subcluster_zeroize` without unmapping).
    /// `start` is subcluster-aligned; `end` is too, or is the end of the image. Version 3 only.
    /// A whole compressed cluster becomes a plain zero cluster and its host range is released
    /// after the L2 writes are synced; part of one is copied out and zeroed by the write path.
    func zeroize(from start: UInt64, to end: UInt64, w: inout WriterState) throws {
        guard start < end else { return }
        var releases: [(UInt64, UInt64)] = []
        let scSize = clusterSize / 32
        let step = extended ? 2 : 1
        var pos = start
        while pos < end {
            let l1Index = Int((pos >> clusterBits) / l2Entries)
            let l2Offset = try writableL2(l1Index: l1Index, w: &w)
            var table = try readEntries(at: l2Offset, count: Int(clusterSize / 8))
            var first = Int.max, last = -1
            func flush() throws {
                guard last >= first else { return }
                try writeEntries(Array(table[first...last]), at: l2Offset + UInt64(first) * 8)
                let copy = table
                state.withLock { s in if s.l2Cache[l2Offset] != nil { s.l2Cache[l2Offset]!.entries = copy } }
                first = Int.max
                last = -1
            }
            let l2End = min(end, UInt64(l1Index + 1) * l2Entries << clusterBits)
            while pos < l2End {
                let i = pos >> clusterBits
                let slot = Int(i % l2Entries) * step
                let clusterStart = i << clusterBits
                let clusterEnd = min(l2End, clusterStart + clusterSize)
                let entry = table[slot]
                let bitmap = extended ? table[slot + 1] : 0
                let whole = pos == clusterStart && (clusterEnd == clusterStart + clusterSize || clusterEnd == end)
                let range = try hostRange(entry: entry, bitmap: bitmap, guestCluster: i)
                if entry & Self.compressedFlag != 0, let (hs, hl) = range {
                    guard whole else {
                        try flush()
                        let zeros = [UInt8](repeating: 0, count: Int(clusterEnd - pos))
                        try zeros.withUnsafeBytes { try writeInCluster($0, guestOffset: pos, w: &w) }
                        table = try readEntries(at: l2Offset, count: Int(clusterSize / 8))
                        pos = clusterEnd
                        continue
                    }
                    releases.append((hs, hl))
                    table[slot] = extended ? 0 : Self.zeroFlag
                    if extended { table[slot + 1] = 0xffff_ffff << 32 }
                } else if extended {
                    let from = Int((pos - clusterStart) / scSize)
                    let to = whole ? 32 : Int((clusterEnd - clusterStart + scSize - 1) / scSize)
                    let mask = UInt64(UInt32.max >> UInt32(32 - (to - from))) << UInt64(from)
                    table[slot + 1] = (bitmap | mask << 32) & ~mask
                } else {
                    table[slot] = entry | Self.zeroFlag
                }
                first = min(first, slot)
                last = max(last, slot + step - 1)
                pos = clusterEnd
            }
            try flush()
        }
        try file.sync()
        for (s, l) in releases { try releaseRange(start: s, length: l, w: &w) }
    }
}

extension QCOW2Image {
    /// Writes `buffer` at a cluster-aligned guest `offset` (ending on a cluster boundary or at the
    /// end of the disk), many clusters at a time where this image has nothing yet: their refcounts
    /// are raised, the data written in one call, synced once, and only then the L2 entries pointing
    /// to them written in one call. Clusters that hold something go through `write`'s path.
    /// Used by rebase, which copies into unallocated ranges, so it costs one `fdatasync` per run
    /// instead of one per cluster.
    func writeIntoUnallocated(_ buffer: UnsafeRawBufferPointer, at offset: UInt64) throws {
        guard !isReadOnly else { throw DiskImageError.readOnly(path: file.path) }
        try checkRange(offset, buffer.count, virtualSize)
        let end = offset + UInt64(buffer.count)
        guard offset % clusterSize == 0, end % clusterSize == 0 || end == virtualSize else {
            return try write(buffer, at: offset)
        }
        let step = extended ? 2 : 1
        try writer.withLock { w in
            var pos = offset
            while pos < end {
                let index = pos >> clusterBits
                let l1Index = Int(index / l2Entries)
                let l2End = min(end, UInt64(l1Index + 1) * l2Entries << clusterBits)
                let l2 = try writableL2(l1Index: l1Index, w: &w)
                let table = try readEntries(at: l2, count: Int(clusterSize / 8))
                let first = Int(index % l2Entries) * step
                var n = 0
                while pos + UInt64(n) * clusterSize < l2End, table[first + n * step] == 0,
                      !extended || table[first + n * step + 1] == 0 {
                    n += 1
                }
                let done = Int(pos - offset)
                guard n > 0 else {
                    let length = Int(min(clusterSize, end - pos))
                    try writeInCluster(UnsafeRawBufferPointer(rebasing: buffer[done..<(done + length)]), guestOffset: pos, w: &w)
                    pos += UInt64(length)
                    continue
                }
                let runBytes = UInt64(n) * clusterSize
                let length = Int(min(runBytes, end - pos))
                let host = try allocateRun(clusters: UInt64(n), w: &w)
                try file.write(UnsafeRawBufferPointer(rebasing: buffer[done..<(done + length)]), at: host)
                if UInt64(length) < runBytes {
                    try file.write(bytes: [UInt8](repeating: 0, count: Int(runBytes) - length), at: host + UInt64(length))
                }
                noteFileEnd(host + runBytes)
                try file.sync()
                var entries = [UInt64](repeating: 0, count: n * step)
                for i in 0..<n {
                    entries[i * step] = (host + UInt64(i) * clusterSize) | Self.copiedFlag
                    if extended { entries[i * step + 1] = 0xffff_ffff }
                }
                try writeEntries(entries, at: l2 + UInt64(first) * 8)
                var updated = table
                updated.replaceSubrange(first..<(first + n * step), with: entries)
                let copy = updated
                state.withLock { s in if s.l2Cache[l2] != nil { s.l2Cache[l2]!.entries = copy } }
                pos += UInt64(length)
            }
        }
    }
}

extension RefcountReader {
    /// A reader over a refcount table already in memory (the writer's).
    init(image: QCOW2Image, table: [UInt64]) {
        self.image = image
        self.table = table
    }
}
