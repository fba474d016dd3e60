/// A device whose state a snapshot records: a plain `Codable` value beside the device, so
/// that a snapshot file and a migration stream are the same value read two ways.
///
/// `saveState()` is called while the machine is paused (no vCPU in `KVM_RUN`, devices
/// quiesced); `restoreState(_:)` on a device freshly built with the same configuration,
/// before any vCPU runs. A saved state comes from a file, which is user input: every value
/// is checked, and one that no running device could have had is refused with a
/// ``DeviceStateError`` (the device is then left as it was), never a trap.
public protocol SnapshotDevice: AnyObject, Sendable {
    associatedtype SavedState: Codable, Sendable, Equatable
    /// The state now (called while the machine is paused).
    func saveState() -> SavedState
    /// Puts `state` back. A value no running device could have had is refused.
    func restoreState(_ state: SavedState) throws(DeviceStateError)
}

/// A saved device state that cannot be restored: which device, and why.
public struct DeviceStateError: Error, Equatable, CustomStringConvertible, Sendable {
    /// The device, as messages name it ("serial (16550)", "virtio-blk queue 0").
    public let device: String
    public let reason: String

    public init(device: String, _ reason: String) {
        self.device = device
        self.reason = reason
    }

    public var description: String { "\(device): \(reason)" }

    /// The same error, with `outer` in front of the device's name ("virtio device 1: ...").
    public func within(_ outer: String) -> DeviceStateError {
        DeviceStateError(device: "\(outer): \(device)", reason)
    }
}

/// Bytes in a saved state that are too many for a JSON array of numbers (the test
/// device's 64 KiB of I/O RAM): encoded as one base64 string (RFC 4648, with padding).
public struct SavedBytes: Codable, Sendable, Equatable {
    public var bytes: [UInt8]

    public init(_ bytes: [UInt8]) { self.bytes = bytes }

    private static let alphabet = Array("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/".utf8)

    public init(from decoder: any Decoder) throws {
        let container = try decoder.singleValueContainer()
        let text = try container.decode(String.self)
        guard let bytes = Self.decode(base64: text) else {
            throw DecodingError.dataCorruptedError(in: container, debugDescription: "not base64 text")
        }
        self.bytes = bytes
    }

    public func encode(to encoder: any Encoder) throws {
        var container = encoder.singleValueContainer()
        try container.encode(Self.encode(bytes))
    }

    /// `bytes` as base64 text.
    static func encode(_ bytes: [UInt8]) -> String {
        var out: [UInt8] = []
        out.reserveCapacity((bytes.count + 2) / 3 * 4)
        var index = 0
        while index < bytes.count {
            let count = min(3, bytes.count - index)
            var group = UInt32(bytes[index]) << 16
            if count > 1 { group |= UInt32(bytes[index + 1]) << 8 }
            if count > 2 { group |= UInt32(bytes[index + 2]) }
            for position in 0..<4 {
                if position <= count {
                    out.append(alphabet[Int(group >> (18 - 6 * UInt32(position)) & 0x3F)])
                } else {
                    out.append(UInt8(ascii: "="))
                }
            }
            index += 3
        }
        return String(decoding: out, as: UTF8.self)
    }

    /// The bytes of base64 `text`, or nil when it is not canonical base64 (wrong length,
    /// a character outside the alphabet, padding in the middle, or non-zero padding bits).
    static func decode(base64 text: String) -> [UInt8]? {
        let characters = Array(text.utf8)
        guard characters.count % 4 == 0 else { return nil }
        var values = [UInt8](repeating: 0xFF, count: 256)
        for (value, character) in alphabet.enumerated() { values[Int(character)] = UInt8(value) }
        var bytes: [UInt8] = []
        bytes.reserveCapacity(characters.count / 4 * 3)
        var index = 0
        while index < characters.count {
            let last = index + 4 == characters.count
            var group: UInt32 = 0
            var padding = 0
            for position in 0..<4 {
                let character = characters[index + position]
                if character == UInt8(ascii: "=") {
                    // Padding only at the end of the last group, at most two characters.
                    guard last, position >= 2 else { return nil }
                    padding += 1
                    group <<= 6
                    continue
                }
                guard padding == 0 else { return nil }
                let value = values[Int(character)]
                guard value != 0xFF else { return nil }
                group = group << 6 | UInt32(value)
            }
            let produced = 3 - padding
            // Bits under the padding must be zero: one text per byte string.
            guard padding == 0 || group & ((1 << (8 * UInt32(padding))) - 1) == 0 else { return nil }
            for position in 0..<produced { bytes.append(UInt8(truncatingIfNeeded: group >> (16 - 8 * UInt32(position)))) }
            index += 4
        }
        return bytes
    }
}
