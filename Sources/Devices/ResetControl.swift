import Synchronization

/// The PIIX/ICH reset control register at port 0xCF9, one byte wide.
///
/// Owns the register's value. Bit 1 (SYS_RST) chooses a hard reset and bit 3 (FULL_RST,
/// ICH) a full power cycle; bit 2 (RST_CPU) starts the reset when it goes from 0 to 1.
/// Bits 1 and 3 are kept and read back; bit 2 clears itself (it reads 0), so every write
/// with bit 2 set is a rising edge and calls `onReset` with the byte written. Every kind
/// of reset ends the VM the same way (the machine's reset, status 6); the byte tells them
/// apart in the message. This is where Linux's `reboot=pci` ends (0x02, then 0x06 or
/// 0x0E), and `reboot=acpi` too: the FADT's RESET_REG points here with value 0x06.
///
/// Only 1-byte accesses reach the register; wider ones read all ones and are dropped.
///
/// Ports 0xCF8-0xCFF are also PCI configuration mechanism #1 (a 32-bit address register
/// at 0xCF8, data at 0xCFC-0xCFF). Hardware tells the two apart by access size, and so
/// must Swiftlet: the PCI host bridge, when it comes, takes 0xCF8 and 0xCFC-0xCFF and has
/// to keep sending 1-byte accesses at 0xCF9 to this device (register it as one device for
/// 0xCF8-0xCFF that forwards those, or give the bus access-size routing).
public final class ResetControl: IODevice {
    public static let port: UInt64 = 0xCF9
    public static let width: UInt64 = 1

    static let systemReset: UInt8 = 0x02
    static let resetCPU: UInt8 = 0x04
    static let fullReset: UInt8 = 0x08
    /// The bits that are stored and read back.
    static let keptBits: UInt8 = systemReset | fullReset

    private let value = Mutex<UInt8>(0)
    private let onReset: @Sendable (UInt8) -> Void

    /// - Parameter onReset: called (from a vCPU thread) with the byte written when it
    ///   starts a reset (bit 2 set).
    public init(onReset: @escaping @Sendable (UInt8) -> Void) {
        self.onReset = onReset
    }

    public func read(offset: UInt64, into data: UnsafeMutableRawBufferPointer) {
        guard offset == 0, data.count == 1 else {
            for index in data.indices { data[index] = 0xFF }
            return
        }
        data[0] = value.withLock { $0 }
    }

    public func write(offset: UInt64, from data: UnsafeRawBufferPointer) {
        guard offset == 0, data.count == 1 else { return }
        let byte = data[0]
        value.withLock { $0 = byte & Self.keptBits }
        if byte & Self.resetCPU != 0 { onReset(byte) }
    }

    /// What the reset kind in `byte` is called, for the stop message.
    public static func describe(_ byte: UInt8) -> String {
        if byte & fullReset != 0 { return "full reset" }
        if byte & systemReset != 0 { return "hard reset" }
        return "soft reset"
    }
}

// MARK: Snapshot

extension ResetControl: SnapshotDevice {
    /// The kept bits (SYS_RST, FULL_RST).
    public struct SavedState: Codable, Sendable, Equatable {
        public var value: UInt8
    }

    public func saveState() -> SavedState { SavedState(value: value.withLock { $0 }) }

    /// Puts the value back; bits other than SYS_RST and FULL_RST never stick, so a value
    /// with them is refused. Restoring starts no reset.
    public func restoreState(_ saved: SavedState) throws(DeviceStateError) {
        guard saved.value & ~Self.keptBits == 0 else {
            throw DeviceStateError(device: "reset control register", "0x\(String(saved.value, radix: 16)) sets bits the register does not keep")
        }
        value.withLock { $0 = saved.value }
    }
}
