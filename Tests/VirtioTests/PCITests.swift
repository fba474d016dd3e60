import Devices
import EventLoop
import Memory
import Synchronization
import Testing
@testable import Virtio

/// Machine services that record what the transport asks for, without KVM.
final class RecordingServices: VirtioMachineServices {
    final class Line: MSILine, LevelLine {
        let message = Mutex<(UInt64, UInt32)?>(nil)
        let triggers = Mutex(0)
        func setMessage(address: UInt64, data: UInt32) throws { message.withLock { $0 = (address, data) } }
        func clearMessage() { message.withLock { $0 = nil } }
        func trigger() { triggers.withLock { $0 += 1 } }
        var count: Int { triggers.withLock { $0 } }
    }

    let watched = Mutex<Set<UInt64>>([])
    let msiLines = Mutex<[Line]>([])
    let levelLine = Line()
    let levelGSI = Mutex<UInt32?>(nil)
    let refuseWatching: Bool

    init(refuseWatching: Bool = false) { self.refuseWatching = refuseWatching }

    struct Refused: Error {}
    func watchNotifications(_ event: EventFD, mmioAddress: UInt64, length: UInt32, dataMatch: UInt64?) throws {
        if refuseWatching { throw Refused() }
        _ = watched.withLock { $0.insert(mmioAddress) }
    }
    func unwatchNotifications(_ event: EventFD, mmioAddress: UInt64, length: UInt32, dataMatch: UInt64?) {
        _ = watched.withLock { $0.remove(mmioAddress) }
    }
    func makeMSILine() throws -> any MSILine {
        let line = Line()
        msiLines.withLock { $0.append(line) }
        return line
    }
    func makeLevelLine(gsi: UInt32, isAsserted: @escaping @Sendable () -> Bool) throws -> any LevelLine {
        levelGSI.withLock { $0 = gsi }
        return levelLine
    }
}

/// Configuration-space and BAR access, as a driver makes them through the host bridge.
struct PCIDriver {
    let bridge: PCIHostBridge
    let ports: any IODevice
    let window: any IODevice
    let windowBase: UInt64

    init(bridge: PCIHostBridge, windowBase: UInt64 = 0xC000_0000) {
        self.bridge = bridge
        ports = bridge.configurationPorts
        window = bridge.memoryWindow(base: windowBase)
        self.windowBase = windowBase
    }

    func config32(slot: Int, _ register: Int) -> UInt32 {
        var address = UInt32(0x8000_0000) | UInt32(slot) << 11 | UInt32(register & 0xFC)
        withUnsafeBytes(of: &address) { ports.write(offset: 0, from: $0) }
        var value: UInt32 = 0
        withUnsafeMutableBytes(of: &value) { ports.read(offset: 4, into: $0) }
        return value
    }

    func setConfig32(slot: Int, _ register: Int, _ value: UInt32) {
        var address = UInt32(0x8000_0000) | UInt32(slot) << 11 | UInt32(register & 0xFC)
        withUnsafeBytes(of: &address) { ports.write(offset: 0, from: $0) }
        withUnsafeBytes(of: value) { ports.write(offset: 4, from: $0) }
    }

    func read<T: FixedWidthInteger>(_ address: UInt64, as: T.Type = T.self) -> T {
        var value = T.zero
        withUnsafeMutableBytes(of: &value) { window.read(offset: address - windowBase, into: $0) }
        return value
    }

    func write<T: FixedWidthInteger>(_ address: UInt64, _ value: T) {
        withUnsafeBytes(of: value) { window.write(offset: address - windowBase, from: $0) }
    }

    /// The capabilities of `slot` as (type or ID, offset).
    func capabilities(slot: Int) -> [(UInt8, Int)] {
        var found: [(UInt8, Int)] = []
        var pointer = Int(config32(slot: slot, 0x34) & 0xFF)
        while pointer != 0 && found.count < 16 {
            let word = config32(slot: slot, pointer)
            let id = UInt8(word & 0xFF)
            found.append((id == 0x09 ? UInt8(word >> 24) : id, pointer))
            pointer = Int(word >> 8 & 0xFF)
        }
        return found
    }
}

func makePCI(services: RecordingServices = RecordingServices()) throws -> (RecordingDevice, VirtioPCIFunction, PCIDriver, RecordingServices, GuestMemory) {
    let device = RecordingDevice()
    let memory = try makeMemory()
    let function = try VirtioPCIFunction(device: device, memory: memory, classCode: 0x01_80_00, barBase: 0xC000_0000,
                                         intxGSI: 16, services: services)
    let resets = Counter()
    let reset = ResetControlStub(counter: resets)
    let bridge = PCIHostBridge(functions: [1: function], resetControl: reset)
    return (device, function, PCIDriver(bridge: bridge), services, memory)
}

final class Counter: Sendable {
    private let value = Mutex(0)
    func increment() { value.withLock { $0 += 1 } }
    var count: Int { value.withLock { $0 } }
}

final class ResetControlStub: IODevice {
    let counter: Counter
    init(counter: Counter) { self.counter = counter }
    func read(offset: UInt64, into data: UnsafeMutableRawBufferPointer) { data[0] = 0x02 }
    func write(offset: UInt64, from data: UnsafeRawBufferPointer) { counter.increment() }
}

@Suite("PCI host bridge and virtio-pci")
struct PCITests {
    @Test("Configuration mechanism #1 finds the host bridge and the virtio function; empty slots read all ones")
    func enumeration() throws {
        let (_, _, driver, _, _) = try makePCI()
        #expect(driver.config32(slot: 0, 0) == 0x0008_1B36)
        #expect(driver.config32(slot: 1, 0) == 0x1042_1AF4) // modern virtio-blk
        #expect(driver.config32(slot: 1, 0x08) >> 8 == 0x01_80_00)
        #expect(driver.config32(slot: 2, 0) == 0xFFFF_FFFF)
        #expect(driver.config32(slot: 1, 0x3C) & 0xFFFF == 0x0110, "INTA on line 16")
        // ECAM gives the same answer.
        var value: UInt32 = 0
        withUnsafeMutableBytes(of: &value) { driver.bridge.ecam.read(offset: 1 << 15, into: $0) }
        #expect(value == 0x1042_1AF4)
    }

    @Test("A byte at 0xCF9 is the reset control register, not a configuration access")
    func resetControlByte() throws {
        let (_, _, driver, _, _) = try makePCI()
        var byte: UInt8 = 0
        withUnsafeMutableBytes(of: &byte) { driver.ports.read(offset: 1, into: $0) }
        #expect(byte == 0x02)
        let stub = try #require(driver.bridge.function(at: 0))
        _ = stub
    }

    @Test("BAR sizing and moving: all ones reads back the size; the notify ioeventfds follow the BAR")
    func barSizing() throws {
        let (_, _, driver, services, _) = try makePCI()
        #expect(driver.config32(slot: 1, 0x10) == 0xC000_0000)
        #expect(services.watched.withLock { $0 } == [0xC000_3000, 0xC000_3004])
        driver.setConfig32(slot: 1, 0x10, 0xFFFF_FFFF)
        #expect(driver.config32(slot: 1, 0x10) == ~UInt32(0x8000 - 1))
        driver.setConfig32(slot: 1, 0x10, 0xC010_0000)
        #expect(driver.config32(slot: 1, 0x10) == 0xC010_0000)
        #expect(services.watched.withLock { $0 } == [0xC010_3000, 0xC010_3004])
        #expect(driver.read(0xC010_0012, as: UInt16.self) == 2, "num_queues at the new place")
        #expect(driver.read(0xC000_0012, as: UInt16.self) == 0xFFFF, "nothing at the old place")
    }

    @Test("The capabilities a modern driver looks for are all there")
    func capabilities() throws {
        let (_, _, driver, _, _) = try makePCI()
        let types = driver.capabilities(slot: 1).map(\.0)
        #expect(types == [1, 2, 3, 4, 5, 0x11])
    }

    @Test("Negotiation, queue set-up and DRIVER_OK through the common configuration")
    func commonConfiguration() throws {
        let (device, _, driver, _, memory) = try makePCI()
        let base: UInt64 = 0xC000_0000
        driver.write(base + 0x14, UInt8(1 | 2))
        driver.write(base + 0x00, UInt32(1))
        #expect(driver.read(base + 0x04, as: UInt32.self) == 1) // VERSION_1 in page 1
        driver.write(base + 0x08, UInt32(1)); driver.write(base + 0x0C, UInt32(1))
        driver.write(base + 0x08, UInt32(0)); driver.write(base + 0x0C, UInt32(0))
        driver.write(base + 0x14, UInt8(1 | 2 | 8))
        #expect(driver.read(base + 0x14, as: UInt8.self) & 8 == 8)
        let queue = TestDriver(memory: memory, size: 16).configuration
        driver.write(base + 0x16, UInt16(0))
        #expect(driver.read(base + 0x18, as: UInt16.self) == 16)
        driver.write(base + 0x20, UInt32(truncatingIfNeeded: queue.descriptorTable)); driver.write(base + 0x24, UInt32(0))
        driver.write(base + 0x28, UInt32(truncatingIfNeeded: queue.driverArea)); driver.write(base + 0x2C, UInt32(0))
        driver.write(base + 0x30, UInt32(truncatingIfNeeded: queue.deviceArea)); driver.write(base + 0x34, UInt32(0))
        driver.write(base + 0x1C, UInt16(1))
        driver.write(base + 0x14, UInt8(1 | 2 | 8 | 4))
        let activation = try #require(device.activations.withLock { $0.first })
        #expect(activation.queues[0]?.configuration == queue)
        #expect(driver.read(base + 0x1E, as: UInt16.self) == 0, "queue 0 notifies at offset 0")
    }

    @Test("MSI-X: a programmed, unmasked vector raises its line; a masked one stays pending until unmasked")
    func msix() throws {
        let (_, function, driver, services, _) = try makePCI()
        let base: UInt64 = 0xC000_0000
        driver.write(base + 0x16, UInt16(0)); driver.write(base + 0x1A, UInt16(1))   // queue 0 -> vector 1
        // Enable MSI-X in message control (capability at 0x98, byte 3 bit 7).
        let control = driver.config32(slot: 1, 0x98)
        driver.setConfig32(slot: 1, 0x98, control | 0x8000_0000)
        // Vector 1: address, data, then unmask.
        driver.write(base + 0x4010, UInt32(0xFEE0_0000)); driver.write(base + 0x4014, UInt32(0))
        driver.write(base + 0x4018, UInt32(0x41))
        function.signalQueue(0)
        let lines = services.msiLines.withLock { $0 }
        #expect(lines[1].count == 0, "masked: pending")
        #expect(driver.read(base + 0x5000, as: UInt8.self) == 0b10)
        driver.write(base + 0x401C, UInt32(0))
        #expect(lines[1].count == 1, "delivered when unmasked")
        #expect(lines[1].message.withLock { $0 }.map { $0.1 } == 0x41)
        function.signalQueue(0)
        #expect(lines[1].count == 2)
        #expect(services.levelLine.count == 0, "no INTx while MSI-X is on")
    }

    @Test("INTx: without MSI-X the ISR is set and INTA asserted; reading the ISR clears it")
    func intx() throws {
        let (_, function, driver, services, _) = try makePCI()
        #expect(services.levelGSI.withLock { $0 } == 16)
        function.signalQueue(0)
        #expect(services.levelLine.count == 1)
        #expect(driver.config32(slot: 1, 0x04) >> 16 & 0x08 == 0x08, "status: interrupt pending")
        #expect(driver.read(0xC000_1000, as: UInt8.self) == 1)
        #expect(driver.read(0xC000_1000, as: UInt8.self) == 0)
        #expect(driver.config32(slot: 1, 0x04) >> 16 & 0x08 == 0)
    }

    @Test("Without an ioeventfd, a notify write reaches the device through the transport")
    func notifyFallback() throws {
        let (_, function, driver, _, _) = try makePCI(services: RecordingServices(refuseWatching: true))
        driver.write(0xC000_3004, UInt16(1))
        #expect(function.core.notifications[1].drain() == 1)
    }

    @Test("The PCI_CFG capability reads the BAR through configuration space")
    func pciConfigurationWindow() throws {
        let (_, _, driver, _, _) = try makePCI()
        driver.setConfig32(slot: 1, 0x84 + 4, 0)          // bar 0
        driver.setConfig32(slot: 1, 0x84 + 8, 0x04)       // offset: the common configuration's device_feature
        driver.setConfig32(slot: 1, 0x84 + 12, 4)         // length 4
        #expect(driver.config32(slot: 1, 0x84 + 16) == (1 << 5) | (1 << 29), "feature page 0 of the recording device")
    }
}
