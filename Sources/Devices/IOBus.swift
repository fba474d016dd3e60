import Layout

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
    /// `name` at `[base, base + length)` overlaps `existing`, already registered.
    case overlap(name: String, base: UInt64, length: UInt64, existing: String)
    /// `name` asked for an empty range, or one that runs past the end of the address space.
    case emptyRange(name: String)
    /// `name` at `[base, base + length)` overlaps `owner`, one of KVM's in-kernel devices:
    /// the guest's accesses there are handled in the host kernel and never reach a bus.
    case ownedByKVM(name: String, base: UInt64, length: UInt64, owner: String)

    public var description: String {
        switch self {
        case let .overlap(name, base, length, existing):
            return "\(name) at 0x\(String(base, radix: 16))+0x\(String(length, radix: 16)) overlaps \(existing)"
        case let .emptyRange(name): return "\(name): its I/O range is empty or wraps around"
        case let .ownedByKVM(name, base, length, owner):
            return "\(name) at 0x\(String(base, radix: 16))+0x\(String(length, radix: 16)) overlaps \(owner): KVM handles "
                + "those accesses in the kernel, so they would never reach the device"
        }
    }
}

/// A window onto part of another device's registers, for a device whose registers are not
/// contiguous on the bus (the i8042 answers at 0x60 and 0x64, with 0x61 in between owned by
/// KVM): an access at offset `o` of the window reaches the device at `offset + o`.
public final class RegisterWindow: IODevice {
    public let device: any IODevice
    public let offset: UInt64

    public init(_ device: any IODevice, offset: UInt64) {
        self.device = device
        self.offset = offset
    }

    public func read(offset: UInt64, into data: UnsafeMutableRawBufferPointer) {
        device.read(offset: self.offset &+ offset, into: data)
    }

    public func write(offset: UInt64, from data: UnsafeRawBufferPointer) {
        device.write(offset: self.offset &+ offset, from: data)
    }
}

/// One device's place on a bus.
public struct IOBusEntry: Sendable {
    public let base: UInt64
    public let length: UInt64
    public let device: any IODevice
    public let name: String
}

/// Maps address ranges to devices: one bus for port I/O, one for MMIO.
///
/// The map is fixed when the bus is made (``IOBus/Builder`` collects and checks the
/// ranges), so a lookup on a vCPU thread is a binary search over an immutable array,
/// with no lock. Devices that move (a PCI BAR the guest reprograms) stay registered at a
/// fixed window and route inside it themselves.
public final class IOBus: Sendable {
    public typealias Entry = IOBusEntry

    /// Collects registrations and checks each for overlaps before the bus exists.
    public struct Builder: Sendable {
        private(set) var entries: [Entry] = []
        /// Ranges no device may take: those KVM's in-kernel devices own.
        private let reserved: [KVMOwnedRange]

        /// A builder that refuses only overlaps between devices (unit tests, buses of their own).
        public init() { reserved = [] }

        /// A builder that also refuses `reserved`, naming its owner.
        public init(reserving reserved: [KVMOwnedRange]) { self.reserved = reserved }

        /// The machine's port bus: refuses the ports of KVM's PICs and PIT (``KVMOwned/ports``).
        public static func portBus() -> Builder { Builder(reserving: KVMOwned.ports) }

        /// The machine's MMIO bus: refuses the IOAPIC and local APIC pages (``KVMOwned/mmio``).
        public static func mmioBus() -> Builder { Builder(reserving: KVMOwned.mmio) }

        /// Places `device` at `[base, base + length)`. Throws when the range is empty,
        /// overlaps a device already placed (the error names both) or a range KVM owns.
        public mutating func register(_ device: any IODevice, name: String, base: UInt64, length: UInt64) throws(IOBusError) {
            guard length > 0, base.addingReportingOverflow(length - 1).overflow == false else { throw .emptyRange(name: name) }
            let last = base + (length - 1)
            if let owned = reserved.first(where: { base <= $0.base + ($0.length - 1) && $0.base <= last }) {
                throw .ownedByKVM(name: name, base: base, length: length,
                                  owner: "\(owned.owner) at 0x\(String(owned.base, radix: 16))+0x\(String(owned.length, radix: 16))")
            }
            if let existing = entries.first(where: { base <= $0.base + ($0.length - 1) && $0.base <= last }) {
                throw .overlap(name: name, base: base, length: length, existing: "\(existing.name) at 0x\(String(existing.base, radix: 16))+0x\(String(existing.length, radix: 16))")
            }
            entries.append(Entry(base: base, length: length, device: device, name: name))
        }

        /// The bus with every registered device, sorted by address.
        public func build() -> IOBus { IOBus(sorted: entries.sorted { $0.base < $1.base }) }
    }

    /// The registered devices in address order, for `--trace-exits` and docs.
    public let devices: [Entry]

    private init(sorted: [Entry]) { devices = sorted }

    /// An empty bus: every access is unclaimed.
    public convenience init() { self.init(sorted: []) }

    /// The device covering `address`, and the offset of `address` within its range.
    public func resolve(_ address: UInt64) -> (entry: Entry, offset: UInt64)? {
        // Binary search for the last entry starting at or below the address.
        var low = 0, high = devices.count
        while low < high {
            let mid = (low + high) / 2
            if devices[mid].base <= address { low = mid + 1 } else { high = mid }
        }
        guard low > 0 else { return nil }
        let entry = devices[low - 1]
        let offset = address - entry.base
        return offset < entry.length ? (entry, offset) : nil
    }

    /// Dispatches a read. Returns the device that took it, or `nil` when no device claims
    /// the address; the data is then all ones, like an unclaimed ISA bus.
    @discardableResult
    public func read(_ address: UInt64, into data: UnsafeMutableRawBufferPointer) -> Entry? {
        guard let (entry, offset) = resolve(address) else {
            for index in data.indices { data[index] = 0xFF }
            return nil
        }
        entry.device.read(offset: offset, into: data)
        return entry
    }

    /// Dispatches a write. Returns the device that took it, or `nil` when no device
    /// claims the address; the write is then dropped.
    @discardableResult
    public func write(_ address: UInt64, from data: UnsafeRawBufferPointer) -> Entry? {
        guard let (entry, offset) = resolve(address) else { return nil }
        entry.device.write(offset: offset, from: data)
        return entry
    }
}
