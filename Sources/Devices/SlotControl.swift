import Layout
import Synchronization

/// What ``SlotControl`` asks of the machine, which owns the memory slots (the KVM side
/// stays out of this module, so the device is unit-tested without /dev/kvm).
public protocol MemorySlotHost: Sendable {
    /// Adds the memory slot of `kind` at its fixed address (``AddressMap/runtimeSlotRAM``
    /// or ``AddressMap/runtimeSlotReadOnly``), or finds it already added. Returns its
    /// slot number, or `nil` when it cannot be added.
    func addSlot(_ kind: SlotControl.SlotKind) -> UInt32?
    /// Reads (and so clears) the dirty log of the RAM slot added at run time: the
    /// guest-physical addresses of the pages the guest wrote there since the last read,
    /// in order. Empty when the slot does not exist.
    func takeDirtyPages() -> [UInt64]
}

/// A teaching device, present with `swiftlet run --show-memory`: the guest asks the VMM
/// to change its memory slots while it runs, and sees the result (guests/memory-slots.s,
/// docs/memory.md).
///
/// Ports ``basePort`` to ``basePort`` + 7:
///
/// | offset | read | write |
/// | --- | --- | --- |
/// | 0 | the signature `SLOT` (little-endian 0x544F4C53), so a guest can tell the device is there | a command byte |
/// | 4 | the next 32-bit word of the last command's answer; 0xFFFFFFFF when there is none left | ignored |
///
/// | command | what the VMM does | answer |
/// | --- | --- | --- |
/// | 1 | adds 2 MiB of RAM at ``AddressMap/runtimeSlotRAM`` (`KVM_SET_USER_MEMORY_REGION`) | the slot number, or 0xFFFFFFFF |
/// | 2 | adds 2 MiB of read-only memory (`KVM_MEM_READONLY`) at ``AddressMap/runtimeSlotReadOnly`` | the slot number, or 0xFFFFFFFF |
/// | 3 | reads the dirty log of the RAM slot (`KVM_GET_DIRTY_LOG`, which clears it) | the number of pages written, then the address of each |
/// | 4 | | how many writes reached the read-only slot's ``WriteTrap`` (each an MMIO exit), the address and value of the last |
///
/// Any other command answers 0xFFFFFFFF. Owns the answer being read and the trap's record.
public final class SlotControl: Sendable {
    public static let basePort: UInt64 = 0x5A0
    public static let portCount: UInt64 = 8
    /// The bytes offset 0 reads: "SLOT".
    public static let signature: UInt32 = 0x544F_4C53
    /// An answer word that means "nothing" or "failed".
    public static let none: UInt32 = 0xFFFF_FFFF

    public enum SlotKind: Sendable, Equatable {
        /// 2 MiB of RAM at ``AddressMap/runtimeSlotRAM``.
        case ram
        /// 2 MiB of read-only memory at ``AddressMap/runtimeSlotReadOnly``.
        case readOnly
    }

    /// The command and answer ports, for the port bus.
    public let ports: Ports
    /// Where the guest's writes to the read-only slot arrive, for the MMIO bus at
    /// ``AddressMap/runtimeSlotReadOnly`` (``AddressMap/runtimeSlotSize`` bytes).
    public let writeTrap: WriteTrap

    public init(host: any MemorySlotHost) {
        writeTrap = WriteTrap(base: AddressMap.runtimeSlotReadOnly)
        ports = Ports(host: host, trap: writeTrap)
    }

    /// The two registers.
    public final class Ports: IODevice {
        static let commandOffset: UInt64 = 0
        static let answerOffset: UInt64 = 4

        private let host: any MemorySlotHost
        private let trap: WriteTrap
        /// The words of the last answer not read yet.
        private let answer = Mutex<[UInt32]>([])

        init(host: any MemorySlotHost, trap: WriteTrap) {
            self.host = host
            self.trap = trap
        }

        public func read(offset: UInt64, into data: UnsafeMutableRawBufferPointer) {
            let value: UInt32?
            switch offset {
            case Self.commandOffset: value = SlotControl.signature
            case Self.answerOffset: value = answer.withLock { $0.isEmpty ? SlotControl.none : $0.removeFirst() }
            default: value = nil
            }
            for index in data.indices {
                data[index] = index < 4 ? UInt8(truncatingIfNeeded: (value ?? SlotControl.none) >> (8 * UInt32(index))) : 0xFF
            }
        }

        public func write(offset: UInt64, from data: UnsafeRawBufferPointer) {
            guard offset == Self.commandOffset, let command = data.first else { return }
            // The host's work (an ioctl, an mmap) happens outside the lock; the answer
            // replaces the previous one.
            let words: [UInt32]
            switch command {
            case 1: words = [host.addSlot(.ram) ?? SlotControl.none]
            case 2: words = [host.addSlot(.readOnly) ?? SlotControl.none]
            case 3:
                let pages = host.takeDirtyPages()
                words = [UInt32(truncatingIfNeeded: pages.count)] + pages.map { UInt32(truncatingIfNeeded: $0) }
            case 4:
                let record = trap.record
                words = [UInt32(truncatingIfNeeded: record.count), UInt32(truncatingIfNeeded: record.lastAddress),
                         UInt32(truncatingIfNeeded: record.lastValue)]
            default: words = [SlotControl.none]
            }
            answer.withLock { $0 = words }
        }
    }

    /// Takes the writes a guest makes to read-only memory: KVM turns each into an MMIO
    /// exit, which the bus hands here. They change nothing; they are counted. Reads reach
    /// it only while the read-only slot does not exist yet, and read all ones.
    public final class WriteTrap: IODevice {
        public struct Record: Sendable, Equatable {
            public var count: UInt64 = 0
            /// Guest-physical address and little-endian value (up to 8 bytes) of the last write.
            public var lastAddress: UInt64 = 0
            public var lastValue: UInt64 = 0
        }

        private let base: UInt64
        private let state = Mutex(Record())

        init(base: UInt64) { self.base = base }

        /// What was written so far.
        public var record: Record { state.withLock { $0 } }

        public func read(offset: UInt64, into data: UnsafeMutableRawBufferPointer) {
            for index in data.indices { data[index] = 0xFF }
        }

        public func write(offset: UInt64, from data: UnsafeRawBufferPointer) {
            var value: UInt64 = 0
            for (index, byte) in data.prefix(8).enumerated() { value |= UInt64(byte) << (8 * UInt64(index)) }
            state.withLock { record in
                record.count += 1
                record.lastAddress = base &+ offset
                record.lastValue = value
            }
        }
    }
}
