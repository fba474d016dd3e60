import Foundation
import Memory
import Testing
import Virtio

@Suite("virtio-net: pause and saved state")
struct NetStateTests {
    @Test("Paused, the device stops reading the TAP and puts back the receive chains it held; resumed, it takes them again and each frame arrives once")
    func pauseReturnsHeldChains() throws {
        // The device holds chains ahead of the next frame: one without MRG_RXBUF, with it
        // two (1526-byte chains, the largest frame and its header need 1530 bytes).
        for mergeable in [false, true] {
            let harness = try NetHarness(features: features(mergeable: mergeable))
            try harness.postReceiveBuffers(4)
            #expect(harness.wait { harness.queues[0].indices.nextAvailable > 0 }, "the device took receive chains ahead of frames")
            let first = Frames.ethernet(length: 60, seed: 1)
            harness.backend.send(Frames.header() + first)
            let delivered = try #require(try harness.nextReceivedFrame())
            #expect(delivered.frame == first)
            let held: UInt16 = mergeable ? 2 : 1
            #expect(harness.wait { harness.queues[0].indices.nextAvailable == 1 + held }, "it took the next chains at once")

            harness.device.pause()
            let paused = harness.queues[0].savedIndices
            #expect(paused.nextAvailable == paused.nextUsed, "nothing taken and not returned: \(paused)")
            #expect(paused.nextUsed == 1)
            // Frames the host sends meanwhile wait in the TAP.
            let second = Frames.ethernet(length: 100, seed: 2)
            harness.backend.send(Frames.header() + second)
            usleep(100_000)
            #expect(try harness.drivers[0].usedIndex == 1, "nothing delivered while paused")
            #expect(harness.queues[0].savedIndices == paused)

            harness.device.resume()
            let next = try #require(try harness.nextReceivedFrame())
            #expect(next.frame == second)
            #expect(next.entries.map(\.0) == [1], "the chain put back is used next, once")
            #expect(try harness.unseenReceiveEntries == 0)
            // Transmit goes on too.
            try harness.transmitFrame(Frames.ethernet(length: 64, seed: 3))
            #expect(harness.backend.receive().map { Array($0.dropFirst(12)) } == Frames.ethernet(length: 64, seed: 3))
        }
    }

    func features(mergeable: Bool) -> UInt64 {
        let all = VirtioFeature.version1 | VirtioFeature.ringEventIndex | VirtioNetFeature.mac | VirtioNetFeature.status
        return mergeable ? all | VirtioNetFeature.mergeableReceiveBuffers : all
    }

    @Test("Activated while paused (a restore), the device starts nothing until it resumes")
    func activatedWhilePaused() throws {
        let harness = try NetHarness(features: features(mergeable: false), activate: false)
        harness.device.pause()
        try harness.postReceiveBuffers(2)
        try harness.activate()
        #expect(harness.backend.offloadsSet.count == 1, "the TAP is told the offloads at once")
        harness.backend.send(Frames.header() + Frames.ethernet(length: 60))
        usleep(100_000)
        #expect(harness.queues[0].savedIndices == VirtqueueIndices(nextAvailable: 0, nextUsed: 0))
        harness.device.resume()
        #expect(try harness.nextReceivedFrame()?.frame == Frames.ethernet(length: 60))
    }

    @Test("The saved state is the MAC, the link status and the queue size; another interface's is refused")
    func savedState() throws {
        let harness = try NetHarness()
        let saved = harness.device.saveDeviceState()
        let data = try JSONEncoder().encode(saved)
        let decoded = try JSONDecoder().decode(VirtioDeviceState.self, from: data)
        #expect(decoded == saved)
        guard case let .network(state) = saved else { Issue.record("not a network state"); return }
        #expect(state.mac == "02:00:00:00:00:01" && state.status == 1 && state.queueSize == 256)
        try harness.device.restoreDeviceState(saved)
        var otherMAC = state; otherMAC.mac = "02:00:00:00:00:09"
        var down = state; down.status = 0
        var queue = state; queue.queueSize = 128
        for wrong in [VirtioDeviceState.network(state: otherMAC), .network(state: down), .network(state: queue), .stateless] {
            #expect(throws: VirtioError.self) { try harness.device.restoreDeviceState(wrong) }
        }
    }
}

@Suite("Virtqueue: chains put back")
struct VirtqueuePutBackTests {
    @Test("Chains put back are taken again in order; more than are out is refused")
    func putBack() throws {
        var driver = TestDriver(memory: try makeMemory(), size: 8)
        let queue = try driver.queue()
        var heads: [UInt16] = []
        for index in 0..<3 { heads.append(try driver.add([(0x8000 + UInt64(index) * 0x100, 64, true)])) }
        let taken = try (0..<3).map { _ in try #require(try queue.popAvailable()).head }
        #expect(taken == heads)
        try queue.pushUsed(taken[0], writtenLength: 0)
        #expect(throws: VirtioError.self) { try queue.putBack(3) }
        try queue.putBack(2)
        #expect(queue.savedIndices == VirtqueueIndices(nextAvailable: 1, nextUsed: 1))
        #expect(try queue.popAvailable()?.head == heads[1])
        #expect(try queue.popAvailable()?.head == heads[2])
        #expect(try queue.popAvailable() == nil)
    }

    @Test("A queue made at saved indices continues there; indices that disagree with the ring are refused")
    func resumingAt() throws {
        var driver = TestDriver(memory: try makeMemory(), size: 8)
        let queue = try driver.queue()
        for index in 0..<4 { _ = try driver.add([(0x8000 + UInt64(index) * 0x100, 64, true)]) }
        for _ in 0..<2 { try queue.pushUsed(try #require(try queue.popAvailable()).head, writtenLength: 1) }
        let saved = queue.savedIndices
        let again = try Virtqueue(memory: driver.memory, configuration: driver.configuration, maximumSize: 256, eventIndex: false,
                                  resumingAt: saved)
        let next = try #require(try again.popAvailable())
        #expect(next.writable.first?.address == 0x8200)
        for wrong in [VirtqueueIndices(nextAvailable: 2, nextUsed: 1), VirtqueueIndices(nextAvailable: 20, nextUsed: 2)] {
            #expect(throws: VirtioError.self) {
                try Virtqueue(memory: driver.memory, configuration: driver.configuration, maximumSize: 256, eventIndex: false, resumingAt: wrong)
            }
        }
    }
}
