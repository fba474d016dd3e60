import EventLoop
import Foundation
import Memory
import Synchronization
import Testing
@testable import Virtio

private let plainFeatures = VirtioFeature.version1 | VirtioFeature.ringEventIndex | VirtioNetFeature.mac | VirtioNetFeature.status
/// Checksum offload both ways, no segmentation.
private let checksumFeatures = plainFeatures | VirtioNetFeature.checksum | VirtioNetFeature.guestChecksum

@Suite("virtio-net: a hostile driver gets its frame dropped and counted, or a reset request; never a crash")
struct NetHostileTests {
    /// Sends a good frame and checks it arrives: the device still forwards.
    private func stillForwards(_ harness: NetHarness, seed: UInt8 = 0x5A) throws {
        let frame = Frames.ethernet(length: 200, seed: seed)
        try harness.transmitFrame(frame)
        #expect(harness.backend.receive() == Frames.header() + frame, "a good frame after the bad one goes through")
    }

    @Test("A transmit chain shorter than the header, or than the header and an Ethernet header, is dropped and counted",
          arguments: [0, 1, 11, 12, 25])
    func shortTransmitChain(length: Int) throws {
        let harness = try NetHarness()
        let bytes = Array((Frames.header() + Frames.ethernet(length: 100))[0..<length])
        if length == 0 {
            // One empty descriptor.
            let address = try harness.allocate(1)
            try harness.drivers[1].add([(address, 0, false)])
            harness.notifiers[1].signal()
        } else {
            try harness.transmit(bytes)
        }
        #expect(try harness.waitForUsed(1, queue: 1), "the chain is returned")
        #expect(try harness.drivers[1].usedEntry(0).1 == 0)
        #expect(harness.statistics.transmitMalformed == 1)
        try stillForwards(harness)
        #expect(harness.wait { harness.statistics.transmittedFrames == 1 })
        #expect(harness.interrupt.resets.isEmpty)
    }

    @Test("A transmit chain with no readable byte at all (only a writable buffer) is dropped and counted")
    func writableOnlyTransmitChain() throws {
        let harness = try NetHarness()
        let address = try harness.allocate(2048)
        try harness.drivers[1].add([(address, 2048, true)])
        harness.notifiers[1].signal()
        #expect(try harness.waitForUsed(1, queue: 1))
        #expect(harness.statistics.transmitMalformed == 1)
        try stillForwards(harness)
    }

    @Test("Frames longer than the features allow are dropped: 1518 bytes without segmentation, 65550 with it",
          arguments: [(false, 1518, true), (false, 1519, false), (false, 9000, false),
                      (true, 1519, true), (true, 65550, true), (true, 65551, false)])
    func oversizedTransmit(segmentation: Bool, length: Int, passes: Bool) throws {
        let features = segmentation ? checksumFeatures | VirtioNetFeature.hostTSO4 : plainFeatures
        let harness = try NetHarness(features: features)
        let frame = Frames.ethernet(length: length, seed: 7)
        try harness.transmitFrame(frame)
        #expect(try harness.waitForUsed(1, queue: 1))
        if passes {
            #expect(harness.backend.receive() == Frames.header() + frame)
        } else {
            #expect(harness.wait { harness.statistics.transmitOversized == 1 })
        }
        try stillForwards(harness)
    }

    @Test("A descriptor that claims more bytes than the frame has (inside RAM) makes an oversized frame: dropped")
    func lyingDescriptorLength() throws {
        let harness = try NetHarness(features: plainFeatures)
        let bytes = Frames.header() + Frames.ethernet(length: 100)
        let address = try harness.allocate(bytes.count)
        try harness.memory.write(bytes, at: address)
        // 1 MiB claimed for a 112-byte frame: everything after it is whatever RAM holds.
        try harness.drivers[1].add([(address, 1 << 20, false)])
        harness.notifiers[1].signal()
        #expect(try harness.waitForUsed(1, queue: 1))
        #expect(harness.statistics.transmitOversized == 1)
        try stillForwards(harness)
    }

    @Test("A descriptor whose length runs past the end of RAM breaks the ring: the device asks for a reset, then works again",
          arguments: ["transmit", "receive"])
    func lengthPastRAM(queue: String) throws {
        let harness = try NetHarness()
        let address = NetHarness.memorySize - 4096
        if queue == "transmit" {
            try harness.drivers[1].add([(address, 8192, false)])
            harness.notifiers[1].signal()
        } else {
            // Receive buffers outside guest memory.
            try harness.postReceiveChain([(address, 8192, true)])
            #expect(harness.backend.send(Frames.header() + Frames.ethernet(length: 100, seed: 3)))
        }
        #expect(harness.waitForNeedsReset())
        #expect(harness.interrupt.resets.count == 1)
        #expect(harness.interrupt.resets[0].contains("outside guest RAM"), "\(harness.interrupt.resets)")
        // Stopped until the reset: a good frame is not sent.
        try harness.transmitFrame(Frames.ethernet(length: 100, seed: 4))
        #expect(harness.backend.receive(within: 0.3) == nil)
        try harness.reinitialize()
        try stillForwards(harness)
        if queue == "receive" {
            // The frame the host sent waited in the TAP and reaches the new buffers.
            try harness.postReceiveBuffers(1, size: 65562)
            #expect(try harness.nextReceivedFrame()?.frame == Frames.ethernet(length: 100, seed: 3))
        }
    }

    /// Transmit headers asking for offloads the driver did not negotiate (it negotiated
    /// checksum offload only, or nothing).
    static let unnegotiatedOffloads: [(String, UInt64, [UInt8])] = [
        ("NEEDS_CSUM without CSUM", plainFeatures, Frames.header(flags: VirtioNetHeader.needsChecksum, checksumStart: 34, checksumOffset: 6)),
        ("TCPv4 segment without HOST_TSO4", checksumFeatures,
         Frames.header(flags: 1, gsoType: VirtioNetHeader.gsoTCPv4, headerLength: 54, gsoSize: 1448, checksumStart: 34, checksumOffset: 16)),
        ("TCPv6 segment without HOST_TSO6", checksumFeatures, Frames.header(flags: 1, gsoType: VirtioNetHeader.gsoTCPv6, gsoSize: 1400)),
        ("UDP fragment without HOST_UFO", checksumFeatures, Frames.header(flags: 1, gsoType: VirtioNetHeader.gsoUDP, gsoSize: 1400)),
        ("UDP segment without HOST_USO", checksumFeatures, Frames.header(flags: 1, gsoType: VirtioNetHeader.gsoUDPL4, gsoSize: 1400)),
        ("ECN bit without HOST_ECN", checksumFeatures | VirtioNetFeature.hostTSO4,
         Frames.header(flags: 1, gsoType: VirtioNetHeader.gsoTCPv4 | VirtioNetHeader.gsoECN, gsoSize: 1400)),
        ("ECN bit alone", checksumFeatures, Frames.header(gsoType: VirtioNetHeader.gsoECN)),
        ("unknown segmentation type 2", checksumFeatures, Frames.header(gsoType: 2)),
        ("unknown segmentation type 0x7F", checksumFeatures, Frames.header(gsoType: 0x7F)),
    ]

    @Test("A transmit header asking for an offload that was not negotiated is dropped and counted", arguments: 0..<9)
    func unnegotiatedOffload(index: Int) throws {
        let (name, features, header) = Self.unnegotiatedOffloads[index]
        let harness = try NetHarness(features: features)
        try harness.transmitFrame(Frames.ethernet(length: 1000), header: header)
        #expect(try harness.waitForUsed(1, queue: 1), "\(name)")
        #expect(harness.statistics.transmitMalformed == 1, "\(name)")
        try stillForwards(harness)
    }

    @Test("Receive chains too small for a header, or with no writable byte, come back empty and are counted")
    func unusableReceiveChains() throws {
        let harness = try NetHarness(features: plainFeatures)
        let small = try harness.allocate(11)
        let readable = try harness.allocate(2048)
        let smallHead = try harness.postReceiveChain([(small, 11, true)], notify: false)
        let readableHead = try harness.postReceiveChain([(readable, 2048, false)], notify: false)
        try harness.postReceiveBuffers(1)
        #expect(try harness.waitForUsed(2, queue: 0))
        #expect(try harness.drivers[0].usedEntry(0) == (UInt32(smallHead), 0))
        #expect(try harness.drivers[0].usedEntry(1) == (UInt32(readableHead), 0))
        #expect(harness.statistics.receiveUnusableBuffers == 2)
        #expect(harness.backend.send(Frames.header() + Frames.ethernet(length: 300, seed: 2)))
        #expect(try harness.waitForUsed(3, queue: 0))
        let entry = try harness.drivers[0].usedEntry(2)
        #expect(entry.1 == 312)
    }

    @Test("A frame longer than the driver's features allow is dropped unseen, and the next one is delivered")
    func oversizedReceive() throws {
        let harness = try NetHarness(features: plainFeatures | VirtioNetFeature.mergeableReceiveBuffers)
        try harness.postReceiveBuffers(40, size: 512)
        #expect(harness.backend.send(Frames.header() + Frames.ethernet(length: 1519, seed: 1)))
        #expect(harness.backend.send(Frames.header() + Frames.ethernet(length: 9000, seed: 2)))
        #expect(harness.backend.send(Frames.header() + Frames.ethernet(length: 1518, seed: 3)))
        let received = try #require(try harness.nextReceivedFrame())
        #expect(received.frame == Frames.ethernet(length: 1518, seed: 3))
        #expect(harness.statistics.receiveOversized == 2)
    }

    @Test("Without MRG_RXBUF, a frame longer than the chain at hand is dropped; the chain waits for the next frame")
    func frameLongerThanChain() throws {
        let harness = try NetHarness(features: plainFeatures)
        try harness.postReceiveBuffers(1, size: 600)
        #expect(harness.backend.send(Frames.header() + Frames.ethernet(length: 1000, seed: 1)))
        #expect(harness.backend.send(Frames.header() + Frames.ethernet(length: 500, seed: 2)))
        let received = try #require(try harness.nextReceivedFrame())
        #expect(received.frame == Frames.ethernet(length: 500, seed: 2))
        #expect(harness.statistics.receiveOversized == 1)
    }

    @Test("A runt from the TAP (shorter than the header) is counted, not delivered")
    func runtFromBackend() throws {
        let harness = try NetHarness(features: plainFeatures)
        try harness.postReceiveBuffers(2)
        #expect(harness.backend.send([1, 2, 3]))
        #expect(harness.backend.send(Frames.header() + Frames.ethernet(length: 64, seed: 5)))
        #expect(try harness.nextReceivedFrame()?.frame == Frames.ethernet(length: 64, seed: 5))
        #expect(harness.statistics.receiveErrors == 1)
    }

    @Test("A flood of notifications with nothing to do costs wake-ups, not a busy loop, and frames keep flowing")
    func notificationFlood() throws {
        let harness = try NetHarness(features: plainFeatures, queueSize: 64)
        let flooding = Atomic<Bool>(true)
        let notifiers = harness.notifiers
        let flood = Thread {
            while flooding.load(ordering: .relaxed) {
                notifiers[0].signal()
                notifiers[1].signal()
            }
        }
        flood.start()
        defer { flooding.store(false, ordering: .relaxed) }
        var sent = 0
        var received = 0
        while received < 300 {
            while sent < 300 && sent - received < 60 {
                try harness.transmitFrame(Frames.ethernet(length: 100, seed: UInt8(truncatingIfNeeded: sent)))
                sent += 1
            }
            guard let bytes = harness.backend.receive() else { break }
            #expect(bytes == Frames.header() + Frames.ethernet(length: 100, seed: UInt8(truncatingIfNeeded: received)))
            received += 1
        }
        #expect(received == 300)
        try harness.postReceiveBuffers(20)
        for index in 0..<20 { #expect(harness.backend.send(Frames.header() + Frames.ethernet(length: 80, seed: UInt8(index)))) }
        for index in 0..<20 { #expect(try harness.nextReceivedFrame()?.frame == Frames.ethernet(length: 80, seed: UInt8(index))) }
        #expect(harness.interrupt.resets.isEmpty)
        #expect(harness.statistics.dropped == 0)
    }

    @Test("A driver that breaks one device's ring leaves another device forwarding")
    func brokenDeviceLeavesOthers() throws {
        let broken = try NetHarness()
        let healthy = try NetHarness(features: plainFeatures)
        try broken.drivers[1].add([(NetHarness.memorySize - 16, 64, false)])
        broken.notifiers[1].signal()
        #expect(broken.waitForNeedsReset())
        try healthy.postReceiveBuffers(10)
        for index in 0..<10 {
            try stillForwards(healthy, seed: UInt8(index))
            #expect(healthy.backend.send(Frames.header() + Frames.ethernet(length: 90, seed: UInt8(index))))
            #expect(try healthy.nextReceivedFrame()?.frame == Frames.ethernet(length: 90, seed: UInt8(index)))
        }
        #expect(healthy.interrupt.resets.isEmpty)
    }

    @Test("A TAP that hangs up stops the device once (a reset request), without spinning")
    func backendHangUp() throws {
        let harness = try NetHarness(features: plainFeatures)
        try harness.postReceiveBuffers(2)
        harness.backend.closePeer()
        #expect(harness.waitForNeedsReset())
        let wakeups = harness.statistics.backendWakeups
        usleep(200_000)
        #expect(harness.statistics.backendWakeups == wakeups)
        #expect(harness.interrupt.resets.count == 1)
    }

    @Test("The same receive head made available again and again: the device holds at most a queue's worth")
    func republishedHeads() throws {
        let harness = try NetHarness(features: plainFeatures | VirtioNetFeature.mergeableReceiveBuffers, queueSize: 16)
        // One 64-byte chain, published 16 times (the most the ring index allows): 1 KiB in
        // all, less than a frame needs; the device takes all 16 and reads with what it has.
        let address = try harness.allocate(64, fill: 0xEE)
        try harness.drivers[0].writeDescriptor(0, address: address, length: 64, flags: 2)
        for _ in 0..<16 { try harness.drivers[0].makeAvailable(0) }
        harness.notifiers[0].signal()
        #expect(harness.backend.send(Frames.header() + Frames.ethernet(length: 60, seed: 1)))
        #expect(try harness.waitForUsed(1, queue: 0))
        #expect(try harness.drivers[0].usedEntry(0) == (0, 64))
        #expect(try harness.drivers[0].usedEntry(1) == (0, 8))
        #expect(harness.interrupt.resets.isEmpty)
    }
}
