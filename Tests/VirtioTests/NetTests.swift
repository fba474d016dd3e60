import EventLoop
import Foundation
import Memory
import Testing
@testable import Virtio

/// The features of a driver that takes no offload and no mergeable buffers.
private let plainFeatures = VirtioFeature.version1 | VirtioFeature.ringEventIndex | VirtioNetFeature.mac | VirtioNetFeature.status

@Suite("virtio-net: configuration, features, and frames both ways over a TAP stand-in")
struct NetTests {
    @Test("The configuration space holds the MAC, link up and one queue pair; the rest reads 0")
    func configurationSpace() throws {
        let harness = try NetHarness(activate: false)
        let device = harness.device
        #expect(device.deviceType == .network)
        #expect(device.queueMaximumSizes == [256, 256])
        var bytes = [UInt8](repeating: 0xAA, count: 32)
        bytes.withUnsafeMutableBytes { device.readConfiguration(offset: 0, into: $0) }
        #expect(Array(bytes[0..<6]) == Frames.guestMAC)
        #expect(bytes[6] == 1 && bytes[7] == 0, "status: VIRTIO_NET_S_LINK_UP")
        #expect(bytes[8] == 1 && bytes[9] == 0, "max_virtqueue_pairs")
        #expect(bytes[10...].allSatisfy { $0 == 0 })
        var far = [UInt8](repeating: 0xAA, count: 4)
        far.withUnsafeMutableBytes { device.readConfiguration(offset: UInt64.max - 1, into: $0) }
        #expect(far == [0, 0, 0, 0])
    }

    /// Each offload set a TAP may accept, and the features it lets the device offer.
    static let offloadOffers: [(TapOffloads, UInt64)] = {
        let csum: UInt64 = VirtioNetFeature.checksum | VirtioNetFeature.guestChecksum
        let tso: UInt64 = VirtioNetFeature.hostTSO4 | VirtioNetFeature.guestTSO4 | VirtioNetFeature.hostTSO6 | VirtioNetFeature.guestTSO6
        let ecn: UInt64 = VirtioNetFeature.hostECN | VirtioNetFeature.guestECN
        let ufo: UInt64 = VirtioNetFeature.hostUFO | VirtioNetFeature.guestUFO
        let uso: UInt64 = VirtioNetFeature.hostUSO | VirtioNetFeature.guestUSO4 | VirtioNetFeature.guestUSO6
        let all: UInt64 = csum | tso | ecn | ufo | uso
        return [(TapOffloads.all, all), ([.checksum, .tso4, .tso6], csum | tso), (.checksum, csum), ([], 0)]
    }()

    @Test("Only the offloads the TAP accepts are offered", arguments: 0..<4)
    func offeredOffloads(index: Int) throws {
        let (offloads, expected) = Self.offloadOffers[index]
        let harness = try NetHarness(backend: try SocketPairBackend(supportedOffloads: offloads), activate: false)
        let always = VirtioFeature.version1 | VirtioFeature.ringIndirectDescriptors | VirtioFeature.ringEventIndex
            | VirtioNetFeature.mac | VirtioNetFeature.status | VirtioNetFeature.mergeableReceiveBuffers
        #expect(harness.device.offeredFeatures == always | expected)
    }

    @Test("At DRIVER_OK the TAP is told the guest offloads the driver accepted, and no others", arguments: [
        (UInt64.max, TapOffloads.all),
        (VirtioNetFeature.guestChecksum | VirtioNetFeature.guestTSO4 | VirtioNetFeature.guestUSO4, TapOffloads([.checksum, .tso4])),
        (VirtioNetFeature.guestTSO4 | VirtioNetFeature.guestTSO6, TapOffloads()),
        (VirtioNetFeature.guestChecksum | VirtioNetFeature.guestECN, TapOffloads.checksum),
        (VirtioNetFeature.checksum | VirtioNetFeature.hostTSO4, TapOffloads()),
    ])
    func negotiatedOffloads(features: UInt64, expected: TapOffloads) throws {
        let harness = try NetHarness(features: features)
        #expect(harness.backend.offloadsSet == [expected])
    }

    @Test("A transmitted frame reaches the TAP byte for byte, header first; the chain comes back with length 0")
    func transmit() throws {
        let harness = try NetHarness()
        let frame = Frames.ethernet(length: 1400, seed: 3)
        let header = Frames.header(flags: VirtioNetHeader.needsChecksum, checksumStart: 34, checksumOffset: 6)
        let head = try harness.transmitFrame(frame, header: header)
        #expect(harness.backend.receive() == header + frame)
        #expect(try harness.waitForUsed(1, queue: 1))
        #expect(try harness.drivers[1].usedEntry(0) == (UInt32(head), 0))
        #expect(harness.wait { harness.interrupt.interrupts(queue: 1) >= 1 })
        #expect(harness.statistics.transmittedFrames == 1)
        #expect(harness.statistics.transmittedBytes == 1400)
    }

    @Test("Any framing: a header split over descriptors, empty descriptors, a frame in many pieces")
    func transmitFraming() throws {
        let harness = try NetHarness()
        let frame = Frames.ethernet(length: 600, seed: 9)
        let bytes = Frames.header() + frame
        try harness.transmit(bytes, pieces: [5, 0, 7, 14, 1, 300, 0, 285])
        #expect(harness.backend.receive() == bytes)
        // The header and the frame's first bytes in one descriptor.
        try harness.transmit(bytes, pieces: [40, 572])
        #expect(harness.backend.receive() == bytes)
    }

    @Test("A frame in an indirect table of more pieces than one writev takes is gathered and sent whole")
    func transmitManyPieces() throws {
        let harness = try NetHarness()
        let frame = Frames.ethernet(length: 1500, seed: 5)
        let bytes = Frames.header() + frame
        // 1512 one-byte descriptors in an indirect table (more than UIO_MAXIOV = 1024).
        let data = try harness.allocate(bytes.count)
        try harness.memory.write(bytes, at: data)
        let table = try harness.allocate(16 * bytes.count)
        for index in 0..<bytes.count {
            let last = index == bytes.count - 1
            try harness.drivers[1].writeDescriptor(UInt16(index), address: data + UInt64(index), length: 1, flags: last ? 0 : 1,
                                                   next: UInt16(index + 1), table: table)
        }
        try harness.drivers[1].writeDescriptor(0, address: table, length: UInt32(16 * bytes.count), flags: 4)
        try harness.drivers[1].makeAvailable(0)
        harness.notifiers[1].signal()
        #expect(harness.backend.receive() == bytes)
        #expect(try harness.waitForUsed(1, queue: 1))
    }

    @Test("Many frames in a burst larger than the queue all arrive, in order")
    func transmitBurst() throws {
        let harness = try NetHarness(queueSize: 64)
        var sent = 0
        var received = 0
        while received < 1000 {
            // Keep at most the queue's worth in flight.
            while sent < 1000 && sent - received < 60 {
                try harness.transmitFrame(Frames.ethernet(length: 64 + sent % 1400, seed: UInt8(truncatingIfNeeded: sent)))
                sent += 1
            }
            guard let bytes = harness.backend.receive() else { break }
            #expect(bytes == Frames.header() + Frames.ethernet(length: 64 + received % 1400, seed: UInt8(truncatingIfNeeded: received)))
            received += 1
            harness.drivers[1].usedSeen &+= 1
        }
        #expect(received == 1000)
        #expect(try harness.waitForUsed(UInt16(1000), queue: 1))
        #expect(harness.statistics.transmittedFrames == 1000)
    }

    @Test("Without MRG_RXBUF a frame fills one chain: num_buffers is 1, the length covers header and frame")
    func receiveOneChain() throws {
        let harness = try NetHarness(features: plainFeatures)
        try harness.postReceiveBuffers(4)
        let frame = Frames.ethernet(length: 1514, seed: 1, from: Frames.hostMAC, to: Frames.guestMAC)
        #expect(harness.backend.send(Frames.header() + frame))
        let received = try #require(try harness.nextReceivedFrame())
        #expect(received.entries.count == 1)
        #expect(received.entries[0].1 == 1526)
        #expect(received.numBuffers == 1)
        #expect(received.frame == frame)
        #expect(harness.wait { harness.interrupt.interrupts(queue: 0) >= 1 })
        #expect(harness.statistics.receivedFrames == 1)
        #expect(harness.statistics.receivedBytes == 1514)
    }

    @Test("Without GUEST_CSUM the header's flags reach the guest as 0; with it, as the TAP wrote them")
    func receiveChecksumFlags() throws {
        for (features, expected) in [(plainFeatures, UInt8(0)), (plainFeatures | VirtioNetFeature.guestChecksum, VirtioNetHeader.dataValid)] {
            let harness = try NetHarness(features: features)
            try harness.postReceiveBuffers(1)
            #expect(harness.backend.send(Frames.header(flags: VirtioNetHeader.dataValid) + Frames.ethernet(length: 60)))
            let received = try #require(try harness.nextReceivedFrame())
            #expect(received.header[0] == expected)
        }
    }

    @Test("With MRG_RXBUF a frame spans chains: each but the last filled, num_buffers counts them")
    func receiveMergeable() throws {
        let harness = try NetHarness(features: plainFeatures | VirtioNetFeature.mergeableReceiveBuffers)
        try harness.postReceiveBuffers(12, size: 512)
        let frame = Frames.ethernet(length: 1400, seed: 2)
        #expect(harness.backend.send(Frames.header() + frame))
        let received = try #require(try harness.nextReceivedFrame())
        #expect(received.numBuffers == 3)
        #expect(received.entries.map(\.1) == [512, 512, 388])
        #expect(received.frame == frame)
        // The next frame starts in the next chain.
        let small = Frames.ethernet(length: 100, seed: 4)
        #expect(harness.backend.send(Frames.header() + small))
        let next = try #require(try harness.nextReceivedFrame())
        #expect(next.numBuffers == 1)
        #expect(next.frame == small)
    }

    @Test("With segmentation offloads a 64 KiB frame arrives whole across 65 chains of 1 KiB")
    func receiveLargeSegment() throws {
        let harness = try NetHarness()
        try harness.postReceiveBuffers(100, size: 1024)
        let frame = Frames.ethernet(length: VirtioNetLimits.segmentedFrame, seed: 6)
        let header = Frames.header(flags: VirtioNetHeader.needsChecksum, gsoType: VirtioNetHeader.gsoTCPv4, headerLength: 54,
                                   gsoSize: 1448, checksumStart: 34, checksumOffset: 16)
        #expect(harness.backend.send(header + frame))
        let received = try #require(try harness.nextReceivedFrame())
        #expect(received.numBuffers == 65)
        #expect(received.frame == frame)
        #expect(Array(received.header[0..<10]) == Array(header[0..<10]), "the TAP's header reaches the guest")
    }

    @Test("A frame is read only once buffers for the largest frame are there; then all wait in order, none lost")
    func receiveWaitsForBuffers() throws {
        let harness = try NetHarness(features: plainFeatures | VirtioNetFeature.mergeableReceiveBuffers)
        // 2 x 512 bytes cannot hold a 1518-byte frame and its header: nothing is read.
        try harness.postReceiveBuffers(2, size: 512)
        #expect(harness.backend.send(Frames.header() + Frames.ethernet(length: 100, seed: 1)))
        usleep(200_000)
        #expect(try harness.unseenReceiveEntries == 0)
        try harness.postReceiveBuffers(1, size: 512)
        let received = try #require(try harness.nextReceivedFrame())
        #expect(received.frame == Frames.ethernet(length: 100, seed: 1))
    }

    @Test("Out of receive buffers, the device stops reading the TAP (no busy loop) and resumes on the notification")
    func receiveBackPressure() throws {
        let harness = try NetHarness(features: plainFeatures)
        try harness.postReceiveBuffers(2)
        for index in 0..<5 {
            #expect(harness.backend.send(Frames.header() + Frames.ethernet(length: 200, seed: UInt8(index))))
        }
        #expect(try harness.nextReceivedFrame()?.frame == Frames.ethernet(length: 200, seed: 0))
        #expect(try harness.nextReceivedFrame()?.frame == Frames.ethernet(length: 200, seed: 1))
        #expect(harness.wait { harness.statistics.receivePauses == 1 })
        let wakeups = harness.statistics.backendWakeups
        usleep(300_000)
        #expect(harness.statistics.backendWakeups == wakeups, "the TAP is not watched while there are no buffers")
        #expect(try harness.unseenReceiveEntries == 0)
        try harness.postReceiveBuffers(3)
        for index in 2..<5 {
            #expect(try harness.nextReceivedFrame()?.frame == Frames.ethernet(length: 200, seed: UInt8(index)))
        }
        #expect(harness.statistics.receivedFrames == 5)
        #expect(harness.statistics.dropped == 0)
    }

    @Test("A guest that takes nothing leaves frames in the TAP: the host's writes stop at the kernel's bound, none is lost")
    func receiveBounded() throws {
        let harness = try NetHarness(features: plainFeatures)
        var accepted = 0
        while harness.backend.send(Frames.header() + Frames.ethernet(length: 1000, seed: UInt8(truncatingIfNeeded: accepted))) {
            accepted += 1
            guard accepted < 100_000 else { break }
        }
        #expect(accepted > 0 && accepted < 100_000, "the socket filled up: the device read nothing into host memory")
        var delivered = 0
        while delivered < accepted {
            try harness.postReceiveBuffers(min(200, accepted - delivered))
            for _ in 0..<min(200, accepted - delivered) {
                let received = try #require(try harness.nextReceivedFrame())
                #expect(received.frame == Frames.ethernet(length: 1000, seed: UInt8(truncatingIfNeeded: delivered)))
                delivered += 1
            }
        }
        #expect(harness.statistics.receivedFrames == UInt64(accepted))
    }

    @Test("A TAP that is full for now holds the transmit queue; nothing is dropped, order is kept")
    func transmitBackPressure() throws {
        let harness = try NetHarness(backend: try SocketPairBackend(sendBuffer: 4096), queueSize: 256)
        for index in 0..<200 { try harness.transmitFrame(Frames.ethernet(length: 1400, seed: UInt8(index))) }
        // Wait until the device blocked: it has written what fits and waits for room.
        #expect(harness.wait { harness.statistics.transmittedFrames > 0 })
        usleep(100_000)
        #expect(harness.statistics.transmittedFrames < 200, "the small socket buffer cannot take all 200 at once")
        for index in 0..<200 {
            #expect(harness.backend.receive() == Frames.header() + Frames.ethernet(length: 1400, seed: UInt8(index)), "frame \(index)")
        }
        #expect(try harness.waitForUsed(200, queue: 1))
        #expect(harness.statistics.transmittedFrames == 200)
        #expect(harness.statistics.dropped == 0)
    }

    @Test("After a reset the device starts again from the new rings")
    func resetAndAgain() throws {
        let harness = try NetHarness()
        try harness.transmitFrame(Frames.ethernet(length: 100))
        #expect(harness.backend.receive() != nil)
        try harness.reinitialize()
        // With every offload and MRG_RXBUF, room for a 64 KiB segment is needed first.
        try harness.postReceiveBuffers(1, size: 65562)
        #expect(harness.backend.send(Frames.header() + Frames.ethernet(length: 100, seed: 8)))
        #expect(try harness.nextReceivedFrame()?.frame == Frames.ethernet(length: 100, seed: 8))
        try harness.transmitFrame(Frames.ethernet(length: 100, seed: 9))
        #expect(harness.backend.receive() == Frames.header() + Frames.ethernet(length: 100, seed: 9))
        #expect(harness.backend.offloadsSet.count == 2, "each activation sets the offloads")
    }

    @Test("MAC addresses: parsing, printing, and random ones are unicast and locally administered")
    func macAddresses() throws {
        #expect(MACAddress("52:54:00:ab:CD:0f")?.description == "52:54:00:ab:cd:0f")
        for bad in ["", "52:54:00:ab:cd", "52:54:00:ab:cd:0f:00", "5:54:00:ab:cd:0f", "52-54-00-ab-cd-0f", "52:54:00:ab:cd:zz", "052:54:00:ab:cd:0"] {
            #expect(MACAddress(bad) == nil, "\(bad)")
        }
        for _ in 0..<1000 {
            let mac = MACAddress.randomLocallyAdministered()
            #expect(!mac.isMulticast && mac.isLocallyAdministered)
        }
        #expect(throws: VirtioError.self) {
            try VirtioNet(backend: try SocketPairBackend(), options: VirtioNetOptions(mac: MACAddress("01:00:5e:00:00:01")!))
        }
    }
}

@Suite("virtio-net behind the virtio-mmio transport")
struct NetTransportTests {
    @Test("A driver probes device ID 1, negotiates through the registers, and a frame goes out after a notify write")
    func throughRegisters() throws {
        let memory = try makeMemory()
        let backend = try SocketPairBackend(supportedOffloads: [.checksum, .tso4])
        let device = try VirtioNet(backend: backend, options: VirtioNetOptions(mac: MACAddress("52:54:00:00:00:07")!))
        defer { device.reset() }
        let transport = try VirtioMMIOTransport(device: device, memory: memory, base: 0xFEB0_0000,
                                                interruptEvent: try EventFD(), services: NoKVMServices())
        let driver = MMIODriver(transport: transport)
        #expect(driver.read(0x008) == 1, "device ID: network card")
        driver.write(0x014, 0)
        let low = UInt64(driver.read(0x010))
        #expect(low & VirtioNetFeature.mac != 0 && low & VirtioNetFeature.mergeableReceiveBuffers != 0)
        #expect(low & VirtioNetFeature.hostTSO4 != 0 && low & VirtioNetFeature.hostUFO == 0, "what the TAP accepts, no more")
        var mac = [UInt8](repeating: 0, count: 6)
        mac.withUnsafeMutableBytes { transport.read(offset: 0x100, into: $0) }
        #expect(mac == [0x52, 0x54, 0, 0, 0, 7])
        let wanted = VirtioFeature.version1 | VirtioFeature.ringEventIndex | VirtioNetFeature.mac | VirtioNetFeature.checksum
            | VirtioNetFeature.guestChecksum | VirtioNetFeature.mergeableReceiveBuffers
        #expect(driver.negotiate(wanted) & 8 == 8)
        var receive = TestDriver(memory: memory, size: 16, base: 0x10000)
        var transmit = TestDriver(memory: memory, size: 16, base: 0x20000)
        driver.setUpQueue(0, receive.configuration)
        driver.setUpQueue(1, transmit.configuration)
        driver.write(0x070, 1 | 2 | 8 | 4)
        #expect(driver.read(0x070) & 0x40 == 0, "running, no reset needed")
        #expect(backend.offloadsSet == [.checksum])
        // Transmit: one frame, notified through the register (no ioeventfd here).
        let frame = Frames.ethernet(length: 90)
        try memory.write(Frames.header() + frame, at: 0x100000)
        try transmit.add([(0x100000, UInt32(12 + frame.count), false)])
        driver.write(0x050, 1)
        #expect(backend.receive() == Frames.header() + frame)
        // Receive: 4 x 1 KiB buffers, then a frame from the TAP.
        for index in 0..<4 { try receive.add([(0x200000 + 0x400 * UInt64(index), 0x400, true)]) }
        driver.write(0x050, 0)
        #expect(backend.send(Frames.header() + frame))
        let deadline = Date().addingTimeInterval(10)
        while try receive.usedIndex == 0 && Date() < deadline { usleep(200) }
        #expect(try receive.usedEntry(0) == (0, UInt32(12 + frame.count)))
        #expect(try memory.read(at: 0x200000 + 12, count: frame.count) == frame)
        #expect(driver.read(0x060) & 1 == 1, "a used-buffer interrupt is pending")
        // A reset stops the device's thread; the driver can start again.
        driver.write(0x070, 0)
        #expect(driver.read(0x070) == 0)
    }
}
