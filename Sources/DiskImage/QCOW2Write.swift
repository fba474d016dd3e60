import Basics
/// Allocator state of a writable qcow2 image, guarded by `QCOW2Image.writer`.
///
/// Owns the in-memory copy of the refcount table and the next host offset to try
/// when allocating a cluster (new clusters are appended after the end of the file).
struct WriterState: Sendable {
    var refcountTable: [UInt64] = []
    /// Where the refcount table is now (it moves when it grows).
    var refcountTableOffset: UInt64 = 0
    /// Where the active L1 table is now (it moves when `resize` grows it).
    var l1TableOffset: UInt64 = 0
    var nextFree: UInt64 = 0
}

// Writing, in an order that survives a crash at any point with at worst leaked clusters:
//
//   1. A new cluster's refcount is raised (and a new refcount block written) before anything points to it.
//   2. Its contents (new L2 table, or data merged with the old contents) are written.
//   3. fdatasync.
//   4. Only then the L2 entry (or L1 entry) is switched to the new cluster.
//   5. fdatasync, then the refcount of a cluster no longer referenced (a COW source) is lowered.
//
// A crash between 1 and 4 leaves a cluster with a refcount and no reference (a leak);
// a crash between 4 and 5 leaves a refcount one too high (a leak). A reference is never
// written to a cluster whose refcount is not already on disk.
extension QCOW2Image {
    var refcountEntriesPerBlock: UInt64 { clusterSize * 8 / header.refcountBits }

    /// Loads the refcount table and clears autoclear feature bits we do not maintain.
    func prepareForWriting() throws {
        let h = header
        guard h.refcountTableClusters > 0 else {
            throw DiskImageError.corruptMetadata("image has no refcount table, so it cannot be written")
        }
        var table = [UInt64](repeating: 0, count: Int(UInt64(h.refcountTableClusters) * clusterSize / 8))
        try table.withUnsafeMutableBytes { try file.readZeroFilled(into: $0, at: h.refcountTableOffset) }
        for i in table.indices { table[i] = UInt64(bigEndian: table[i]) }
        let fileSize = state.withLock { $0.fileSize }
        writer.withLock { w in
            w.refcountTable = table
            w.refcountTableOffset = h.refcountTableOffset
            w.l1TableOffset = h.l1TableOffset
            w.nextFree = (fileSize + clusterSize - 1) & ~(clusterSize - 1)
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
        try writer.withLock { w in
            var done = 0
            while done < buffer.count {
                let guest = offset + UInt64(done)
                let inCluster = guest & (clusterSize - 1)
                let n = min(buffer.count - done, Int(clusterSize - inCluster))
                try writeInCluster(UnsafeRawBufferPointer(rebasing: buffer[done..<(done + n)]), guestOffset: guest, w: &w)
                done += n
            }
        }
    }

    func noteFileEnd(_ end: UInt64) {
        state.withLock { s in s.fileSize = max(s.fileSize, end) }
    }

    func writeInCluster(_ src: UnsafeRawBufferPointer, guestOffset: UInt64, w: inout WriterState) throws {
        let index = guestOffset >> clusterBits
        let inCluster = Int(guestOffset & (clusterSize - 1))
        let l1Index = Int(index / l2Entries)
        let l2Index = index % l2Entries
        let l2Offset = try writableL2(l1Index: l1Index, w: &w)
        let (entry, bitmap) = try l2Entry(guestCluster: index)
        let mapping = try mapping(entry: entry, bitmap: bitmap, guestCluster: index)
        let copied = entry & Self.copiedFlag != 0
        let entryOffset = l2Offset + l2Index * header.l2EntryBytes

        // Case 1: a cluster we own outright — overwrite in place.
        if copied, case let .data(host) = mapping {
            try file.write(src, at: host + UInt64(inCluster))
            noteFileEnd(host + UInt64(inCluster + src.count))
            return
        }
        // Case 2: an owned cluster with subclusters — fill the touched subclusters, then mark them allocated.
        if copied, case let .subclusters(host, allocated, zero) = mapping, host != 0 {
            let scSize = Int(clusterSize / 32)
            let first = inCluster / scSize, last = (inCluster + src.count - 1) / scSize
            let mask = UInt32(truncatingIfNeeded: ((UInt64(1) << UInt64(last + 1)) - 1) ^ ((UInt64(1) << UInt64(first)) - 1))
            if allocated & mask == mask {
                try file.write(src, at: host + UInt64(inCluster))
                noteFileEnd(host + UInt64(inCluster + src.count))
                return
            }
            let spanStart = first * scSize, spanLen = (last + 1 - first) * scSize
            var span = [UInt8](repeating: 0, count: spanLen)
            try span.withUnsafeMutableBytes { buf in
                try readInCluster(buf, guestOffset: (index << clusterBits) + UInt64(spanStart))
                UnsafeMutableRawBufferPointer(rebasing: buf[(inCluster - spanStart)...]).copyMemory(from: src)
                try file.write(UnsafeRawBufferPointer(buf), at: host + UInt64(spanStart))
            }
            noteFileEnd(host + UInt64(spanStart + spanLen))
            try file.sync()
            let newBitmap = UInt64(allocated | mask) | (UInt64(zero & ~mask) << 32)
            try writeL2Entry(entry, bitmap: newBitmap, at: entryOffset, l2Offset: l2Offset, l2Index: l2Index)
            return
        }

        // Case 3: allocate a cluster, fill it with the current contents merged with the new bytes.
        var full = [UInt8](repeating: 0, count: Int(clusterSize))
        try full.withUnsafeMutableBytes { buf in
            if src.count < Int(clusterSize) {
                try readInCluster(buf, guestOffset: index << clusterBits)
            }
            UnsafeMutableRawBufferPointer(rebasing: buf[inCluster...]).copyMemory(from: src)
        }
        // A zero cluster that still owns its preallocated host cluster is reused in place.
        var target: UInt64
        var release: (UInt64, UInt64)?  // Host byte range whose refcounts drop after the switch.
        let host = entry & Self.offsetMask
        switch mapping {
        case .zero where copied && host != 0:
            target = host
        case .zero, .data, .subclusters:
            target = try allocateCluster(w: &w)
            if host != 0 { release = (host, clusterSize) }
        case .compressed:
            target = try allocateCluster(w: &w)
            let shift = 62 - (clusterBits - 8)
            let coffset = entry & ((1 << shift) - 1)
            let sectors = ((entry >> shift) & ((1 << (clusterBits - 8)) - 1)) + 1
            release = (coffset & ~511, sectors * 512)
        case .unallocated:
            target = try allocateCluster(w: &w)
        }
        try file.write(bytes: full, at: target)
        noteFileEnd(target + clusterSize)
        try file.sync()
        try writeL2Entry(target | Self.copiedFlag, bitmap: extended ? 0xffff_ffff : 0,
                         at: entryOffset, l2Offset: l2Offset, l2Index: l2Index)
        if let (start, length) = release {
            try file.sync()
            try releaseRange(start: start, length: length, w: &w)
        }
    }

    /// Writes one L2 entry (and bitmap) to disk and to the cached table.
    func writeL2Entry(_ entry: UInt64, bitmap: UInt64, at offset: UInt64, l2Offset: UInt64, l2Index: UInt64) throws {
        var bytes = [UInt8](repeating: 0, count: Int(header.l2EntryBytes))
        bytes.setBE(entry, at: 0)
        if extended { bytes.setBE(bitmap, at: 8) }
        try file.write(bytes: bytes, at: offset)
        state.withLock { s in
            guard s.l2Cache[l2Offset] != nil else { return }
            if extended {
                s.l2Cache[l2Offset]!.entries[Int(2 * l2Index)] = entry
                s.l2Cache[l2Offset]!.entries[Int(2 * l2Index + 1)] = bitmap
            } else {
                s.l2Cache[l2Offset]!.entries[Int(l2Index)] = entry
            }
        }
    }

    /// Returns the offset of an L2 table for `l1Index` that this image owns (refcount 1),
    /// allocating a new table or copying one shared with a snapshot.
    func writableL2(l1Index: Int, w: inout WriterState) throws -> UInt64 {
        let l1Entry = state.withLock { $0.l1[l1Index] }
        let old = l1Entry & Self.offsetMask
        if old != 0 && l1Entry & Self.copiedFlag != 0 { return old }
        var table = [UInt64](repeating: 0, count: Int(clusterSize / 8))
        if old != 0 {
            // Shared with a snapshot: copy it. The data clusters it points to keep their refcounts
            // (each L1 path counts once), and their COPIED flags are already clear.
            if let cached = state.withLock({ $0.l2Cache[old]?.entries }) {
                table = cached
            } else {
                table = try loadL2(offset: old, l1Entry: l1Entry, l1Index: UInt64(l1Index))
            }
        }
        let new = try allocateCluster(w: &w)
        var bytes = [UInt8](repeating: 0, count: Int(clusterSize))
        for (i, e) in table.enumerated() where e != 0 { bytes.setBE(e, at: i * 8) }
        try file.write(bytes: bytes, at: new)
        noteFileEnd(new + clusterSize)
        try file.sync()
        var entryBytes = [UInt8](repeating: 0, count: 8)
        entryBytes.setBE(new | Self.copiedFlag, at: 0)
        try file.write(bytes: entryBytes, at: w.l1TableOffset + UInt64(l1Index) * 8)
        state.withLock { s in
            s.l1[l1Index] = new | Self.copiedFlag
            if old != 0 { s.l2Cache[old] = nil }
        }
        cacheL2(offset: new, entries: table)
        if old != 0 {
            try file.sync()
            try releaseRange(start: old, length: clusterSize, w: &w)
        }
        return new
    }

    /// Lowers by one the refcount of every host cluster overlapping `[start, start+length)`.
    func releaseRange(start: UInt64, length: UInt64, w: inout WriterState) throws {
        var cluster = start >> clusterBits
        let last = (start + length - 1) >> clusterBits
        while cluster <= last {
            let rc = try refcount(cluster: cluster, w: &w)
            guard rc > 0 else {
                throw DiskImageError.corruptMetadata("host cluster \(cluster) is in use but its refcount is 0")
            }
            try setRefcount(cluster: cluster, rc - 1, w: &w)
            cluster += 1
        }
    }

    /// Finds a free cluster at or after the end of the file and sets its refcount to 1.
    func allocateCluster(w: inout WriterState) throws -> UInt64 {
        // Past the end of the file every cluster should be free; a refcount structure that says
        // otherwise for this many clusters is broken, and scanning further would only waste time.
        for _ in 0..<65536 {
            let offset = w.nextFree
            w.nextFree += clusterSize
            if try refcount(cluster: offset >> clusterBits, w: &w) == 0 {
                try setRefcount(cluster: offset >> clusterBits, 1, w: &w)
                return offset
            }
        }
        throw DiskImageError.corruptMetadata("no free cluster in the 65536 clusters after the end of the file")
    }

    /// Offset of the refcount block covering table index `t`, or 0 if none; checked before use.
    func refcountBlock(_ t: Int, w: inout WriterState) throws -> UInt64 {
        let e = w.refcountTable[t]
        let offset = e & ~(clusterSize - 1)
        guard e & 0x1ff == 0, offset & (clusterSize - 1) == 0 else {
            throw DiskImageError.corruptMetadata("refcount table entry \(t) (0x\(Hex.digits(e))) is not cluster-aligned")
        }
        if offset != 0 {
            let fileSize = state.withLock { $0.fileSize }
            guard offset >= clusterSize, offset < fileSize else {
                throw DiskImageError.corruptMetadata("refcount block 0x\(Hex.digits(offset)) is outside the file")
            }
        }
        return offset
    }

    func refcount(cluster: UInt64, w: inout WriterState) throws -> UInt64 {
        let t = cluster / refcountEntriesPerBlock
        guard t < UInt64(w.refcountTable.count) else { return 0 }
        let block = try refcountBlock(Int(t), w: &w)
        guard block != 0 else { return 0 }
        let (byteOffset, width) = refcountLocation(cluster % refcountEntriesPerBlock)
        let bytes = try file.readBytes(width, at: block + byteOffset, what: "refcount block")
        return decodeRefcount(bytes, index: cluster % refcountEntriesPerBlock)
    }

    /// Byte offset in the block and byte count holding entry `index`.
    func refcountLocation(_ index: UInt64) -> (UInt64, Int) {
        let bits = header.refcountBits
        if bits >= 8 { return (index * bits / 8, Int(bits / 8)) }
        return (index * bits / 8, 1)
    }

    func decodeRefcount(_ bytes: [UInt8], index: UInt64) -> UInt64 {
        let bits = header.refcountBits
        if bits >= 8 {
            return bytes.reduce(0) { ($0 << 8) | UInt64($1) }
        }
        let shift = (index * bits) % 8
        return (UInt64(bytes[0]) >> shift) & ((1 << bits) - 1)
    }

    func setRefcount(cluster: UInt64, _ value: UInt64, w: inout WriterState) throws {
        let bits = header.refcountBits
        guard bits == 64 || value < (UInt64(1) << bits) else { throw DiskImageError.refcountOverflow(cluster: cluster) }
        let perBlock = refcountEntriesPerBlock
        let t = cluster / perBlock
        if t >= UInt64(w.refcountTable.count) { try growRefcountTable(covering: t, w: &w) }
        var block = try refcountBlock(Int(t), w: &w)
        if block == 0 {
            // New refcount block, placed after the end of the file. It describes itself if it can.
            block = w.nextFree
            w.nextFree += clusterSize
            var bytes = [UInt8](repeating: 0, count: Int(clusterSize))
            let selfCluster = block >> clusterBits
            if selfCluster / perBlock == t {
                encodeRefcount(&bytes, index: selfCluster % perBlock, value: 1)
            }
            try file.write(bytes: bytes, at: block)
            noteFileEnd(block + clusterSize)
            if selfCluster / perBlock != t {
                try setRefcount(cluster: selfCluster, 1, w: &w)
            }
            try file.sync()
            var entry = [UInt8](repeating: 0, count: 8)
            entry.setBE(block, at: 0)
            try file.write(bytes: entry, at: w.refcountTableOffset + t * 8)
            try file.sync()
            w.refcountTable[Int(t)] = block
        }
        let index = cluster % perBlock
        let (byteOffset, width) = refcountLocation(index)
        var bytes = try file.readBytes(width, at: block + byteOffset, what: "refcount block")
        encodeRefcount(&bytes, index: index, value: value, base: Int(byteOffset))
        try file.write(bytes: bytes, at: block + byteOffset)
    }

    /// Replaces the refcount table with a larger copy placed after the end of the file.
    ///
    /// Order: new refcount blocks and the new table are written (describing themselves and
    /// everything the old table described), synced; then the header's two table fields are
    /// switched in one write, synced; then the old table's clusters are released. A crash
    /// before the switch leaves unreferenced clusters past the old table's reach; after it, a leak.
    func growRefcountTable(covering needed: UInt64, w: inout WriterState) throws {
        let perBlock = refcountEntriesPerBlock
        let perTableCluster = clusterSize / 8
        let oldCount = UInt64(w.refcountTable.count)
        // Enough entries for `needed`, for everything up to the end of the file, and for the new
        // table and its blocks themselves, with room to spare.
        let endCluster = w.nextFree >> clusterBits
        var entries = max(needed + 1, oldCount * 2, (endCluster + 2 * perTableCluster) / perBlock + 2)
        entries = (entries + perTableCluster - 1) / perTableCluster * perTableCluster
        let tableClusters = entries / perTableCluster
        guard tableClusters * clusterSize <= QCOW2Header.maxRefcountTableBytes else {
            throw DiskImageError.refcountTableFull
        }
        var table = w.refcountTable + [UInt64](repeating: 0, count: Int(entries - oldCount))
        let tableOffset = w.nextFree
        w.nextFree += tableClusters * clusterSize

        // Refcounts for the new table's clusters and for any new blocks, kept in memory until written.
        var newBlocks: [Int: [UInt8]] = [:]
        var pending = (0..<tableClusters).map { (tableOffset >> clusterBits) + $0 }
        while let cluster = pending.popLast() {
            let t = Int(cluster / perBlock)
            guard t < table.count else { throw DiskImageError.refcountTableFull }
            if table[t] == 0 {
                let block = w.nextFree
                w.nextFree += clusterSize
                table[t] = block
                newBlocks[t] = [UInt8](repeating: 0, count: Int(clusterSize))
                pending.append(block >> clusterBits)
            }
            let index = cluster % perBlock
            if newBlocks[t] != nil {
                encodeRefcount(&newBlocks[t]!, index: index, value: 1)
            } else {
                // An existing block: raising a refcount early can only leak.
                let (byteOffset, width) = refcountLocation(index)
                var bytes = try file.readBytes(width, at: table[t] + byteOffset, what: "refcount block")
                encodeRefcount(&bytes, index: index, value: 1, base: Int(byteOffset))
                try file.write(bytes: bytes, at: table[t] + byteOffset)
            }
        }
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
        let oldOffset = w.refcountTableOffset
        let oldBytes = oldCount * 8
        w.refcountTable = table
        w.refcountTableOffset = tableOffset
        if oldBytes > 0 { try releaseRange(start: oldOffset, length: oldBytes, w: &w) }
    }

    /// Stores `value` for entry `index` into `bytes`, which start at byte `base` of the block.
    func encodeRefcount(_ bytes: inout [UInt8], index: UInt64, value: UInt64, base: Int = 0) {
        let bits = header.refcountBits
        let byte = Int(index * bits / 8) - base
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
