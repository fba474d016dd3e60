import Basics
import Synchronization

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// The outcome of a qcow2 consistency check: refcounts against the references found by
/// walking every table, as `qemu-img check` does, plus everything Swiftlet's read path would
/// refuse (so an image `check` passes can be read whole).
public struct CheckResult: Sendable {
    /// Problems that can lose data: a refcount below its references, a reference outside the
    /// file, a misaligned table or cluster, reserved bits, a wrong COPIED flag, a compressed
    /// cluster that does not decompress.
    public var corruptions = 0
    /// Clusters with a refcount but fewer references: wasted space, harmless.
    public var leaks = 0
    /// Refcounts that could not be read (QEMU's "internal errors"): the check is incomplete.
    public var checkErrors = 0
    /// One line per problem, in `qemu-img check`'s words where it has them (it prints them on stderr).
    public var messages: [String] = []
    /// Guest clusters of the active L1 table that have a host cluster (QEMU's block fragmentation info).
    public var allocatedClusters: UInt64 = 0
    /// Guest clusters in the disk.
    public var totalClusters: UInt64 = 0
    /// Allocated clusters not right after the previous one in their L2 table, and compressed ones.
    public var fragmentedClusters: UInt64 = 0
    public var compressedClusters: UInt64 = 0
    /// One past the last host cluster that has a refcount or a reference.
    public var imageEndOffset: UInt64 = 0
    /// Per host cluster: references found, and refcount stored (used to repair a dirty image).
    var references: [UInt32] = []
    var storedRefcounts: [UInt64] = []

    /// The exit status `qemu-img check` would use: 0 clean, 1 the check could not complete,
    /// 2 corruptions, 3 leaks only.
    public var exitStatus: Int32 { checkErrors > 0 ? 1 : corruptions > 0 ? 2 : leaks > 0 ? 3 : 0 }

    /// The report `qemu-img check` prints on standard output, line by line.
    public var summary: [String] {
        var lines: [String] = []
        if corruptions == 0 && leaks == 0 && checkErrors == 0 {
            lines.append("No errors were found on the image.")
        } else {
            if corruptions > 0 {
                lines += ["", "\(corruptions) errors were found on the image.",
                          "Data may be corrupted, or further writes to the image may corrupt it."]
            }
            if leaks > 0 {
                lines += ["", "\(leaks) leaked clusters were found on the image.",
                          "This means waste of disk space, but no harm to data."]
            }
            if checkErrors > 0 { lines += ["", "\(checkErrors) internal errors have occurred during the check."] }
        }
        if totalClusters != 0 && allocatedClusters != 0 {
            let a = Double(allocatedClusters)
            lines.append("\(allocatedClusters)/\(totalClusters) = \(percent(a * 100 / Double(totalClusters)))% allocated, "
                         + "\(percent(Double(fragmentedClusters) * 100 / a))% fragmented, "
                         + "\(percent(Double(compressedClusters) * 100 / a))% compressed clusters")
        }
        if imageEndOffset != 0 { lines.append("Image end offset: \(imageEndOffset)") }
        return lines
    }

    /// `%0.2f`, as printf rounds it.
    private func percent(_ v: Double) -> String {
        var buffer = [CChar](repeating: 0, count: 64)
        _ = withVaList([v]) { vsnprintf(&buffer, buffer.count, "%0.2f", $0) }
        return String(decoding: buffer.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }
}

extension DiskImage {
    /// Opens `path` the way `qemu-img check` does (tolerating what it reports rather than
    /// refuses) and checks it; nil for a raw image, which has no metadata to check.
    public static func check(path: String, format: ImageFormat? = nil) throws -> CheckResult? {
        var chain = BackingChainState()
        let dev = try open(path: path, format: format, readOnly: true, snapshot: nil, chain: &chain, forCheck: true)
        return try (dev as? QCOW2Image)?.check()
    }
}

extension QCOW2Image {
    /// Walks the header, refcount structures, active and snapshot L1/L2 tables, snapshot table
    /// and bitmaps, counting references to each host cluster, and compares them with the stored
    /// refcounts, in the order and with the messages of QEMU's `qcow2_check_refcounts`. Then
    /// checks what only Swiftlet's read path refuses: compressed data outside the file and,
    /// with `verifyCompressed`, compressed clusters that do not decompress to one cluster.
    public func check(verifyCompressed: Bool = true) throws -> CheckResult {
        var walk = try CheckWalk(image: self)
        try walk.run()
        if verifyCompressed { walk.verifyCompressedClusters() }
        return walk.finish()
    }

    /// Makes the refcounts of an image with the dirty bit (lazy refcounts) match its references,
    /// then clears the bit, as the spec asks before an image with the dirty bit is written.
    /// A crash before the bit is cleared just means the repair runs again next time.
    func repairDirtyImage() throws {
        let before = try check(verifyCompressed: false)
        try metadata.exclusive { m in
            for (c, r) in before.references.enumerated() where c < before.storedRefcounts.count
                && UInt64(r) != before.storedRefcounts[c] {
                try setRefcount(cluster: UInt64(c), UInt64(r), m: &m)
            }
            try commit(&m)
        }
        let after = try check(verifyCompressed: false)
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

/// One run of `QCOW2Image.check`: the in-memory reference counts and what was found so far.
struct CheckWalk {
    let image: QCOW2Image
    let file: ImageFile
    let h: QCOW2Header
    let cs: UInt64
    let clusterBits: UInt64
    let fileSize: UInt64
    let refcountMax: UInt64
    /// References found per host cluster (saturating: more than 2^32 - 1 cannot be stored anyway
    /// but in 64-bit refcounts, and no image has that many).
    var refs: [UInt32]
    var result = CheckResult()
    /// Compressed clusters to decompress, as their L2 entries describe them.
    var compressed = Set<CompressedData>()
    /// Stored refcounts, and the refcount blocks (refcount table indices) that cannot be read.
    var stored: [UInt64] = []
    var unreadableBlocks = Set<Int>()

    /// Refcounts per refcount block.
    var refcountsPerBlock: Int { Int(cs * 8 / h.refcountBits) }
    /// True if cluster `c`'s refcount cannot be read.
    func isUnreadable(_ c: Int) -> Bool { !unreadableBlocks.isEmpty && unreadableBlocks.contains(c / refcountsPerBlock) }
    /// The on-disk refcount table, as loaded by QEMU at open.
    var refcountTable: [UInt64] = []

    static let l1Reserved: UInt64 = 0x7f00_0000_0000_01ff
    static let l2Reserved: UInt64 = 0x3f00_0000_0000_01fe
    static let refcountTableReserved: UInt64 = 0x1ff
    static let allAllocated: UInt64 = 0xffff_ffff
    /// 2^27 clusters: an 8 TiB file of 64 KiB clusters, 1.5 GiB of bookkeeping.
    static let maxClusters: UInt64 = 1 << 27

    init(image: QCOW2Image) throws {
        self.image = image
        file = image.file
        // Re-read the header: writes may have moved the refcount table since the image was opened.
        h = try QCOW2Header.parse(file: file, forCheck: true)
        cs = h.clusterSize
        clusterBits = UInt64(h.clusterBits)
        fileSize = try file.size()
        refcountMax = h.refcountBits == 64 ? .max : (1 << h.refcountBits) - 1
        let clusters = (fileSize + cs - 1) / cs
        // 12 bytes of bookkeeping per cluster: a bound keeps a hostile sparse file from exhausting memory.
        guard clusters <= Self.maxClusters else {
            throw DiskImageError.tooLargeToCheck(clusters: clusters, limit: Self.maxClusters)
        }
        refs = [UInt32](repeating: 0, count: Int(clusters))
    }

    mutating func problem(_ message: String) {
        result.corruptions += 1
        result.messages.append(message)
    }

    func readTable(_ offset: UInt64, _ count: Int) throws -> [UInt64] {
        var t = [UInt64](repeating: 0, count: count)
        try t.withUnsafeMutableBytes { try file.readZeroFilled(into: $0, at: offset) }
        return t.map { UInt64(bigEndian: $0) }
    }

    /// Adds `times` references to every cluster of `[offset, offset + size)` (QEMU's
    /// `qcow2_inc_refcounts_imrt`); returns false if the region lies a cluster or more past
    /// the end of the file (reported, not counted).
    @discardableResult
    mutating func reference(_ offset: UInt64, _ size: UInt64, times: UInt64 = 1) -> Bool {
        guard size > 0 else { return true }
        let (end, overflow) = offset.addingReportingOverflow(size)
        guard !overflow, end <= UInt64(Int64.max), end < fileSize || end - fileSize < cs else {
            problem("ERROR: counting reference for region exceeding the end of the file by one cluster or more: "
                    + "offset 0x\(Hex.digits(offset)) size 0x\(Hex.digits(size))")
            return false
        }
        var c = offset >> clusterBits
        while c <= (end - 1) >> clusterBits {
            if c >= UInt64(refs.count) { refs += [UInt32](repeating: 0, count: Int(c) + 1 - refs.count) }
            let sum = UInt64(refs[Int(c)]) + times
            if sum > min(refcountMax, UInt64(UInt32.max)) {
                problem("ERROR: overflow cluster offset=0x\(Hex.digits(c << clusterBits))")
                refs[Int(c)] = UInt32(min(refcountMax, UInt64(UInt32.max)))
            } else {
                refs[Int(c)] = UInt32(sum)
            }
            c += 1
        }
        return true
    }

    mutating func run() throws {
        let total = h.diskSize
        result.totalClusters = total / cs + (total % cs == 0 ? 0 : 1)

        // Snapshot table entries of a version 3 image need the 16 bytes of extra data QEMU writes.
        if h.version >= 3 {
            for (i, s) in h.snapshots.enumerated() where s.extraDataSize < 16 {
                problem("ERROR snapshot table entry \(i) is incomplete")
            }
        }

        reference(0, cs)  // The header.
        // Each L2 table is walked once however many L1 tables share it; its clusters get one
        // reference per sharing L1 entry. This bounds the walk by the file's size even when a
        // hostile snapshot table makes thousands of L1 tables point at the same L2 tables.
        var l2Users: [UInt64: UInt64] = [:]
        var activeL2 = Set<UInt64>()
        try walkL1(offset: h.l1TableOffset, size: h.l1Size, active: true, l2Users: &l2Users, activeL2: &activeL2)
        for s in h.snapshots {
            guard s.l1TableOffset & (cs - 1) == 0 else {
                problem("ERROR snapshot \(s.id) (\(s.name)) l1_offset=\(alt(s.l1TableOffset)): "
                        + "L1 table is not cluster aligned; snapshot table entry corrupted")
                continue
            }
            guard UInt64(s.l1Size) <= QCOW2Header.maxL1Entries else {
                problem("ERROR snapshot \(s.id) (\(s.name)) l1_size=\(alt(UInt64(s.l1Size))): "
                        + "L1 table is too large; snapshot table entry corrupted")
                continue
            }
            try walkL1(offset: s.l1TableOffset, size: s.l1Size, active: false, l2Users: &l2Users, activeL2: &activeL2)
        }
        for (l2, users) in l2Users.sorted(by: { $0.key < $1.key }) {
            try walkL2(l2, users: users, active: activeL2.contains(l2))
        }
        reference(h.snapshotsOffset, h.snapshotTableSize)
        reference(h.refcountTableOffset, UInt64(h.refcountTableClusters) * cs)
        try checkBitmaps()
        refcountTable = try readTable(h.refcountTableOffset, Int(UInt64(h.refcountTableClusters) * cs / 8))
        checkRefcountBlocks()
        try compareRefcounts()
        try checkCopiedFlags()
    }

    /// QEMU's `%#x`: 0x-prefixed lowercase hex, or 0.
    func alt(_ v: UInt64) -> String { v == 0 ? "0" : "0x" + Hex.digits(v) }

    /// References an L1 table and its L2 tables, checking the L1 entries.
    mutating func walkL1(offset: UInt64, size: UInt32, active: Bool, l2Users: inout [UInt64: UInt64],
                         activeL2: inout Set<UInt64>) throws {
        guard size > 0 else { return }
        reference(offset, UInt64(size) * 8)
        for e in try readTable(offset, Int(size)) where e != 0 {
            if e & Self.l1Reserved != 0 { problem("ERROR found L1 entry with reserved bits set: \(Hex.digits(e))") }
            let l2 = e & QCOW2Image.offsetMask
            let inFile = reference(l2, cs)
            guard l2 & (cs - 1) == 0 else {
                problem("ERROR l2_offset=\(Hex.digits(l2)): Table is not cluster aligned; L1 entry corrupted")
                continue
            }
            // QEMU also reads an L2 table at offset 0 (the header) or past the end of the file
            // (zeros); Swiftlet's reads treat the first as unallocated and refuse the second.
            guard l2 != 0, inFile else { continue }
            l2Users[l2, default: 0] += 1
            if active { activeL2.insert(l2) }
        }
    }

    /// Checks the entries of one L2 table (QEMU's `check_refcounts_l2`) and references their clusters
    /// `users` times; counts allocation and fragmentation for the active L1 table.
    mutating func walkL2(_ l2: UInt64, users: UInt64, active: Bool) throws {
        let table = try readTable(l2, Int(cs / 8))
        let extended = h.extendedL2
        let step = extended ? 2 : 1
        let shift = 62 - (clusterBits - 8)
        var nextContiguous: UInt64 = 0
        for (i, j) in stride(from: 0, to: table.count, by: step).enumerated() {
            let entry = table[j]
            let bitmap = extended ? table[j + 1] : 0
            let host = entry & QCOW2Image.offsetMask
            if entry & QCOW2Image.compressedFlag != 0 {
                var e = entry
                if e & QCOW2Image.copiedFlag != 0 {
                    problem("ERROR: coffset=0x\(Hex.digits(e & ((1 << shift) - 1))): copied flag must never be set for compressed clusters")
                    e &= ~QCOW2Image.copiedFlag
                }
                if bitmap != 0 {
                    problem("ERROR compressed cluster \(i) with non-zero subcluster allocation bitmap, entry=0x\(Hex.digits(e))")
                    continue
                }
                let coffset = e & ((1 << shift) - 1)
                let sectors = ((e >> shift) & ((1 << (clusterBits - 8)) - 1)) + 1
                let csize = sectors * 512 - (coffset & 511)
                let counted = reference(coffset, csize, times: users)
                if active {
                    result.allocatedClusters += 1
                    result.compressedClusters += 1
                    result.fragmentedClusters += 1
                }
                // Swiftlet refuses to read compressed data in the header cluster or past the end of the file.
                if coffset < cs || coffset >= fileSize {
                    if counted {
                        problem("ERROR compressed cluster \(i) of L2 table 0x\(Hex.digits(l2)): its data at 0x\(Hex.digits(coffset)) "
                                + "is \(coffset < cs ? "in the header cluster" : "past the end of the file")")
                    }
                } else {
                    compressed.insert(CompressedData(offset: coffset, size: min(csize, fileSize - coffset)))
                }
                continue
            }
            if entry & Self.l2Reserved != 0 { problem("ERROR found l2 entry with reserved bits set: \(Hex.digits(entry))") }
            let zeroFlag = !extended && entry & QCOW2Image.zeroFlag != 0
            if host == 0 {
                if extended && bitmap & Self.allAllocated != 0 {
                    problem("ERROR: Unallocated cluster has non-zero subcluster allocation map")
                }
                continue
            }
            if (bitmap >> 32) & bitmap != 0 {
                problem("ERROR offset=\(Hex.digits(host)): Allocated cluster has corrupted subcluster allocation bitmap")
            }
            if host & (cs - 1) != 0 {
                let containsData = extended ? bitmap & Self.allAllocated != 0 : !zeroFlag
                problem(containsData
                    ? "ERROR offset=\(Hex.digits(host)): Data cluster is not properly aligned; L2 entry corrupted."
                    : "ERROR offset=\(Hex.digits(host)): Preallocated cluster is not properly aligned; L2 entry corrupted.")
            }
            if active {
                result.allocatedClusters += 1
                if nextContiguous != 0 && host != nextContiguous { result.fragmentedClusters += 1 }
                nextContiguous = host + cs
            }
            reference(host, cs, times: users)
        }
    }

    /// References the bitmap directory, each bitmap's table and its data clusters (QEMU's
    /// `qcow2_check_bitmaps_refcounts`), checking every table entry, in use or not.
    mutating func checkBitmaps() throws {
        guard h.bitmapCount > 0 else { return }
        reference(h.bitmapDirectoryOffset, h.bitmapDirectorySize)
        for b in h.bitmapDirectory {
            reference(b.tableOffset, UInt64(b.tableEntries) * 8)
            // Tables of bitmaps in use were not read at open; QEMU reads them here.
            guard b.tableOffset <= fileSize, UInt64(b.tableEntries) * 8 <= fileSize - b.tableOffset else { continue }
            for (i, e) in try readTable(b.tableOffset, Int(b.tableEntries)).enumerated() {
                if let why = BitmapDirectoryEntry.tableEntryProblem(e, clusterSize: cs) {
                    problem("ERROR bitmap '\(b.name)': table entry \(i) (0x\(Hex.digits(e))) \(why)")
                    continue
                }
                let data = e & BitmapDirectoryEntry.tableEntryOffsetMask
                if data != 0 { reference(data, cs) }
            }
        }
    }

    /// The refcount table's entries must point at cluster-aligned blocks inside the file that
    /// nothing else references (QEMU's `check_refblocks`).
    mutating func checkRefcountBlocks() {
        for (i, e) in refcountTable.enumerated() {
            if e & Self.refcountTableReserved != 0 {
                problem("ERROR refcount table entry \(i) has reserved bits set")
                continue
            }
            let offset = e & ~Self.refcountTableReserved
            if offset & (cs - 1) != 0 {
                problem("ERROR refcount block \(i) is not cluster aligned; refcount table entry corrupted")
                continue
            }
            let cluster = offset >> clusterBits
            if cluster >= UInt64(refs.count) {
                problem("ERROR refcount block \(i) is outside image")
                continue
            }
            guard offset != 0 else { continue }
            reference(offset, cs)
            if refs[Int(cluster)] != 1 { problem("ERROR refcount block \(i) refcount=\(refs[Int(cluster)])") }
        }
    }

    /// Refcounts as stored, one refcount block at a time, and the blocks that cannot be read
    /// (a misaligned block offset: QEMU's "Can't get refcount").
    func storedRefcounts(count: Int) throws -> ([UInt64], Set<Int>) {
        var stored = [UInt64](repeating: 0, count: count)
        var unreadable = Set<Int>()
        let perBlock = cs * 8 / h.refcountBits
        let bits = h.refcountBits
        for (t, e) in refcountTable.enumerated() {
            let first = UInt64(t) * perBlock
            guard first < UInt64(count) else { break }
            let n = Int(min(perBlock, UInt64(count) - first))
            let offset = e & ~Self.refcountTableReserved
            guard offset != 0 else { continue }
            guard offset & (cs - 1) == 0 else {
                unreadable.insert(t)
                continue
            }
            var block = [UInt8](repeating: 0, count: Int(cs))
            try block.withUnsafeMutableBytes { try file.readZeroFilled(into: $0, at: offset) }
            for i in 0..<UInt64(n) {
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
        return (stored, unreadable)
    }

    /// Compares stored refcounts with the references found (QEMU's `compare_refcounts`).
    mutating func compareRefcounts() throws {
        (stored, unreadableBlocks) = try storedRefcounts(count: refs.count)
        if let bad = refcountTable.firstIndex(where: { $0 & ~Self.refcountTableReserved & (cs - 1) != 0 }),
           UInt64(bad) * (cs * 8 / h.refcountBits) < UInt64(refs.count) {
            result.messages.append("qcow2: Image is corrupt: Refblock offset 0x\(Hex.digits(refcountTable[bad] & ~Self.refcountTableReserved)) "
                                   + "unaligned (reftable index: \(alt(UInt64(bad)))); further non-fatal corruption events will be suppressed")
        }
        var highest = 0
        for c in refs.indices {
            guard !isUnreadable(c) else {
                result.checkErrors += 1
                result.messages.append("Can't get refcount for cluster \(c): Input/output error")
                continue
            }
            let s = stored[c], r = UInt64(refs[c])
            if s > 0 || r > 0 { highest = c }
            if s < r {
                problem("ERROR cluster \(c) refcount=\(s) reference=\(r)")
            } else if s > r {
                result.leaks += 1
                result.messages.append("Leaked cluster \(c) refcount=\(s) reference=\(r)")
            }
        }
        result.imageEndOffset = UInt64(highest + 1) * cs
        result.references = refs
        result.storedRefcounts = stored
    }

    /// The COPIED flag of each active L1 entry and data cluster must say "refcount is 1"
    /// exactly when the stored refcount is 1 (QEMU's `check_oflag_copied`).
    mutating func checkCopiedFlags() throws {
        let stored = self.stored, walk = self
        func refcount(_ offset: UInt64) -> UInt64? {
            let c = Int(offset >> clusterBits)
            if walk.isUnreadable(c) { return nil }  // Not reported twice, as in QEMU.
            return c < stored.count ? stored[c] : 0  // Past the file: refcount 0.
        }
        let l1 = try readTable(h.l1TableOffset, Int(h.l1Size))
        for (i, e) in l1.enumerated() {
            let l2 = e & QCOW2Image.offsetMask
            guard l2 != 0 else { continue }
            if let r = refcount(l2), (r == 1) != (e & QCOW2Image.copiedFlag != 0) {
                problem("ERROR OFLAG_COPIED L2 cluster: l1_index=\(i) l1_entry=\(Hex.digits(e)) refcount=\(r)")
            }
            let table = try readTable(l2, Int(cs / 8))
            for j in stride(from: 0, to: table.count, by: h.extendedL2 ? 2 : 1) {
                let entry = table[j]
                let data = entry & QCOW2Image.offsetMask
                guard entry & QCOW2Image.compressedFlag == 0, data != 0 else { continue }
                if let r = refcount(data), (r == 1) != (entry & QCOW2Image.copiedFlag != 0) {
                    problem("ERROR OFLAG_COPIED data cluster: l2_entry=\(Hex.digits(entry)) refcount=\(r)")
                }
            }
        }
    }

    /// Decompresses every compressed cluster found, on all cores, as a read would.
    mutating func verifyCompressedClusters() {
        let work = compressed.sorted { ($0.offset, $0.size) < ($1.offset, $1.size) }
        guard !work.isEmpty else { return }
        let next = Atomic<Int>(0)
        let failures = Mutex<[(UInt64, String)]>([])
        let image = self.image
        runThreads(min(work.count, System.activeProcessorCount)) { _ in
            let output = UnsafeMutableRawBufferPointer.allocate(byteCount: Int(image.clusterSize), alignment: 16)
            defer { output.deallocate() }
            while true {
                let i = next.wrappingAdd(1, ordering: .relaxed).oldValue
                guard i < work.count else { return }
                do {
                    try image.decompressCluster(host: work[i].offset, size: work[i].size, into: output)
                } catch let DiskImageError.decompressionFailed(_, reason) {
                    failures.withLock { $0.append((work[i].offset, reason)) }
                } catch {
                    failures.withLock { $0.append((work[i].offset, "\(error)")) }
                }
            }
        }
        for (host, reason) in failures.withLock({ $0 }).sorted(by: { $0.0 < $1.0 }) {
            problem("ERROR compressed cluster at host offset 0x\(Hex.digits(host)) cannot be decompressed: \(reason)")
        }
    }

    func finish() -> CheckResult { result }

    /// Where a compressed cluster's bytes are (clipped to the file, as a read clips them).
    struct CompressedData: Hashable {
        var offset: UInt64
        var size: UInt64
    }
}
