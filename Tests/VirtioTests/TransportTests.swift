import EventLoop
import Memory
import Synchronization
import Testing
@testable import Virtio

/// A device that records what the transport does to it.
final class RecordingDevice: VirtioDevice {
    let deviceType = VirtioDeviceType.block
    let offeredFeatures: UInt64 = (1 << 5) | VirtioFeature.ringEventIndex
    let queueMaximumSizes: [UInt16] = [16, 8]
    let activations = Mutex<[VirtioActivation]>([])
    let resets = Mutex(0)
    let configuration: [UInt8] = Array(0..<32)

    func readConfiguration(offset: UInt64, into data: UnsafeMutableRawBufferPointer) {
        for index in data.indices {
            let position = Int(offset) + index
            data[index] = position < configuration.count ? configuration[position] : 0
        }
    }
    func writeConfiguration(offset: UInt64, from data: UnsafeRawBufferPointer) {}
    func activate(_ activation: VirtioActivation) throws(VirtioError) { activations.withLock { $0.append(activation) } }
    func reset() { resets.withLock { $0 += 1 } }
}

/// Machine services without KVM: no ioeventfd (notify writes reach the transport) and no
/// MSI lines.
struct NoKVMServices: VirtioMachineServices {
    struct Unsupported: Error {}
    func watchNotifications(_ event: EventFD, mmioAddress: UInt64, length: UInt32, dataMatch: UInt64?) throws { throw Unsupported() }
    func unwatchNotifications(_ event: EventFD, mmioAddress: UInt64, length: UInt32, dataMatch: UInt64?) {}
    func makeMSILine() throws -> any MSILine { throw Unsupported() }
    func makeLevelLine(gsi: UInt32, isAsserted: @escaping @Sendable () -> Bool) throws -> any LevelLine { throw Unsupported() }
}

/// Register access to a virtio-mmio window, as a driver makes it.
struct MMIODriver {
    let transport: VirtioMMIOTransport

    func read(_ offset: UInt64) -> UInt32 {
        var value: UInt32 = 0
        withUnsafeMutableBytes(of: &value) { transport.read(offset: offset, into: $0) }
        return UInt32(littleEndian: value)
    }

    func write(_ offset: UInt64, _ value: UInt32) {
        withUnsafeBytes(of: value.littleEndian) { transport.write(offset: offset, from: $0) }
    }

    /// Feature negotiation: writes both pages of `features`, sets FEATURES_OK, returns the status read back.
    func negotiate(_ features: UInt64) -> UInt32 {
        write(0x070, 1)          // ACKNOWLEDGE
        write(0x070, 1 | 2)      // DRIVER
        write(0x024, 0); write(0x020, UInt32(truncatingIfNeeded: features))
        write(0x024, 1); write(0x020, UInt32(truncatingIfNeeded: features >> 32))
        write(0x070, 1 | 2 | 8)
        return read(0x070)
    }

    /// Sets up queue `index` from a test driver's layout and marks it ready.
    func setUpQueue(_ index: UInt32, _ configuration: VirtqueueConfiguration) {
        write(0x030, index)
        write(0x038, UInt32(configuration.size))
        write(0x080, UInt32(truncatingIfNeeded: configuration.descriptorTable)); write(0x084, UInt32(configuration.descriptorTable >> 32))
        write(0x090, UInt32(truncatingIfNeeded: configuration.driverArea)); write(0x094, UInt32(configuration.driverArea >> 32))
        write(0x0A0, UInt32(truncatingIfNeeded: configuration.deviceArea)); write(0x0A4, UInt32(configuration.deviceArea >> 32))
        write(0x044, 1)
    }
}

func makeMMIO(memory: GuestMemory? = nil) throws -> (RecordingDevice, VirtioMMIOTransport, MMIODriver, GuestMemory) {
    let device = RecordingDevice()
    let memory = try memory ?? makeMemory()
    let transport = try VirtioMMIOTransport(device: device, memory: memory, base: 0xFEB0_0000,
                                            interruptEvent: try EventFD(), services: NoKVMServices())
    return (device, transport, MMIODriver(transport: transport), memory)
}

@Suite("virtio-mmio transport")
struct MMIOTransportTests {
    @Test("A driver's probe sees the magic, version 2, the device ID and the offered features with VERSION_1")
    func probe() throws {
        let (_, _, driver, _) = try makeMMIO()
        #expect(driver.read(0x000) == 0x7472_6976)
        #expect(driver.read(0x004) == 2)
        #expect(driver.read(0x008) == 2)
        driver.write(0x014, 0)
        #expect(driver.read(0x010) == (1 << 5) | (1 << 29))
        driver.write(0x014, 1)
        #expect(driver.read(0x010) == 1) // VERSION_1 is bit 32
        driver.write(0x014, 7)
        #expect(driver.read(0x010) == 0)
        driver.write(0x030, 1)
        #expect(driver.read(0x034) == 8)
        driver.write(0x030, 9)
        #expect(driver.read(0x034) == 0)
        // Configuration space bytes at 0x100, any width.
        var word: UInt16 = 0
        withUnsafeMutableBytes(of: &word) { driver.transport.read(offset: 0x104, into: $0) }
        #expect(word == 0x0504)
    }

    @Test("FEATURES_OK sticks only for an acceptable subset that includes VERSION_1")
    func negotiation() throws {
        #expect(try makeMMIO().2.negotiate(VirtioFeature.version1 | (1 << 5)) & 8 == 8)
        #expect(try makeMMIO().2.negotiate(1 << 5) & 8 == 0, "without VERSION_1")
        #expect(try makeMMIO().2.negotiate(VirtioFeature.version1 | (1 << 6)) & 8 == 0, "a feature that was not offered")
    }

    @Test("DRIVER_OK activates the device with the queues the driver set up; notify writes reach the device")
    func activation() throws {
        let (device, transport, driver, memory) = try makeMMIO()
        let queue0 = TestDriver(memory: memory, size: 16, base: 0x10000)
        #expect(driver.negotiate(VirtioFeature.version1 | VirtioFeature.ringEventIndex) & 8 == 8)
        driver.setUpQueue(0, queue0.configuration)
        driver.write(0x070, 1 | 2 | 8 | 4)
        let activation = try #require(device.activations.withLock { $0.first })
        #expect(activation.features == VirtioFeature.version1 | VirtioFeature.ringEventIndex)
        #expect(activation.queues.count == 2)
        #expect(activation.queues[0]?.configuration == queue0.configuration)
        #expect(activation.queues[0]?.eventIndex == true)
        #expect(activation.queues[1] == nil, "queue 1 was not made ready")
        // Registers of a live queue cannot change.
        driver.write(0x030, 0)
        driver.write(0x038, 2)
        #expect(activation.queues[0]?.configuration.size == 16)
        driver.write(0x050, 0)
        #expect(activation.notifications[0].drain() == 1)
        // Used-buffer interrupt: status bit 0, the line's eventfd written; the ACK clears it.
        activation.interrupt.signalQueue(0)
        #expect(driver.read(0x060) == 1)
        #expect(transport.interruptEvent.drain() == 1)
        driver.write(0x064, 1)
        #expect(driver.read(0x060) == 0)
    }

    @Test("Status 0 resets the device and forgets what the driver set")
    func reset() throws {
        let (device, _, driver, memory) = try makeMMIO()
        _ = driver.negotiate(VirtioFeature.version1)
        driver.setUpQueue(0, TestDriver(memory: memory, size: 16).configuration)
        driver.write(0x070, 15)
        let generation = driver.read(0x0FC)
        driver.write(0x070, 0)
        #expect(device.resets.withLock { $0 } == 1)
        #expect(driver.read(0x070) == 0)
        driver.write(0x030, 0)
        #expect(driver.read(0x044) == 0)
        #expect(driver.read(0x0FC) != generation)
    }

    @Test("A driver that breaks the rules gets DEVICE_NEEDS_RESET and a configuration interrupt", arguments: [
        "DRIVER_OK before FEATURES_OK", "queue size not a power of two", "queue outside RAM", "status bits cleared",
    ])
    func needsReset(kind: String) throws {
        let (device, transport, driver, memory) = try makeMMIO()
        var configuration = TestDriver(memory: memory, size: 16).configuration
        switch kind {
        case "DRIVER_OK before FEATURES_OK":
            driver.write(0x070, 1 | 2 | 4)
        case "queue size not a power of two":
            configuration.size = 12
            _ = driver.negotiate(VirtioFeature.version1)
            driver.setUpQueue(0, configuration)
            driver.write(0x070, 15)
        case "queue outside RAM":
            configuration.deviceArea = 0x7FFF_F000
            _ = driver.negotiate(VirtioFeature.version1)
            driver.setUpQueue(0, configuration)
            driver.write(0x070, 15)
        default:
            _ = driver.negotiate(VirtioFeature.version1)
            driver.write(0x070, 1)
        }
        #expect(driver.read(0x070) & 0x40 == 0x40)
        #expect(driver.read(0x060) & 2 == 2)
        #expect(transport.interruptEvent.drain() >= 1)
        #expect(device.activations.withLock { $0.isEmpty })
        #expect(transport.core.needsResetReason != nil)
        driver.write(0x070, 0)
        #expect(driver.read(0x070) == 0, "a reset clears DEVICE_NEEDS_RESET")
    }

    @Test("Accesses that are not 32-bit, or past the registers, are harmless")
    func oddAccesses() throws {
        let (_, _, driver, _) = try makeMMIO()
        var byte: UInt8 = 0xAA
        withUnsafeMutableBytes(of: &byte) { driver.transport.read(offset: 0x000, into: $0) }
        #expect(byte == 0)
        withUnsafeBytes(of: UInt16(1)) { driver.transport.write(offset: 0x070, from: $0) }
        #expect(driver.read(0x070) == 0)
        driver.write(0x0F0, 1)
        driver.write(0x1FC, 0xFFFF_FFFF)
        #expect(driver.read(0x0B0) == 0xFFFF_FFFF, "no shared memory regions")
    }
}
