import Devices
import Synchronization

/// Port-access helpers and recorders for the platform device tests.
enum Port {
    static func write8(_ device: some IODevice, _ offset: UInt64, _ value: UInt8) {
        withUnsafeBytes(of: value) { device.write(offset: offset, from: $0) }
    }

    static func write16(_ device: some IODevice, _ offset: UInt64, _ value: UInt16) {
        withUnsafeBytes(of: value.littleEndian) { device.write(offset: offset, from: $0) }
    }

    static func write32(_ device: some IODevice, _ offset: UInt64, _ value: UInt32) {
        withUnsafeBytes(of: value.littleEndian) { device.write(offset: offset, from: $0) }
    }

    static func read8(_ device: some IODevice, _ offset: UInt64) -> UInt8 {
        var value: UInt8 = 0
        withUnsafeMutableBytes(of: &value) { device.read(offset: offset, into: $0) }
        return value
    }

    static func read16(_ device: some IODevice, _ offset: UInt64) -> UInt16 {
        var value: UInt16 = 0
        withUnsafeMutableBytes(of: &value) { device.read(offset: offset, into: $0) }
        return UInt16(littleEndian: value)
    }

    static func read32(_ device: some IODevice, _ offset: UInt64) -> UInt32 {
        var value: UInt32 = 0
        withUnsafeMutableBytes(of: &value) { device.read(offset: offset, into: $0) }
        return UInt32(littleEndian: value)
    }
}

final class Counter: Sendable {
    let value = Mutex(0)
    func increment() { value.withLock { $0 += 1 } }
    var count: Int { value.withLock { $0 } }
}

final class LevelRecorder: InterruptLine {
    let levels = Mutex<[Bool]>([])
    func setLevel(_ high: Bool) { levels.withLock { $0.append(high) } }
    var history: [Bool] { levels.withLock { $0 } }
}
