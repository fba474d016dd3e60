import Devices
import Synchronization
import Testing

final class LatchDevice: IODevice {
    let last = Mutex<(UInt64, [UInt8])?>(nil)
    func read(offset: UInt64, into data: UnsafeMutableRawBufferPointer) {
        for index in data.indices { data[index] = UInt8(truncatingIfNeeded: offset) }
    }
    func write(offset: UInt64, from data: UnsafeRawBufferPointer) { last.withLock { $0 = (offset, Array(data)) } }
}

@Suite("I/O bus and small devices")
struct IOBusTests {
    @Test("Accesses reach the device with the offset inside its range")
    func dispatch() throws {
        var builder = IOBus.Builder()
        let device = LatchDevice()
        try builder.register(device, name: "latch", base: 0x3F8, length: 8)
        let bus = builder.build()
        #expect([UInt8(0x83)].withUnsafeBytes { bus.write(0x3FB, from: $0) }?.name == "latch")
        #expect(device.last.withLock { $0?.0 } == 3)
        var value: UInt8 = 0
        #expect(withUnsafeMutableBytes(of: &value) { bus.read(0x3FF, into: $0) } != nil)
        #expect(value == 7)
        #expect(bus.resolve(0x3F7) == nil)
        #expect(bus.resolve(0x400) == nil)
    }

    @Test("Unclaimed reads are all ones; unclaimed writes are dropped")
    func unclaimed() {
        let bus = IOBus()
        var value: UInt32 = 0
        #expect(withUnsafeMutableBytes(of: &value) { bus.read(0x1234, into: $0) } == nil)
        #expect(value == 0xFFFF_FFFF)
        #expect([UInt8(1)].withUnsafeBytes { bus.write(0x1234, from: $0) } == nil)
    }

    @Test("Overlapping or empty ranges are refused, naming both devices")
    func overlaps() throws {
        var bus = IOBus.Builder()
        try bus.register(LatchDevice(), name: "a", base: 0x10, length: 0x10)
        #expect(throws: IOBusError.overlap(name: "b", base: 0x1F, length: 2, existing: "a at 0x10+0x10")) { try bus.register(LatchDevice(), name: "b", base: 0x1F, length: 2) }
        #expect(throws: IOBusError.overlap(name: "c", base: 0x0, length: 0x11, existing: "a at 0x10+0x10")) { try bus.register(LatchDevice(), name: "c", base: 0x0, length: 0x11) }
        #expect(throws: IOBusError.emptyRange(name: "d")) { try bus.register(LatchDevice(), name: "d", base: 0x40, length: 0) }
        #expect(throws: IOBusError.emptyRange(name: "e")) { try bus.register(LatchDevice(), name: "e", base: UInt64.max, length: 2) }
        try bus.register(LatchDevice(), name: "f", base: 0x20, length: 1)
        try bus.register(LatchDevice(), name: "g", base: 0x0, length: 0x10)
        #expect(bus.build().devices.map(\.name) == ["g", "a", "f"])
        #expect(IOBusError.overlap(name: "b", base: 0x1F, length: 2, existing: "a at 0x10+0x10").description == "b at 0x1f+0x2 overlaps a at 0x10+0x10")
    }

    @Test("The exit port passes on the value the guest wrote, at any width")
    func debugExit() {
        let seen = Mutex<[UInt32]>([])
        let device = DebugExit { status in seen.withLock { $0.append(status) } }
        var value: UInt32 = 0x10
        withUnsafeBytes(of: &value) { device.write(offset: 0, from: $0) }
        [UInt8(2)].withUnsafeBytes { device.write(offset: 0, from: $0) }
        #expect(seen.withLock { $0 } == [0x10, 2])
    }
}

@Suite("Ranges KVM owns")
struct KVMOwnedRangeTests {
    @Test("The machine's buses refuse the ports and pages of KVM's in-kernel devices, naming them")
    func refused() throws {
        var ports = IOBus.Builder.portBus()
        let cases: [(UInt64, UInt64, String)] = [(0x20, 1, "master 8259 PIC"), (0xA1, 1, "slave 8259 PIC"), (0x3E, 4, "8254 PIT"),
                                                 (0x61, 1, "PC speaker port"), (0x4D1, 1, "ELCR"), (0x00, 0x1000, "master 8259 PIC")]
        for (base, length, owner) in cases {
            let error = Self.refusal(&ports, base: base, length: length)
            guard case let .ownedByKVM(name, _, _, what)? = error else {
                Issue.record("port 0x\(String(base, radix: 16)): \(String(describing: error))")
                continue
            }
            #expect(name == "mine" && what.contains(owner), "\(what)")
            #expect(error?.description.contains("KVM handles those accesses in the kernel") == true)
        }
        var mmio = IOBus.Builder.mmioBus()
        #expect(throws: IOBusError.ownedByKVM(name: "ioapic clone", base: 0xFEC0_0F00, length: 4,
                                              owner: "the IOAPIC (KVM_CREATE_IRQCHIP) at 0xfec00000+0x1000")) {
            try mmio.register(LatchDevice(), name: "ioapic clone", base: 0xFEC0_0F00, length: 4)
        }
        #expect(throws: IOBusError.self) { try mmio.register(LatchDevice(), name: "big", base: 0xFE00_0000, length: 0x100_0000) }
        // Next to them is fine: the UART, the i8042's two ports, a device below the IOAPIC.
        try ports.register(LatchDevice(), name: "uart", base: 0x3F8, length: 8)
        try ports.register(LatchDevice(), name: "i8042 data", base: 0x60, length: 1)
        try ports.register(LatchDevice(), name: "i8042 command", base: 0x64, length: 1)
        try mmio.register(LatchDevice(), name: "below", base: 0xFEBF_F000, length: 0x1000)
        // A plain builder knows nothing of KVM.
        var plain = IOBus.Builder()
        try plain.register(LatchDevice(), name: "pic", base: 0x20, length: 2)
    }

    static func refusal(_ builder: inout IOBus.Builder, base: UInt64, length: UInt64) -> IOBusError? {
        do {
            try builder.register(LatchDevice(), name: "mine", base: base, length: length)
            return nil
        } catch {
            return error
        }
    }

    @Test("A register window shifts offsets into the device it shows")
    func registerWindow() {
        let device = LatchDevice()
        let window = RegisterWindow(device, offset: 4)
        [UInt8(0xFE)].withUnsafeBytes { window.write(offset: 0, from: $0) }
        #expect(device.last.withLock { $0?.0 } == 4)
        var value: UInt8 = 0
        withUnsafeMutableBytes(of: &value) { window.read(offset: 1, into: $0) }
        #expect(value == 5)
    }
}
