/// Sizes as people write them on a command line (`64M`, `1G`, `+512M`), parsed and
/// printed the one way across Swiftlet: guest RAM, disk images, limits.
///
/// Accepted: a whole number followed by an optional unit `K`, `M`, `G`, `T`, `P` or `E`
/// (binary multiples; `KiB`, `MB`, `g` and the like are read the same) or `B` for bytes.
/// A number with no unit is read in `defaultUnit`: MiB for guest RAM (QEMU's `-m`),
/// bytes for disk images (`qemu-img`).
public enum ByteSize {
    public enum Unit: UInt64, Sendable {
        case bytes = 0, kibibytes = 10, mebibytes = 20, gibibytes = 30, tebibytes = 40
    }

    public enum ParseError: Error, Equatable, CustomStringConvertible {
        case empty
        case notANumber(String)
        case unknownUnit(String)
        case tooLarge(String)

        public var description: String {
            switch self {
            case .empty: return "empty size"
            case let .notANumber(text): return "'\(text)' is not a size: expected a number with an optional unit, like 64M or 2G"
            case let .unknownUnit(text): return "'\(text)' has an unknown unit: use K, M, G or T"
            case let .tooLarge(text): return "'\(text)' is too large"
            }
        }
    }

    /// Returns the number of bytes `text` stands for.
    public static func parse(_ text: String, defaultUnit: Unit) throws(ParseError) -> UInt64 {
        let trimmed = text.trimmingWhitespace
        guard !trimmed.isEmpty else { throw .empty }
        let digits = trimmed.prefix { $0.isASCII && $0.isNumber }
        guard !digits.isEmpty, let number = UInt64(digits) else {
            throw digits.isEmpty ? .notANumber(text) : .tooLarge(text)
        }
        let shift: UInt64
        switch trimmed.dropFirst(digits.count).lowercased() {
        case "": shift = defaultUnit.rawValue
        case "b": shift = 0
        case "k", "kb", "kib": shift = 10
        case "m", "mb", "mib": shift = 20
        case "g", "gb", "gib": shift = 30
        case "t", "tb", "tib": shift = 40
        case "p", "pb", "pib": shift = 50
        case "e", "eb", "eib": shift = 60
        default: throw .unknownUnit(text)
        }
        let (bytes, overflow) = number.multipliedReportingOverflow(by: 1 << shift)
        guard !overflow else { throw .tooLarge(text) }
        return bytes
    }

    /// The byte count with the largest binary unit that divides it exactly: `1536M`, `4K`, `100B`.
    public static func exact(_ bytes: UInt64) -> String {
        for (shift, unit) in [(40, "T"), (30, "G"), (20, "M"), (10, "K")] where bytes >= (1 << shift) && bytes % (1 << shift) == 0 {
            return "\(bytes >> UInt64(shift))\(unit)"
        }
        return "\(bytes)B"
    }

    /// A rounded, human-readable size like qemu-img prints: `1 GiB`, `192 KiB`, `1.5 MiB`, `512 B`.
    public static func human(_ bytes: UInt64) -> String {
        let units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"]
        var value = Double(bytes)
        var index = 0
        while value >= 1024 && index < units.count - 1 {
            value /= 1024
            index += 1
        }
        if index == 0 { return "\(bytes) B" }
        let rounded = (value * 100).rounded() / 100
        let text = rounded == rounded.rounded() ? String(Int(rounded)) : String(rounded)
        return "\(text) \(units[index])"
    }
}

extension StringProtocol {
    /// The string without leading and trailing white space.
    public var trimmingWhitespace: SubSequence {
        let start = firstIndex { !$0.isWhitespace } ?? endIndex
        let end = lastIndex { !$0.isWhitespace }.map { index(after: $0) } ?? endIndex
        return start < end ? self[start..<end] : self[endIndex..<endIndex]
    }
}
