/// Parses and prints memory sizes the way people write them on a command line.
///
/// Accepted: a whole number followed by an optional unit `K`, `M`, `G` or `T`
/// (binary multiples; `KiB`, `MB`, `g` and the like are read the same). A number with
/// no unit means MiB, as in QEMU's `-m`. Examples: `64M`, `1G`, `1536M`, `512`.
public enum MemorySize {
    public enum ParseError: Error, Equatable, CustomStringConvertible {
        case empty
        case notANumber(String)
        case unknownUnit(String)
        case tooLarge(String)

        public var description: String {
            switch self {
            case .empty: return "empty memory size"
            case let .notANumber(text): return "'\(text)' is not a size: expected a number with an optional unit, like 64M or 2G"
            case let .unknownUnit(text): return "'\(text)' has an unknown unit: use K, M, G or T"
            case let .tooLarge(text): return "'\(text)' is too large"
            }
        }
    }

    /// Returns the number of bytes `text` stands for.
    public static func parse(_ text: String) throws(ParseError) -> UInt64 {
        let trimmed = text.trimmingSpaces
        guard !trimmed.isEmpty else { throw .empty }
        let digits = trimmed.prefix { $0.isASCII && $0.isNumber }
        guard !digits.isEmpty, let number = UInt64(digits) else {
            throw digits.isEmpty ? .notANumber(text) : .tooLarge(text)
        }
        let shift: UInt64
        switch trimmed.dropFirst(digits.count).lowercased() {
        case "b": shift = 0
        case "k", "kb", "kib": shift = 10
        case "", "m", "mb", "mib": shift = 20
        case "g", "gb", "gib": shift = 30
        case "t", "tb", "tib": shift = 40
        default: throw .unknownUnit(text)
        }
        let (bytes, overflow) = number.multipliedReportingOverflow(by: 1 << shift)
        guard !overflow else { throw .tooLarge(text) }
        return bytes
    }

    /// Formats a byte count with the largest binary unit that divides it, e.g. `1536M`.
    public static func format(_ bytes: UInt64) -> String {
        for (shift, unit) in [(40, "T"), (30, "G"), (20, "M"), (10, "K")] where bytes >= (1 << shift) && bytes % (1 << shift) == 0 {
            return "\(bytes >> UInt64(shift))\(unit)"
        }
        return "\(bytes)B"
    }
}

extension String {
    var trimmingSpaces: Substring {
        let start = firstIndex { !$0.isWhitespace } ?? endIndex
        let end = lastIndex { !$0.isWhitespace }.map { index(after: $0) } ?? endIndex
        return start < end ? self[start..<end] : ""
    }
}
