import Basics

/// Counts VM exits by kind and by device and address, with the time spent handling
/// each: what `--trace-exits` prints. One instance per vCPU thread (no locking on the
/// hot path); the machine merges them at the end.
///
/// The table is bounded whatever the guest does: accesses to a device are counted per
/// register (offset) for small devices, per device otherwise; unclaimed ports and
/// addresses get rows of their own only up to ``distinctRowLimit`` per kind, and the
/// rest are counted together in one "other" row. A guest sweeping the whole MMIO hole
/// gives a table of a few dozen lines, not one per address.
public struct ExitStatistics: Sendable {
    /// Unclaimed addresses (or large-device pages) that get a row of their own, per kind.
    public static let distinctRowLimit = 16
    /// Devices at most this long are counted per register; longer ones as a whole.
    public static let perRegisterLimit: UInt64 = 0x1000

    public enum Direction: String, Sendable, Hashable {
        case read, write
    }

    /// What an exit is grouped under in the table.
    public enum Key: Hashable, Sendable, Comparable {
        /// Port I/O that reached `device` at `port`.
        case port(Direction, port: UInt16, device: String)
        /// Port I/O no device claims.
        case unclaimedPort(Direction, port: UInt16)
        /// MMIO that reached `device`: at `offset`, or `nil` for a device counted as a whole.
        case mmio(Direction, device: String, offset: UInt64?)
        /// MMIO no device claims, by 4 KiB page.
        case unclaimedMMIO(Direction, page: UInt64)
        /// What did not get a row of its own: `kind` says which rows it stands for.
        case other(Direction, kind: String)
        /// Any other exit (a signal, a system event, ...).
        case event(String)

        public static func < (a: Key, b: Key) -> Bool { a.label < b.label }

        var label: String {
            switch self {
            case let .port(direction, port, device):
                return "port \(direction == .read ? "in " : "out") 0x\(Hex.digits(port, width: 4)) \(device)"
            case let .unclaimedPort(direction, port):
                return "port \(direction == .read ? "in " : "out") 0x\(Hex.digits(port, width: 4)) (no device)"
            case let .mmio(direction, device, offset):
                return "MMIO \(direction.rawValue) \(device)" + (offset.map { " +0x\(Hex.digits($0, width: 3))" } ?? "")
            case let .unclaimedMMIO(direction, page):
                return "MMIO \(direction.rawValue) 0x\(Hex.digits(page, width: 8)) page (no device)"
            case let .other(direction, kind):
                return "\(kind) \(direction.rawValue), other addresses"
            case let .event(name):
                return name
            }
        }
    }

    public struct Entry: Sendable {
        public var count: UInt64 = 0
        public var nanoseconds: UInt64 = 0
    }

    public private(set) var entries: [Key: Entry] = [:]
    /// Rows given so far to unclaimed ports and unclaimed or large-device MMIO pages.
    private var distinctRows: [String: Int] = [:]

    public init() {}

    /// Counts a port access; `device` is the name of the device that took it, if any.
    public mutating func recordPort(_ port: UInt16, _ direction: Direction, device: String?, nanoseconds: UInt64) {
        if let device {
            record(.port(direction, port: port, device: device), nanoseconds: nanoseconds)
        } else {
            record(bounded(.unclaimedPort(direction, port: port), kind: "unclaimed port", direction), nanoseconds: nanoseconds)
        }
    }

    /// Counts an MMIO access; `device` is the device that took it, with its length and
    /// the offset inside it.
    public mutating func recordMMIO(_ address: UInt64, _ direction: Direction, device: (name: String, length: UInt64, offset: UInt64)?,
                                    nanoseconds: UInt64) {
        if let device {
            let offset = device.length <= Self.perRegisterLimit ? device.offset : nil
            record(.mmio(direction, device: device.name, offset: offset), nanoseconds: nanoseconds)
        } else {
            record(bounded(.unclaimedMMIO(direction, page: address & ~0xFFF), kind: "unclaimed MMIO", direction), nanoseconds: nanoseconds)
        }
    }

    /// Counts any other exit.
    public mutating func recordEvent(_ name: String, nanoseconds: UInt64) {
        record(.event(name), nanoseconds: nanoseconds)
    }

    /// `key` if it already has a row or there is room for one more of its kind, else the
    /// kind's "other" row.
    private mutating func bounded(_ key: Key, kind: String, _ direction: Direction) -> Key {
        if entries[key] != nil { return key }
        let rowKind = "\(kind) \(direction.rawValue)"
        let used = distinctRows[rowKind, default: 0]
        guard used < Self.distinctRowLimit else { return .other(direction, kind: kind) }
        distinctRows[rowKind] = used + 1
        return key
    }

    private mutating func record(_ key: Key, nanoseconds: UInt64) {
        entries[key, default: Entry()].count += 1
        entries[key, default: Entry()].nanoseconds += nanoseconds
    }

    mutating func merge(_ other: ExitStatistics) {
        for (key, entry) in other.entries {
            entries[key, default: Entry()].count += entry.count
            entries[key, default: Entry()].nanoseconds += entry.nanoseconds
        }
    }

    /// The table, most frequent first, with totals.
    public func formattedTable() -> String {
        let rows = entries.sorted { $0.value.count != $1.value.count ? $0.value.count > $1.value.count : $0.key < $1.key }
        let width = max(30, rows.map(\.key.label.count).max() ?? 0) + 2
        var lines = ["VM exits handled in user space (time is spent in Swiftlet's handler, not in the guest):",
                     pad("exit", width) + pad("count", 12, right: true) + pad("total µs", 14, right: true) + pad("avg ns", 10, right: true)]
        var totalCount: UInt64 = 0
        var totalTime: UInt64 = 0
        for (key, entry) in rows {
            totalCount += entry.count
            totalTime += entry.nanoseconds
            lines.append(pad(key.label, width) + pad("\(entry.count)", 12, right: true)
                + pad(microseconds(entry.nanoseconds), 14, right: true)
                + pad("\(entry.count > 0 ? entry.nanoseconds / entry.count : 0)", 10, right: true))
        }
        lines.append(pad("total", width) + pad("\(totalCount)", 12, right: true) + pad(microseconds(totalTime), 14, right: true))
        return lines.joined(separator: "\n")
    }
}

private func pad(_ text: String, _ width: Int, right: Bool = false) -> String {
    let padding = String(repeating: " ", count: max(0, width - text.count))
    return right ? padding + text : text + padding
}

/// Nanoseconds as microseconds with one decimal.
private func microseconds(_ nanoseconds: UInt64) -> String {
    "\(nanoseconds / 1000).\(nanoseconds % 1000 / 100)"
}
