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
