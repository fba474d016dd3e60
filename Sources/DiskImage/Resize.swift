import Basics

/// The size `resize` is asked for: absolute, or relative to the current size.
public enum ResizeTarget: Sendable, Equatable {
    case absolute(UInt64)
    case grow(by: UInt64)
    case shrink(by: UInt64)

    /// The new size for an image whose size is `current`, or nil if it would not be positive.
    public func size(from current: UInt64) -> UInt64? {
        switch self {
        case let .absolute(n): return n
        case let .grow(n):
            let (sum, overflow) = current.addingReportingOverflow(n)
            return overflow ? .max : sum
        case let .shrink(n): return n >= current ? nil : current - n
        }
    }
}

// `qemu-img resize`: grow or shrink the virtual disk.
//
// Raw: the file is truncated or extended (sparsely). qcow2, following QEMU's qcow2_co_truncate:
// - growing writes a larger L1 table when the new size needs one (new table written and synced,
//   one 12-byte header write switches `l1_size` and `l1_table_offset`, the old table is released),
//   and, when the backing file reaches past the old end, marks the new area as zero clusters so
//   the backing file's data does not show through; the new size is written last;
// - shrinking writes the new size first, then drops the L2 entries and L1 entries past the new
//   end (synced) before lowering the refcounts they held, frees refcount blocks that describe
//   nothing but themselves, and truncates the file after its last used cluster.
// A crash at any point leaves a consistent image: at worst leaked clusters.
extension DiskImage {
    /// Resizes the image at `path` and returns its new size. Shrinking needs `allowShrink`.
    @discardableResult
    public static func resize(path: String, format: ImageFormat? = nil, to target: ResizeTarget,
                              allowShrink: Bool) throws -> UInt64 {
        // Everything that can refuse is checked on a read-only open, so a refusal changes nothing.
        var newSize: UInt64 = 0
        do {
            let dev = try open(path: path, format: format, readOnly: true)
            let current = BlockStatusReader.length(of: dev)
            guard let size = target.size(from: current), size > 0 else { throw ImageEditError.sizeNotPositive }
            guard size <= UInt64(Int64.max) else { throw ImageEditError.sizeTooLarge(size) }
            if size < current && !allowShrink { throw ImageEditError.shrinkNeedsFlag(current: current, requested: size) }
            try (dev as? QCOW2Image)?.checkResize(to: size)
            newSize = size
        }
        let dev = try open(path: path, format: format, readOnly: false)
        if let raw = dev as? RawImage {
            try raw.file.truncate(to: newSize)
            try raw.file.sync()
        } else if let q = dev as? QCOW2Image {
            try q.resize(to: newSize)
        }
        return newSize
    }
}

extension QCOW2Image {
    /// Refuses what QEMU refuses (and what we do not support), without writing anything.
    func checkResize(to newSize: UInt64) throws {
        let h = header
        guard newSize % 512 == 0 else { throw ImageEditError.sizeNotSectorMultiple(newSize) }
        if h.snapshotCount > 0 && h.version < 3 { throw ImageEditError.resizeV2WithSnapshots }
        if h.bitmapCount > 0 { throw ImageEditError.resizeWithBitmaps }
        let perL1 = clusterSize * l2Entries
        guard (newSize + perL1 - 1) / perL1 <= QCOW2Header.maxL1Entries else { throw ImageEditError.sizeTooLarge(newSize) }
        let old = h.size & ~511
        if newSize > old && h.version < 3, let backing, BlockStatusReader.length(of: backing) > old {
            throw ImageEditError.growV2OverLargerBacking(backingSize: BlockStatusReader.length(of: backing))
        }
    }

    func resize(to newSize: UInt64) throws {
        try checkResize(to: newSize)
        let h = header
        let perL1 = clusterSize * l2Entries
        let newL1 = (newSize + perL1 - 1) / perL1
        let old = h.size & ~511
        if newSize >= old {
            try grow(from: old, to: newSize, l1Entries: newL1)
        } else {
            try shrink(to: newSize, l1Entries: newL1)
        }
    }

    private func writeSize(_ size: UInt64) throws {
        var bytes = [UInt8](repeating: 0, count: 8)
        bytes.setBE(size, at: 0)
        try writeHeaderFields(bytes, at: 24)
    }

    private func grow(from old: UInt64, to newSize: UInt64, l1Entries: UInt64) throws {
        // A backing file longer than the old size would show through the new area: zero it.
        var backingLength: UInt64 = 0
        if let backing { backingLength = BlockStatusReader.length(of: backing) }
        let needZero = backingLength > old && newSize > old
        let unit = extended ? clusterSize / 32 : clusterSize
        let zeroStart = (old + unit - 1) / unit * unit
        if needZero && zeroStart > old {
            // The unaligned head, inside the old last (sub)cluster: written as data.
            let zeros = [UInt8](repeating: 0, count: Int(min(zeroStart, newSize) - old))
            try zeros.withUnsafeBytes { buffer in try hostIO.shared { try writeRange(buffer, at: old) } }
        }
        try metadata.exclusive { m in
            try commit(&m)
            try growL1(to: l1Entries, m: &m)
        }
        if needZero && newSize > zeroStart {
            try hostIO.shared { try zeroRange(from: zeroStart, to: newSize, imageEnd: newSize, deallocate: false, always: true) }
        }
        try flush()
        try writeSize(newSize)
    }

    private func shrink(to newSize: UInt64, l1Entries newL1: UInt64) throws {
        let h = header
        try metadata.exclusive { m in
            try commit(&m)
            let cut = (newSize + clusterSize - 1) & ~(clusterSize - 1)
            let oldEnd = (h.size + clusterSize - 1) & ~(clusterSize - 1)
            let step = extended ? 2 : 1
            let l1 = m.l1

            // What goes: the entries of the last L2 table kept that lie past the new end, and
            // every path through the L1 entries past it. Checked before anything is written.
            var loss = RefcountChanges()
            let lastKept = Int(newL1) - 1
            var straddling: (l1Index: Int, first: UInt64, end: UInt64)?
            if lastKept >= 0, lastKept < l1.count, let l2 = try l2Table(of: l1[lastKept], index: lastKept),
               cut < UInt64(lastKept + 1) * l2Entries << clusterBits, cut < oldEnd {
                let first = cut >> clusterBits
                let end = min(oldEnd >> clusterBits, UInt64(lastKept + 1) * l2Entries)
                let table = try readEntries(at: l2, count: Int(clusterSize / 8))
                for i in first..<max(first, end) {
                    let slot = Int(i % l2Entries) * step
                    if let (s, l) = try hostRange(entry: table[slot], bitmap: extended ? table[slot + 1] : 0, guestCluster: i) {
                        loss.add(range: s, length: l, clusterBits: clusterBits, -1)
                    }
                }
                straddling = (lastKept, first, end)
            }
            let dropped = Int(newL1) < l1.count ? Array(l1[Int(newL1)...]) : []
            try collectReferences(l1: dropped, delta: -1, into: &loss)
            try apply(loss, dryRun: true, m: &m)

            // The new size first: from here on nothing past it is visible.
            try writeSize(newSize)
            if let (l1Index, first, end) = straddling {
                // A table shared with a snapshot is copied first (and its L1 entry committed).
                let cached = try writableL2(l1Index: l1Index, m: &m)
                try commit(&m)
                let l2 = m.l1[l1Index] & Self.offsetMask
                var table = cached.entries
                for i in first..<max(first, end) {
                    let slot = Int(i % l2Entries) * step
                    table[slot] = 0
                    if extended { table[slot + 1] = 0 }
                }
                try writeEntries(table, at: l2)
                cached.entries = table
            }
            if dropped.contains(where: { $0 != 0 }) {
                try writeEntries([UInt64](repeating: 0, count: dropped.count), at: m.l1TableOffset + newL1 * 8)
                let kept = Array(l1[..<Int(newL1)]) + [UInt64](repeating: 0, count: dropped.count)
                m.l1 = kept
                m.l2 = [:]
                m.l2Removals += 1
                m.protectedClusters = nil
            }
            try commit(&m)
            try apply(loss, m: &m)
            try commit(&m)
            try trimFile(m: &m)
        }
    }

    /// Frees refcount blocks that count nothing but themselves, then truncates the file after
    /// its last cluster in use (QEMU's `qcow2_shrink_reftable` and tail truncation).
    func trimFile(m: inout QCOW2Metadata) throws {
        let reader = RefcountReader(image: self, metadata: m)
        let perBlock = reader.entriesPerBlock
        var unused: [(t: Int, offset: UInt64)] = []
        for t in m.refcountTable.indices {
            let e = m.refcountTable[t]
            guard e & 0x1ff == 0 else {
                throw DiskImageError.corruptMetadata("refcount table entry \(t) (0x\(Hex.digits(e))) is not cluster-aligned")
            }
            let offset = e & ~(clusterSize - 1)
            guard offset != 0, var values = try reader.block(t) else { continue }
            let own = offset >> clusterBits
            if own / perBlock == UInt64(t) { values[Int(own % perBlock)] = 0 }
            if values.allSatisfy({ $0 == 0 }) { unused.append((t, offset)) }
        }
        if !unused.isEmpty {
            let zero = [UInt8](repeating: 0, count: 8)
            for (t, _) in unused {
                try file.write(bytes: zero, at: m.refcountTableOffset + UInt64(t) * 8)
                m.refcountTable[t] = 0
                if let block = m.refcountBlocks.removeValue(forKey: t), block.dirty { m.dirtyRefcountBlocks -= 1 }
            }
            m.protectedClusters = nil
            try commit(&m)
            // A block counted in another block gives its count back there.
            for (t, offset) in unused where (offset >> clusterBits) / perBlock != UInt64(t) {
                try releaseRange(start: offset, length: clusterSize, m: &m)
            }
            try commit(&m)
        }

        let size = try file.size()
        let endCluster = (size + clusterSize - 1) >> clusterBits
        let current = RefcountReader(image: self, metadata: m)
        var last: UInt64?
        var t = Int(min(UInt64(current.table.count), (endCluster + perBlock - 1) / perBlock))
        while last == nil && t > 0 {
            t -= 1
            guard let values = try current.block(t) else { continue }
            let first = UInt64(t) * perBlock
            var i = Int(min(perBlock, endCluster - first))
            while i > 0 {
                i -= 1
                if values[i] != 0 { last = first + UInt64(i); break }
            }
        }
        guard let last else { return }
        let newEnd = (last + 1) << clusterBits
        if newEnd < size {
            try file.truncate(to: newEnd)
            try file.sync()
            fileSize.store(newEnd, ordering: .relaxed)
            m.endOfFile = newEnd
            m.freeHint = min(m.freeHint, last + 1)
        }
    }
}
