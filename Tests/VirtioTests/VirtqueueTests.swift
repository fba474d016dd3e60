import Memory
import Testing
import Virtio

/// Plays the driver's part: lays out a split virtqueue in guest memory and fills it the
/// way virtio 1.2, 2.7 says a driver does.
struct TestDriver {
    let memory: GuestMemory
    let size: UInt16
    let configuration: VirtqueueConfiguration
    var freeDescriptor: UInt16 = 0
    var availableIndex: UInt16 = 0
    var usedSeen: UInt16 = 0

    init(memory: GuestMemory, size: UInt16, base: GuestAddress = 0x10000) {
        self.memory = memory
        self.size = size
        let table = base
        let driverArea = table + 16 * UInt64(size)
        let deviceArea = (driverArea + 6 + 2 * UInt64(size) + 3) & ~3
        configuration = VirtqueueConfiguration(size: size, descriptorTable: table, driverArea: driverArea, deviceArea: deviceArea)
    }

    func queue(maximum: UInt16 = 256, eventIndex: Bool = false) throws -> Virtqueue {
        try Virtqueue(memory: memory, configuration: configuration, maximumSize: maximum, eventIndex: eventIndex)
    }

    /// Writes descriptor `index` of the table at `table` (the queue's own by default).
    func writeDescriptor(_ index: UInt16, address: UInt64, length: UInt32, flags: UInt16, next: UInt16 = 0,
                         table: GuestAddress? = nil) throws {
        let base = (table ?? configuration.descriptorTable) + 16 * UInt64(index)
        try memory.store(address, at: base)
        try memory.store(length, at: base + 8)
        try memory.store(flags, at: base + 12)
        try memory.store(next, at: base + 14)
    }

    /// Adds a chain of buffers (readable first) and makes it available; returns its head.
    @discardableResult
    mutating func add(_ buffers: [(address: UInt64, length: UInt32, writable: Bool)], publish: Bool = true) throws -> UInt16 {
        let head = freeDescriptor
        for (position, buffer) in buffers.enumerated() {
            let index = (head &+ UInt16(position)) % size
            let last = position == buffers.count - 1
            try writeDescriptor(index, address: buffer.address, length: buffer.length,
                                flags: (buffer.writable ? 2 : 0) | (last ? 0 : 1), next: (index + 1) % size)
        }
        freeDescriptor = (head &+ UInt16(buffers.count)) % size
        if publish { try makeAvailable(head) }
        return head
    }

    /// Puts `head` in the available ring and publishes the new index.
    mutating func makeAvailable(_ head: UInt16) throws {
        try memory.store(head, at: configuration.driverArea + 4 + 2 * UInt64(availableIndex % size))
        availableIndex &+= 1
        try memory.storeRelease16(availableIndex, at: configuration.driverArea + 2)
    }

    func setAvailableIndex(_ value: UInt16) throws { try memory.store(value, at: configuration.driverArea + 2) }
    func setAvailableFlags(_ value: UInt16) throws { try memory.store(value, at: configuration.driverArea) }
    func setUsedEvent(_ value: UInt16) throws { try memory.store(value, at: configuration.driverArea + 4 + 2 * UInt64(size)) }
    var usedIndex: UInt16 { get throws { try memory.load(UInt16.self, at: configuration.deviceArea + 2) } }
    var usedFlags: UInt16 { get throws { try memory.load(UInt16.self, at: configuration.deviceArea) } }
    var availableEvent: UInt16 { get throws { try memory.load(UInt16.self, at: configuration.deviceArea + 4 + 8 * UInt64(size)) } }

    /// The used entry at position `index` of the used ring: (id, length).
    func usedEntry(_ index: UInt16) throws -> (UInt32, UInt32) {
        let base = configuration.deviceArea + 4 + 8 * UInt64(index % size)
        return (try memory.load(UInt32.self, at: base), try memory.load(UInt32.self, at: base + 4))
    }
}

func makeMemory(_ size: UInt64 = 16 << 20) throws -> GuestMemory {
    try GuestMemory(size: size, transparentHugePages: false)
}

@Suite("Split virtqueues")
struct VirtqueueTests {
    @Test("A chain comes out with its readable and writable buffers; the used ring gets it back")
    func roundTrip() throws {
        var driver = TestDriver(memory: try makeMemory(), size: 8)
        let queue = try driver.queue()
        #expect(try queue.popAvailable() == nil)
        let head = try driver.add([(0x100000, 16, false), (0x101000, 512, true), (0x102000, 1, true)])
        let chain = try #require(try queue.popAvailable())
        #expect(chain.head == head)
        #expect(chain.readable == [GuestBuffer(address: 0x100000, length: 16)])
        #expect(chain.writable == [GuestBuffer(address: 0x101000, length: 512), GuestBuffer(address: 0x102000, length: 1)])
        #expect(chain.writableLength == 513)
        #expect(try queue.popAvailable() == nil)
        try queue.pushUsed(chain.head, writtenLength: 513)
        #expect(try driver.usedIndex == 1)
        #expect(try driver.usedEntry(0) == (UInt32(head), 513))
    }

    @Test("Several chains returned at once appear together: the used index moves once, past all of them")
    func batchPush() throws {
        var driver = TestDriver(memory: try makeMemory(), size: 4)
        let queue = try driver.queue()
        var heads: [UInt16] = []
        // Six rounds of three chains on a ring of four: the used ring wraps inside a batch.
        for round in 0..<6 {
            heads = []
            for _ in 0..<3 {
                try driver.add([(0x100000, 64, true)])
                heads.append(try #require(try queue.popAvailable()).head)
            }
            let before = try driver.usedIndex
            try queue.pushUsed(heads.enumerated().map { (head: $0.element, writtenLength: UInt32(10 + $0.offset)) })
            #expect(try driver.usedIndex == before &+ 3, "round \(round)")
            for (offset, head) in heads.enumerated() {
                #expect(try driver.usedEntry(before &+ UInt16(offset)) == (UInt32(head), UInt32(10 + offset)))
            }
        }
        try queue.pushUsed([(head: UInt16, writtenLength: UInt32)]())
        #expect(try driver.usedIndex == 18, "an empty batch publishes nothing")
    }

    @Test("Indices wrap around 65536 and the ring position around the queue size")
    func wrapAround() throws {
        var driver = TestDriver(memory: try makeMemory(), size: 4)
        let queue = try driver.queue()
        for round in 0..<70_000 {
            try driver.add([(0x100000, 8, false), (0x100008, 8, true)])
            let chain = try #require(try queue.popAvailable(), "round \(round)")
            try queue.pushUsed(chain.head, writtenLength: 8)
        }
        #expect(try driver.usedIndex == UInt16(truncatingIfNeeded: 70_000))
        #expect(queue.indices == (UInt16(truncatingIfNeeded: 70_000), UInt16(truncatingIfNeeded: 70_000)))
    }

    @Test("Indirect descriptors are followed")
    func indirect() throws {
        var driver = TestDriver(memory: try makeMemory(), size: 8)
        let queue = try driver.queue()
        let table: GuestAddress = 0x200000
        try driver.writeDescriptor(0, address: 0x100000, length: 16, flags: 1, next: 1, table: table)
        try driver.writeDescriptor(1, address: 0x101000, length: 4096, flags: 2 | 1, next: 2, table: table)
        try driver.writeDescriptor(2, address: 0x102000, length: 1, flags: 2, table: table)
        try driver.writeDescriptor(0, address: table, length: 48, flags: 4)
        try driver.makeAvailable(0)
        let chain = try #require(try queue.popAvailable())
        #expect(chain.readable.count == 1)
        #expect(chain.writable.map(\.length) == [4096, 1])
    }

    /// Each way a hostile driver can break a queue, as the configuration or the rings.
    static let brokenConfigurations: [(String, @Sendable (inout VirtqueueConfiguration) -> Void, UInt16)] = [
        ("size not a power of two", { $0.size = 6 }, 256),
        ("size zero", { $0.size = 0 }, 256),
        ("size above the device's maximum", { $0.size = 512 }, 256),
        ("descriptor table misaligned", { $0.descriptorTable += 8 }, 256),
        ("available ring misaligned", { $0.driverArea += 1 }, 256),
        ("used ring misaligned", { $0.deviceArea += 2 }, 256),
        ("descriptor table outside RAM", { $0.descriptorTable = (16 << 20) - 16 }, 256),
        ("used ring across the end of RAM", { $0.deviceArea = (16 << 20) - 8 }, 256),
        ("ring address near 2^64", { $0.driverArea = UInt64.max - 1 }, 256),
    ]

    @Test("A queue configured outside RAM, misaligned or of a bad size is refused", arguments: 0..<9)
    func brokenConfiguration(index: Int) throws {
        let (name, mutate, maximum) = Self.brokenConfigurations[index]
        let driver = TestDriver(memory: try makeMemory(), size: 8)
        var configuration = driver.configuration
        mutate(&configuration)
        #expect(throws: VirtioError.self, "\(name)") {
            try Virtqueue(memory: driver.memory, configuration: configuration, maximumSize: maximum, eventIndex: false)
        }
    }

    @Test("Each hostile ring is an error, and the queue stays broken afterwards", arguments: [
        "index jump", "head out of range", "next out of range", "loop", "chain longer than the queue",
        "indirect with next", "nested indirect", "indirect length", "empty indirect", "indirect outside RAM",
        "indirect loop", "indirect next out of range", "buffer outside RAM", "buffer overflowing 2^64",
        "readable after writable", "total over 4 GiB",
    ])
    func hostileRing(kind: String) throws {
        var driver = TestDriver(memory: try makeMemory(), size: 8)
        let queue = try driver.queue()
        let table: GuestAddress = 0x200000
        switch kind {
        case "index jump":
            try driver.setAvailableIndex(9)
        case "head out of range":
            try driver.makeAvailable(8)
        case "next out of range":
            try driver.writeDescriptor(0, address: 0x100000, length: 8, flags: 1, next: 8)
            try driver.makeAvailable(0)
        case "loop":
            try driver.writeDescriptor(0, address: 0x100000, length: 8, flags: 1, next: 1)
            try driver.writeDescriptor(1, address: 0x100000, length: 8, flags: 1, next: 0)
            try driver.makeAvailable(0)
        case "chain longer than the queue":
            for index in UInt16(0)..<8 { try driver.writeDescriptor(index, address: 0x100000, length: 8, flags: 1, next: (index + 1) % 8) }
            try driver.makeAvailable(3)
        case "indirect with next":
            try driver.writeDescriptor(0, address: table, length: 16, flags: 4 | 1, next: 1)
            try driver.makeAvailable(0)
        case "nested indirect":
            try driver.writeDescriptor(0, address: table + 0x100, length: 16, flags: 4, table: table)
            try driver.writeDescriptor(0, address: table, length: 16, flags: 4)
            try driver.makeAvailable(0)
        case "indirect length":
            try driver.writeDescriptor(0, address: table, length: 24, flags: 4)
            try driver.makeAvailable(0)
        case "empty indirect":
            try driver.writeDescriptor(0, address: table, length: 0, flags: 4)
            try driver.makeAvailable(0)
        case "indirect outside RAM":
            try driver.writeDescriptor(0, address: (16 << 20) - 16, length: 32, flags: 4)
            try driver.makeAvailable(0)
        case "indirect loop":
            try driver.writeDescriptor(0, address: 0x100000, length: 8, flags: 1, next: 1, table: table)
            try driver.writeDescriptor(1, address: 0x100000, length: 8, flags: 1, next: 0, table: table)
            try driver.writeDescriptor(0, address: table, length: 32, flags: 4)
            try driver.makeAvailable(0)
        case "indirect next out of range":
            try driver.writeDescriptor(0, address: 0x100000, length: 8, flags: 1, next: 2, table: table)
            try driver.writeDescriptor(0, address: table, length: 32, flags: 4)
            try driver.makeAvailable(0)
        case "buffer outside RAM":
            try driver.add([(16 << 20, 1, false)])
        case "buffer overflowing 2^64":
            try driver.add([(UInt64.max - 8, 64, true)])
        case "readable after writable":
            try driver.add([(0x100000, 8, true), (0x100100, 8, false)])
        case "total over 4 GiB":
            // 300 descriptors in an indirect table, each naming all 16 MiB of RAM.
            for index in UInt16(0)..<300 {
                try driver.writeDescriptor(index, address: 0, length: 16 << 20, flags: index < 299 ? 1 : 0, next: index + 1, table: table)
            }
            try driver.writeDescriptor(0, address: table, length: 300 * 16, flags: 4)
            try driver.makeAvailable(0)
        default:
            Issue.record("unknown case \(kind)")
        }
        #expect(throws: VirtioError.self) { try queue.popAvailable() }
        // Once broken, always broken: the device must be reset.
        #expect(throws: VirtioError.self) { try queue.popAvailable() }
        #expect(throws: VirtioError.self) { try queue.pushUsed(0, writtenLength: 0) }
    }

    @Test("Without event indices, the driver's NO_INTERRUPT flag decides, and the device's NO_NOTIFY asks for quiet")
    func flagsSuppression() throws {
        var driver = TestDriver(memory: try makeMemory(), size: 8)
        let queue = try driver.queue()
        try driver.add([(0x100000, 8, true)])
        try queue.pushUsed(try #require(try queue.popAvailable()).head, writtenLength: 8)
        #expect(try queue.shouldNotifyDriver())
        try driver.setAvailableFlags(1)
        try driver.add([(0x100000, 8, true)])
        try queue.pushUsed(try #require(try queue.popAvailable()).head, writtenLength: 8)
        #expect(try queue.shouldNotifyDriver() == false)

        try queue.disableNotifications()
        #expect(try driver.usedFlags == 1)
        #expect(try queue.enableNotifications() == false)
        #expect(try driver.usedFlags == 0)
        try driver.add([(0x100000, 8, true)])
        #expect(try queue.enableNotifications() == true, "work arrived before notifications were enabled")
    }

    @Test("With event indices, used_event decides when to interrupt and avail_event when to be notified")
    func eventIndex() throws {
        var driver = TestDriver(memory: try makeMemory(), size: 8)
        let queue = try driver.queue(eventIndex: true)
        // The driver wants an interrupt once the used index passes 2 (used_event = 2).
        try driver.setUsedEvent(2)
        var decisions: [Bool] = []
        for _ in 0..<4 {
            try driver.add([(0x100000, 8, true)])
            try queue.pushUsed(try #require(try queue.popAvailable()).head, writtenLength: 8)
            decisions.append(try queue.shouldNotifyDriver())
        }
        // used index 1, 2, 3, 4: only the step from 2 to 3 crosses used_event + 1.
        #expect(decisions == [false, false, true, false])

        // Two pushes between checks: 4 -> 6 passes used_event 5.
        try driver.setUsedEvent(5)
        for _ in 0..<2 {
            try driver.add([(0x100000, 8, true)])
            try queue.pushUsed(try #require(try queue.popAvailable()).head, writtenLength: 8)
        }
        #expect(try queue.shouldNotifyDriver())

        #expect(try queue.enableNotifications() == false)
        #expect(try driver.availableEvent == 6)
    }
}
