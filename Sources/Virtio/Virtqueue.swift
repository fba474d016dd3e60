import Memory
import Synchronization

/// Where the driver put a split virtqueue, as it wrote it to the transport's registers.
public struct VirtqueueConfiguration: Sendable, Equatable {
    /// Number of entries: a power of two, at most the device's maximum.
    public var size: UInt16
    /// The descriptor table: `size` entries of 16 bytes, 16-byte aligned.
    public var descriptorTable: GuestAddress
    /// The driver area (available ring): flags, index, `size` heads, `used_event`; 2-byte aligned.
    public var driverArea: GuestAddress
    /// The device area (used ring): flags, index, `size` (id, length) pairs, `avail_event`;
    /// 4-byte aligned.
    public var deviceArea: GuestAddress

    public init(size: UInt16, descriptorTable: GuestAddress, driverArea: GuestAddress, deviceArea: GuestAddress) {
        self.size = size
        self.descriptorTable = descriptorTable
        self.driverArea = driverArea
        self.deviceArea = deviceArea
    }
}

/// A guest buffer named by one descriptor: checked to lie in guest RAM when the chain was
/// taken from the queue (the guest may still change its contents at any time).
public struct GuestBuffer: Sendable, Equatable {
    public let address: GuestAddress
    public let length: UInt32

    public init(address: GuestAddress, length: UInt32) {
        self.address = address
        self.length = length
    }
}

/// One request: the chain of descriptors starting at `head`, split into the buffers the
/// device reads (the driver's request) and the ones it writes (the answer). Indirect
/// tables are already followed.
public struct DescriptorChain: Sendable, Equatable {
    public let head: UInt16
    /// Device-readable buffers, in order.
    public let readable: [GuestBuffer]
    /// Device-writable buffers, in order.
    public let writable: [GuestBuffer]

    /// Total bytes the device may read.
    public var readableLength: UInt64 { readable.reduce(0) { $0 + UInt64($1.length) } }
    /// Total bytes the device may write.
    public var writableLength: UInt64 { writable.reduce(0) { $0 + UInt64($1.length) } }
}

/// A split virtqueue (virtio 1.2, 2.7), the device's side: it takes the chains the driver
/// makes available and returns them through the used ring.
///
/// Every value the guest controls is checked here, once, so device models never touch
/// ring memory themselves: the queue size (a power of two within the device's maximum),
/// the rings' alignment and placement in RAM (at creation), an available index that runs
/// more than `size` entries ahead, heads and `next` fields out of range, chains longer
/// than the queue (which also catches loops), indirect tables that are empty, unaligned,
/// outside RAM, longer than 2^16 entries or nested, device-readable descriptors after
/// device-writable ones, buffers outside RAM, and lengths whose sum overflows. A broken
/// ring throws ``VirtioError``; the device then marks itself `DEVICE_NEEDS_RESET` and
/// stops using the queue.
///
/// Memory ordering follows 2.7.13: the available index is read with acquire before the
/// entries it covers, a used entry is written before the used index is published with
/// release, and a full fence separates publishing the used index from reading whether
/// the driver wants an interrupt (`used_event` or `VIRTQ_AVAIL_F_NO_INTERRUPT`).
///
/// It is safe to use from several threads (a worker completing requests while another
/// takes new ones): its state is behind a lock.
public final class Virtqueue: Sendable {
    static let descriptorSize: UInt64 = 16
    static let flagNext: UInt16 = 1
    static let flagWrite: UInt16 = 2
    static let flagIndirect: UInt16 = 4
    static let availNoInterrupt: UInt16 = 1
    static let usedNoNotify: UInt16 = 1
    /// The largest queue virtio allows (2.7: Queue Size up to 32768).
    public static let largestSize: UInt16 = 32768

    public let configuration: VirtqueueConfiguration
    public let eventIndex: Bool
    private let memory: GuestMemory

    private struct State {
        /// The next available-ring entry to take.
        var nextAvailable: UInt16 = 0
        /// The used index the device will publish next.
        var nextUsed: UInt16 = 0
        /// The used index when the device last decided whether to interrupt the driver.
        var usedAtLastSignal: UInt16 = 0
        /// Set once the guest broke the ring; every later call fails the same way.
        var broken: VirtioError?
    }

    private let state = Mutex(State())

    var size: UInt16 { configuration.size }
    private var availableIndexAddress: GuestAddress { configuration.driverArea + 2 }
    private var usedEventAddress: GuestAddress { configuration.driverArea + 4 + 2 * UInt64(size) }
    private var usedIndexAddress: GuestAddress { configuration.deviceArea + 2 }
    private var availableEventAddress: GuestAddress { configuration.deviceArea + 4 + 8 * UInt64(size) }

    /// Checks what the driver configured and makes the queue. Called when the driver
    /// enables the queue (or at DRIVER_OK).
    /// - Parameters:
    ///   - maximumSize: the device's limit for this queue.
    ///   - eventIndex: `VIRTIO_F_RING_EVENT_IDX` was negotiated.
    public init(memory: GuestMemory, configuration: VirtqueueConfiguration, maximumSize: UInt16,
                eventIndex: Bool) throws(VirtioError) {
        let size = configuration.size
        guard size > 0, size & (size - 1) == 0 else { throw VirtioError("queue size \(size) is not a power of two") }
        guard size <= maximumSize, size <= Self.largestSize else {
            throw VirtioError("queue size \(size) is larger than the device's maximum of \(min(maximumSize, Self.largestSize))")
        }
        let entries = UInt64(size)
        let areas: [(String, GuestAddress, UInt64, UInt64)] = [
            ("descriptor table", configuration.descriptorTable, Self.descriptorSize * entries, 16),
            ("driver area (available ring)", configuration.driverArea, 6 + 2 * entries, 2),
            ("device area (used ring)", configuration.deviceArea, 6 + 8 * entries, 4),
        ]
        for (name, address, length, alignment) in areas {
            guard address % alignment == 0 else {
                throw VirtioError("the \(name) at 0x\(String(address, radix: 16)) is not \(alignment)-byte aligned")
            }
            guard memory.contains(address, count: length) else {
                throw VirtioError("the \(name) at 0x\(String(address, radix: 16)) (\(length) bytes) is not in guest RAM")
            }
        }
        self.memory = memory
        self.configuration = configuration
        self.eventIndex = eventIndex
    }

    /// A state snapshot for saving the queue: where the device is in each ring.
    public var indices: (nextAvailable: UInt16, nextUsed: UInt16) {
        state.withLock { ($0.nextAvailable, $0.nextUsed) }
    }

    /// Takes the next chain the driver made available, or `nil` when there is none.
    public func popAvailable() throws(VirtioError) -> DescriptorChain? {
        try withState { (state) throws(VirtioError) -> DescriptorChain? in
            let availableIndex = try load { () throws(GuestMemoryError) in try memory.loadAcquire16(at: availableIndexAddress) }
            let pending = availableIndex &- state.nextAvailable
            guard pending <= size else {
                throw VirtioError("the available index jumped \(pending) entries ahead, more than the queue's \(size)")
            }
            guard pending > 0 else { return nil }
            let slot = configuration.driverArea + 4 + 2 * UInt64(state.nextAvailable % size)
            let head = try load { () throws(GuestMemoryError) in try memory.load(UInt16.self, at: slot) }
            guard head < size else { throw VirtioError("available head \(head) is outside the queue of \(size)") }
            let chain = try walk(head: head)
            state.nextAvailable &+= 1
            return chain
        }
    }

    /// Puts back the chain the last ``popAvailable()`` returned, so that the next call takes
    /// it again (read from the ring afresh): for a device that cannot serve it now, such as
    /// one whose rate limiter says wait. Only the thread that pops may call it, right after
    /// the pop, and never after the chain was returned to the driver.
    public func returnLastAvailable() {
        state.withLock { $0.nextAvailable &-= 1 }
    }

    /// Returns the chain `head` to the driver with `writtenLength` bytes written into its
    /// writable buffers.
    public func pushUsed(_ head: UInt16, writtenLength: UInt32) throws(VirtioError) {
        try withState { (state) throws(VirtioError) in
            let slot = configuration.deviceArea + 4 + 8 * UInt64(state.nextUsed % size)
            try store { () throws(GuestMemoryError) in
                try memory.store(UInt32(head), at: slot)
                try memory.store(writtenLength, at: slot + 4)
            }
            state.nextUsed &+= 1
            try store { () throws(GuestMemoryError) in try memory.storeRelease16(state.nextUsed, at: usedIndexAddress) }
        }
    }

    /// Returns several chains at once: every entry is written before the used index moves,
    /// once, past all of them, so the driver sees them together or not at all. (A
    /// virtio-net frame spread over several receive chains must not be seen in part: the
    /// driver reads `num_buffers` from the first and expects the others to be there.)
    public func pushUsed(_ entries: some Collection<(head: UInt16, writtenLength: UInt32)>) throws(VirtioError) {
        guard !entries.isEmpty else { return }
        try withState { (state) throws(VirtioError) in
            var next = state.nextUsed
            for entry in entries {
                let slot = configuration.deviceArea + 4 + 8 * UInt64(next % size)
                try store { () throws(GuestMemoryError) in
                    try memory.store(UInt32(entry.head), at: slot)
                    try memory.store(entry.writtenLength, at: slot + 4)
                }
                next &+= 1
            }
            state.nextUsed = next
            try store { () throws(GuestMemoryError) in try memory.storeRelease16(next, at: usedIndexAddress) }
        }
    }

    /// Whether the driver wants an interrupt for the used entries pushed since the last
    /// call: `used_event` with `VIRTIO_F_RING_EVENT_IDX` (2.7.10), else the available
    /// ring's `NO_INTERRUPT` flag.
    public func shouldNotifyDriver() throws(VirtioError) -> Bool {
        try withState { (state) throws(VirtioError) -> Bool in
            GuestMemory.fence()
            let new = state.nextUsed
            let old = state.usedAtLastSignal
            state.usedAtLastSignal = new
            if eventIndex {
                let event = try load { () throws(GuestMemoryError) in try memory.load(UInt16.self, at: usedEventAddress) }
                // vring_need_event: did `new` pass `event` since `old`?
                return new &- event &- 1 < new &- old
            }
            let flags = try load { () throws(GuestMemoryError) in try memory.load(UInt16.self, at: configuration.driverArea) }
            return flags & Self.availNoInterrupt == 0
        }
    }

    /// Asks the driver to notify the device of new buffers (`avail_event` or clearing the
    /// used ring's `NO_NOTIFY`), then checks the available ring again: returns `true` when
    /// buffers arrived meanwhile, which the caller must process (no notification will come
    /// for them).
    public func enableNotifications() throws(VirtioError) -> Bool {
        try withState { (state) throws(VirtioError) -> Bool in
            try store { () throws(GuestMemoryError) in
                if eventIndex {
                    try memory.store(state.nextAvailable, at: availableEventAddress)
                } else {
                    try memory.store(UInt16(0), at: configuration.deviceArea)
                }
            }
            GuestMemory.fence()
            let availableIndex = try load { () throws(GuestMemoryError) in try memory.loadAcquire16(at: availableIndexAddress) }
            return availableIndex != state.nextAvailable
        }
    }

    /// Asks the driver not to notify (while the device is busy and will look anyway).
    /// Only a hint: the driver may notify regardless. With event indices it is a no-op.
    public func disableNotifications() throws(VirtioError) {
        guard !eventIndex else { return }
        try withState { (_) throws(VirtioError) in
            try store { () throws(GuestMemoryError) in try memory.store(Self.usedNoNotify, at: configuration.deviceArea) }
        }
    }

    // MARK: Chains

    private struct Descriptor {
        var address: UInt64
        var length: UInt32
        var flags: UInt16
        var next: UInt16
    }

    private func descriptor(in table: GuestAddress, index: UInt16) throws(VirtioError) -> Descriptor {
        try descriptor(at: table + Self.descriptorSize * UInt64(index))
    }

    /// Follows the chain from `head`, through at most one indirect table.
    private func walk(head: UInt16) throws(VirtioError) -> DescriptorChain {
        var readable: [GuestBuffer] = []
        var writable: [GuestBuffer] = []
        var total: UInt64 = 0

        func add(_ entry: Descriptor) throws(VirtioError) {
            let isWritable = entry.flags & Self.flagWrite != 0
            guard isWritable || writable.isEmpty else {
                throw VirtioError("chain \(head) has a device-readable descriptor after a device-writable one")
            }
            guard memory.contains(entry.address, count: UInt64(entry.length)) else {
                throw VirtioError("chain \(head) names a buffer at 0x\(String(entry.address, radix: 16)) (\(entry.length) bytes) outside guest RAM")
            }
            total += UInt64(entry.length)
            guard total <= UInt64(UInt32.max) else { throw VirtioError("chain \(head) is longer than 4 GiB in total") }
            let buffer = GuestBuffer(address: entry.address, length: entry.length)
            if isWritable { writable.append(buffer) } else { readable.append(buffer) }
        }

        var index = head
        var count = 0
        while true {
            count += 1
            guard count <= Int(size) else { throw VirtioError("chain \(head) is longer than the queue (a loop?)") }
            let entry = try descriptor(in: configuration.descriptorTable, index: index)
            if entry.flags & Self.flagIndirect != 0 {
                guard entry.flags & Self.flagNext == 0 else {
                    throw VirtioError("chain \(head): an indirect descriptor also has NEXT set")
                }
                try walkIndirect(entry, head: head, add: add)
                break
            }
            try add(entry)
            guard entry.flags & Self.flagNext != 0 else { break }
            guard entry.next < size else { throw VirtioError("chain \(head): next \(entry.next) is outside the queue of \(size)") }
            index = entry.next
        }
        return DescriptorChain(head: head, readable: readable, writable: writable)
    }

    private func walkIndirect(_ entry: Descriptor, head: UInt16, add: (Descriptor) throws(VirtioError) -> Void) throws(VirtioError) {
        guard entry.length > 0, UInt64(entry.length) % Self.descriptorSize == 0 else {
            throw VirtioError("chain \(head): indirect table length \(entry.length) is not a positive multiple of 16")
        }
        let count = UInt64(entry.length) / Self.descriptorSize
        guard count <= 65536 else { throw VirtioError("chain \(head): indirect table has more than 65536 entries") }
        guard memory.contains(entry.address, count: UInt64(entry.length)) else {
            throw VirtioError("chain \(head): indirect table at 0x\(String(entry.address, radix: 16)) is outside guest RAM")
        }
        var index: UInt64 = 0
        var walked: UInt64 = 0
        while true {
            walked += 1
            guard walked <= count else { throw VirtioError("chain \(head): the indirect chain is longer than its table (a loop?)") }
            let inner = try descriptor(at: entry.address + Self.descriptorSize * index)
            guard inner.flags & Self.flagIndirect == 0 else {
                throw VirtioError("chain \(head): an indirect table holds another indirect descriptor")
            }
            try add(inner)
            guard inner.flags & Self.flagNext != 0 else { return }
            guard UInt64(inner.next) < count else {
                throw VirtioError("chain \(head): indirect next \(inner.next) is outside its table of \(count)")
            }
            index = UInt64(inner.next)
        }
    }

    /// Reads the 16-byte descriptor at `address` once (the guest may change it later;
    /// only this copy is used).
    private func descriptor(at address: GuestAddress) throws(VirtioError) -> Descriptor {
        var raw = (UInt64(0), UInt64(0))
        try load { () throws(GuestMemoryError) in
            try withUnsafeMutableBytes(of: &raw) { (bytes) throws(GuestMemoryError) in try memory.read(into: bytes, at: address) }
        }
        return withUnsafeBytes(of: raw) { bytes in
            Descriptor(address: UInt64(littleEndian: bytes.loadUnaligned(fromByteOffset: 0, as: UInt64.self)),
                       length: UInt32(littleEndian: bytes.loadUnaligned(fromByteOffset: 8, as: UInt32.self)),
                       flags: UInt16(littleEndian: bytes.loadUnaligned(fromByteOffset: 12, as: UInt16.self)),
                       next: UInt16(littleEndian: bytes.loadUnaligned(fromByteOffset: 14, as: UInt16.self)))
        }
    }

    // MARK: Helpers

    /// Runs `body` on the state; a ring error marks the queue broken for good.
    private func withState<Result>(_ body: (inout State) throws(VirtioError) -> Result) throws(VirtioError) -> Result {
        try state.withLock { (state) throws(VirtioError) -> Result in
            if let broken = state.broken { throw broken }
            do throws(VirtioError) {
                return try body(&state)
            } catch {
                state.broken = error
                throw error
            }
        }
    }

    /// A ring access; the rings were checked to be in RAM, so a failure here means the
    /// guest's memory layout changed under us, reported as a broken ring.
    private func load<T>(_ body: () throws(GuestMemoryError) -> T) throws(VirtioError) -> T {
        do { return try body() } catch { throw VirtioError("ring access failed: \(error)") }
    }

    private func store(_ body: () throws(GuestMemoryError) -> Void) throws(VirtioError) {
        do { try body() } catch { throw VirtioError("ring access failed: \(error)") }
    }
}
