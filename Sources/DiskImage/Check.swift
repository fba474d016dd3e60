/// The outcome of a qcow2 consistency check: refcounts against the references found by
/// walking every table, as `qemu-img check` does.
public struct CheckResult: Sendable {
    /// Problems that can lose data: a refcount below its references, a reference outside the
    /// file, an L2 or data cluster that is misaligned, a wrong COPIED flag.
    public var corruptions = 0
    /// Clusters with a refcount but fewer references: wasted space, harmless.
    public var leaks = 0
    /// One line per problem found.
    public var messages: [String] = []
    public var allocatedClusters: UInt64 = 0
    public var totalClusters: UInt64 = 0
    /// Per host cluster: references found, and refcount stored (used to repair a dirty image).
    var references: [UInt32] = []
    var storedRefcounts: [UInt64] = []

    /// The exit status `qemu-img check` would use: 0 clean, 2 corruptions, 3 leaks only.
    public var exitStatus: Int32 { corruptions > 0 ? 2 : (leaks > 0 ? 3 : 0) }
}

extension QCOW2Image {
    /// Walks the header, refcount structures, active and snapshot L1/L2 tables and the snapshot table,
    /// counting references to each host cluster, and compares them with the stored refcounts.
    public func check() throws -> CheckResult {
        var result = CheckResult()
        let fileSize = try file.size()
        let clusters = (fileSize + clusterSize - 1) >> clusterBits
        var refs = [UInt32](repeating: 0, count: Int(clusters))
        // Re-read the header: writes may have moved the refcount table since this image was opened.
        let h = try QCOW2Header.parse(file: file)

        func problem(_ s: String) { result.corruptions += 1; result.messages.append("ERROR " + s) }
        func reference(_ offset: UInt64, _ length: UInt64, _ what: String, times: UInt32 = 1) {
            guard length > 0 else { return }
            let (end, overflow) = offset.addingReportingOverflow(length)
            guard !overflow, end <= clusters << clusterBits else {
                problem("\(what) at 0x\(hex(offset)) is outside the file")
                return
            }
            var c = offset >> clusterBits
            while c <= (end - 1) >> clusterBits {
                refs[Int(c)] &+= times
                c += 1
            }
        }
        func readTable(_ offset: UInt64, _ count: Int) throws -> [UInt64] {
            var t = [UInt64](repeating: 0, count: count)
            try t.withUnsafeMutableBytes { try file.readZeroFilled(into: $0, at: offset) }
            return t.map { UInt64(bigEndian: $0) }
        }

        reference(0, clusterSize, "header")
        let refTableBytes = UInt64(h.refcountTableClusters) * clusterSize
        reference(h.refcountTableOffset, refTableBytes, "refcount table")
        let refTable = try readTable(h.refcountTableOffset, Int(refTableBytes / 8))
        for (i, e) in refTable.enumerated() where e != 0 {
            if e & (clusterSize - 1) != 0 { problem("refcount block \(i) offset 0x\(hex(e)) is not cluster-aligned"); continue }
            if e >= fileSize { problem("refcount block \(i) at 0x\(hex(e)) is outside the file"); continue }
            reference(e, clusterSize, "refcount block \(i)")
        }

        // Data clusters of the active L1 table whose COPIED flag must match refcount == 1.
        var copiedChecks: [(cluster: UInt64, copied: Bool, what: String)] = []
        let shift = 62 - (clusterBits - 8)
        // Each L2 table is read once however many L1 tables share it; its data clusters get one
        // reference per sharing L1 entry. This keeps the walk bounded by the file's size even when a
        // hostile snapshot table makes thousands of L1 tables point at the same L2 tables.
        var l2Users: [UInt64: UInt32] = [:]
        var activeL2 = Set<UInt64>()
        func walkL1(offset: UInt64, size: UInt32, active: Bool, name: String) throws {
            reference(offset, UInt64(size) * 8, "\(name) L1 table")
            let l1 = try readTable(offset, Int(size))
            for (i, e) in l1.enumerated() where e & Self.offsetMask != 0 {
                let l2 = e & Self.offsetMask
                if e & Self.l1ReservedMask != 0 { problem("\(name) L1 entry \(i) has reserved bits set") }
                guard l2 & (clusterSize - 1) == 0 else { problem("\(name) L2 table 0x\(hex(l2)) is not cluster-aligned"); continue }
                guard l2 < fileSize else { problem("\(name) L2 table 0x\(hex(l2)) is outside the file"); continue }
                reference(l2, clusterSize, "\(name) L2 table")
                l2Users[l2, default: 0] &+= 1
                if active {
                    activeL2.insert(l2)
                    copiedChecks.append((l2 >> clusterBits, e & Self.copiedFlag != 0, "L2 table 0x\(hex(l2))"))
                }
            }
        }
        func walkL2(_ l2: UInt64, users: UInt32, active: Bool) throws {
            let table = try readTable(l2, Int(clusterSize / 8))
            let step = extended ? 2 : 1
            for j in stride(from: 0, to: table.count, by: step) {
                let entry = table[j]
                if entry & Self.compressedFlag != 0 {
                    if entry & Self.copiedFlag != 0 { problem("compressed cluster entry 0x\(hex(entry)) has the COPIED flag") }
                    let coffset = entry & ((1 << shift) - 1)
                    let sectors = ((entry >> shift) & ((1 << (clusterBits - 8)) - 1)) + 1
                    reference(coffset & ~511, sectors * 512, "compressed cluster", times: users)
                    continue
                }
                let host = entry & Self.offsetMask
                guard host != 0 else { continue }
                if entry & Self.l2ReservedMask != 0 { problem("L2 entry 0x\(hex(entry)) has reserved bits set") }
                guard host & (clusterSize - 1) == 0 else { problem("data cluster 0x\(hex(host)) is not cluster-aligned"); continue }
                reference(host, clusterSize, "data cluster", times: users)
                if active { copiedChecks.append((host >> clusterBits, entry & Self.copiedFlag != 0, "data cluster 0x\(hex(host))")) }
            }
        }
        try walkL1(offset: h.l1TableOffset, size: h.l1Size, active: true, name: "active")
        if h.snapshotCount > 0 {
            for s in h.snapshots {
                try walkL1(offset: s.l1TableOffset, size: s.l1Size, active: false, name: "snapshot '\(s.name)'")
            }
            reference(h.snapshotsOffset, try snapshotTableLength(), "snapshot table")
        }
        for (l2, users) in l2Users.sorted(by: { $0.key < $1.key }) {
            try walkL2(l2, users: users, active: activeL2.contains(l2))
        }
        // Persistent bitmaps: the directory, each bitmap's table, and the table's data clusters.
        if h.bitmapCount > 0 {
            reference(h.bitmapDirectoryOffset, h.bitmapDirectorySize, "bitmap directory")
            for b in h.bitmapDirectory {
                reference(b.tableOffset, UInt64(b.tableEntries) * 8, "bitmap table")
                for e in try readTable(b.tableOffset, Int(b.tableEntries)) where e & Self.offsetMask != 0 {
                    let data = e & Self.offsetMask
                    guard data & (clusterSize - 1) == 0 else { problem("bitmap data cluster 0x\(hex(data)) is not cluster-aligned"); continue }
                    reference(data, clusterSize, "bitmap data cluster")
                }
            }
        }

        // Compare with the stored refcounts, reading each refcount block once.
        var stored = [UInt64](repeating: 0, count: Int(clusters))
        let perBlock = refcountEntriesPerBlock
        let bits = h.refcountBits
        for (t, e) in refTable.enumerated() where e != 0 && e & (clusterSize - 1) == 0 && e < fileSize {
            let first = UInt64(t) * perBlock
            guard first < clusters else { break }
            let block = try readBlock(e)
            for i in 0..<min(perBlock, clusters - first) {
                let v: UInt64
                if bits >= 8 {
                    let width = Int(bits / 8), at = Int(i) * width
                    v = block[at..<(at + width)].reduce(0) { ($0 << 8) | UInt64($1) }
                } else {
                    v = (UInt64(block[Int(i * bits / 8)]) >> ((i * bits) % 8)) & ((1 << bits) - 1)
                }
                stored[Int(first + i)] = v
            }
        }
        for c in 0..<Int(clusters) {
            let r = UInt64(refs[c]), s = stored[c]
            if s > 0 || r > 0 { result.allocatedClusters += 1 }
            if s < r {
                problem("cluster \(c) refcount=\(s) reference=\(r)")
            } else if s > r {
                result.leaks += 1
                result.messages.append("Leaked cluster \(c) refcount=\(s) reference=\(r)")
            }
        }
        for (cluster, copied, what) in copiedChecks where Int(cluster) < stored.count {
            if copied != (stored[Int(cluster)] == 1) {
                problem("OFLAG_COPIED \(what): refcount=\(stored[Int(cluster)]) but COPIED is \(copied ? "set" : "clear")")
            }
        }
        result.totalClusters = h.size / clusterSize + (h.size % clusterSize == 0 ? 0 : 1)
        result.references = refs
        result.storedRefcounts = stored
        return result
    }

    func readBlock(_ offset: UInt64) throws -> [UInt8] {
        var bytes = [UInt8](repeating: 0, count: Int(clusterSize))
        try bytes.withUnsafeMutableBytes { try file.readZeroFilled(into: $0, at: offset) }
        return bytes
    }

    /// Byte length of the snapshot table, summed from its entries (already validated by the header parser).
    func snapshotTableLength() throws -> UInt64 {
        var offset = header.snapshotsOffset
        for _ in 0..<header.snapshotCount {
            let fixed = try file.readBytes(40, at: offset, what: "snapshot entry")
            let len = 40 + UInt64(fixed.be(36, as: UInt32.self)) + UInt64(fixed.be(12, as: UInt16.self))
                + UInt64(fixed.be(14, as: UInt16.self))
            offset += (len + 7) & ~7
        }
        return offset - header.snapshotsOffset
    }

    /// Makes the refcounts of an image with the dirty bit (lazy refcounts) match its references,
    /// then clears the bit, as the spec asks before an image with the dirty bit is written.
    /// A crash before the bit is cleared just means the repair runs again next time.
    func repairDirtyImage() throws {
        let before = try check()
        try writer.withLock { w in
            for (c, r) in before.references.enumerated() where UInt64(r) != before.storedRefcounts[c] {
                try setRefcount(cluster: UInt64(c), UInt64(r), w: &w)
            }
        }
        try file.sync()
        let after = try check()
        guard after.exitStatus == 0 else {
            throw DiskImageError.corruptMetadata(
                "the dirty image cannot be repaired: \(after.messages.first ?? "check failed")")
        }
        var bits = [UInt8](repeating: 0, count: 8)
        bits.setBE(header.incompatibleFeatures & ~QCOW2Header.incompatDirty, at: 0)
        try file.write(bytes: bits, at: 72)
        try file.sync()
    }
}
