import API
import APIServer
import Foundation
import NIOCore
import NIOEmbedded
import Testing

/// The server's real pipeline (NIO's HTTP/1.1 parser and encoder, the idle timeout, the
/// request handler) on an in-memory channel: bytes in, bytes out, no socket.
final class PipelineHarness {
    let channel = EmbeddedChannel()

    init(controller: APIController = APIController(), maxPayload: Int = APIServer.defaultMaxPayload) throws {
        try APIServer.configure(channel.pipeline.syncOperations, controller: controller, maxPayload: maxPayload)
        try channel.connect(to: SocketAddress(unixDomainSocketPath: "/tmp/unused")).wait()
    }

    /// Feeds `bytes` and returns everything the server wrote back. A parse error the
    /// pipeline reports is part of the exchange, not a test failure.
    func exchange(_ bytes: [UInt8]) -> String {
        var buffer = channel.allocator.buffer(capacity: bytes.count)
        buffer.writeBytes(bytes)
        _ = try? channel.writeInbound(buffer)
        var output: [UInt8] = []
        while let part = try? channel.readOutbound(as: ByteBuffer.self) {
            output += part.readableBytesView
        }
        return String(decoding: output, as: UTF8.self)
    }

    func exchange(_ text: String) -> String { exchange(Array(text.utf8)) }

    deinit { _ = try? channel.finish() }
}

@Suite("HTTP handling of the API socket (NIO pipeline on an EmbeddedChannel)")
struct HTTPTests {
    @Test("A GET / answers 200 with JSON; a PUT answers 204; keep-alive serves several requests")
    func basics() throws {
        let harness = try PipelineHarness()
        let answer = harness.exchange("GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
        #expect(answer.hasPrefix("HTTP/1.1 200 OK\r\n"))
        #expect(answer.contains("\"state\":\"Not started\""))
        let body = #"{"vcpu_count": 1, "mem_size_mib": 32}"#
        let put = harness.exchange("PUT /machine-config HTTP/1.1\r\nHost: localhost\r\nContent-Length: \(body.utf8.count)\r\n\r\n\(body)")
        #expect(put.hasPrefix("HTTP/1.1 204 No Content\r\n"))
        // Two pipelined requests in one write: two answers, in order.
        let both = harness.exchange("GET /machine-config HTTP/1.1\r\nHost: x\r\n\r\nGET /nope HTTP/1.1\r\nHost: x\r\n\r\n")
        let okAt = try #require(both.range(of: "HTTP/1.1 200 OK"))
        let badAt = try #require(both.range(of: "HTTP/1.1 400 Bad Request"))
        #expect(okAt.lowerBound < badAt.lowerBound)
        #expect(both.contains("\"mem_size_mib\":32"))
    }

    @Test("Malformed HTTP gets a 400 with a fault message and the connection closes")
    func malformed() throws {
        let harness = try PipelineHarness()
        let answer = harness.exchange("THIS IS NOT HTTP\r\n\r\n")
        #expect(answer.hasPrefix("HTTP/1.1 400 Bad Request\r\n"))
        #expect(answer.contains("fault_message"))
        #expect(!harness.channel.isActive)
    }

    @Test("A body over the payload limit is refused, whether announced or streamed in chunks")
    func oversized() throws {
        let harness = try PipelineHarness(maxPayload: 1024)
        let announced = harness.exchange("PUT /machine-config HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n\r\n")
            + harness.exchange(String(repeating: "x", count: 5000))
        #expect(announced.hasPrefix("HTTP/1.1 400 Bad Request\r\n"))
        #expect(announced.contains("larger than the limit of 1024"))

        let chunked = try PipelineHarness(maxPayload: 1024)
        var request = "PUT /machine-config HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        for _ in 0..<4 { request += "200\r\n" + String(repeating: "y", count: 0x200) + "\r\n" }
        request += "0\r\n\r\n"
        let answer = chunked.exchange(request)
        #expect(answer.contains("larger than the limit of 1024"))
    }

    @Test("A client that stops mid-request gets no answer and costs nothing")
    func partial() throws {
        let harness = try PipelineHarness()
        #expect(harness.exchange("PUT /machine-config HTTP/1.1\r\nContent-Length: 100\r\n\r\n{\"vcpu").isEmpty)
        _ = try? harness.channel.close().wait()
        #expect(!harness.channel.isActive)
    }

    /// Fuzz target for the request parser: valid requests mutated byte by byte, and
    /// random bytes, for a bounded number of rounds and time. Every answer must be a
    /// well-formed HTTP response (or none, for an incomplete request), and nothing traps.
    @Test("Fuzz: mutated and random requests never crash the parser or the handler")
    func fuzz() throws {
        var generator = SplitMix64(seed: 0x5EED_F1CE)
        let seeds = [
            "GET / HTTP/1.1\r\nHost: x\r\n\r\n",
            "PUT /machine-config HTTP/1.1\r\nContent-Length: 37\r\n\r\n{\"vcpu_count\": 1, \"mem_size_mib\": 32}",
            "PUT /drives/rootfs HTTP/1.1\r\nContent-Length: 84\r\n\r\n{\"drive_id\":\"rootfs\",\"path_on_host\":\"/tmp/x\",\"is_root_device\":true,\"is_read_only\":1}",
            "PATCH /vm HTTP/1.1\r\nContent-Length: 19\r\n\r\n{\"state\": \"Paused\"}",
            "PUT /actions HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n1c\r\n{\"action_type\": \"FlushMetr\"}\r\n0\r\n\r\n",
            "PUT /network-interfaces/e HTTP/1.1\r\nContent-Length: 60\r\n\r\n{\"iface_id\":\"e\",\"host_dev_name\":\"t\",\"rx_rate_limiter\":{\"o\":1}}",
        ].map { Array($0.utf8) }
        let deadline = Date().addingTimeInterval(5)
        var rounds = 0
        while rounds < 4000 && Date() < deadline {
            rounds += 1
            var input: [UInt8]
            if rounds % 5 == 0 {
                input = (0..<Int(generator.next() % 300)).map { _ in UInt8(truncatingIfNeeded: generator.next()) }
            } else {
                input = seeds[Int(generator.next() % UInt64(seeds.count))]
                for _ in 0..<(1 + generator.next() % 4) {
                    let position = Int(generator.next() % UInt64(input.count))
                    switch generator.next() % 4 {
                    case 0: input[position] = UInt8(truncatingIfNeeded: generator.next())
                    case 1: input.remove(at: position)
                    case 2: input.insert(UInt8(truncatingIfNeeded: generator.next()), at: position)
                    default: input.insert(contentsOf: input[position...].prefix(8), at: position)
                    }
                    if input.isEmpty { input = [0x0A] }
                }
            }
            let harness = try PipelineHarness()
            let answer = harness.exchange(input)
            if !answer.isEmpty {
                #expect(answer.hasPrefix("HTTP/1.1 "), "round \(rounds): \(answer.prefix(40))")
            }
        }
        #expect(rounds > 100)
    }
}

/// A small deterministic generator (SplitMix64), so a failing fuzz round can be replayed.
struct SplitMix64: RandomNumberGenerator {
    var state: UInt64
    init(seed: UInt64) { state = seed }
    mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
}
