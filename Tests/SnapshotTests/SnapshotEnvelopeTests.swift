import Testing
@testable import Snapshot

@Suite struct SnapshotEnvelopeTests {
    let payload = Array(#"{"format":1,"vcpus":[]}"#.utf8)

    @Test func roundTrip() throws {
        let file = SnapshotEnvelope.encode(payload: payload)
        #expect(String(decoding: file.prefix(20), as: UTF8.self) == "SWIFTLET SNAPSHOT 1\n")
        let decoded = try SnapshotEnvelope.decode(file)
        #expect(decoded.version == 1)
        #expect(decoded.payload == payload)
    }

    @Test func emptyPayload() throws {
        #expect(try SnapshotEnvelope.decode(SnapshotEnvelope.encode(payload: [])).payload == [])
    }

    @Test func checksumIsZlibCRC32() {
        // The CRC-32 of "123456789" is the standard check value.
        #expect(SnapshotEnvelope.checksum(Array("123456789".utf8)) == 0xCBF4_3926)
    }

    @Test func newerFormatRefused() {
        let file = SnapshotEnvelope.encode(payload: payload, version: 2)
        #expect(throws: SnapshotError.newerFormat(found: 2, supported: 1)) { try SnapshotEnvelope.decode(file) }
        let message = SnapshotError.newerFormat(found: 2, supported: 1).description
        #expect(message.contains("format 2") && message.contains("newer"))
    }

    @Test func truncatedRefused() {
        let file = SnapshotEnvelope.encode(payload: payload)
        for cut in [file.count - 1, file.count - payload.count, 30, 10] {
            #expect(throws: SnapshotError.self) { try SnapshotEnvelope.decode(Array(file.prefix(cut))) }
        }
        if case .truncated = (try? SnapshotEnvelope.decode(Array(file.dropLast(3)))).map({ _ in SnapshotError.notASnapshot }) ?? catchError({ try SnapshotEnvelope.decode(Array(file.dropLast(3))) }) {
        } else {
            Issue.record("a payload cut short is reported as truncated")
        }
    }

    @Test func changedByteRefused() {
        var file = SnapshotEnvelope.encode(payload: payload)
        file[file.count - 5] ^= 0x01
        let error = catchError { try SnapshotEnvelope.decode(file) }
        guard case .checksumMismatch = error else { Issue.record("expected a checksum mismatch, got \(String(describing: error))"); return }
    }

    @Test func trailingBytesRefused() {
        let file = SnapshotEnvelope.encode(payload: payload) + [0x0A]
        guard case .malformed = catchError({ try SnapshotEnvelope.decode(file) }) else { Issue.record("trailing bytes accepted"); return }
    }

    @Test func otherFilesRefused() {
        #expect(catchError { try SnapshotEnvelope.decode(Array("QFI\u{fb}....".utf8)) } == .notASnapshot)
        #expect(catchError { try SnapshotEnvelope.decode([]) } == .notASnapshot)
        let badVersion = Array("SWIFTLET SNAPSHOT x\nlength 0\ncrc32 00000000\n\n".utf8)
        guard case .malformed = catchError({ try SnapshotEnvelope.decode(badVersion) }) else { Issue.record("bad version accepted"); return }
        let hugeLength = Array("SWIFTLET SNAPSHOT 1\nlength 999999999999\ncrc32 00000000\n\n".utf8)
        guard case .malformed = catchError({ try SnapshotEnvelope.decode(hugeLength) }) else { Issue.record("huge length accepted"); return }
    }

    @Test func hexBytes() {
        #expect(HexBytes.format([0x00, 0xAB, 0x7F]) == "00ab7f")
        #expect(HexBytes.parse("00aB7f") == [0x00, 0xAB, 0x7F])
        #expect(HexBytes.parse("0") == nil)
        #expect(HexBytes.parse("zz") == nil)
    }

    private func catchError(_ body: () throws -> Any) -> SnapshotError? {
        do { _ = try body(); return nil } catch let error as SnapshotError { return error } catch { return nil }
    }
}
