/// Hexadecimal formatting, the one home for it (register dumps, exit tables, error
/// messages about addresses and offsets).
public enum Hex {
    /// `value` in lowercase hex, zero-padded to `width` digits, no prefix: `hex(0x3f8, width: 4)` is `03f8`.
    public static func digits<T: BinaryInteger>(_ value: T, width: Int = 0) -> String {
        let digits = String(value, radix: 16)
        return digits.count >= width ? digits : String(repeating: "0", count: width - digits.count) + digits
    }

    /// `value` with a `0x` prefix: `0x3f8`.
    public static func prefixed<T: BinaryInteger>(_ value: T, width: Int = 0) -> String {
        "0x" + digits(value, width: width)
    }
}
