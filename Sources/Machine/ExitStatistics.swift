/// Counts VM exits by kind and by port or MMIO address, with the time spent handling
/// each: what `--trace-exits` prints. One instance per vCPU thread (no locking on the
/// hot path); the machine merges them at the end.
public struct ExitStatistics: Sendable {
    /// What an exit is grouped under in the table.
    public enum Key: Hashable, Sendable, Comparable {
        case portIn(UInt16)
        case portOut(UInt16)
        case mmioRead(UInt64)
        case mmioWrite(UInt64)
        case other(String)

        var label: String {
            switch self {
            case let .portIn(port): return "IO in   port 0x\(hex(port, width: 4))"
            case let .portOut(port): return "IO out  port 0x\(hex(port, width: 4))"
            case let .mmioRead(address): return "MMIO read  0x\(hex(address, width: 8))"
            case let .mmioWrite(address): return "MMIO write 0x\(hex(address, width: 8))"
            case let .other(name): return name
            }
        }
    }

    public struct Entry: Sendable {
        public var count: UInt64 = 0
        public var nanoseconds: UInt64 = 0
    }

    public private(set) var entries: [Key: Entry] = [:]

    public init() {}

    mutating func record(_ key: Key, nanoseconds: UInt64) {
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
        var lines = ["VM exits handled in user space (time is spent in Swiftlet's handler, not in the guest):",
                     pad("exit", 30) + pad("count", 12, right: true) + pad("total µs", 14, right: true) + pad("avg ns", 10, right: true)]
        var totalCount: UInt64 = 0
        var totalTime: UInt64 = 0
        for (key, entry) in rows {
            totalCount += entry.count
            totalTime += entry.nanoseconds
            lines.append(pad(key.label, 30) + pad("\(entry.count)", 12, right: true)
                + pad(String(format3(Double(entry.nanoseconds) / 1000)), 14, right: true)
                + pad("\(entry.count > 0 ? entry.nanoseconds / entry.count : 0)", 10, right: true))
        }
        lines.append(pad("total", 30) + pad("\(totalCount)", 12, right: true) + pad(format3(Double(totalTime) / 1000), 14, right: true))
        return lines.joined(separator: "\n")
    }
}

func hex<T: BinaryInteger>(_ value: T, width: Int) -> String {
    let digits = String(value, radix: 16)
    return String(repeating: "0", count: max(0, width - digits.count)) + digits
}

private func pad(_ text: String, _ width: Int, right: Bool = false) -> String {
    let padding = String(repeating: " ", count: max(0, width - text.count))
    return right ? padding + text : text + padding
}

private func format3(_ value: Double) -> String {
    let scaled = (value * 10).rounded() / 10
    return "\(scaled)"
}
