import Basics
import Layout

/// The devices a machine has besides the fixed PC platform, as the firmware tables
/// announce them to the guest: virtio-mmio transports (DSDT devices `LNRO0005`) and a PCI
/// host bridge (MCFG, DSDT device `PNP0A08` with its interrupt routing, MP table bus and
/// interrupt entries). The machine fills it in from ``AddressMap`` and ``InterruptMap``;
/// ``FirmwareTables/write(into:cpuCount:devices:irq0ToGSI2:)`` checks it before it writes
/// anything. The default, ``none``, announces nothing and leaves the tables as a machine
/// without these devices has them.
public struct PlatformDevices: Sendable, Equatable {
    /// virtio-mmio devices, announced in this order as `\_SB.VR00`, `\_SB.VR01`, ...
    /// (`_UID` 0, 1, ...).
    public var virtioMMIO: [VirtioMMIODevice]
    /// The PCI host bridge, if the machine has one.
    public var pci: PCIHostDescription?

    /// No virtio-mmio devices and no PCI host bridge.
    public static let none = PlatformDevices()

    /// More virtio-mmio devices than this cannot be named `VR00`-`VRFF`.
    public static let maximumVirtioMMIODevices = 256

    public init(virtioMMIO: [VirtioMMIODevice] = [], pci: PCIHostDescription? = nil) {
        self.virtioMMIO = virtioMMIO; self.pci = pci
    }
}

/// One virtio-mmio transport: its register window and the GSI it raises, edge-triggered
/// and active high (the machine signals it through an irqfd).
public struct VirtioMMIODevice: Sendable, Equatable {
    public var base: UInt64
    public var size: UInt64
    public var gsi: UInt32

    public init(base: UInt64, size: UInt64, gsi: UInt32) {
        self.base = base; self.size = size; self.gsi = gsi
    }

    /// virtio-mmio slot `index` as ``AddressMap`` and ``InterruptMap`` place it, or `nil`
    /// when there is no such slot.
    public static func slot(_ index: Int) -> VirtioMMIODevice? {
        guard index >= 0, index < AddressMap.virtioMMIOSlotCount, index < InterruptMap.virtioMMIO.count else { return nil }
        return VirtioMMIODevice(base: AddressMap.virtioMMIOSlot(index), size: AddressMap.virtioMMIOSlotSize,
                                gsi: InterruptMap.virtioMMIO[index])
    }
}

/// A PCI host bridge (PCI segment 0): where its configuration space is, which address
/// ranges it forwards to its devices, and how the INTx pins of the device slots on its
/// root bus reach the IOAPIC.
public struct PCIHostDescription: Sendable, Equatable {
    /// The MCFG base: where bus 0's enhanced configuration space (ECAM) would start; bus
    /// `b` is at `ecamBase + b << 20` (1 MiB per bus, 4 KiB per function).
    public var ecamBase: UInt64
    /// The buses behind the bridge; the first is its root bus (`_BBN`).
    public var busRange: ClosedRange<UInt8>
    /// The 32-bit memory window for device BARs (non-prefetchable).
    public var memoryWindow: Range<UInt64>
    /// I/O port windows forwarded to the PCI bus, if any.
    public var ioWindows: [ClosedRange<UInt16>]
    /// Configuration mechanism #1 at ports 0xCF8-0xCFF: announced as ports the bridge
    /// itself decodes.
    public var configurationPorts: Bool
    /// The device slots on the root bus and the GSIs their INTx pins raise.
    public var slots: [PCISlotInterrupts]

    public init(ecamBase: UInt64, busRange: ClosedRange<UInt8>, memoryWindow: Range<UInt64>,
                ioWindows: [ClosedRange<UInt16>], configurationPorts: Bool, slots: [PCISlotInterrupts]) {
        self.ecamBase = ecamBase; self.busRange = busRange; self.memoryWindow = memoryWindow
        self.ioWindows = ioWindows; self.configurationPorts = configurationPorts; self.slots = slots
    }

    /// The I/O windows QEMU gives a `pc`/`q35` root bridge: all ports but the
    /// configuration mechanism's 0xCF8-0xCFF.
    public static let pcIOWindows: [ClosedRange<UInt16>] = [0x0000...0x0CF7, 0x0D00...0xFFFF]

    /// Swiftlet's host bridge as ``AddressMap`` and ``InterruptMap`` lay it out: bus 0 with
    /// its ECAM, the 32-bit BAR window, the PC's I/O windows, configuration mechanism #1,
    /// and `deviceSlots` on bus 0 with their INTx pins swizzled onto GSI 16-19.
    public static func swiftlet(deviceSlots: [UInt8]) -> PCIHostDescription {
        let buses = UInt8(AddressMap.pciECAMSize >> 20)
        return PCIHostDescription(
            ecamBase: AddressMap.pciECAMStart, busRange: 0...(max(buses, 1) - 1),
            memoryWindow: AddressMap.pciMemoryWindowStart..<(AddressMap.pciMemoryWindowStart + AddressMap.pciMemoryWindowSize),
            ioWindows: pcIOWindows, configurationPorts: true,
            slots: deviceSlots.map { PCISlotInterrupts.swizzled(device: $0) })
    }

    /// The ECAM range of the buses in ``busRange`` (empty for a base so high that the
    /// range wraps, which the firmware tables refuse).
    public var ecamRange: Range<UInt64> {
        let start = ecamBase &+ UInt64(busRange.lowerBound) << 20
        let end = ecamBase &+ (UInt64(busRange.upperBound) + 1) << 20
        return start < end ? start..<end : start..<start
    }
}

/// The INTx wiring of one device slot on a PCI root bus.
public struct PCISlotInterrupts: Sendable, Equatable {
    /// The device number, 0-31.
    public var device: UInt8
    /// The GSIs of INTA, INTB, INTC and INTD, in that order: level-triggered, active low.
    public var gsis: [UInt32]

    public init(device: UInt8, gsis: [UInt32]) {
        self.device = device; self.gsis = gsis
    }

    /// INTx pin `p` of device `d` on GSI `base + (d + p) % 4`, the swizzle PCI bridges use
    /// and ``InterruptMap/pciINTxBase`` describes.
    public static func swizzled(device: UInt8, base: UInt32 = InterruptMap.pciINTxBase) -> PCISlotInterrupts {
        PCISlotInterrupts(device: device, gsis: (0..<4).map { base + (UInt32(device) + $0) % 4 })
    }
}

extension PlatformDevices {
    /// GSIs the fixed platform already uses: the PIT (also on pin 2 when IRQ 0 is
    /// overridden to GSI 2), the keyboard, COM1, the RTC and the ACPI SCI.
    static let platformGSIs: Set<UInt32> = [InterruptMap.timer, 2, InterruptMap.keyboard, InterruptMap.com1,
                                            InterruptMap.rtc, InterruptMap.acpiSCI]

    /// Checks that the tables can describe these devices truthfully: every range inside
    /// the 32-bit space, outside RAM, the IOAPIC and the local APICs and apart from each
    /// other; every GSI an IOAPIC pin no platform device or other virtio-mmio device uses,
    /// PCI INTx only on pins 16 and up (no ISA IRQ); slots and buses in range.
    func check(ram: [Range<UInt64>]) throws(BootError) {
        func hex(_ value: some BinaryInteger) -> String { Hex.prefixed(value) }
        func fail(_ reason: String) -> BootError { .invalidPlatform(reason) }
        var claimed: [(range: Range<UInt64>, name: String)] = ram.map { ($0, "guest RAM") }
        claimed.append((AddressMap.ioAPIC..<(AddressMap.ioAPIC + 0x1000), "the IOAPIC"))
        claimed.append((AddressMap.localAPIC..<(AddressMap.localAPIC + 0x1000), "the local APIC"))
        func claim(_ range: Range<UInt64>, _ name: String) throws(BootError) {
            guard !range.isEmpty else { throw fail("\(name) is empty") }
            guard range.upperBound <= 1 << 32 else {
                throw fail("\(name) at \(hex(range.lowerBound)) ends above 4 GiB (\(hex(range.upperBound)))")
            }
            if let other = claimed.first(where: { $0.range.overlaps(range) }) {
                throw fail("\(name) (\(hex(range.lowerBound))-\(hex(range.upperBound - 1))) overlaps \(other.name)")
            }
            claimed.append((range, name))
        }

        var pciGSIs = Set<UInt32>()
        if let pci {
            guard pci.ecamBase & 0xF_FFFF == 0 else { throw fail("the PCI ECAM base \(hex(pci.ecamBase)) is not 1 MiB aligned") }
            guard pci.busRange.upperBound < 0xFF else {
                throw fail("PCI bus 255 cannot be announced (the MP table needs a bus ID after the last PCI bus for ISA)")
            }
            guard pci.ecamBase <= 1 << 32 else { throw fail("the PCI ECAM base \(hex(pci.ecamBase)) is above 4 GiB") }
            try claim(pci.ecamRange, "the PCI ECAM")
            try claim(pci.memoryWindow, "the PCI memory window")
            for (index, window) in pci.ioWindows.enumerated() {
                if pci.configurationPorts, window.overlaps(0xCF8...0xCFF) {
                    throw fail("the PCI I/O window \(hex(window.lowerBound))-\(hex(window.upperBound)) includes the configuration ports 0xCF8-0xCFF")
                }
                if pci.ioWindows[..<index].contains(where: { $0.overlaps(window) }) {
                    throw fail("the PCI I/O windows overlap at \(hex(window.lowerBound))-\(hex(window.upperBound))")
                }
            }
            var devices = Set<UInt8>()
            for slot in pci.slots {
                guard slot.device < 32 else { throw fail("PCI device \(slot.device) does not exist (devices are 0-31)") }
                guard devices.insert(slot.device).inserted else { throw fail("PCI device \(slot.device) is listed twice") }
                guard slot.gsis.count == 4 else {
                    throw fail("PCI device \(slot.device) has \(slot.gsis.count) INTx GSIs; INTA-INTD need 4")
                }
                for gsi in slot.gsis {
                    guard gsi >= 16, gsi < InterruptMap.ioAPICPins else {
                        throw fail("PCI device \(slot.device): INTx on GSI \(gsi); PCI interrupts use IOAPIC pins 16-\(InterruptMap.ioAPICPins - 1)")
                    }
                    pciGSIs.insert(gsi)
                }
            }
        }

        guard virtioMMIO.count <= Self.maximumVirtioMMIODevices else {
            throw fail("\(virtioMMIO.count) virtio-mmio devices; the DSDT names at most \(Self.maximumVirtioMMIODevices)")
        }
        var virtioGSIs = Set<UInt32>()
        for (index, device) in virtioMMIO.enumerated() {
            let name = "virtio-mmio device \(index)"
            let (end, overflow) = device.base.addingReportingOverflow(device.size)
            guard !overflow, device.size <= UInt32.max else {
                throw fail("\(name) at \(hex(device.base)) is \(device.size) bytes long, more than a 32-bit range holds")
            }
            try claim(device.base..<end, name)
            guard device.gsi < InterruptMap.ioAPICPins else {
                throw fail("\(name) uses GSI \(device.gsi); the IOAPIC has pins 0-\(InterruptMap.ioAPICPins - 1)")
            }
            guard !Self.platformGSIs.contains(device.gsi) else { throw fail("\(name) uses GSI \(device.gsi), a platform device's") }
            guard !pciGSIs.contains(device.gsi) else {
                throw fail("\(name) uses GSI \(device.gsi), which PCI INTx uses (level-triggered, active low)")
            }
            guard virtioGSIs.insert(device.gsi).inserted else {
                throw fail("\(name) uses GSI \(device.gsi) like another virtio-mmio device (an edge-triggered line is not shared)")
            }
        }
    }
}
