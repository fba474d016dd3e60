import Foundation
import RateLimit
import Testing
import Virtio

private let plainFeatures = VirtioFeature.version1 | VirtioFeature.ringEventIndex | VirtioNetFeature.mac | VirtioNetFeature.status

@Suite("virtio-net: rate limits", .serialized)
struct NetRateLimitTests {
    /// One frame a minute: after the first, nothing more until the limit changes.
    static let oneFrame = RateLimiterConfiguration(ops: TokenBucketConfiguration(size: 1, refillTime: 60_000))
    static let unlimited = RateLimiterConfiguration(ops: TokenBucketConfiguration(size: 0, refillTime: 0))

    static func options(receive: RateLimiterConfiguration? = nil, transmit: RateLimiterConfiguration? = nil) -> VirtioNetOptions {
        VirtioNetOptions(mac: MACAddress(bytes: Frames.guestMAC)!, index: 8, receiveRateLimiter: receive, transmitRateLimiter: transmit)
    }

    @Test("A transmit frame without tokens waits in the ring; raising the limit sends it at once")
    func transmitWaits() throws {
        let harness = try NetHarness(options: Self.options(transmit: Self.oneFrame))
        let frames = (0..<3).map { Frames.ethernet(length: 200, seed: UInt8($0)) }
        for frame in frames { try harness.transmitFrame(frame) }
        #expect(harness.backend.receive().map { Array($0.dropFirst(VirtioNetHeader.size)) } == frames[0])
        #expect(harness.backend.receive(within: 0.3) == nil, "a frame went out without tokens")
        // The second chain is back in the available ring, not held by the device.
        #expect(harness.queues[1].indices.nextAvailable == 1)
        #expect(try harness.drivers[1].usedIndex == 1)
        #expect(harness.device.statistics.transmitRateLimited >= 1)
        harness.device.updateRateLimiters(receive: nil, transmit: Self.unlimited)
        #expect(harness.backend.receive(within: 2).map { Array($0.dropFirst(VirtioNetHeader.size)) } == frames[1])
        #expect(harness.backend.receive(within: 2).map { Array($0.dropFirst(VirtioNetHeader.size)) } == frames[2])
        #expect(try harness.waitForUsed(3, queue: 1))
        #expect(harness.device.rateLimiterConfigurations.transmit == RateLimiterConfiguration())
    }

    @Test("Received frames beyond the limit wait in the backend, in order; raising the limit delivers them")
    func receiveWaits() throws {
        let harness = try NetHarness(features: plainFeatures, options: Self.options(receive: Self.oneFrame))
        try harness.postReceiveBuffers(8)
        let frames = (0..<3).map { Frames.ethernet(length: 300, seed: UInt8(10 + $0)) }
        for frame in frames { #expect(harness.backend.send(Frames.header() + frame)) }
        let first = try #require(try harness.nextReceivedFrame())
        #expect(Array(first.bytes.dropFirst(VirtioNetHeader.size)) == frames[0])
        usleep(300_000)
        #expect(try harness.unseenReceiveEntries == 0, "a frame came in without tokens")
        #expect(harness.device.statistics.receiveRateLimited >= 1)
        harness.device.updateRateLimiters(receive: Self.unlimited, transmit: nil)
        for frame in frames.dropFirst() {
            let received = try #require(try harness.nextReceivedFrame())
            #expect(Array(received.bytes.dropFirst(VirtioNetHeader.size)) == frame)
        }
    }

    @Test("A receive bandwidth limit paces frames: 20 frames of 1000 bytes at 10 000 bytes/s")
    func receivePaced() throws {
        // 5000-byte bucket refilled in 500 ms: 10 000 bytes/s. 20 000 bytes: the first
        // 5000 at once, and each frame is charged after it is in: the last after 1.4 s.
        let limit = RateLimiterConfiguration(bandwidth: TokenBucketConfiguration(size: 5000, refillTime: 500))
        let harness = try NetHarness(features: plainFeatures, options: Self.options(receive: limit))
        try harness.postReceiveBuffers(32)
        let start = Date()
        for index in 0..<20 { #expect(harness.backend.send(Frames.header() + Frames.ethernet(length: 1000, seed: UInt8(index)))) }
        for _ in 0..<20 { _ = try #require(try harness.nextReceivedFrame()) }
        let elapsed = Date().timeIntervalSince(start)
        #expect(elapsed >= 1.39 && elapsed < 3, "\(elapsed) s")
    }
}
