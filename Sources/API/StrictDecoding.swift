/// Strict JSON decoding for the API's request bodies: Firecracker (serde with
/// `deny_unknown_fields`) refuses a field it does not know, and so do we, so a client's
/// typo is an error rather than a silently ignored setting.

/// Any key: used to list the keys an object really has.
struct AnyCodingKey: CodingKey {
    let stringValue: String
    var intValue: Int? { nil }
    init(stringValue: String) { self.stringValue = stringValue }
    init?(intValue: Int) { return nil }
}

extension Decoder {
    /// A keyed container for `keys`, after checking that the object has no key outside
    /// them (the error names the first unknown one and the expected ones).
    func strictContainer<Keys: CodingKey & CaseIterable>(_ keys: Keys.Type) throws -> KeyedDecodingContainer<Keys> {
        let all = try container(keyedBy: AnyCodingKey.self)
        let known = Keys.allCases.map(\.stringValue)
        if let unknown = all.allKeys.first(where: { !known.contains($0.stringValue) }) {
            let expected = known.map { "`\($0)`" }.joined(separator: ", ")
            throw DecodingError.dataCorrupted(.init(codingPath: codingPath,
                                                    debugDescription: "unknown field `\(unknown.stringValue)`, expected one of \(expected)"))
        }
        return try container(keyedBy: Keys.self)
    }
}

/// What went wrong in a request: a 400 with Firecracker's `{"fault_message": ...}` body.
public struct APIError: Error, Equatable, Sendable, CustomStringConvertible {
    public let message: String
    public init(_ message: String) { self.message = message }
    public var description: String { message }

    /// Firecracker's words for a call made after `InstanceStart` that only works before.
    public static let notSupportedPostBoot = APIError("The requested operation is not supported after starting the microVM.")
    /// Firecracker's words for a call made before `InstanceStart` that only works after.
    public static let notSupportedPreBoot = APIError("The requested operation is not supported before starting the microVM.")
    public static func notSupported(_ what: String) -> APIError {
        APIError("The requested operation is not supported: \(what)")
    }
}

extension DecodingError {
    /// One line naming the field and what was wrong with it.
    var summary: String {
        func path(_ context: Context) -> String {
            let names = context.codingPath.map { $0.intValue.map { "[\($0)]" } ?? $0.stringValue }
            return names.isEmpty ? "" : " at `\(names.joined(separator: "."))`"
        }
        switch self {
        case let .typeMismatch(type, context):
            return "invalid type\(path(context)): expected \(Self.jsonName(of: type))"
        case let .valueNotFound(type, context):
            return "missing value\(path(context)): expected \(Self.jsonName(of: type))"
        case let .keyNotFound(key, context):
            return "missing field `\(key.stringValue)`\(path(context))"
        case let .dataCorrupted(context):
            if let underlying = context.underlyingError {
                return "\(context.debugDescription)\(path(context)) (\(underlying))"
            }
            return "\(context.debugDescription)\(path(context))"
        @unknown default:
            return "\(self)"
        }
    }

    private static func jsonName(of type: Any.Type) -> String {
        switch type {
        case is String.Type: return "a string"
        case is Bool.Type: return "a boolean"
        case is Int.Type, is UInt64.Type, is Int64.Type, is UInt32.Type: return "an integer"
        default: return "\(type)"
        }
    }
}
