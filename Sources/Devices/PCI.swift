import Basics
import Layout
import Synchronization

/// A memory BAR's current place in guest-physical space.
public struct PCIBARRegion: Sendable, Equatable {
    public var index: Int
    public var base: UInt64
    public var size: UInt64
}

/// One PCI function on Swiftlet's bus 0: its configuration space and the memory its BARs
/// decode. The host bridge routes configuration cycles (port 0xCF8/0xCFC or ECAM) and BAR
/// accesses to it.
public protocol PCIFunction: AnyObject, Sendable {
    /// Reads `data.count` bytes (1, 2 or 4) of configuration space at `offset` (0-4095).
    func readConfiguration(offset: Int, into data: UnsafeMutableRawBufferPointer)
    /// Writes configuration space.
    func writeConfiguration(offset: Int, from data: UnsafeRawBufferPointer)
    /// The BARs that decode memory now: empty while memory decoding is off.
    var memoryRegions: [PCIBARRegion] { get }
    /// An access to BAR `index` at `offset` inside it.
    func readBAR(_ index: Int, offset: UInt64, into data: UnsafeMutableRawBufferPointer)
    func writeBAR(_ index: Int, offset: UInt64, from data: UnsafeRawBufferPointer)
}

/// A type-0 configuration header with 32-bit memory BARs, the part every function shares
/// (PCI Local Bus 3.0, 6.1-6.2): identity, command and status, BAR sizing and placement,
/// the interrupt line and pin, and a capability area the function fills in. Writes change
/// only the writable bits: the command register's I/O, memory, bus-master and INTx-disable
/// bits, the BAR address bits above the BAR's size, the interrupt line, and the
/// capability bytes the function marks writable.
public struct PCIConfigurationHeader: Sendable {
    public static let size = 256
    static let commandMemory: UInt16 = 1 << 1
    static let commandWritable: UInt16 = (1 << 0) | (1 << 1) | (1 << 2) | (1 << 10)
    static let statusCapabilities: UInt16 = 1 << 4

    public private(set) var bytes: [UInt8]
    /// Which bytes the driver may write (beyond command, BARs and interrupt line).
    private var writable: [Bool]
    /// Each BAR's size (a power of two, at least 16), or 0 when the BAR is unused.
    public let barSizes: [UInt64]

    /// - Parameters:
    ///   - barSizes: up to six 32-bit memory BAR sizes (0 for none).
    ///   - interruptPin: 1 for INTA, 0 for no interrupt pin.
    public init(vendor: UInt16, device: UInt16, revision: UInt8, classCode: UInt32, subsystemVendor: UInt16,
                subsystem: UInt16, barSizes: [UInt64], interruptPin: UInt8) {
        bytes = [UInt8](repeating: 0, count: Self.size)
        writable = [Bool](repeating: false, count: Self.size)
        self.barSizes = (barSizes + [UInt64](repeating: 0, count: 6)).prefix(6).map { $0 == 0 ? 0 : max(16, $0) }
        bytes.putLE(vendor, at: 0x00)
        bytes.putLE(device, at: 0x02)
        bytes[0x08] = revision
        bytes[0x09] = UInt8(truncatingIfNeeded: classCode)
        bytes[0x0A] = UInt8(truncatingIfNeeded: classCode >> 8)
        bytes[0x0B] = UInt8(truncatingIfNeeded: classCode >> 16)
        bytes.putLE(subsystemVendor, at: 0x2C)
        bytes.putLE(subsystem, at: 0x2E)
        bytes[0x3D] = interruptPin
    }

    public var command: UInt16 { UInt16(bytes[0x04]) | UInt16(bytes[0x05]) << 8 }
    public var memoryDecoding: Bool { command & Self.commandMemory != 0 }
    public var interruptDisabled: Bool { command & (1 << 10) != 0 }
    public var interruptLine: UInt8 { bytes[0x3C] }

    /// Places BAR `index` at `base` (firmware's job: Swiftlet has none, so the machine
    /// assigns every BAR before the guest runs) and turns memory decoding on.
    public mutating func assignBAR(_ index: Int, base: UInt64) {
        precondition(barSizes[index] > 0 && base % barSizes[index] == 0 && base <= UInt64(UInt32.max))
        bytes.putLE(UInt32(base), at: 0x10 + 4 * index)
        let command = self.command | Self.commandMemory
        bytes.putLE(command, at: 0x04)
    }

    /// The base address programmed in BAR `index`.
    public func barBase(_ index: Int) -> UInt64 {
        UInt64((bytes.le(UInt32.self, at: 0x10 + 4 * index) ?? 0) & ~0xF)
    }

    public var memoryRegions: [PCIBARRegion] {
        guard memoryDecoding else { return [] }
        return barSizes.enumerated().compactMap { index, size in
            size > 0 ? PCIBARRegion(index: index, base: barBase(index), size: size) : nil
        }
    }

    /// Appends the capability `body` (starting with its ID byte; the next pointer is
    /// filled in) at `offset`, and marks `writableRange` (relative to the capability) as
    /// driver-writable.
    public mutating func addCapability(at offset: Int, _ body: [UInt8], writableRange: Range<Int>? = nil) {
        precondition(offset >= 0x40 && offset + body.count <= Self.size && offset % 4 == 0)
        bytes.put(bytes: body, at: offset)
        bytes[offset + 1] = 0
        // Link it at the end of the list.
        if bytes[0x34] == 0 {
            bytes[0x34] = UInt8(offset)
        } else {
            var pointer = Int(bytes[0x34])
            while bytes[pointer + 1] != 0 { pointer = Int(bytes[pointer + 1]) }
            bytes[pointer + 1] = UInt8(offset)
        }
        let status = (UInt16(bytes[0x06]) | UInt16(bytes[0x07]) << 8) | Self.statusCapabilities
        bytes.putLE(status, at: 0x06)
        if let writableRange { for index in writableRange { writable[offset + index] = true } }
    }

    /// Sets a byte inside a capability directly (a register whose writable bits the
    /// function decides itself, such as MSI-X message control).
    public mutating func setCapabilityByte(_ offset: Int, _ value: UInt8) {
        precondition(offset >= 0x40 && offset < Self.size)
        bytes[offset] = value
    }

    /// Sets bit 3 of the status register (interrupt status), which mirrors the INTx line.
    public mutating func setInterruptStatus(_ pending: Bool) {
        if pending { bytes[0x06] |= 1 << 3 } else { bytes[0x06] &= ~(1 << 3) }
    }

    public func read(offset: Int, into data: UnsafeMutableRawBufferPointer) {
        for index in data.indices {
            let position = offset + index
            data[index] = position < Self.size ? bytes[position] : 0
        }
    }

    /// The bits of each byte a driver can change: the command register's writable bits,
    /// the interrupt status bit, BAR address bits above each BAR's size, the interrupt
    /// line, and the capability bytes marked writable. `functionBits` adds the bits the
    /// function changes itself (offset -> mask, such as MSI-X message control).
    func changeableBits(functionBits: [Int: UInt8]) -> [UInt8] {
        var masks = [UInt8](repeating: 0, count: Self.size)
        masks[0x04] = UInt8(truncatingIfNeeded: Self.commandWritable)
        masks[0x05] = UInt8(truncatingIfNeeded: Self.commandWritable >> 8)
        masks[0x06] = 1 << 3
        for (bar, size) in barSizes.enumerated() where size > 0 {
            for byte in 0..<4 {
                let mask = UInt8(truncatingIfNeeded: ~(size - 1) >> (8 * UInt64(byte))) & (byte == 0 ? 0xF0 : 0xFF)
                masks[0x10 + 4 * bar + byte] = mask
            }
        }
        masks[0x3C] = 0xFF
        for position in writable.indices where writable[position] { masks[position] = 0xFF }
        for (offset, bits) in functionBits where offset >= 0 && offset < Self.size { masks[offset] |= bits }
        return masks
    }

    /// Takes `saved` as the header's bytes if this header could have become it: the same
    /// size, and every byte equal to this header's except in the bits a driver (or the
    /// function, `functionBits`) can change. Returns why not, or nil when it took them.
    /// A restore uses it on a header made as the saved one was, so identity, BAR sizes and
    /// the capability list cannot be changed by a snapshot file.
    public mutating func restore(_ saved: [UInt8], functionBits: [Int: UInt8] = [:]) -> String? {
        guard saved.count == Self.size else { return "\(saved.count) bytes of configuration header, not \(Self.size)" }
        let masks = changeableBits(functionBits: functionBits)
        for position in 0..<Self.size where (saved[position] ^ bytes[position]) & ~masks[position] != 0 {
            return "configuration byte 0x\(String(position, radix: 16)) is 0x\(String(saved[position], radix: 16)), "
                + "which no driver write can make of 0x\(String(bytes[position], radix: 16))"
        }
        bytes = saved
        return nil
    }

    /// Applies a configuration write. Returns the BARs whose base changed (old, new).
    @discardableResult
    public mutating func write(offset: Int, from data: UnsafeRawBufferPointer) -> [(index: Int, old: UInt64, new: UInt64)] {
        var moved: [(Int, UInt64, UInt64)] = []
        for (index, byte) in data.enumerated() {
            let position = offset + index
            guard position < Self.size else { continue }
            switch position {
            case 0x04, 0x05:
                let mask = UInt8(truncatingIfNeeded: Self.commandWritable >> (8 * UInt16(position - 0x04)))
                bytes[position] = (bytes[position] & ~mask) | (byte & mask)
            case 0x06, 0x07:
                break // status: only read-only and write-1-to-clear bits we never set
            case 0x10..<0x28:
                let bar = (position - 0x10) / 4
                let size = barSizes[bar]
                guard size > 0 else { continue }
                let before = barBase(bar)
                // Address bits below the size read as zero; bits 3:0 are the BAR's type
                // (32-bit memory, not prefetchable: all zero).
                let shift = 8 * UInt64(position - 0x10 - 4 * bar)
                let mask = UInt8(truncatingIfNeeded: ~(size - 1) >> shift) & (position % 4 == 0 ? 0xF0 : 0xFF)
                bytes[position] = byte & mask
                let after = barBase(bar)
                if after != before { moved.append((bar, before, after)) }
            case 0x3C:
                bytes[position] = byte
            default:
                if writable[position] { bytes[position] = byte }
            }
        }
        // A BAR written in pieces reports each step; callers only need first and last.
        return moved.map { (index: $0.0, old: $0.1, new: $0.2) }
    }
}

/// The PCI host bridge of Swiftlet's bus 0: configuration mechanism #1 at ports
/// 0xCF8-0xCFF, the ECAM window (``AddressMap/pciECAMStart``, announced in the ACPI MCFG),
/// and the memory window where functions' BARs live. Functions are placed by device
/// number (slot) with function number 0; slot 0 is the host bridge itself.
///
/// Three ``IODevice``s face the buses: ``configurationPorts`` (port bus, 0xCF8-0xCFF),
/// ``ecam`` and ``memoryWindow`` (MMIO bus). Port 0xCF9 answers 1-byte accesses as the
/// reset control register (the device given at init), as on a PIIX/ICH chipset.
public final class PCIHostBridge: Sendable {
    public static let configurationAddressPort: UInt64 = 0xCF8
    public static let slotCount = 32
    /// The bits CONFIG_ADDRESS keeps: enable, bus, device, function, register.
    static let configurationAddressBits: UInt32 = 0x80FF_FFFC

    /// The host bridge's own function at 00:00.0 (class 06 00 00, host bridge).
    final class HostFunction: PCIFunction {
        let header = PCIConfigurationHeader(vendor: 0x1B36, device: 0x0008, revision: 0, classCode: 0x06_00_00,
                                            subsystemVendor: 0x1AF4, subsystem: 0x1100, barSizes: [], interruptPin: 0)
        func readConfiguration(offset: Int, into data: UnsafeMutableRawBufferPointer) { header.read(offset: offset, into: data) }
        func writeConfiguration(offset: Int, from data: UnsafeRawBufferPointer) {}
        var memoryRegions: [PCIBARRegion] { [] }
        func readBAR(_ index: Int, offset: UInt64, into data: UnsafeMutableRawBufferPointer) {}
        func writeBAR(_ index: Int, offset: UInt64, from data: UnsafeRawBufferPointer) {}
    }

    private let slots: [(any PCIFunction)?]
    private let address = Mutex<UInt32>(0)
    private let resetControl: (any IODevice)?

    /// - Parameters:
    ///   - functions: device number -> function, for slots 1-31.
    ///   - resetControl: the device answering 1-byte accesses at 0xCF9.
    public init(functions: [Int: any PCIFunction], resetControl: (any IODevice)?) {
        var slots = [(any PCIFunction)?](repeating: nil, count: Self.slotCount)
        slots[0] = HostFunction()
        for (slot, function) in functions where slot > 0 && slot < Self.slotCount { slots[slot] = function }
        self.slots = slots
        self.resetControl = resetControl
    }

    /// The function at `slot`, if any.
    public func function(at slot: Int) -> (any PCIFunction)? {
        slot >= 0 && slot < slots.count ? slots[slot] : nil
    }

    // MARK: Configuration access

    /// Routes a configuration access for bus/device/function/offset; absent functions read all ones.
    func configurationRead(bus: Int, device: Int, function: Int, offset: Int, into data: UnsafeMutableRawBufferPointer) {
        guard bus == 0, function == 0, let target = self.function(at: device) else {
            for index in data.indices { data[index] = 0xFF }
            return
        }
        target.readConfiguration(offset: offset, into: data)
    }

    func configurationWrite(bus: Int, device: Int, function: Int, offset: Int, from data: UnsafeRawBufferPointer) {
        guard bus == 0, function == 0, let target = self.function(at: device) else { return }
        target.writeConfiguration(offset: offset, from: data)
    }

    /// Ports 0xCF8-0xCFF: CONFIG_ADDRESS (32-bit at 0xCF8; bit 31 enables, bus 23:16,
    /// device 15:11, function 10:8, register 7:2) and CONFIG_DATA (0xCFC-0xCFF, any width).
    public var configurationPorts: any IODevice { ConfigurationPorts(bridge: self) }

    final class ConfigurationPorts: IODevice {
        let bridge: PCIHostBridge
        init(bridge: PCIHostBridge) { self.bridge = bridge }

        func read(offset: UInt64, into data: UnsafeMutableRawBufferPointer) {
            switch offset {
            case 0 where data.count == 4:
                data.storeBytes(of: bridge.address.withLock { $0 }.littleEndian, as: UInt32.self)
            case 1 where data.count == 1 && bridge.resetControl != nil:
                bridge.resetControl!.read(offset: 0, into: data)
            case 4..<8 where offset + UInt64(data.count) <= 8:
                let address = bridge.address.withLock { $0 }
                guard address & 0x8000_0000 != 0 else { fill(data); return }
                let (bus, device, function, register) = Self.decode(address)
                bridge.configurationRead(bus: bus, device: device, function: function, offset: register + Int(offset - 4), into: data)
            default:
                fill(data)
            }
        }

        func write(offset: UInt64, from data: UnsafeRawBufferPointer) {
            switch offset {
            case 0 where data.count == 4:
                let value = UInt32(littleEndian: data.loadUnaligned(as: UInt32.self))
                bridge.address.withLock { $0 = value & PCIHostBridge.configurationAddressBits }
            case 1 where data.count == 1:
                bridge.resetControl?.write(offset: 0, from: data)
            case 4..<8 where offset + UInt64(data.count) <= 8:
                let address = bridge.address.withLock { $0 }
                guard address & 0x8000_0000 != 0 else { return }
                let (bus, device, function, register) = Self.decode(address)
                bridge.configurationWrite(bus: bus, device: device, function: function, offset: register + Int(offset - 4), from: data)
            default:
                break
            }
        }

        static func decode(_ address: UInt32) -> (Int, Int, Int, Int) {
            (Int(address >> 16 & 0xFF), Int(address >> 11 & 0x1F), Int(address >> 8 & 0x7), Int(address & 0xFC))
        }

        private func fill(_ data: UnsafeMutableRawBufferPointer) {
            for index in data.indices { data[index] = 0xFF }
        }
    }

    /// The ECAM window: offset = bus << 20 | device << 15 | function << 12 | register.
    public var ecam: any IODevice { ECAM(bridge: self) }

    final class ECAM: IODevice {
        let bridge: PCIHostBridge
        init(bridge: PCIHostBridge) { self.bridge = bridge }

        func read(offset: UInt64, into data: UnsafeMutableRawBufferPointer) {
            let register = Int(offset & 0xFFF)
            guard register + data.count <= 0x1000 else { for index in data.indices { data[index] = 0xFF }; return }
            bridge.configurationRead(bus: Int(offset >> 20 & 0xFF), device: Int(offset >> 15 & 0x1F), function: Int(offset >> 12 & 0x7),
                                     offset: register, into: data)
        }

        func write(offset: UInt64, from data: UnsafeRawBufferPointer) {
            let register = Int(offset & 0xFFF)
            guard register + data.count <= 0x1000 else { return }
            bridge.configurationWrite(bus: Int(offset >> 20 & 0xFF), device: Int(offset >> 15 & 0x1F), function: Int(offset >> 12 & 0x7),
                                      offset: register, from: data)
        }
    }

    // MARK: BAR window

    /// The PCI memory window: an access goes to the function whose BAR covers it now
    /// (BARs may be moved by the guest), or reads all ones.
    public func memoryWindow(base: UInt64) -> any IODevice { MemoryWindow(bridge: self, base: base) }

    final class MemoryWindow: IODevice {
        let bridge: PCIHostBridge
        let base: UInt64
        init(bridge: PCIHostBridge, base: UInt64) { self.bridge = bridge; self.base = base }

        private func route(_ offset: UInt64, _ count: Int) -> (any PCIFunction, Int, UInt64)? {
            let address = base + offset
            for case let function? in bridge.slots {
                for region in function.memoryRegions where address >= region.base && address - region.base < region.size {
                    guard address - region.base + UInt64(count) <= region.size else { return nil }
                    return (function, region.index, address - region.base)
                }
            }
            return nil
        }

        func read(offset: UInt64, into data: UnsafeMutableRawBufferPointer) {
            guard let (function, bar, inside) = route(offset, data.count) else {
                for index in data.indices { data[index] = 0xFF }
                return
            }
            function.readBAR(bar, offset: inside, into: data)
        }

        func write(offset: UInt64, from data: UnsafeRawBufferPointer) {
            guard let (function, bar, inside) = route(offset, data.count) else { return }
            function.writeBAR(bar, offset: inside, from: data)
        }
    }
}

// MARK: Snapshot

extension PCIHostBridge: SnapshotDevice {
    /// CONFIG_ADDRESS, the one register the bridge owns. The functions' configuration
    /// headers are saved with each function's own state.
    public struct SavedState: Codable, Sendable, Equatable {
        public var configurationAddress: UInt32
    }

    public func saveState() -> SavedState { SavedState(configurationAddress: address.withLock { $0 }) }

    /// Puts CONFIG_ADDRESS back; bits the register does not keep (1:0, 30:24) are refused.
    public func restoreState(_ saved: SavedState) throws(DeviceStateError) {
        guard saved.configurationAddress & ~Self.configurationAddressBits == 0 else {
            throw DeviceStateError(device: "PCI host bridge",
                                   "CONFIG_ADDRESS 0x\(String(saved.configurationAddress, radix: 16)) sets bits the register does not keep")
        }
        address.withLock { $0 = saved.configurationAddress }
    }
}
