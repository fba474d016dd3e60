import DiskImage
import EventLoop
import Foundation
import Memory
import Synchronization
import Testing
import Virtio

/// Records what the device tells the driver: interrupts per queue and reset requests.
final class RecordingInterrupt: VirtioInterrupt {
    private let state = Mutex<(queues: [Int: Int], configuration: Int, resets: [String])>(([:], 0, []))

    func signalQueue(_ index: Int) { state.withLock { $0.queues[index, default: 0] += 1 } }
    func signalConfigurationChange() { state.withLock { $0.configuration += 1 } }
    func needsReset(_ message: String) { state.withLock { $0.resets.append(message) } }

    func interrupts(queue: Int) -> Int { state.withLock { $0.queues[queue, default: 0] } }
    var resets: [String] { state.withLock { $0.resets } }
}

/// Lines appended from several threads, in order.
final class EventLog: Sendable {
    private let lines = Mutex<[String]>([])
    func append(_ line: String) { lines.withLock { $0.append(line) } }
    var all: [String] { lines.withLock { $0 } }
}

/// One request as the test driver laid it out in guest memory.
struct SubmittedRequest {
    let queue: Int
    let head: UInt16
    /// Where the device-writable data starts (IN, GET_ID), and how long it is.
    let dataAddress: GuestAddress
    let dataLength: UInt32
    /// The status byte, preset to 0xFF so an untouched one shows.
    let statusAddress: GuestAddress?
}

/// Plays a virtio-blk driver against a `VirtioBlock` in this process: lays out queues (with
/// `TestDriver`), builds requests in guest memory, notifies through the queue's EventFD as
/// KVM's ioeventfd would, and reads the answers.
final class BlockHarness {
    static let memorySize: UInt64 = 64 << 20
    let memory: GuestMemory
    let device: VirtioBlock
    let interrupt = RecordingInterrupt()
    var drivers: [TestDriver]
    var queues: [Virtqueue]
    let notifiers: [EventFD]
    let features: UInt64
    /// Next free guest address for request buffers (a bump allocator).
    private var nextFree: GuestAddress = 0x100000

    /// - Parameters:
    ///   - features: what the driver accepts; by default everything offered.
    ///   - activate: set DRIVER_OK at once.
    init(disk: any BlockDevice, options: VirtioBlockOptions = VirtioBlockOptions(), queueSize: UInt16 = 128,
         features: UInt64? = nil, activate: Bool = true) throws {
        memory = try GuestMemory(size: Self.memorySize, transparentHugePages: false)
        device = try VirtioBlock(disk: disk, options: options)
        self.features = features ?? device.offeredFeatures
        let eventIndex = self.features & VirtioFeature.ringEventIndex != 0
        var drivers: [TestDriver] = []
        var queues: [Virtqueue] = []
        var notifiers: [EventFD] = []
        for index in 0..<options.queueCount {
            let driver = TestDriver(memory: memory, size: queueSize, base: 0x10000 + 0x8000 * UInt64(index))
            queues.append(try driver.queue(maximum: device.queueMaximumSizes[index], eventIndex: eventIndex))
            drivers.append(driver)
            notifiers.append(try EventFD())
        }
        self.drivers = drivers
        self.queues = queues
        self.notifiers = notifiers
        if activate { try self.activate() }
    }

    deinit { device.reset() }

    var activation: VirtioActivation {
        let interrupt = self.interrupt
        return VirtioActivation(memory: memory, features: features, queues: queues, notifications: notifiers,
                                interrupt: interrupt, needsReset: { interrupt.needsReset($0) })
    }

    func activate() throws { try device.activate(activation) }

    /// What a driver does after a reset: resets the device, clears its rings, and sets up
    /// the same queues again from index 0, then DRIVER_OK.
    func reinitialize() throws {
        device.reset()
        for index in drivers.indices {
            let old = drivers[index].configuration
            try memory.zero(at: old.descriptorTable, count: old.deviceArea + 6 + 8 * UInt64(old.size) - old.descriptorTable)
            drivers[index] = TestDriver(memory: memory, size: old.size, base: old.descriptorTable)
            queues[index] = try drivers[index].queue(maximum: device.queueMaximumSizes[index],
                                                     eventIndex: features & VirtioFeature.ringEventIndex != 0)
        }
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

    static func header(type: UInt32, sector: UInt64) -> [UInt8] {
        var bytes = [UInt8](repeating: 0, count: 16)
        bytes.withUnsafeMutableBytes {
            $0.storeBytes(of: type.littleEndian, toByteOffset: 0, as: UInt32.self)
            $0.storeBytes(of: sector.littleEndian, toByteOffset: 8, as: UInt64.self)
        }
        return bytes
    }

    /// One discard / write-zeroes segment.
    static func range(sector: UInt64, sectors: UInt32, flags: UInt32 = 0) -> [UInt8] {
        var bytes = [UInt8](repeating: 0, count: 16)
        bytes.withUnsafeMutableBytes {
            $0.storeBytes(of: sector.littleEndian, toByteOffset: 0, as: UInt64.self)
            $0.storeBytes(of: sectors.littleEndian, toByteOffset: 8, as: UInt32.self)
            $0.storeBytes(of: flags.littleEndian, toByteOffset: 12, as: UInt32.self)
        }
        return bytes
    }

    /// Makes a chain of the given buffers available on `queue` and notifies the device.
    @discardableResult
    func submitChain(_ buffers: [(address: UInt64, length: UInt32, writable: Bool)], queue: Int = 0,
                     notify: Bool = true) throws -> UInt16 {
        let head = try drivers[queue].add(buffers)
        if notify { notifiers[queue].signal() }
        return head
    }

    /// Builds the usual layout: header (readable), `payload` (readable), `writableData`
    /// bytes (writable, preset to 0xEE), the status byte (writable, preset to 0xFF).
    @discardableResult
    func submit(type: UInt32, sector: UInt64 = 0, payload: [UInt8] = [], writableData: UInt32 = 0,
                queue: Int = 0, notify: Bool = true) throws -> SubmittedRequest {
        let header = try allocate(16)
        try memory.write(Self.header(type: type, sector: sector), at: header)
        var buffers: [(address: UInt64, length: UInt32, writable: Bool)] = [(header, 16, false)]
        if !payload.isEmpty {
            let address = try allocate(payload.count)
            try memory.write(payload, at: address)
            buffers.append((address, UInt32(payload.count), false))
        }
        let data = try allocate(Int(writableData), fill: 0xEE)
        if writableData > 0 { buffers.append((data, writableData, true)) }
        let status = try allocate(1, fill: 0xFF)
        buffers.append((status, 1, true))
        let head = try submitChain(buffers, queue: queue, notify: notify)
        return SubmittedRequest(queue: queue, head: head, dataAddress: data, dataLength: writableData, statusAddress: status)
    }

    func read(sector: UInt64, count: UInt32, queue: Int = 0) throws -> SubmittedRequest {
        try submit(type: VirtioBlockRequestType.read, sector: sector, writableData: count, queue: queue)
    }

    func write(sector: UInt64, _ data: [UInt8], queue: Int = 0) throws -> SubmittedRequest {
        try submit(type: VirtioBlockRequestType.write, sector: sector, payload: data, queue: queue)
    }

    /// Waits (up to 10 s) until the used index of `queue` reaches `count` (tests stay far
    /// below 65536 entries, so the index does not wrap).
    func waitForUsed(_ count: UInt16, queue: Int = 0) throws -> Bool {
        let deadline = Date().addingTimeInterval(10)
        while Date() < deadline {
            if try drivers[queue].usedIndex >= count { return true }
            usleep(200)
        }
        return false
    }

    /// Waits for `count` used entries on queue 0 and returns each status, in submission order.
    func complete(_ requests: [SubmittedRequest], queue: Int = 0) throws -> [UInt8] {
        let done = try waitForUsed(drivers[queue].usedSeen &+ UInt16(requests.count), queue: queue)
        #expect(done, "the device did not complete \(requests.count) requests within 10 s")
        drivers[queue].usedSeen &+= UInt16(requests.count)
        return try requests.map { try status(of: $0) }
    }

    /// Submits nothing more; waits for one request and returns its status.
    func complete(_ request: SubmittedRequest) throws -> UInt8 {
        try complete([request], queue: request.queue)[0]
    }

    func status(of request: SubmittedRequest) throws -> UInt8 {
        guard let address = request.statusAddress else { return 0xFF }
        return try memory.load(UInt8.self, at: address)
    }

    func data(of request: SubmittedRequest) throws -> [UInt8] {
        try memory.read(at: request.dataAddress, count: Int(request.dataLength))
    }

    /// The used-ring entries of `queue` so far: (head, written length).
    func usedEntries(queue: Int = 0) throws -> [(UInt32, UInt32)] {
        let count = try drivers[queue].usedIndex
        return try (0..<count).map { try drivers[queue].usedEntry($0) }
    }
}

/// Forwards to a real disk image and watches how the device uses it: flushes, reads in
/// flight at once, and an optional gate that holds reads until the test opens it.
final class ObservedDisk: BlockDevice {
    let inner: any BlockDevice
    private let state = Mutex<(flushes: Int, reading: Int, mostReading: Int, gateOpen: Bool, readsStarted: Int)>((0, 0, 0, true, 0))

    init(_ inner: any BlockDevice, gateOpen: Bool = true) {
        self.inner = inner
        state.withLock { $0.gateOpen = gateOpen }
    }

    var flushes: Int { state.withLock { $0.flushes } }
    /// The most reads that were in the disk at the same moment.
    var mostConcurrentReads: Int { state.withLock { $0.mostReading } }
    var readsStarted: Int { state.withLock { $0.readsStarted } }
    func openGate() { state.withLock { $0.gateOpen = true } }

    /// Waits (up to 10 s) until `count` reads have started.
    func waitForReads(_ count: Int) -> Bool {
        let deadline = Date().addingTimeInterval(10)
        while Date() < deadline {
            if readsStarted >= count { return true }
            usleep(200)
        }
        return false
    }

    var virtualSize: UInt64 { inner.virtualSize }
    var isReadOnly: Bool { inner.isReadOnly }
    var canDeallocate: Bool { inner.canDeallocate }
    var discardGranularity: UInt64 { inner.discardGranularity }

    func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws {
        state.withLock {
            $0.reading += 1
            $0.readsStarted += 1
            $0.mostReading = max($0.mostReading, $0.reading)
        }
        defer { state.withLock { $0.reading -= 1 } }
        // The gate: a closed one holds the read (never longer than 10 s, so no test hangs).
        let deadline = Date().addingTimeInterval(10)
        while !state.withLock({ $0.gateOpen }) && Date() < deadline { usleep(200) }
        try inner.read(into: buffer, at: offset)
    }

    func write(_ buffer: UnsafeRawBufferPointer, at offset: UInt64) throws { try inner.write(buffer, at: offset) }
    func flush() throws {
        state.withLock { $0.flushes += 1 }
        try inner.flush()
    }
    func isKnownZero(at offset: UInt64, length: UInt64) throws -> Bool { try inner.isKnownZero(at: offset, length: length) }
    func discard(at offset: UInt64, length: UInt64) throws { try inner.discard(at: offset, length: length) }
    func writeZeroes(at offset: UInt64, length: UInt64, deallocate: Bool) throws {
        try inner.writeZeroes(at: offset, length: length, deallocate: deallocate)
    }
}

/// Temporary image files and the real `qemu-img`.
final class ImageFolder {
    let path: String

    init() throws {
        var template = Array((NSTemporaryDirectory() + "/swiftlet-blk-XXXXXX").utf8CString)
        guard let made = template.withUnsafeMutableBufferPointer({ mkdtemp($0.baseAddress!) }) else {
            throw VirtioError("mkdtemp failed")
        }
        path = String(cString: made)
    }

    deinit { try? FileManager.default.removeItem(atPath: path) }

    func file(_ name: String) -> String { path + "/" + name }

    /// A raw image of `size` bytes holding `pattern(size)`.
    func raw(_ name: String, size: Int, seed: UInt8 = 1) throws -> String {
        let path = file(name)
        try Data(Self.pattern(size, seed: seed)).write(to: URL(fileURLWithPath: path))
        return path
    }

    /// Deterministic, non-zero bytes: every sector differs.
    static func pattern(_ count: Int, seed: UInt8 = 1) -> [UInt8] {
        [UInt8](unsafeUninitializedCapacity: count) { buffer, initialized in
            for index in 0..<count {
                buffer[index] = UInt8(truncatingIfNeeded: (index &* 7 &+ (index >> 9) &* 13) ^ Int(seed)) | 1
            }
            initialized = count
        }
    }

    static func contents(_ path: String) throws -> [UInt8] {
        [UInt8](try Data(contentsOf: URL(fileURLWithPath: path)))
    }

    static func write(_ bytes: [UInt8], to path: String) throws {
        try Data(bytes).write(to: URL(fileURLWithPath: path))
    }

    /// Bytes the file occupies on disk (st_blocks * 512).
    static func allocatedBytes(_ path: String) -> UInt64 {
        var st = stat()
        guard stat(path, &st) == 0 else { return 0 }
        return UInt64(st.st_blocks) * 512
    }

    struct Run {
        var status: Int32
        var output: String
    }

    /// Runs `qemu-img` with `arguments`; its stdout and stderr together.
    @discardableResult
    static func qemuImg(_ arguments: String...) throws -> Run {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: "/usr/bin/qemu-img")
        process.arguments = arguments
        let pipe = Pipe()
        process.standardOutput = pipe
        process.standardError = pipe
        try process.run()
        let output = pipe.fileHandleForReading.readDataToEndOfFile()
        process.waitUntilExit()
        return Run(status: process.terminationStatus, output: String(decoding: output, as: UTF8.self))
    }

    static var hasQemuImg: Bool { FileManager.default.isExecutableFile(atPath: "/usr/bin/qemu-img") }
}
