/// ACPI Machine Language: the byte code of a DSDT, for the few objects Swiftlet's tables
/// hold, encoded as the grammar in chapter 20 of the ACPI specification defines it.
///
/// A value describes one term; ``encoded`` gives its bytes. For example
/// `AML.name("\\_S5", .package([.integer(0), .integer(0)]))` is the ASL
/// `Name (\_S5, Package (0x02) { Zero, Zero })` and encodes as
/// `08 5C 5F 53 35 5F 12 04 02 00 00` (NameOp, root prefix, NameSeg `_S5_`, PackageOp,
/// PkgLength, element count, ZeroOp, ZeroOp), byte for byte what `iasl` produces.
///
/// Names and sizes come from Swiftlet's own code, never from a guest or a file: a name
/// that is not valid AML, or a package of more than 255 elements, is a Swiftlet bug and
/// stops with a precondition failure.
public indirect enum AML: Equatable, Sendable {
    /// An integer constant: ZeroOp, OneOp, OnesOp, or the shortest of BytePrefix,
    /// WordPrefix, DWordPrefix and QWordPrefix that holds it.
    case integer(UInt64)
    /// A string constant of ASCII characters 0x01-0x7F (StringPrefix, the bytes, NUL).
    case string(String)
    /// `Package (n) { ... }`: up to 255 elements (PackageOp).
    case package([AML])
    /// `Name (path, object)`: declares a named object (NameOp).
    case name(String, AML)
    /// `Scope (path) { ... }`: opens a namespace scope (ScopeOp).
    case scope(String, [AML])
    /// `Device (path) { ... }`: declares a device and the objects inside it (ExtOpPrefix,
    /// DeviceOp).
    case device(String, [AML])
    /// `ResourceTemplate () { ... }`: a buffer of resource descriptors closed by an end tag
    /// (BufferOp; the descriptors are in ``AMLResource``).
    case resourceTemplate([AMLResource])

    // Opcodes and prefixes (ACPI 6.5, section 20.3).
    static let zeroOp: UInt8 = 0x00
    static let oneOp: UInt8 = 0x01
    static let onesOp: UInt8 = 0xFF
    static let bytePrefix: UInt8 = 0x0A
    static let wordPrefix: UInt8 = 0x0B
    static let dwordPrefix: UInt8 = 0x0C
    static let qwordPrefix: UInt8 = 0x0E
    static let stringPrefix: UInt8 = 0x0D
    static let nameOp: UInt8 = 0x08
    static let scopeOp: UInt8 = 0x10
    static let packageOp: UInt8 = 0x12
    static let bufferOp: UInt8 = 0x11
    static let extOpPrefix: UInt8 = 0x5B
    static let deviceOp: UInt8 = 0x82
    static let rootChar: UInt8 = 0x5C           // '\'
    static let parentPrefixChar: UInt8 = 0x5E   // '^'
    static let dualNamePrefix: UInt8 = 0x2E
    static let multiNamePrefix: UInt8 = 0x2F
    static let nullName: UInt8 = 0x00

    /// The term's AML bytes.
    public var encoded: [UInt8] {
        switch self {
        case let .integer(value):
            switch value {
            case 0: return [Self.zeroOp]
            case 1: return [Self.oneOp]
            case .max: return [Self.onesOp]
            case 0...0xFF: return [Self.bytePrefix, UInt8(value)]
            case 0...0xFFFF: return [Self.wordPrefix] + Self.littleEndian(value, count: 2)
            case 0...0xFFFF_FFFF: return [Self.dwordPrefix] + Self.littleEndian(value, count: 4)
            default: return [Self.qwordPrefix] + Self.littleEndian(value, count: 8)
            }
        case let .string(text):
            let bytes = Array(text.utf8)
            precondition(bytes.allSatisfy { (0x01...0x7F).contains($0) }, "AML strings hold ASCII 0x01-0x7F: \(text)")
            return [Self.stringPrefix] + bytes + [0]
        case let .package(elements):
            precondition(elements.count <= 0xFF, "a PackageOp holds at most 255 elements")
            let body = [UInt8(elements.count)] + elements.flatMap(\.encoded)
            return [Self.packageOp] + Self.packageLength(body.count) + body
        case let .name(path, object):
            return [Self.nameOp] + Self.nameString(path) + object.encoded
        case let .scope(path, terms):
            let body = Self.nameString(path) + terms.flatMap(\.encoded)
            return [Self.scopeOp] + Self.packageLength(body.count) + body
        case let .device(path, terms):
            let body = Self.nameString(path) + terms.flatMap(\.encoded)
            return [Self.extOpPrefix, Self.deviceOp] + Self.packageLength(body.count) + body
        case let .resourceTemplate(descriptors):
            // The end tag's checksum byte is 0: "the checksum is not computed", as iasl
            // leaves it.
            let contents = descriptors.flatMap(\.encoded) + [AMLResource.endTag, 0]
            let body = AML.integer(UInt64(contents.count)).encoded + contents
            return [Self.bufferOp] + Self.packageLength(body.count) + body
        }
    }

    /// `EisaId ("PNP0A08")`: a compressed EISA ID, three letters `A-Z` and four hex digits,
    /// as the integer iasl makes of it (vendor letters in five bits each, big-endian,
    /// then the product number's bytes; the shortest integer encoding).
    public static func eisaID(_ id: String) -> AML {
        let characters = Array(id.utf8)
        let letters = UInt8(ascii: "A")...UInt8(ascii: "Z")
        let digits = UInt8(ascii: "0")...UInt8(ascii: "9"), hexLetters = UInt8(ascii: "A")...UInt8(ascii: "F")
        precondition(characters.count == 7 && characters.prefix(3).allSatisfy { letters.contains($0) }
                     && characters.suffix(4).allSatisfy { digits.contains($0) || hexLetters.contains($0) },
                     "not an EISA ID: \(id)")
        let vendor = characters.prefix(3).reduce(UInt32(0)) { $0 << 5 | UInt32($1 - 0x40) }
        let product = characters.suffix(4).reduce(UInt32(0)) { $0 << 4 | UInt32(digits.contains($1) ? $1 - 0x30 : $1 - 0x37) }
        // Bytes in memory: vendor high, vendor low, product high, product low.
        let value = (vendor >> 8) | (vendor & 0xFF) << 8 | (product >> 8) << 16 | (product & 0xFF) << 24
        return .integer(UInt64(value))
    }

    /// PkgLength (section 20.2.4) for `count` bytes that follow it. The encoded length
    /// counts the PkgLength bytes themselves: one byte up to 63 in all, otherwise a lead
    /// byte (bits 7-6: how many bytes follow, bits 3-0: the low four bits) and up to three
    /// more bytes of eight bits each, for at most 2^28 - 1.
    static func packageLength(_ count: Int) -> [UInt8] {
        if count + 1 <= 0x3F { return [UInt8(count + 1)] }
        for following in 1...3 {
            let total = count + 1 + following
            guard total < 1 << (4 + 8 * following) else { continue }
            var bytes = [UInt8(following << 6 | total & 0xF)]
            for index in 0..<following { bytes.append(UInt8(truncatingIfNeeded: total >> (4 + 8 * index))) }
            return bytes
        }
        preconditionFailure("an AML package of \(count) bytes is longer than PkgLength can say")
    }

    /// NameString (section 20.2.2): an optional `\` (root) or `^` (parent) prefixes, then
    /// segments separated by dots. Each segment is one to four characters, the first
    /// `A-Z` or `_`, the others also `0-9`, padded to four with `_`.
    static func nameString(_ path: String) -> [UInt8] {
        var bytes = Array(path.utf8)
        var prefix: [UInt8] = []
        if bytes.first == rootChar {
            prefix = [rootChar]
            bytes.removeFirst()
        } else {
            while bytes.first == parentPrefixChar {
                prefix.append(parentPrefixChar)
                bytes.removeFirst()
            }
        }
        if bytes.isEmpty { return prefix + [nullName] }
        let segments = bytes.split(separator: UInt8(ascii: "."), omittingEmptySubsequences: false).map { segment -> [UInt8] in
            precondition(isNameSegment(segment), "not an AML name segment: \(path)")
            return Array(segment) + Array(repeating: UInt8(ascii: "_"), count: 4 - segment.count)
        }
        switch segments.count {
        case 1: return prefix + segments[0]
        case 2: return prefix + [dualNamePrefix] + segments[0] + segments[1]
        default:
            precondition(segments.count <= 0xFF, "an AML name has at most 255 segments: \(path)")
            return prefix + [multiNamePrefix, UInt8(segments.count)] + segments.flatMap { $0 }
        }
    }

    static func isNameSegment(_ segment: ArraySlice<UInt8>) -> Bool {
        guard (1...4).contains(segment.count), let first = segment.first else { return false }
        let upper = UInt8(ascii: "A")...UInt8(ascii: "Z"), digits = UInt8(ascii: "0")...UInt8(ascii: "9")
        let underscore = UInt8(ascii: "_")
        guard upper.contains(first) || first == underscore else { return false }
        return segment.dropFirst().allSatisfy { upper.contains($0) || digits.contains($0) || $0 == underscore }
    }

    static func littleEndian(_ value: UInt64, count: Int) -> [UInt8] {
        (0..<count).map { UInt8(truncatingIfNeeded: value >> (8 * UInt64($0))) }
    }
}
