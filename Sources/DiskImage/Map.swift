/// One run of `swiftlet image map`: guest bytes whose status and placement continue alike.
///
/// The fields are those of `qemu-img map --output=json`: `depth` counts the backing images
/// passed before one had the data (0: the image itself), `present` says an image of the chain
/// decides the contents, `offset` is where the bytes live in `filename`.
public struct MapEntry: Sendable, Equatable {
    public var start: UInt64
    public var length: UInt64
    public var depth: Int
    public var present: Bool
    public var zero: Bool
    public var data: Bool
    public var offset: UInt64?
    public var filename: String?

    /// QEMU's `entry_mergeable`: a run continues while everything but the position matches
    /// and the host offsets stay consecutive.
    func canAbsorb(_ next: MapEntry) -> Bool {
        guard length > 0, zero == next.zero, data == next.data, depth == next.depth, present == next.present,
              filename == next.filename, (offset == nil) == (next.offset == nil) else { return false }
        if let offset, offset + length != next.offset { return false }
        return true
    }
}

/// `qemu-img map`: walks an image's guest range and reports runs of data, zeros and unallocated
/// space, with where each run's data lives, in QEMU's human and JSON formats.
public enum ImageMap {
    /// Calls `body` for each run of `[start, start + maxLength)` (the whole image by default), in
    /// order; `isLast` is true for the final run. A range past the end yields one empty run.
    public static func forEachEntry(_ dev: any BlockDevice, start: UInt64 = 0, maxLength: UInt64? = nil,
                                    _ body: (MapEntry, _ isLast: Bool) throws -> Void) throws {
        let reader = BlockStatusReader(dev)
        var end = BlockStatusReader.length(of: dev)
        if let maxLength {
            let (sum, overflow) = start.addingReportingOverflow(maxLength)
            end = overflow ? end : min(sum, end)
        }
        var current = MapEntry(start: start, length: 0, depth: 0, present: false, zero: false, data: false)
        while current.start + current.length < end {
            let offset = current.start + current.length
            let st = try reader.mapStatus(at: offset, length: end - offset)
            let next = MapEntry(start: offset, length: st.length, depth: st.depth, present: st.allocated, zero: st.zero,
                                data: st.data, offset: st.hostOffset, filename: st.hostOffset == nil ? nil : st.file)
            if current.canAbsorb(next) {
                current.length += next.length
                continue
            }
            if current.length > 0 { try body(current, false) }
            current = next
        }
        try body(current, true)
    }

    /// Every run, as `forEachEntry` reports them.
    public static func entries(_ dev: any BlockDevice, start: UInt64 = 0, maxLength: UInt64? = nil) throws -> [MapEntry] {
        var all: [MapEntry] = []
        try forEachEntry(dev, start: start, maxLength: maxLength) { e, _ in all.append(e) }
        return all
    }

    /// One run in `qemu-img map --output=json` form; runs are joined by ",\n" inside "[" and "]".
    public static func jsonLine(_ e: MapEntry) -> String {
        var s = "{ \"start\": \(e.start), \"length\": \(e.length), \"depth\": \(e.depth), \"present\": \(e.present), "
            + "\"zero\": \(e.zero), \"data\": \(e.data)"
        if let offset = e.offset { s += ", \"offset\": \(offset)" }
        return s + "}"
    }

    /// The whole JSON document for `entries`, as `qemu-img map --output=json` prints it.
    public static func json(_ entries: [MapEntry]) -> String {
        "[" + entries.map(jsonLine).joined(separator: ",\n") + "]\n"
    }

    /// The heading of the human format.
    public static let humanHeader = "Offset".padded(16) + "Length".padded(16) + "Mapped to".padded(16) + "File"

    /// One run in the human format, or nil for runs it does not show (zeros and unallocated space).
    /// Data whose place in a file cannot be given (compressed clusters) cannot be shown: an error, as in QEMU.
    public static func humanLine(_ e: MapEntry) throws -> String? {
        if e.data && e.offset == nil {
            throw DiskImageError.invalidArgument(
                "File contains external, encrypted or compressed clusters (use --output=json to map them)")
        }
        guard e.data && !e.zero else { return nil }
        return cHex(e.start).padded(16) + cHex(e.length).padded(16) + cHex(e.offset ?? 0).padded(16) + (e.filename ?? "")
    }

    /// C's `%#x`: "0x" and lower-case hex digits, but plain "0" for zero.
    static func cHex(_ v: UInt64) -> String { v == 0 ? "0" : "0x" + String(v, radix: 16) }
}

extension String {
    /// Left-justified in a field of `width` bytes, as C's `%-Ns`.
    func padded(_ width: Int) -> String {
        utf8.count >= width ? self : self + String(repeating: " ", count: width - utf8.count)
    }
}
