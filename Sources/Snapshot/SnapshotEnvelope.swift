import Basics
import CZlib

/// The outside of a snapshot's state file: a header a person can read with `head`, then
/// the payload (the machine's state as JSON).
///
///     SWIFTLET SNAPSHOT 1
///     length 48213
///     crc32 9a3f01c2
///
///     {"format":1,"swiftlet":"0.1.0", ...}
///
/// The version says how to read the payload: a Swiftlet reads its own version and older
/// ones, and refuses a newer one by name. The length and the CRC-32 (zlib's) of the payload
/// catch a file cut short or changed on disk, before anything in it is believed.
public enum SnapshotEnvelope {
    /// The first word of every state file.
    public static let magic = "SWIFTLET SNAPSHOT"
    /// The format this Swiftlet writes, and the newest it reads.
    public static let currentVersion = 1
    /// A payload larger than this is refused unread (a state file holds registers and
    /// device state, not RAM: it is kilobytes per vCPU).
    public static let maximumPayload = 64 << 20

    /// The state file for `payload`.
    public static func encode(payload: [UInt8], version: Int = currentVersion) -> [UInt8] {
        let header = "\(magic) \(version)\nlength \(payload.count)\ncrc32 \(Hex.digits(checksum(payload), width: 8))\n\n"
        return Array(header.utf8) + payload
    }

    /// The payload of state file `bytes`, once the magic, the version, the length and the
    /// checksum have been checked.
    public static func decode(_ bytes: [UInt8]) throws(SnapshotError) -> (version: Int, payload: [UInt8]) {
        // The header is four lines, the last empty; it is short, so look only at its start.
        let limit = min(bytes.count, 256)
        guard let headerEnd = findHeaderEnd(bytes, limit: limit) else {
            if bytes.starts(with: Array(magic.utf8)) { throw .truncated("the header is incomplete") }
            throw .notASnapshot
        }
        let lines = String(decoding: bytes[..<headerEnd], as: UTF8.self).split(separator: "\n", omittingEmptySubsequences: false)
        guard lines.count >= 3, lines[0].hasPrefix(magic + " ") else { throw .notASnapshot }
        guard let version = Int(lines[0].dropFirst(magic.count + 1)), version >= 1 else {
            throw .malformed("the version in '\(lines[0])' is not a positive number")
        }
        guard version <= currentVersion else { throw .newerFormat(found: version, supported: currentVersion) }
        guard lines[1].hasPrefix("length "), let length = Int(lines[1].dropFirst(7)), length >= 0 else {
            throw .malformed("expected 'length <bytes>' on line 2")
        }
        guard length <= maximumPayload else { throw .malformed("a payload of \(length) bytes is larger than a state file can be") }
        guard lines[2].hasPrefix("crc32 "), lines[2].count == 14, let expected = UInt32(lines[2].dropFirst(6), radix: 16) else {
            throw .malformed("expected 'crc32 <8 hex digits>' on line 3")
        }
        let start = headerEnd + 2
        let available = bytes.count - start
        guard available >= length else { throw .truncated("the payload has \(max(0, available)) of its \(length) bytes") }
        guard available == length else { throw .malformed("\(available - length) bytes follow the payload") }
        let payload = Array(bytes[start...])
        let actual = checksum(payload)
        guard actual == expected else { throw .checksumMismatch(expected: expected, actual: actual) }
        return (version, payload)
    }

    /// zlib's CRC-32 of `bytes`.
    public static func checksum(_ bytes: [UInt8]) -> UInt32 {
        bytes.withUnsafeBufferPointer { buffer in
            var crc = crc32(0, nil, 0)
            var offset = 0
            // zlib takes a 32-bit length: feed large buffers in pieces.
            while offset < buffer.count {
                let chunk = min(buffer.count - offset, 1 << 30)
                crc = crc32(crc, buffer.baseAddress! + offset, uInt(chunk))
                offset += chunk
            }
            return UInt32(truncatingIfNeeded: crc)
        }
    }

    /// The index of the "\n\n" that ends the header, within the first `limit` bytes.
    private static func findHeaderEnd(_ bytes: [UInt8], limit: Int) -> Int? {
        guard limit >= 2 else { return nil }
        for index in 0..<(limit - 1) where bytes[index] == 0x0A && bytes[index + 1] == 0x0A { return index }
        return nil
    }
}

/// Why a snapshot cannot be used. Each says what is wrong in words a user can act on.
public enum SnapshotError: Error, Equatable, CustomStringConvertible {
    /// The file does not start with the magic: not a Swiftlet state file.
    case notASnapshot
    /// Written by a newer Swiftlet, in a format this one does not know.
    case newerFormat(found: Int, supported: Int)
    /// Cut short.
    case truncated(String)
    /// The payload's checksum is not the one recorded.
    case checksumMismatch(expected: UInt32, actual: UInt32)
    /// Damaged in a way the checks above do not name.
    case malformed(String)
    /// The snapshot is fine but this host or this Swiftlet cannot run it.
    case incompatible(String)

    public var description: String {
        switch self {
        case .notASnapshot:
            return "not a Swiftlet snapshot (the state file does not start with '\(SnapshotEnvelope.magic)')"
        case let .newerFormat(found, supported):
            return "the snapshot is in format \(found), newer than this Swiftlet reads (\(supported)); restore it with the Swiftlet that wrote it, or a newer one"
        case let .truncated(what):
            return "the snapshot is truncated: \(what)"
        case let .checksumMismatch(expected, actual):
            return "the snapshot is damaged: its checksum is \(Hex.digits(actual, width: 8)), the header says \(Hex.digits(expected, width: 8))"
        case let .malformed(what):
            return "the snapshot is damaged: \(what)"
        case let .incompatible(what):
            return "the snapshot cannot run here: \(what)"
        }
    }
}
