#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// One internal snapshot, with every field of its snapshot-table entry, so that the table can be
/// written back without losing anything.
public struct SnapshotRecord: Sendable, Equatable {
    public var id: String
    public var name: String
    public var l1TableOffset: UInt64
    public var l1Size: UInt32
    public var dateSeconds: UInt32
    public var dateNanoseconds: UInt32
    public var vmClockNanoseconds: UInt64
    public var vmStateSize: UInt64
    /// The disk size when the snapshot was taken (the image's size if the entry does not say).
    public var diskSize: UInt64
    /// The guest's instruction count, if recorded (`-icount` record/replay).
    public var icount: UInt64?
    /// Extra data past the 24 bytes this version understands, kept as it is.
    public var unknownExtraData: [UInt8] = []
}

/// The snapshot table of a qcow2 image: reading it field by field and writing it back in QEMU's
/// layout (each entry 8-byte aligned, 24 bytes of extra data: VM state size, disk size, icount).
enum SnapshotTable {
    static let maxTableBytes: UInt64 = 1024 * UInt64(QCOW2Header.maxSnapshots)

    /// Reads the table the header describes; the header parser has already bounded it.
    static func read(_ q: QCOW2Image, header h: QCOW2Header) throws -> (records: [SnapshotRecord], bytes: UInt64) {
        var records: [SnapshotRecord] = []
        var offset = h.snapshotsOffset
        for _ in 0..<h.snapshotCount {
            let fixed = try q.file.readBytes(40, at: offset, what: "snapshot entry")
            let idLen = Int(fixed.be(12, as: UInt16.self)), nameLen = Int(fixed.be(14, as: UInt16.self))
            let extraLen = Int(fixed.be(36, as: UInt32.self))
            let rest = try q.file.readBytes(extraLen + idLen + nameLen, at: offset + 40, what: "snapshot entry")
            var r = SnapshotRecord(
                id: String(decoding: rest[extraLen..<(extraLen + idLen)], as: UTF8.self),
                name: String(decoding: rest[(extraLen + idLen)...], as: UTF8.self),
                l1TableOffset: fixed.be(0), l1Size: fixed.be(8), dateSeconds: fixed.be(16), dateNanoseconds: fixed.be(20),
                vmClockNanoseconds: fixed.be(24), vmStateSize: UInt64(fixed.be(32, as: UInt32.self)),
                diskSize: h.size & ~511, icount: nil)
            if extraLen >= 8 { r.vmStateSize = rest.be(0) }
            if extraLen >= 16 { r.diskSize = rest.be(8) }
            if extraLen >= 24 {
                let icount: UInt64 = rest.be(16)
                r.icount = icount == .max ? nil : icount
            }
            if extraLen > 24 { r.unknownExtraData = Array(rest[24..<extraLen]) }
            records.append(r)
            offset += (40 + UInt64(extraLen + idLen + nameLen) + 7) & ~7
        }
        return (records, offset - h.snapshotsOffset)
    }

    /// The table as QEMU writes it.
    static func encode(_ records: [SnapshotRecord]) throws -> [UInt8] {
        var out: [UInt8] = []
        for r in records {
            while out.count % 8 != 0 { out.append(0) }
            let id = Array(r.id.utf8), name = Array(r.name.utf8)
            var entry = [UInt8](repeating: 0, count: 40 + 24)
            entry.setBE(r.l1TableOffset, at: 0)
            entry.setBE(r.l1Size, at: 8)
            entry.setBE(UInt16(id.count), at: 12)
            entry.setBE(UInt16(name.count), at: 14)
            entry.setBE(r.dateSeconds, at: 16)
            entry.setBE(r.dateNanoseconds, at: 20)
            entry.setBE(r.vmClockNanoseconds, at: 24)
            // A VM state too large for the old 32-bit field is recorded only in the extra data.
            entry.setBE(r.vmStateSize <= UInt64(UInt32.max) ? UInt32(r.vmStateSize) : 0, at: 32)
            entry.setBE(UInt32(24 + r.unknownExtraData.count), at: 36)
            entry.setBE(r.vmStateSize, at: 40)
            entry.setBE(r.diskSize, at: 48)
            entry.setBE(r.icount ?? .max, at: 56)
            out += entry + r.unknownExtraData + id + name
            guard UInt64(out.count) <= maxTableBytes else { throw ImageEditError.snapshotTableTooLarge }
        }
        return out
    }

    /// The ID QEMU gives a new snapshot: one more than the largest numeric ID.
    static func nextID(_ records: [SnapshotRecord]) -> String {
        let largest = records.map { UInt64(leadingDigits: $0.id) }.max() ?? 0
        return String(largest + 1)
    }
}

extension UInt64 {
    /// `strtoul`-like: the value of the leading decimal digits, 0 if none.
    init(leadingDigits s: String) {
        var v: UInt64 = 0
        for c in s.utf8 {
            guard c >= 48 && c <= 57 else { break }
            let (m, o1) = v.multipliedReportingOverflow(by: 10)
            let (a, o2) = m.addingReportingOverflow(UInt64(c - 48))
            if o1 || o2 { v = .max; break }
            v = a
        }
        self = v
    }
}

// Internal snapshots: list, create, apply (revert to), delete. Each opens the image for writing
// (except list), changes it in an order that a crash at any point leaves the guest-visible
// contents of the image and of every snapshot intact, and closes it.
//
// The one state a crash can leave that `qemu-img check` reports as an error is a COPIED flag
// that is clear although the cluster's refcount is 1 (`ERROR OFLAG_COPIED`): it only costs a
// copy on the next write, and `qemu-img check -r all` sets it again. COPIED is never set on a
// cluster whose refcount is above 1, which is what would let a write corrupt a snapshot.
extension DiskImage {
    /// The image's internal snapshots, in table order; none for a raw image (as `qemu-img snapshot -l`).
    public static func snapshots(path: String, format: ImageFormat? = nil) throws -> [SnapshotRecord] {
        let dev = try open(path: path, format: format, readOnly: true)
        guard let q = dev as? QCOW2Image else { return [] }
        return try SnapshotTable.read(q, header: q.header).records
    }

    /// Opens `path` for writing as a qcow2 image, or explains why `operation` needs one.
    /// `precheck` runs first on a read-only open: a refusal leaves the file untouched (a writable
    /// open already marks persistent bitmaps in use and clears autoclear bits).
    static func openQCOW2ForWriting(path: String, format: ImageFormat?, operation: String,
                                    precheck: (QCOW2Image) throws -> Void = { _ in }) throws -> QCOW2Image {
        do {
            guard let q = try open(path: path, format: format, readOnly: true) as? QCOW2Image else {
                throw ImageEditError.notQcow2(operation: operation)
            }
            try precheck(q)
        }
        guard let q = try open(path: path, format: format, readOnly: false) as? QCOW2Image else {
            throw ImageEditError.notQcow2(operation: operation)
        }
        return q
    }

    /// Creates an internal snapshot named `name` of the image's current state (`qemu-img snapshot -c`).
    ///
    /// Order: the snapshot's copy of the L1 table is written to new clusters and synced; COPIED
    /// flags in the active tables are cleared (every cluster is about to be shared) and synced;
    /// the refcount of every cluster the active tables reach goes up by one, synced; a new
    /// snapshot table is written and synced; one 12-byte header write switches `nb_snapshots` and
    /// `snapshots_offset`; the old table's clusters are released last. A crash before the switch
    /// leaves leaked clusters and no snapshot.
    @discardableResult
    public static func createSnapshot(path: String, format: ImageFormat? = nil, name: String,
                                      date: (seconds: UInt32, nanoseconds: UInt32)? = nil) throws -> SnapshotRecord {
        guard name.utf8.count <= 255 else { throw ImageEditError.snapshotNameTooLong(name.utf8.count) }
        let q = try openQCOW2ForWriting(path: path, format: format, operation: "have internal snapshots") {
            _ = try $0.planSnapshotCreation(reader: $0.header.isDirty ? nil : RefcountReader(image: $0))
        }
        return try q.createSnapshot(name: name, date: date)
    }

    /// Reverts the image to snapshot `name` (found by ID first, then by name, as
    /// `qemu-img snapshot -a` does); the snapshot is kept.
    ///
    /// Order: COPIED flags in the snapshot's tables are cleared and the refcount of everything
    /// the snapshot reaches goes up by one (synced); a copy of the snapshot's L1 table is written
    /// to new clusters (synced); one 24-byte header write switches the disk size, `l1_size` and
    /// `l1_table_offset`; then the old active tables' references are dropped and COPIED flags set
    /// where a refcount came down to 1. A crash before the switch leaves the old state and leaks.
    public static func applySnapshot(path: String, format: ImageFormat? = nil, name: String) throws {
        try openQCOW2ForWriting(path: path, format: format, operation: "have internal snapshots") {
            _ = try $0.planSnapshotApplication(name: name, reader: $0.header.isDirty ? nil : RefcountReader(image: $0))
        }.applySnapshot(name: name)
    }

    /// Deletes snapshot `name` (found by name, as `qemu-img snapshot -d` does).
    ///
    /// Order: a new snapshot table without it is written and the header switched to it (a crash
    /// before leaves the snapshot in place); then the refcounts of everything it reached go down,
    /// its L1 table is released, and COPIED flags are set where a refcount came down to 1.
    public static func deleteSnapshot(path: String, format: ImageFormat? = nil, name: String) throws {
        try openQCOW2ForWriting(path: path, format: format, operation: "have internal snapshots") {
            _ = try $0.planSnapshotDeletion(name: name, reader: $0.header.isDirty ? nil : RefcountReader(image: $0))
        }.deleteSnapshot(name: name)
    }
}

extension QCOW2Image {
    /// What creating a snapshot will change, checked against the refcounts on disk.
    struct SnapshotCreation {
        var records: [SnapshotRecord]
        var tableBytes: UInt64
        var l1: [UInt64]
        var gain: RefcountChanges
    }

    /// `reader` checks the changes against refcounts; nil skips that (an image with the dirty bit
    /// has refcounts that only become right when it is opened for writing).
    func planSnapshotCreation(reader: RefcountReader?) throws -> SnapshotCreation {
        let h = header
        guard h.snapshotCount < QCOW2Header.maxSnapshots else { throw ImageEditError.tooManySnapshots }
        let (records, bytes) = try SnapshotTable.read(self, header: h)
        let l1 = try readEntries(at: h.l1TableOffset, count: Int(h.l1Size))
        var gain = RefcountChanges()
        try collectReferences(l1: l1, delta: 1, into: &gain)
        if let reader { try checkCapacity(gain, reader: reader) }
        return SnapshotCreation(records: records, tableBytes: bytes, l1: l1, gain: gain)
    }

    /// See `DiskImage.createSnapshot`.
    func createSnapshot(name: String, date: (seconds: UInt32, nanoseconds: UInt32)? = nil) throws -> SnapshotRecord {
        let h = header
        var ts = timespec()
        clock_gettime(CLOCK_REALTIME, &ts)
        let when = date ?? (UInt32(truncatingIfNeeded: ts.tv_sec), UInt32(ts.tv_nsec / 1000 * 1000))
        return try metadata.exclusive { m in
            try commit(&m)
            let plan = try planSnapshotCreation(reader: RefcountReader(image: self, metadata: m))
            var snapshotL1Offset: UInt64 = 0
            if !plan.l1.isEmpty {
                snapshotL1Offset = try writeNewTable(plan.l1.map { $0 & ~Self.copiedFlag }, m: &m)
            }
            var active = plan.l1
            try syncCopiedFlags(l1Offset: m.l1TableOffset, l1: &active, .clearAll, m: &m)
            try commit(&m)
            try apply(plan.gain, m: &m)
            try commit(&m)

            let record = SnapshotRecord(
                id: SnapshotTable.nextID(plan.records), name: name, l1TableOffset: snapshotL1Offset, l1Size: h.l1Size,
                dateSeconds: when.seconds, dateNanoseconds: when.nanoseconds, vmClockNanoseconds: 0, vmStateSize: 0,
                diskSize: h.size & ~511, icount: 0)
            try replaceSnapshotTable(plan.records + [record], old: h, oldBytes: plan.tableBytes, m: &m)
            try reloadTables(l1Offset: m.l1TableOffset, count: Int(h.l1Size), m: &m)
            return record
        }
    }

    /// What applying snapshot `name` will change, checked against the refcounts on disk.
    struct SnapshotApplication {
        var snapshot: SnapshotRecord
        var snapshotL1: [UInt64]
        var gain: RefcountChanges
        var loss: RefcountChanges
    }

    func planSnapshotApplication(name: String, reader: RefcountReader?) throws -> SnapshotApplication {
        let h = header
        let records = try SnapshotTable.read(self, header: h).records
        guard let s = records.first(where: { $0.id == name }) ?? records.first(where: { $0.name == name }) else {
            throw DiskImageError.snapshotNotFound(name)
        }
        if s.diskSize != h.size & ~511 {
            if h.version < 3 { throw ImageEditError.snapshotSizeChangeV2 }
            if h.bitmapCount > 0 { throw ImageEditError.resizeWithBitmaps }
        }
        let perL1 = clusterSize * l2Entries
        guard UInt64(s.l1Size) >= (s.diskSize + perL1 - 1) / perL1 else {
            throw DiskImageError.l1TooSmall(entries: s.l1Size, needed: (s.diskSize + perL1 - 1) / perL1)
        }
        let snapshotL1 = try readEntries(at: s.l1TableOffset, count: Int(s.l1Size))
        let oldL1 = try readEntries(at: h.l1TableOffset, count: Int(h.l1Size))
        var gain = RefcountChanges()
        try collectReferences(l1: snapshotL1, delta: 1, into: &gain)
        var loss = RefcountChanges()
        try collectReferences(l1: oldL1, delta: -1, into: &loss)
        if !oldL1.isEmpty {
            loss.add(range: h.l1TableOffset, length: UInt64(oldL1.count) * 8, clusterBits: clusterBits, -1)
        }
        if let reader {
            try checkCapacity(gain, reader: reader)
            try validate(loss, reader: reader)
        }
        return SnapshotApplication(snapshot: s, snapshotL1: snapshotL1, gain: gain, loss: loss)
    }

    /// See `DiskImage.applySnapshot`.
    func applySnapshot(name: String) throws {
        let h = header
        try metadata.exclusive { m in
            try commit(&m)
            let plan = try planSnapshotApplication(name: name, reader: RefcountReader(image: self, metadata: m))
            let s = plan.snapshot
            var snapshotL1 = plan.snapshotL1
            try syncCopiedFlags(l1Offset: s.l1TableOffset, l1: &snapshotL1, .clearAll, m: &m)
            try commit(&m)
            try apply(plan.gain, m: &m)
            try commit(&m)
            let newL1Offset = snapshotL1.isEmpty ? 0 : try writeNewTable(snapshotL1, m: &m)

            var fields = [UInt8](repeating: 0, count: 24)
            fields.setBE(s.diskSize, at: 0)
            fields.setBE(h.cryptMethod, at: 8)
            fields.setBE(s.l1Size, at: 12)
            fields.setBE(newL1Offset, at: 16)
            try writeHeaderFields(fields, at: 24)
            m.l1TableOffset = newL1Offset

            try apply(plan.loss, m: &m)
            try commit(&m)
            var active = snapshotL1
            try syncCopiedFlags(l1Offset: newL1Offset, l1: &active, .matchRefcounts, m: &m)
            try commit(&m)
            try reloadTables(l1Offset: newL1Offset, count: Int(s.l1Size), m: &m)
        }
    }

    /// What deleting snapshot `name` will change, checked against the refcounts on disk.
    struct SnapshotDeletion {
        var records: [SnapshotRecord]
        var tableBytes: UInt64
        var index: Int
        var loss: RefcountChanges
    }

    func planSnapshotDeletion(name: String, reader: RefcountReader?) throws -> SnapshotDeletion {
        let (records, bytes) = try SnapshotTable.read(self, header: header)
        guard let index = records.firstIndex(where: { $0.name == name }) else { throw DiskImageError.snapshotNotFound(name) }
        let s = records[index]
        let snapshotL1 = try readEntries(at: s.l1TableOffset, count: Int(s.l1Size))
        var loss = RefcountChanges()
        try collectReferences(l1: snapshotL1, delta: -1, into: &loss)
        if !snapshotL1.isEmpty {
            loss.add(range: s.l1TableOffset, length: UInt64(s.l1Size) * 8, clusterBits: clusterBits, -1)
        }
        if let reader { try validate(loss, reader: reader) }
        return SnapshotDeletion(records: records, tableBytes: bytes, index: index, loss: loss)
    }

    /// See `DiskImage.deleteSnapshot`.
    func deleteSnapshot(name: String) throws {
        let h = header
        try metadata.exclusive { m in
            try commit(&m)
            let plan = try planSnapshotDeletion(name: name, reader: RefcountReader(image: self, metadata: m))
            var remaining = plan.records
            remaining.remove(at: plan.index)
            try replaceSnapshotTable(remaining, old: h, oldBytes: plan.tableBytes, m: &m)
            try apply(plan.loss, m: &m)
            try commit(&m)
            var active = try readEntries(at: m.l1TableOffset, count: Int(h.l1Size))
            try syncCopiedFlags(l1Offset: m.l1TableOffset, l1: &active, .matchRefcounts, m: &m)
            try commit(&m)
            try reloadTables(l1Offset: m.l1TableOffset, count: Int(h.l1Size), m: &m)
        }
    }

    /// Checks that `changes` fit (nothing written), explaining a refcount overflow in terms of sharing.
    func checkCapacity(_ changes: RefcountChanges, reader: RefcountReader) throws {
        do {
            try validate(changes, reader: reader)
        } catch DiskImageError.refcountOverflow {
            throw ImageEditError.refcountsTooNarrow(bits: header.refcountBits)
        }
    }

    /// Writes `entries` as a table in newly allocated clusters (zero-padded to whole clusters),
    /// syncs, and returns its offset.
    func writeNewTable(_ entries: [UInt64], m: inout QCOW2Metadata) throws -> UInt64 {
        let count = clusters(forEntries: UInt64(entries.count))
        let offset = try allocateRun(clusters: count, m: &m)
        var bytes = [UInt8](repeating: 0, count: Int(count * clusterSize))
        for (i, e) in entries.enumerated() where e != 0 { bytes.setBE(e, at: i * 8) }
        try file.write(bytes: bytes, at: offset)
        noteFileEnd(offset + UInt64(bytes.count))
        try commit(&m)
        return offset
    }

    /// Writes `records` as a new snapshot table, switches the header to it with one 12-byte
    /// write (`nb_snapshots`, `snapshots_offset`), then releases the old table's clusters.
    func replaceSnapshotTable(_ records: [SnapshotRecord], old h: QCOW2Header, oldBytes: UInt64,
                              m: inout QCOW2Metadata) throws {
        let bytes = try SnapshotTable.encode(records)
        var offset: UInt64 = 0
        if !records.isEmpty {
            let count = (UInt64(bytes.count) + clusterSize - 1) >> clusterBits
            offset = try allocateRun(clusters: count, m: &m)
            try file.write(bytes: bytes + [UInt8](repeating: 0, count: Int(count * clusterSize) - bytes.count), at: offset)
            noteFileEnd(offset + count * clusterSize)
            try commit(&m)
        }
        var fields = [UInt8](repeating: 0, count: 12)
        fields.setBE(UInt32(records.count), at: 0)
        fields.setBE(offset, at: 4)
        try writeHeaderFields(fields, at: 60)
        if h.snapshotCount > 0 && oldBytes > 0 {
            try releaseRange(start: h.snapshotsOffset, length: oldBytes, m: &m)
            try commit(&m)
        }
    }
}

// MARK: - Listing, as `qemu-img snapshot -l` prints it

extension SnapshotRecord {
    /// The heading line of the list.
    public static let listHeader = "ID".padded(10) + "TAG".padded(17) + "VM SIZE".rightAligned(8) + "DATE".rightAligned(20)
        + "VM CLOCK".rightAligned(13) + "ICOUNT".rightAligned(11)

    /// This snapshot's line of the list: the date in local time, the VM state size in QEMU's units.
    public var listLine: String {
        var t = time_t(dateSeconds)
        var tm = tm()
        localtime_r(&t, &tm)
        var buf = [CChar](repeating: 0, count: 64)
        let n = strftime(&buf, buf.count, "%Y-%m-%d %H:%M:%S", &tm)
        let date = String(decoding: buf[0..<n].map { UInt8(bitPattern: $0) }, as: UTF8.self)
        let secs = vmClockNanoseconds / 1_000_000_000
        let clock = pad2(secs / 3600) + ":" + pad2((secs / 60) % 60) + ":" + pad2(secs % 60) + "."
            + String(String((vmClockNanoseconds / 1_000_000) % 1000 + 1000).dropFirst())
        return id.padded(9) + " " + name.padded(16) + " " + Self.sizeString(vmStateSize).rightAligned(8)
            + date.rightAligned(20) + clock.rightAligned(13) + (icount.map { String($0) } ?? "").rightAligned(11)
    }

    private func pad2(_ v: UInt64) -> String { v < 10 ? "0\(v)" : "\(v)" }

    /// QEMU's `size_to_str`: three significant digits and a binary unit ("0 B", "1.5 MiB").
    public static func sizeString(_ value: UInt64) -> String {
        var exponent: Int32 = 0
        _ = frexp(Double(value) / (1000.0 / 1024.0), &exponent)
        let i = min(6, Int((exponent - 1) / 10))
        let units = ["", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei"]
        let scaled = Double(value) / Double(UInt64(1) << UInt64(i * 10))
        var buf = [CChar](repeating: 0, count: 32)
        _ = withVaList([scaled]) { vsnprintf(&buf, buf.count, "%0.3g", $0) }
        let digits = String(decoding: buf.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
        return "\(digits) \(units[i])B"
    }
}

extension String {
    /// Right-justified in a field of `width` bytes, as C's `%Ns`.
    func rightAligned(_ width: Int) -> String {
        utf8.count >= width ? self : String(repeating: " ", count: width - utf8.count) + self
    }
}
