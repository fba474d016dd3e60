import Basics

// Writing cached metadata back to the file, in an order that leaves a consistent image (at
// worst leaked clusters) whether the process is killed (what it wrote survives in the page
// cache) or the host loses power (what was not synced may be lost, in any part).
//
// The rules (QEMU's qcow2 metadata cache keeps the same ones with its cache dependencies):
//   - a refcount block may be written at any time: it only ever holds raised refcounts
//     (harmless before anything points to the cluster: a leak at worst) and refcounts
//     lowered after the reference's removal is durable (`deferFree`);
//   - an L2 entry (or L1 entry) pointing to a newly allocated cluster is written only after
//     the cluster's refcount and contents are durable: refcount blocks written, then fdatasync;
//   - a cluster freed by a change is reused only once that change is durable and no read or
//     write that looked the cluster up before the change is still running.
// So one write-back costs at most two fdatasyncs however many clusters it covers:
//
//   1. Take a copy of every changed refcount block, L2 table and L1 entry (under the lock).
//   2. Write the refcount blocks.
//   3. If an L2 or L1 change points to a new cluster: fdatasync. This makes durable the
//      refcounts of (2), the data written into new clusters (each before its entry changed),
//      and new L2 tables (written when allocated).
//   4. Write the L2 tables and L1 entries.
//   5. fdatasync: a guest's flush is complete here.
//   6. Wait for the reads and writes under way (`hostIO.waitForReaders`), then lower the
//      refcounts of the clusters whose references (4) removed, so they can be allocated
//      again, and write those refcount blocks (no sync: losing them leaves leaks only).
extension QCOW2Image {
    /// Makes every completed write durable, with the metadata that points to it.
    public func flush() throws {
        guard !isReadOnly else { return }
        try writeBack(durable: true)
    }

    /// The cached changes at one moment, copied out of the lock to be written.
    struct WritebackBatch {
        var refcountBlocks: [(t: Int, offset: UInt64, bytes: [UInt8], version: UInt64)] = []
        var l2Tables: [(offset: UInt64, table: CachedL2Table, entries: [UInt64], version: UInt64)] = []
        var l1Entries: [(index: Int, value: UInt64)] = []
        var l1Offset: UInt64 = 0
        /// An L2/L1 change points to a new cluster: sync before writing tables.
        var barrier = false
        /// Pending frees whose reference removals this batch writes.
        var frees = 0
    }

    /// Writes the cached changes back in the order above; with `durable`, ends with an
    /// fdatasync and then frees the clusters the changes stopped referencing.
    func writeBack(durable: Bool) throws {
        try writebackLock.withLock { _ in
            let batch = metadata.exclusive { m in takeBatch(&m) }
            do {
                try writeBatch(batch, durable: durable)
            } catch {
                if batch.barrier { metadata.exclusive { $0.needsBarrier = true } }
                throw error
            }
            metadata.exclusive { m in markWritten(batch, m: &m) }
            guard durable, batch.frees > 0 else { return }
            // Grace period: a read or write that found a freed cluster before it was freed is done.
            hostIO.waitForReaders()
            lastCompressed.withLock { $0 = nil }
            let blocks = try metadata.exclusive { m in
                try applyFrees(batch.frees, m: &m)
                return takeBatch(&m, refcountBlocksOnly: true)
            }
            try writeBatch(blocks, durable: false)
            metadata.exclusive { m in markWritten(blocks, m: &m) }
        }
    }

    /// For edits that hold the metadata lock throughout on an image nobody else uses (snapshot,
    /// resize, repair): writes every cached change now in the same order, syncs, and frees at
    /// once what the changes stopped referencing (no grace period is needed: nobody reads).
    func commit(_ m: inout QCOW2Metadata) throws {
        let batch = takeBatch(&m)
        do {
            try writeBatch(batch, durable: true)
        } catch {
            if batch.barrier { m.needsBarrier = true }
            throw error
        }
        markWritten(batch, m: &m)
        guard batch.frees > 0 else { return }
        try applyFrees(batch.frees, m: &m)
        let blocks = takeBatch(&m, refcountBlocksOnly: true)
        try writeBatch(blocks, durable: false)
        markWritten(blocks, m: &m)
    }

    /// Copies the changed refcount blocks (and, unless `refcountBlocksOnly`, L2 tables and L1 entries).
    private func takeBatch(_ m: inout QCOW2Metadata, refcountBlocksOnly: Bool = false) -> WritebackBatch {
        var b = WritebackBatch()
        if m.dirtyRefcountBlocks > 0 {
            for (t, block) in m.refcountBlocks where block.dirty {
                b.refcountBlocks.append((t, m.refcountTable[t] & ~(clusterSize - 1), block.bytes, block.version))
            }
        }
        guard !refcountBlocksOnly else { return b }
        if m.dirtyL2Tables > 0 {
            for (offset, table) in m.l2 where table.dirty {
                b.l2Tables.append((offset, table, table.entries, table.version))
            }
        }
        b.l1Entries = m.l1Dirty.sorted().map { ($0, m.l1[$0]) }
        b.l1Offset = m.l1TableOffset
        b.barrier = m.needsBarrier
        m.needsBarrier = false
        b.frees = m.pendingFrees.count
        return b
    }

    /// Steps 2 to 5.
    private func writeBatch(_ b: WritebackBatch, durable: Bool) throws {
        for block in b.refcountBlocks { try file.write(bytes: block.bytes, at: block.offset) }
        if !b.l2Tables.isEmpty || !b.l1Entries.isEmpty {
            if b.barrier { try file.sync() }
            for t in b.l2Tables { try writeEntries(t.entries, at: t.offset) }
            // Runs of consecutive L1 entries, one write each.
            var i = 0
            while i < b.l1Entries.count {
                var j = i + 1
                while j < b.l1Entries.count, b.l1Entries[j].index == b.l1Entries[j - 1].index + 1 { j += 1 }
                try writeEntries(b.l1Entries[i..<j].map(\.value), at: b.l1Offset + UInt64(b.l1Entries[i].index) * 8)
                i = j
            }
        }
        if durable { try file.sync() }
    }

    /// Marks clean what a batch wrote, unless it changed again meanwhile.
    private func markWritten(_ b: WritebackBatch, m: inout QCOW2Metadata) {
        for r in b.refcountBlocks {
            guard let block = m.refcountBlocks[r.t], block.dirty, block.version == r.version else { continue }
            m.refcountBlocks[r.t]!.dirty = false
            m.dirtyRefcountBlocks -= 1
        }
        for t in b.l2Tables where t.table.dirty && t.table.version == t.version && m.l2[t.offset] === t.table {
            t.table.dirty = false
            m.dirtyL2Tables -= 1
        }
        for e in b.l1Entries where m.l1[e.index] == e.value { m.l1Dirty.remove(e.index) }
    }

    /// Records that `range` is no longer referenced by a cached change; its refcount drops
    /// after the change is durable (`writeBack`). Adjacent whole-cluster ranges are merged.
    func deferFree(_ range: HostRange, m: inout QCOW2Metadata) {
        let mask = clusterSize - 1
        if range.start & mask == 0, range.length & mask == 0, let last = m.pendingFrees.last,
           last.start & mask == 0, last.length & mask == 0, last.start + last.length == range.start {
            m.pendingFrees[m.pendingFrees.count - 1].length += range.length
        } else {
            m.pendingFrees.append(range)
        }
    }

    /// Lowers the refcounts of the first `count` pending frees, each cluster they overlap by
    /// one (a cluster holding several compressed clusters counts each). A refcount already 0
    /// (a broken image) stays 0. Progress is recorded as it goes, so an error part-way
    /// through never lowers a refcount twice.
    func applyFrees(_ count: Int, m: inout QCOW2Metadata) throws {
        var done = 0
        defer { m.pendingFrees.removeFirst(done) }
        while done < count {
            let range = m.pendingFrees[done]
            var cluster = range.start >> clusterBits
            let last = (range.start + range.length - 1) >> clusterBits
            while cluster <= last {
                let rc = try refcount(cluster: cluster, m: &m)
                if rc > 0 {
                    try setRefcount(cluster: cluster, rc - 1, m: &m)
                    if rc == 1 { m.freeHint = min(m.freeHint, cluster) }
                }
                cluster += 1
                if cluster <= last {
                    let next = cluster << clusterBits
                    m.pendingFrees[done] = HostRange(start: next, length: range.start + range.length - next)
                }
            }
            done += 1
        }
    }

    /// Writes back early when the caches hold many changes (dirty tables cannot be evicted) or
    /// many frees wait. Called after an operation, holding no lock.
    func relieveCachePressure() throws {
        let pressing = metadata.shared { m in
            m.dirtyL2Tables > l2CacheCapacity / 2 || m.dirtyRefcountBlocks > refcountCacheCapacity / 2
                || m.pendingFrees.count > 4096
        }
        if pressing { try writeBack(durable: true) }
    }
}
