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

    /// A human-readable size as qemu-img prints it (QEMU's `size_to_str`): the largest
    /// binary unit that keeps the figure under 1000, with three significant digits:
    /// `512 B`, `192 KiB`, `1.5 MiB`, `0.977 MiB`, `1 GiB`.
    public static func human(_ bytes: UInt64) -> String {
        let units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"]
        // frexp(bytes / (1000 / 1024)) gives the binary exponent e; the unit is (e - 1) / 10.
        let scaled = Double(bytes) / (1000.0 / 1024.0)
        let exponent = scaled < 1 ? 0 : Int(scaled.exponent) + 1
        let index = min(max((exponent - 1) / 10, 0), units.count - 1)
        let value = Double(bytes) / Double(UInt64(1) << UInt64(index * 10))
        return "\(threeSignificantDigits(value)) \(units[index])"
    }

    /// `%0.3g` for values from 0 to 1000: three significant digits, no trailing zeros.
    static func threeSignificantDigits(_ value: Double) -> String {
        guard value > 0 else { return "0" }
        let magnitude = Int((value).rounded(.down)) >= 100 ? 0 : Int(value) >= 10 ? 1 : Int(value) >= 1 ? 2 : 3
        var digits = magnitude
        var rounded = (value * pow10(digits)).rounded() / pow10(digits)
        // Rounding can carry into another digit (9.995 -> 10): three significant digits again.
        if rounded >= 1000 { return "1e+03" }
        if digits > 0 && rounded >= Double(pow10(3 - digits)) { digits -= 1; rounded = (value * pow10(digits)).rounded() / pow10(digits) }
        var text = String(format3: rounded, digits: digits)
        if text.contains(".") {
            while text.hasSuffix("0") { text.removeLast() }
            if text.hasSuffix(".") { text.removeLast() }
        }
        return text
    }

    private static func pow10(_ n: Int) -> Double {
        var result = 1.0
        for _ in 0..<n { result *= 10 }
        return result
    }
}

extension String {
    /// `value` with exactly `digits` decimals, without Foundation.
    init(format3 value: Double, digits: Int) {
        var scale: UInt64 = 1
        for _ in 0..<digits { scale *= 10 }
        let total = UInt64((value * Double(scale)).rounded())
        let whole = total / scale
        guard digits > 0 else { self = "\(whole)"; return }
        var fraction = String(total % scale)
        while fraction.count < digits { fraction = "0" + fraction }
        self = "\(whole).\(fraction)"
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
