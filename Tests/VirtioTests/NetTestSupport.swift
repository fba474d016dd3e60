import EventLoop
import Foundation
import Memory
import Synchronization
import Testing
import Virtio

/// A TAP stand-in: a `socketpair(AF_UNIX, SOCK_SEQPACKET)`, which, like a TAP, moves one
/// whole frame per read or write. The device gets one end (non-blocking); the test plays
/// the host's network stack on the other.
final class SocketPairBackend: NetBackend {
    let descriptor: Int32
    /// The host's end.
    let peer: Int32
    let name = "socketpair"
    let supportedOffloads: TapOffloads
    private let offloadCalls = Mutex<[TapOffloads]>([])

    init(supportedOffloads: TapOffloads = .all, sendBuffer: Int32? = nil) throws {
        var fds: [Int32] = [0, 0]
        guard socketpair(AF_UNIX, Int32(SOCK_SEQPACKET.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0, &fds) == 0 else {
            throw VirtioError("socketpair failed: errno \(errno)")
        }
        descriptor = fds[0]
        peer = fds[1]
        self.supportedOffloads = supportedOffloads
        _ = fcntl(descriptor, F_SETFL, fcntl(descriptor, F_GETFL) | O_NONBLOCK)
        _ = fcntl(peer, F_SETFL, fcntl(peer, F_GETFL) | O_NONBLOCK)
        if var size = sendBuffer {
            _ = setsockopt(descriptor, SOL_SOCKET, SO_SNDBUF, &size, socklen_t(MemoryLayout<Int32>.size))
        }
    }

    deinit {
        close(descriptor)
        closePeer()
    }

    private let peerOpen = Mutex(true)

    /// Closes the host's end (the device then sees a hang-up).
    func closePeer() {
        let open = peerOpen.withLock { open in
            defer { open = false }
            return open
        }
        if open { close(peer) }
    }

    func setOffloads(_ offloads: TapOffloads) throws(SystemError) {
        offloadCalls.withLock { $0.append(offloads) }
    }

    /// The offloads the device set, in order.
    var offloadsSet: [TapOffloads] { offloadCalls.withLock { $0 } }

    /// The host sends `bytes` (header and frame) to the guest. False when the socket is full.
    @discardableResult
    func send(_ bytes: [UInt8]) -> Bool {
        bytes.withUnsafeBytes { Glibc.send(peer, $0.baseAddress, $0.count, Int32(MSG_DONTWAIT)) } == bytes.count
    }

    /// The next frame the guest sent (header included), waiting up to `seconds`.
    func receive(within seconds: Double = 10) -> [UInt8]? {
        var fds = [pollfd(fd: peer, events: Int16(POLLIN), revents: 0)]
        guard poll(&fds, 1, Int32(seconds * 1000)) == 1 else { return nil }
        var buffer = [UInt8](repeating: 0, count: 70_000)
        let count = buffer.withUnsafeMutableBytes { recv(peer, $0.baseAddress, $0.count, Int32(MSG_DONTWAIT)) }
        guard count >= 0 else { return nil }
        return Array(buffer[0..<count])
    }
}

/// Ethernet frames and virtio-net headers for the tests.
enum Frames {
    static let guestMAC: [UInt8] = [0x02, 0x00, 0x00, 0x00, 0x00, 0x01]
    static let hostMAC: [UInt8] = [0x02, 0x00, 0x00, 0x00, 0x00, 0x02]

    /// An Ethernet frame of `length` bytes (IPv4 ethertype), its payload a pattern seeded by `seed`.
    static func ethernet(length: Int, seed: UInt8 = 0, from source: [UInt8] = guestMAC, to destination: [UInt8] = hostMAC) -> [UInt8] {
        precondition(length >= 14)
        var frame = destination + source + [0x08, 0x00]
        frame += (0..<(length - 14)).map { UInt8(truncatingIfNeeded: $0 &* 31 &+ Int(seed)) }
        return frame
    }

    /// A 12-byte virtio-net header.
    static func header(flags: UInt8 = 0, gsoType: UInt8 = 0, headerLength: UInt16 = 0, gsoSize: UInt16 = 0,
                       checksumStart: UInt16 = 0, checksumOffset: UInt16 = 0, buffers: UInt16 = 0) -> [UInt8] {
        var bytes = [flags, gsoType]
        for field in [headerLength, gsoSize, checksumStart, checksumOffset, buffers] {
            bytes += [UInt8(truncatingIfNeeded: field), UInt8(field >> 8)]
        }
        return bytes
    }
}

/// One frame the device put in the guest's receive chains.
struct ReceivedFrame {
    /// The used entries: (head, length).
    let entries: [(UInt32, UInt32)]
    /// Header and frame, reassembled from the chains.
    let bytes: [UInt8]
    var header: [UInt8] { Array(bytes[0..<12]) }
    var frame: [UInt8] { Array(bytes[12...]) }
    var numBuffers: UInt16 { UInt16(bytes[10]) | UInt16(bytes[11]) << 8 }
}

/// Plays a virtio-net driver against a `VirtioNet` in this process: queues laid out by
/// `TestDriver` in guest memory (RX = 0, TX = 1), notifications through the queues'
/// EventFDs as KVM's ioeventfd would signal them, and a socket pair for the TAP.
final class NetHarness {
    static let memorySize: UInt64 = 64 << 20
    let memory: GuestMemory
    /// The backend: a socket pair unless the test gave another (a real TAP).
    let netBackend: any NetBackend
    /// The socket pair, for the tests that use one.
    var backend: SocketPairBackend { netBackend as! SocketPairBackend }
    let device: VirtioNet
    let interrupt = RecordingInterrupt()
    var drivers: [TestDriver]
    var queues: [Virtqueue]
    let notifiers: [EventFD]
    let features: UInt64
    private var nextFree: GuestAddress = 0x100000
    /// Receive buffers posted, by head: where they are and how long.
    private var receiveBuffers: [UInt16: [(address: GuestAddress, length: UInt32)]] = [:]
    /// Receive used entries consumed so far.
    private var receiveSeen: UInt16 = 0

    /// - Parameters:
    ///   - features: what the driver accepts (masked to the offer); by default everything offered.
    init(backend: (any NetBackend)? = nil, features: UInt64? = nil, queueSize: UInt16 = 256, activate: Bool = true,
         options: VirtioNetOptions = VirtioNetOptions(mac: MACAddress(bytes: Frames.guestMAC)!, index: 7)) throws {
        memory = try GuestMemory(size: Self.memorySize, transparentHugePages: false)
        netBackend = try backend ?? SocketPairBackend()
        device = try VirtioNet(backend: netBackend, options: options)
        self.features = (features ?? device.offeredFeatures) & device.offeredFeatures | VirtioFeature.version1
        let eventIndex = self.features & VirtioFeature.ringEventIndex != 0
        drivers = [TestDriver(memory: memory, size: queueSize, base: 0x10000),
                   TestDriver(memory: memory, size: queueSize, base: 0x20000)]
        queues = try drivers.map { try $0.queue(maximum: 256, eventIndex: eventIndex) }
        notifiers = [try EventFD(), try EventFD()]
        if activate { try self.activate() }
    }

    deinit { device.reset() }

    var activation: VirtioActivation {
        let interrupt = self.interrupt
        return VirtioActivation(memory: memory, features: features, queues: queues, notifications: notifiers,
                                interrupt: interrupt, needsReset: { interrupt.needsReset($0) })
    }

    func activate() throws { try device.activate(activation) }

    /// What a driver does after a reset: resets the device, clears its rings, sets up the
    /// queues again from index 0, then DRIVER_OK.
    func reinitialize() throws {
        device.reset()
        for index in drivers.indices {
            let old = drivers[index].configuration
            try memory.zero(at: old.descriptorTable, count: old.deviceArea + 6 + 8 * UInt64(old.size) - old.descriptorTable)
            drivers[index] = TestDriver(memory: memory, size: old.size, base: old.descriptorTable)
            queues[index] = try drivers[index].queue(maximum: 256, eventIndex: features & VirtioFeature.ringEventIndex != 0)
        }
        receiveBuffers = [:]
        receiveSeen = 0
        try activate()
    }

    /// Reserves `length` bytes of guest memory, 16-byte aligned, filled with `fill`.
    func allocate(_ length: Int, fill: UInt8 = 0) throws -> GuestAddress {
        let address = nextFree
        nextFree = (nextFree + UInt64(max(length, 1)) + 15) & ~15
        precondition(nextFree < Self.memorySize, "the test used more guest memory than it has")
        try memory.write([UInt8](repeating: fill, count: length), at: address)
        return address
    }

    // MARK: Transmit

    /// Makes `bytes` (header and frame) available on the TX queue, cut into descriptors of
    /// the given sizes (one descriptor by default), and notifies.
    @discardableResult
    func transmit(_ bytes: [UInt8], pieces: [Int]? = nil, notify: Bool = true) throws -> UInt16 {
        let sizes = pieces ?? [bytes.count]
        precondition(sizes.reduce(0, +) == bytes.count)
        var buffers: [(address: UInt64, length: UInt32, writable: Bool)] = []
        var offset = 0
        for size in sizes {
            let address = try allocate(size)
            try memory.write(bytes[offset..<(offset + size)], at: address)
            buffers.append((address, UInt32(size), false))
            offset += size
        }
        let head = try drivers[1].add(buffers)
        if notify { notifiers[1].signal() }
        return head
    }

    /// Sends a frame with a plain header.
    @discardableResult
    func transmitFrame(_ frame: [UInt8], header: [UInt8] = Frames.header()) throws -> UInt16 {
        try transmit(header + frame)
    }

    // MARK: Receive

    /// Posts `count` receive chains of one writable buffer of `size` bytes each (filled with
    /// 0xEE) and notifies.
    func postReceiveBuffers(_ count: Int, size: Int = 1526, notify: Bool = true) throws {
        for _ in 0..<count {
            let address = try allocate(size, fill: 0xEE)
            let head = try drivers[0].add([(address, UInt32(size), true)])
            receiveBuffers[head] = [(address, UInt32(size))]
        }
        if notify { notifiers[0].signal() }
    }

    /// Posts one receive chain made of the given buffers (readable or writable) and
    /// notifies; returns its head.
    @discardableResult
    func postReceiveChain(_ buffers: [(address: UInt64, length: UInt32, writable: Bool)], notify: Bool = true) throws -> UInt16 {
        let head = try drivers[0].add(buffers)
        receiveBuffers[head] = buffers.filter(\.writable).map { ($0.address, $0.length) }
        if notify { notifiers[0].signal() }
        return head
    }

    /// Waits (up to 10 s) until the used index of `queue` reaches `count`.
    func waitForUsed(_ count: UInt16, queue: Int) throws -> Bool {
        let deadline = Date().addingTimeInterval(10)
        while Date() < deadline {
            if try drivers[queue].usedIndex >= count { return true }
            usleep(200)
        }
        return false
    }

    /// Waits for `condition` (up to `seconds`).
    func wait(seconds: Double = 10, _ condition: () throws -> Bool) rethrows -> Bool {
        let deadline = Date().addingTimeInterval(seconds)
        while Date() < deadline {
            if try condition() { return true }
            usleep(200)
        }
        return try condition()
    }

    /// The next frame in the RX used ring, waiting up to 10 s: its entries (num_buffers of
    /// them) and the bytes reassembled from its chains.
    func nextReceivedFrame() throws -> ReceivedFrame? {
        guard try waitForUsed(receiveSeen &+ 1, queue: 0) else { return nil }
        let first = try drivers[0].usedEntry(receiveSeen)
        let firstBytes = try bytes(ofChain: UInt16(first.0), length: first.1)
        guard firstBytes.count >= 12 else { return nil }
        let count = UInt16(firstBytes[10]) | UInt16(firstBytes[11]) << 8
        guard count >= 1, try drivers[0].usedIndex &- receiveSeen >= count else { return nil }
        var entries = [first]
        var bytes = firstBytes
        for index in 1..<Int(count) {
            let entry = try drivers[0].usedEntry(receiveSeen &+ UInt16(index))
            entries.append(entry)
            bytes += try self.bytes(ofChain: UInt16(entry.0), length: entry.1)
        }
        receiveSeen &+= count
        return ReceivedFrame(entries: entries, bytes: bytes)
    }

    /// Used entries of the RX queue not consumed yet.
    var unseenReceiveEntries: UInt16 { get throws { try drivers[0].usedIndex &- receiveSeen } }

    private func bytes(ofChain head: UInt16, length: UInt32) throws -> [UInt8] {
        var remaining = Int(length)
        var bytes: [UInt8] = []
        for buffer in receiveBuffers[head] ?? [] where remaining > 0 {
            let take = min(remaining, Int(buffer.length))
            bytes += try memory.read(at: buffer.address, count: take)
            remaining -= take
        }
        return bytes
    }

    var statistics: VirtioNetStatistics { device.statistics }

    /// Waits (up to 10 s) for the device to ask for a reset.
    func waitForNeedsReset() -> Bool {
        wait { !interrupt.resets.isEmpty }
    }
}
