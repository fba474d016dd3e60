import Basics
import Glibc
import Snapshot

/// The kinds of frame in a migration stream, in the order they normally come.
///
///     source                                  target
///     hello (JSON: version, machine) ------>
///                                    <------  accept | refuse (reason)
///     pages / zero pages ...          ------>  (pre-copy rounds, the guest running)
///     pages / zero pages ...          ------>  (the last pages, the guest paused)
///     state (JSON: the snapshot manifest) -->
///                                    <------  ready (restored) | failure (reason)
///     commit                          ------>  (the target runs, the source stops)
///
/// Either side may send `failure` instead of its next frame; the source then resumes.
enum MigrationFrameKind: UInt8, Sendable {
    case hello = 1, accept = 2, refuse = 3, pages = 4, zeroPages = 5, state = 6, ready = 7, commit = 8, failure = 9

    /// The largest payload of this kind that is read (anything larger is refused unread).
    var maximumPayload: Int {
        switch self {
        case .pages: return 8 + MigrationChannel.pagesPerFrame * 4096
        case .state: return SnapshotEnvelope.maximumPayload
        case .hello: return 1 << 20
        default: return 64 << 10
        }
    }
}

/// One end of a migration connection: frames out and in, each checked.
///
/// A frame is a 16-byte header, then its payload:
///
///     0   "SWMG"                 magic
///     4   kind (1 byte), 3 zero bytes
///     8   payload length         (32-bit little-endian)
///     12  CRC-32 of the payload  (zlib's, little-endian)
///
/// A frame with another magic, an unknown kind, a length over its kind's limit or a bad
/// checksum ends the migration: nothing of it is believed.
final class MigrationChannel {
    static let magic: [UInt8] = Array("SWMG".utf8)
    /// Pages in one `pages` frame at most (1 MiB of RAM).
    static let pagesPerFrame = 256
    /// Bytes of the stream so far, both ways.
    private(set) var bytesSent = 0
    private(set) var bytesReceived = 0

    let fd: Int32
    /// When the connection was made (monotonic nanoseconds), for a bandwidth limit.
    let openedAt = MonotonicClock.nanoseconds()
    private var buffer: [UInt8] = []

    /// Takes ownership of the connected socket `fd`.
    init(fd: Int32) { self.fd = fd }

    deinit { close(fd) }

    // MARK: Sending

    /// Sends a frame whose payload is `prefix` followed by `body`.
    func send(_ kind: MigrationFrameKind, prefix: [UInt8] = [], body: UnsafeRawBufferPointer? = nil) throws(MigrationFailure) {
        let bodyCount = body?.count ?? 0
        var crc = prefix.withUnsafeBytes { CRC32.checksum($0) }
        if let body, body.count > 0 { crc = CRC32.checksum(body, continuing: crc) }
        let header = Self.magic + [kind.rawValue, 0, 0, 0] + [UInt8].littleEndian(UInt32(prefix.count + bodyCount))
            + [UInt8].littleEndian(crc)
        let first = header + prefix
        let failure = first.withUnsafeBytes { (bytes) -> MigrationFailure? in
            do throws(MigrationFailure) { try sendAll(bytes, more: bodyCount > 0) } catch { return error }
            return nil
        }
        if let failure { throw failure }
        if let body, body.count > 0 { try sendAll(body, more: false) }
    }

    /// Sends a frame with a JSON or text payload.
    func send(_ kind: MigrationFrameKind, bytes: [UInt8]) throws(MigrationFailure) {
        try send(kind, prefix: bytes)
    }

    private func sendAll(_ bytes: UnsafeRawBufferPointer, more: Bool) throws(MigrationFailure) {
        var done = 0
        while done < bytes.count {
            let sent = Glibc.send(fd, bytes.baseAddress! + done, bytes.count - done, Int32(MSG_NOSIGNAL) | (more ? Int32(MSG_MORE) : 0))
            if sent < 0, errno == EINTR { continue }
            guard sent > 0 else {
                if sent < 0, errno == EAGAIN || errno == EWOULDBLOCK { throw MigrationFailure("the other side stopped reading (timed out)") }
                throw MigrationFailure.system("the connection failed while sending")
            }
            done += sent
        }
        bytesSent += bytes.count
    }

    // MARK: Receiving

    /// The next frame; its payload is valid until the next call.
    func receive() throws(MigrationFailure) -> (kind: MigrationFrameKind, payload: ArraySlice<UInt8>) {
        var header = [UInt8](repeating: 0, count: 16)
        try receiveExactly(&header, count: 16)
        guard Array(header[0..<4]) == Self.magic else { throw MigrationFailure("the stream is not a Swiftlet migration (bad frame magic)") }
        guard let kind = MigrationFrameKind(rawValue: header[4]) else { throw MigrationFailure("unknown frame kind \(header[4])") }
        let length = Int(header.le(UInt32.self, at: 8) ?? 0)
        let expected = header.le(UInt32.self, at: 12) ?? 0
        guard length <= kind.maximumPayload else {
            throw MigrationFailure("a \(kind) frame of \(length) bytes is larger than one may be (\(kind.maximumPayload))")
        }
        if buffer.count < length { buffer = [UInt8](repeating: 0, count: length) }
        try receiveExactly(&buffer, count: length)
        let actual = buffer.withUnsafeBytes { CRC32.checksum(UnsafeRawBufferPointer(rebasing: $0[0..<length])) }
        guard actual == expected else {
            throw MigrationFailure("a \(kind) frame is damaged (CRC-32 \(Hex.digits(actual, width: 8)), expected \(Hex.digits(expected, width: 8)))")
        }
        return (kind, buffer[0..<length])
    }

    private func receiveExactly(_ target: inout [UInt8], count: Int) throws(MigrationFailure) {
        var done = 0
        while done < count {
            let received = target.withUnsafeMutableBytes { recv(fd, $0.baseAddress! + done, count - done, 0) }
            if received < 0, errno == EINTR { continue }
            if received == 0 { throw MigrationFailure("the other side closed the connection") }
            guard received > 0 else {
                if errno == EAGAIN || errno == EWOULDBLOCK { throw MigrationFailure("the other side sent nothing for too long (timed out)") }
                throw MigrationFailure.system("the connection failed while receiving")
            }
            done += received
        }
        bytesReceived += count
    }
}

/// The first frame: who is sending, and the machine it sends. The target refuses a
/// machine it was not started to receive.
struct MigrationHello: Codable, Sendable {
    /// This protocol's version: a target refuses a newer one.
    static let currentProtocol = 1

    var protocolVersion: Int
    var swiftletVersion: String
    var machine: SavedMachineConfiguration
    /// The CPU features the guest was given (by /proc/cpuinfo name).
    var cpuFeatures: [String]
}
