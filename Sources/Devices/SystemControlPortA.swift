import Synchronization

/// System control port A at port 0x92 (the PS/2 "fast A20 and reset" port), one byte.
///
/// Owns the port's value, which reads back as last written. Bit 0 (fast reset) starts a
/// CPU reset when it goes from 0 to 1: `onReset` is called, and the machine ends the VM
/// as a reset (status 6). Bit 1 is the A20 gate. KVM has no A20 masking, so addresses
/// never wrap at 1 MiB whatever the guest writes: the port starts with bit 1 set (A20
/// enabled, as firmware leaves it) and keeps the bit only to read it back. The other bits
/// (security lock, activity lights) are stored and have no effect.
///
/// Only 1-byte accesses reach the port; wider ones read all ones and are dropped.
public final class SystemControlPortA: IODevice {
    public static let port: UInt64 = 0x92
    public static let width: UInt64 = 1

    static let fastReset: UInt8 = 0x01
    static let a20Gate: UInt8 = 0x02

    private let value = Mutex<UInt8>(a20Gate)
    private let onReset: @Sendable () -> Void

    /// - Parameter onReset: called (from a vCPU thread) when bit 0 goes from 0 to 1.
    public init(onReset: @escaping @Sendable () -> Void) {
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
        let rising = value.withLock { value -> Bool in
            let old = value
            value = byte
            return old & Self.fastReset == 0 && byte & Self.fastReset != 0
        }
        if rising { onReset() }
    }
}

// MARK: Snapshot

extension SystemControlPortA: SnapshotDevice {
    /// The port's byte (every value reads back).
    public struct SavedState: Codable, Sendable, Equatable {
        public var value: UInt8
    }

    public func saveState() -> SavedState { SavedState(value: value.withLock { $0 }) }

    /// Puts the byte back. A saved bit 0 starts no reset: only a guest write's rising
    /// edge does.
    public func restoreState(_ saved: SavedState) throws(DeviceStateError) {
        value.withLock { $0 = saved.value }
    }
}
