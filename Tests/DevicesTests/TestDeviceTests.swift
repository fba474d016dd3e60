import Devices
import Synchronization
import Testing

@Suite("pc-testdev for kvm-unit-tests")
struct TestDeviceTests {
    func write(_ device: some IODevice, _ offset: UInt64, _ bytes: [UInt8]) {
        bytes.withUnsafeBytes { device.write(offset: offset, from: $0) }
    }

    func read(_ device: some IODevice, _ offset: UInt64, _ count: Int) -> [UInt8] {
        var bytes = [UInt8](repeating: 0, count: count)
        bytes.withUnsafeMutableBytes { device.read(offset: offset, into: $0) }
        return bytes
    }

    @Test("The register reads back at every width and offset")
    func register() {
        let device = TestDevice { _, _ in }
        write(device.register, 0, [0x99, 0x99])           // outw 0x9999
        #expect(read(device.register, 0, 1) == [0x99])    // inb
        write(device.register, 0, [0x78, 0x56, 0x34, 0x12])
        #expect(read(device.register, 2, 2) == [0x34, 0x12])
        write(device.register, 3, [0xAB])
        #expect(read(device.register, 0, 4) == [0x78, 0x56, 0x34, 0xAB])
        #expect(read(device.register, 3, 2) == [0xAB, 0xFF]) // past the register
    }

    @Test("Writes to 0x2000 + N drive interrupt line N")
    func irqLines() {
        let seen = Mutex<[(UInt32, Bool)]>([])
        let device = TestDevice { gsi, high in seen.withLock { $0.append((gsi, high)) } }
        write(device.irqLines, 11, [1])
        write(device.irqLines, 11, [0])
        write(device.irqLines, 24, [1]) // no such line: ignored
        let calls = seen.withLock { $0 }
        #expect(calls.map(\.0) == [11, 11])
        #expect(calls.map(\.1) == [true, false])
    }

    @Test("I/O RAM keeps what is written; accesses past its end are cut off")
    func ioRAM() {
        let device = TestDevice { _, _ in }
        write(device.ioRAM, 4095, [0xAA, 0x88])
        #expect(read(device.ioRAM, 4095, 2) == [0xAA, 0x88])
        write(device.ioRAM, TestDevice.ioRAMLength - 2, [1, 2, 3, 4, 5, 6, 7, 8])
        #expect(read(device.ioRAM, TestDevice.ioRAMLength - 2, 4) == [1, 2, 0xFF, 0xFF])
    }
}
