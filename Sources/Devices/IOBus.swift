import Synchronization

/// A device that answers reads and writes in a range of port-I/O or MMIO addresses.
///
/// The bus hands each access to the device with the offset inside the device's range,
/// so one model works at any base address. `data` is the access itself (1, 2, 4 or 8
/// bytes, little-endian as on x86). Devices are called from vCPU threads concurrently
/// and keep their own state behind a lock.
public protocol IODevice: AnyObject, Sendable {
    /// Fills `data` with the value read at `offset`.
    func read(offset: UInt64, into data: UnsafeMutableRawBufferPointer)
    /// Takes the value written at `offset`.
    func write(offset: UInt64, from data: UnsafeRawBufferPointer)
}

/// An interrupt input the device can raise or lower: a GSI on the in-kernel irqchip in
/// the running machine (`KVM_IRQ_LINE`), a recorder in tests.
public protocol InterruptLine: Sendable {
    func setLevel(_ high: Bool)
}

/// Why a device could not be placed on a bus.
public enum IOBusError: Error, Equatable, CustomStringConvertible {
    case overlap(base: UInt64, length: UInt64)
    case emptyRange

    public var description: String {
        switch self {
        case let .overlap(base, length):
            return "I/O range 0x\(String(base, radix: 16))+0x\(String(length, radix: 16)) overlaps another device"
        case .emptyRange: return "I/O range is empty"
        }
    }
}

/// Maps address ranges to devices: one bus for port I/O, one for MMIO.
///
/// Devices are registered while the machine is built; lookups afterwards are lock-free
/// reads of a sorted array (registration after vCPUs start is not supported).
public final class IOBus: Sendable {
    public struct Entry: Sendable {
        public let base: UInt64
        public let length: UInt64
        public let device: any IODevice
        public let name: String
    }

    private let entries = Mutex<[Entry]>([])

    public init() {}

    /// Places `device` at `[base, base + length)`.
    public func register(_ device: any IODevice, name: String, base: UInt64, length: UInt64) throws(IOBusError) {
        guard length > 0, base.addingReportingOverflow(length - 1).overflow == false else { throw .emptyRange }
        try entries.withLock { (entries: inout [Entry]) throws(IOBusError) in
            let last = base + (length - 1)
            if entries.contains(where: { base <= $0.base + ($0.length - 1) && $0.base <= last }) {
                throw .overlap(base: base, length: length)
            }
            entries.append(Entry(base: base, length: length, device: device, name: name))
            entries.sort { $0.base < $1.base }
        }
    }

    /// The device covering `address`, and the offset of `address` within its range.
    public func resolve(_ address: UInt64) -> (entry: Entry, offset: UInt64)? {
        entries.withLock { entries in
            // Binary search for the last entry starting at or below the address.
            var low = 0, high = entries.count
            while low < high {
                let mid = (low + high) / 2
                if entries[mid].base <= address { low = mid + 1 } else { high = mid }
            }
            guard low > 0 else { return nil }
            let entry = entries[low - 1]
            let offset = address - entry.base
            return offset < entry.length ? (entry, offset) : nil
        }
    }

    /// Dispatches a read. Returns `false` when no device claims the address; the data is
    /// then all ones, like an unclaimed ISA bus.
    @discardableResult
    public func read(_ address: UInt64, into data: UnsafeMutableRawBufferPointer) -> Bool {
        guard let (entry, offset) = resolve(address) else {
            for index in data.indices { data[index] = 0xFF }
            return false
        }
        entry.device.read(offset: offset, into: data)
        return true
    }

    /// Dispatches a write. Returns `false` when no device claims the address; the write
    /// is dropped.
    @discardableResult
    public func write(_ address: UInt64, from data: UnsafeRawBufferPointer) -> Bool {
        guard let (entry, offset) = resolve(address) else { return false }
        entry.device.write(offset: offset, from: data)
        return true
    }

    /// The registered devices in address order, for `--trace-exits` and docs.
    public var devices: [Entry] { entries.withLock { $0 } }
}
