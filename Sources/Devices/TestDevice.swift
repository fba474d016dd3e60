import Layout
import Synchronization

/// QEMU's `pc-testdev`, the device kvm-unit-tests' x86 tests expect next to the PC
/// platform. It gives a test a way to check the CPU's I/O paths against known answers:
///
/// - ports 0xE0-0xE3: one 32-bit register that reads back what was written, at any
///   width and byte offset (string I/O tests: `rep outsb`, `rep insb`);
/// - port 0xE4: "flush page". QEMU changes the page's host mapping so the next access
///   must go through KVM's emulator; here the write is accepted and does nothing, which
///   keeps such tests correct, if less thorough;
/// - ports 0x2000-0x2017: writing V to 0x2000 + N sets interrupt line (GSI) N to
///   V != 0, so a test can raise and lower IOAPIC and PIC inputs;
/// - guest-physical 0xFF000000-0xFF00FFFF (``AddressMap/testDeviceRAM``): 64 KiB of "I/O RAM", memory that is MMIO, so
///   every access exits to the VMM (emulator tests run instructions on it).
///
/// Swiftlet places it only for Multiboot kernels, which is what kvm-unit-tests are.
public final class TestDevice: Sendable {
    public static let ioPort: UInt64 = 0xE0
    public static let ioPortLength: UInt64 = 4
    public static let flushPagePort: UInt64 = 0xE4
    public static let irqPortBase: UInt64 = 0x2000
    public static let irqLineCount: UInt64 = 24
    public static let ioRAMLength: UInt64 = AddressMap.testDeviceRAMSize

    /// The three parts, each placed on its bus at the addresses above.
    public let register: Register
    public let flushPage: IgnoredPorts
    public let irqLines: IRQLines
    public let ioRAM: IORAM

    /// - Parameter setIRQ: drives interrupt line `gsi` (`KVM_IRQ_LINE` in the machine).
    public init(setIRQ: @escaping @Sendable (_ gsi: UInt32, _ high: Bool) -> Void) {
        register = Register()
        flushPage = IgnoredPorts()
        irqLines = IRQLines(setIRQ: setIRQ)
        ioRAM = IORAM()
    }

    /// The read-back register at 0xE0.
    public final class Register: IODevice {
        fileprivate let value = Mutex<UInt32>(0)

        public func read(offset: UInt64, into data: UnsafeMutableRawBufferPointer) {
            let current = value.withLock { $0 }
            for index in data.indices {
                let byte = offset + UInt64(index)
                data[index] = byte < 4 ? UInt8(truncatingIfNeeded: current >> (8 * byte)) : 0xFF
            }
        }

        public func write(offset: UInt64, from data: UnsafeRawBufferPointer) {
            value.withLock { current in
                for (index, byte) in data.enumerated() where offset + UInt64(index) < 4 {
                    let shift = 8 * (offset + UInt64(index))
                    current = (current & ~(0xFF << shift)) | (UInt32(byte) << shift)
                }
            }
        }
    }

    /// Ports 0x2000 + N: set interrupt line N. Keeps each line's level (bit N), so a
    /// snapshot can drive the lines again.
    public final class IRQLines: IODevice {
        private let setIRQ: @Sendable (UInt32, Bool) -> Void
        fileprivate let levels = Mutex<UInt32>(0)

        init(setIRQ: @escaping @Sendable (UInt32, Bool) -> Void) { self.setIRQ = setIRQ }

        public func read(offset: UInt64, into data: UnsafeMutableRawBufferPointer) {
            for index in data.indices { data[index] = 0 }
        }

        public func write(offset: UInt64, from data: UnsafeRawBufferPointer) {
            guard offset < TestDevice.irqLineCount else { return }
            let high = data.contains { $0 != 0 }
            // Under the lock, so the lines change in the order the writes came.
            levels.withLock { levels in
                if high { levels |= 1 << UInt32(offset) } else { levels &= ~(1 << UInt32(offset)) }
                setIRQ(UInt32(offset), high)
            }
        }

        /// Sets each line whose level differs from `levels` (a restore).
        fileprivate func drive(_ levels: UInt32) {
            self.levels.withLock { current in
                for line in 0..<UInt32(TestDevice.irqLineCount) where (current ^ levels) & (1 << line) != 0 {
                    setIRQ(line, levels & (1 << line) != 0)
                }
                current = levels
            }
        }
    }

    /// 64 KiB of memory reached through MMIO exits.
    public final class IORAM: IODevice {
        fileprivate let bytes = Mutex([UInt8](repeating: 0, count: Int(TestDevice.ioRAMLength)))

        public func read(offset: UInt64, into data: UnsafeMutableRawBufferPointer) {
            bytes.withLock { bytes in
                for index in data.indices {
                    let position = offset + UInt64(index)
                    // An access may run past the end of the region: that part reads as ones.
                    data[index] = position < TestDevice.ioRAMLength ? bytes[Int(position)] : 0xFF
                }
            }
        }

        public func write(offset: UInt64, from data: UnsafeRawBufferPointer) {
            bytes.withLock { bytes in
                for (index, byte) in data.enumerated() where offset + UInt64(index) < TestDevice.ioRAMLength {
                    bytes[Int(offset) + index] = byte
                }
            }
        }
    }
}

// MARK: Snapshot

extension TestDevice: SnapshotDevice {
    /// The read-back register, the level of each interrupt line it drives, and the 64 KiB
    /// of I/O RAM (as base64).
    public struct SavedState: Codable, Sendable, Equatable {
        public var register: UInt32
        /// Bit N: line N is high.
        public var irqLevels: UInt32
        public var ioRAM: SavedBytes
    }

    static let deviceName = "pc-testdev"

    public func saveState() -> SavedState {
        SavedState(register: register.value.withLock { $0 }, irqLevels: irqLines.levels.withLock { $0 },
                   ioRAM: SavedBytes(ioRAM.bytes.withLock { $0 }))
    }

    /// Checks `saved` (exactly 64 KiB of I/O RAM, lines 0-23 only), puts it back and
    /// drives each line to its saved level.
    public func restoreState(_ saved: SavedState) throws(DeviceStateError) {
        guard saved.ioRAM.bytes.count == Int(Self.ioRAMLength) else {
            throw DeviceStateError(device: Self.deviceName, "\(saved.ioRAM.bytes.count) bytes of I/O RAM, not \(Self.ioRAMLength)")
        }
        guard saved.irqLevels >> UInt32(Self.irqLineCount) == 0 else {
            throw DeviceStateError(device: Self.deviceName, "interrupt lines above \(Self.irqLineCount - 1) are high")
        }
        register.value.withLock { $0 = saved.register }
        ioRAM.bytes.withLock { $0 = saved.ioRAM.bytes }
        irqLines.drive(saved.irqLevels)
    }
}
