// Discard and write-zeroes on qcow2 images: changes of L2 entries, no data written where a
// whole cluster (or, with extended L2 entries, a whole subcluster) is covered.
//
// - discard: each whole cluster is deallocated: its L2 entry becomes 0 (unallocated, which
//   reads as zeros) or, with a backing file that would show through, a zero cluster without
//   a host cluster. Pieces of clusters are left as they are (a discard is a hint). A version 2
//   image with a backing file has no zero flag, so nothing is discarded there.
// - write-zeroes: whole clusters become zero clusters (the zero flag, or all subclusters
//   "zero"); a cluster the image owns keeps its host cluster for the next write unless
//   `deallocate` asks to free it; a compressed cluster or one shared with a snapshot is always
//   let go. With extended L2 entries, whole subclusters are marked zero too. Whatever is left
//   (pieces of clusters, a version 2 image) gets zeros written through `write`, skipping what
//   already reads as zeros.
//
// Freed host clusters are released after the change is on disk (`deferFree`), like every free.
extension QCOW2Image {
    /// A writable image can free clusters, unless it is version 2 with a backing file (no zero
    /// flag: the backing file would show through).
    public var canDeallocate: Bool { !isReadOnly && (header.version >= 3 || backing == nil) }

    /// Clusters are what a discard frees.
    public var discardGranularity: UInt64 { clusterSize }

    public func discard(at offset: UInt64, length: UInt64) throws {
        try checkZeroingAllowed(offset, length)
        guard canDeallocate, length > 0 else { return }
        let end = offset + length
        let start = (offset + clusterSize - 1) & ~(clusterSize - 1)
        // The last cluster of a disk whose size is not a multiple of the cluster size is whole at its end.
        let stop = end == virtualSize ? end : end & ~(clusterSize - 1)
        guard start < stop else { return }
        try hostIO.shared { try changeClusters(from: start, to: stop, imageEnd: virtualSize, .discard) }
        try relieveCachePressure()
    }

    public func writeZeroes(at offset: UInt64, length: UInt64, deallocate: Bool) throws {
        try checkZeroingAllowed(offset, length)
        guard length > 0 else { return }
        try hostIO.shared {
            try zeroRange(from: offset, to: offset + length, imageEnd: virtualSize, deallocate: deallocate, always: false)
        }
        try relieveCachePressure()
    }

    /// What `changeClusters` does to each cluster.
    enum ClusterChange {
        case discard
        /// `always`: mark unallocated clusters zero even without a backing file (a rebase or
        /// resize will put one, or more of one, behind them).
        case zero(deallocate: Bool, always: Bool)
    }

    /// Makes guest bytes `[start, end)` read as zeros, for a caller that holds `hostIO`. Unlike
    /// `writeZeroes`, the range may lie past the disk's current size (up to `imageEnd`, where a
    /// resize is taking it; the L1 table must already cover it).
    func zeroRange(from start: UInt64, to end: UInt64, imageEnd: UInt64, deallocate: Bool, always: Bool) throws {
        guard header.version >= 3 else {
            // No zero flag: whole clusters can only be freed (over no backing file); zeros are written elsewhere.
            if deallocate && backing == nil {
                let a = (start + clusterSize - 1) & ~(clusterSize - 1)
                let b = end == imageEnd ? end : end & ~(clusterSize - 1)
                if a < b {
                    try writeZeroBytes(from: start, to: a, skipKnownZero: !always)
                    try changeClusters(from: a, to: b, imageEnd: imageEnd, .discard)
                    try writeZeroBytes(from: b, to: end, skipKnownZero: !always)
                    return
                }
            }
            try writeZeroBytes(from: start, to: end, skipKnownZero: !always)
            return
        }
        let unit = extended ? clusterSize / 32 : clusterSize
        let a = (start + unit - 1) / unit * unit
        let b = end == imageEnd ? end : end / unit * unit
        guard a < b else { return try writeZeroBytes(from: start, to: end, skipKnownZero: !always) }
        try writeZeroBytes(from: start, to: a, skipKnownZero: !always)
        try changeClusters(from: a, to: b, imageEnd: imageEnd, .zero(deallocate: deallocate, always: always))
        try writeZeroBytes(from: b, to: end, skipKnownZero: !always)
    }

    /// Writes zeros over `[start, end)` through the write path, 1 MiB at a time, skipping pieces
    /// that already read as zeros when `skipKnownZero`. For a caller that holds `hostIO`.
    func writeZeroBytes(from start: UInt64, to end: UInt64, skipKnownZero: Bool) throws {
        guard start < end else { return }
        let chunk: UInt64 = 1 << 20
        let zeros = UnsafeMutableRawBufferPointer.allocate(byteCount: Int(min(end - start, chunk)), alignment: 4096)
        defer { zeros.deallocate() }
        zeros.initializeMemory(as: UInt8.self, repeating: 0)
        var position = start
        while position < end {
            let pieceEnd = min(end, (position / chunk + 1) * chunk)
            let count = Int(pieceEnd - position)
            if try !skipKnownZero || !isKnownZero(at: position, length: UInt64(count)) {
                try writeRange(UnsafeRawBufferPointer(rebasing: zeros[0..<count]), at: position)
            }
            position = pieceEnd
        }
    }

    /// Applies `change` to guest range `[start, end)`, whose ends are cluster-aligned (a discard)
    /// or subcluster-aligned (zeroing), or the image end, one L2 table at a time with its
    /// clusters claimed. For a caller that holds `hostIO`.
    func changeClusters(from start: UInt64, to end: UInt64, imageEnd: UInt64, _ change: ClusterChange) throws {
        var leftovers: [(UInt64, UInt64)] = []  // Parts of compressed clusters: zeros are written there.
        var pos = start
        while pos < end {
            let index = pos >> clusterBits
            let l1Index = Int(index / l2Entries)
            let chunkEnd = min(end, (UInt64(l1Index) + 1) * l2Entries << clusterBits)
            let clusters = index..<(((chunkEnd - 1) >> clusterBits) + 1)
            try claims.with(clusters) {
                try metadata.exclusive { m in
                    try changeClusters(from: pos, to: chunkEnd, imageEnd: imageEnd, change, l1Index: l1Index,
                                       leftovers: &leftovers, m: &m)
                }
            }
            pos = chunkEnd
        }
        for (s, e) in leftovers { try writeZeroBytes(from: s, to: e, skipKnownZero: false) }
    }

    /// `changeClusters` within the L2 table of `l1Index`, under the lock.
    private func changeClusters(from start: UInt64, to end: UInt64, imageEnd: UInt64, _ change: ClusterChange, l1Index: Int,
                                leftovers: inout [(UInt64, UInt64)], m: inout QCOW2Metadata) throws {
        // Without an L2 table every cluster is unallocated: only a backing file (or a caller
        // that will put one behind) needs zero clusters there.
        let hasTable = l1Index < m.l1.count && m.l1[l1Index] & Self.offsetMask != 0
        var markUnallocated = backing != nil
        if case .zero(_, true) = change { markUnallocated = true }
        if !hasTable && !markUnallocated { return }
        let table = try writableL2(l1Index: l1Index, m: &m)
        let step = extended ? 2 : 1
        let scSize = clusterSize / 32
        var changed = false
        var pos = start
        while pos < end {
            let i = pos >> clusterBits
            let clusterStart = i << clusterBits
            let clusterEnd = min(end, clusterStart + clusterSize)
            defer { pos = clusterEnd }
            let slot = Int(i % l2Entries) * step
            let entry = table.entries[slot]
            let bitmap = extended ? table.entries[slot + 1] : 0
            let mapping = try mapping(entry: entry, bitmap: bitmap, guestCluster: i)
            let whole = pos == clusterStart && (clusterEnd == clusterStart + clusterSize || clusterEnd >= imageEnd)
            var newEntry = entry, newBitmap = bitmap
            var release = false
            if whole {
                if mapping == .unallocated && !markUnallocated { continue }
                switch change {
                case .discard:
                    release = true
                    if backing == nil {
                        (newEntry, newBitmap) = (0, 0)
                    } else {
                        (newEntry, newBitmap) = extended ? (0, Self.allZero) : (Self.zeroFlag, 0)
                    }
                case let .zero(deallocate, _):
                    var compressed = false
                    if case .compressed = mapping { compressed = true }
                    let keep = !deallocate && !compressed && entry & Self.copiedFlag != 0 && entry & Self.offsetMask != 0
                    if keep {
                        (newEntry, newBitmap) = extended ? (entry, Self.allZero) : (entry | Self.zeroFlag, 0)
                    } else {
                        release = true
                        (newEntry, newBitmap) = extended ? (0, Self.allZero) : (Self.zeroFlag, 0)
                    }
                }
            } else {
                // Whole subclusters of an extended entry: mark them zero, keep the rest.
                guard extended, case .zero = change else { continue }
                if case .compressed = mapping {
                    leftovers.append((pos, clusterEnd))
                    continue
                }
                let mask = Self.subclusterMask(from: Int((pos - clusterStart) / scSize),
                                               through: Int((clusterEnd - clusterStart - 1) / scSize))
                let allocated = UInt32(truncatingIfNeeded: bitmap) & ~mask
                let zero = UInt32(truncatingIfNeeded: bitmap >> 32) | mask
                newBitmap = UInt64(allocated) | UInt64(zero) << 32
            }
            guard newEntry != entry || newBitmap != bitmap else { continue }
            if release, let old = try hostRange(entry: entry, bitmap: bitmap, guestCluster: i) {
                deferFree(HostRange(start: old.start, length: old.length), m: &m)
            }
            table.entries[slot] = newEntry
            if extended { table.entries[slot + 1] = newBitmap }
            changed = true
        }
        if changed { markDirty(table, m: &m) }
    }
}
