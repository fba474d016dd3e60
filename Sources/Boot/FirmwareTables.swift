import Layout
import Basics
import Devices
import Memory

/// The tables a PC BIOS leaves for the operating system to find the vCPUs, the IOAPIC,
/// the interrupt wiring, the power management hardware and the devices, built without a
/// BIOS: an Intel MP table (floating pointer and configuration table at
/// ``BootLayout/mpTable``) and ACPI tables (RSDP at ``BootLayout/acpiTables``, then XSDT,
/// RSDT, MADT, FADT, FACS, a DSDT with `\_S5`, and with a PCI host bridge an MCFG). Both
/// lie in the e820-reserved area below 1 MiB, where kernels scan for them.
///
/// Platform described: vCPUs with local APIC IDs 0..N-1 at 0xFEE00000, one IOAPIC with
/// ID N at 0xFEC00000 and 24 pins (GSI 0-23), ISA IRQs 0-15 wired to the IOAPIC pins of
/// the same number, which is KVM's default in-kernel irqchip routing; ACPI fixed
/// hardware (PM1a event and control blocks, PM timer, reset register) at the ports
/// ``ACPILayout`` gives; and the ``PlatformDevices`` the machine names: virtio-mmio
/// devices and a PCI host bridge in the DSDT (and the MCFG), their interrupts also in the
/// MP table for kernels booted with `acpi=off`.
public enum FirmwareTables {
    public static let localAPICAddress = UInt32(AddressMap.localAPIC)
    public static let ioAPICAddress = UInt32(AddressMap.ioAPIC)
    /// APIC IDs are 8 bits and the IOAPIC takes ID N; 0xFF is the broadcast ID.
    public static let maximumCPUs = 254

    /// Layout inside the ACPI area.
    static let rsdpOffset: UInt64 = 0x0
    static let xsdtOffset: UInt64 = 0x40
    static let rsdtOffset: UInt64 = 0x80
    static let madtOffset: UInt64 = 0x100
    static let fadtOffset: UInt64 = 0x1000
    /// The FACS must be 64-byte aligned; the FADT (276 bytes) ends at 0x1114.
    static let facsOffset: UInt64 = 0x1140
    /// The MCFG (60 bytes with its one entry) fits between the FACS and the DSDT.
    static let mcfgOffset: UInt64 = 0x1180
    static let dsdtOffset: UInt64 = 0x1200

    static let oemID = Array("SWIFTL".utf8)
    static let oemTableID = Array("SWIFTLET".utf8)

    /// Writes the MP table and the ACPI tables for `cpuCount` vCPUs and `devices`. Returns
    /// the RSDP's address (for boot_params.acpi_rsdp_addr and hvm_start_info.rsdp_paddr).
    /// Throws before writing anything when `devices` cannot be announced as given
    /// (``PlatformDevices`` lists the checks).
    ///
    /// - Parameter devices: virtio-mmio devices and the PCI host bridge to announce; with
    ///   the default, ``PlatformDevices/none``, the tables are those of a machine without
    ///   them.
    /// - Parameter irq0ToGSI2: add the ACPI interrupt source override ISA IRQ 0 -> GSI 2
    ///   (and the same wiring in the MP table), as QEMU does. Only correct when the machine
    ///   routes GSI 0 (the in-kernel PIT) to IOAPIC pin 2 with KVM_SET_GSI_ROUTING; with
    ///   KVM's default routing leave it off.
    @discardableResult
    public static func write(into memory: GuestMemory, cpuCount: Int, devices: PlatformDevices = .none,
                             irq0ToGSI2: Bool = false) throws(BootError) -> GuestAddress {
        guard cpuCount >= 1, cpuCount <= maximumCPUs else { throw .tooManyCPUs(cpuCount, maximum: maximumCPUs) }
        try devices.check(ram: memory.regions.map { $0.guestBase..<$0.guestEnd })
        let base = BootLayout.acpiTables
        let dsdtBytes = dsdt(devices)
        guard dsdtOffset + UInt64(dsdtBytes.count) <= BootLayout.mpTable - base else {
            throw .invalidPlatform("the DSDT (\(dsdtBytes.count) bytes) does not fit below the MP table")
        }
        try memory.put(mpTable(cpuCount: cpuCount, irq0ToGSI2: irq0ToGSI2, devices: devices), at: BootLayout.mpTable,
                       what: "the MP table")
        try memory.put(madt(cpuCount: cpuCount, irq0ToGSI2: irq0ToGSI2), at: base + madtOffset, what: "the ACPI MADT")
        try memory.put(dsdtBytes, at: base + dsdtOffset, what: "the ACPI DSDT")
        try memory.put(facs(), at: base + facsOffset, what: "the ACPI FACS")
        try memory.put(fadt(dsdt: base + dsdtOffset, facs: base + facsOffset), at: base + fadtOffset, what: "the ACPI FADT")
        var tables = [base + madtOffset, base + fadtOffset]
        if let pci = devices.pci {
            try memory.put(mcfg(pci), at: base + mcfgOffset, what: "the ACPI MCFG")
            tables.append(base + mcfgOffset)
        }
        try memory.put(xsdt(tables), at: base + xsdtOffset, what: "the ACPI XSDT")
        try memory.put(rsdt(tables), at: base + rsdtOffset, what: "the ACPI RSDT")
        try memory.put(rsdp(rsdt: base + rsdtOffset, xsdt: base + xsdtOffset), at: base + rsdpOffset, what: "the ACPI RSDP")
        return base + rsdpOffset
    }

    /// The byte that makes `bytes[range]` sum to zero modulo 256.
    static func checksum(_ bytes: ArraySlice<UInt8>) -> UInt8 {
        0 &- bytes.reduce(0, &+)
    }

    // MARK: MP table (Intel MultiProcessor Specification 1.4, chapter 4)

    // I/O interrupt entry flags (MP 1.4, table 4-10): polarity in bits 0-1, trigger mode
    // in bits 2-3; 0 conforms to the bus (ISA: edge, active high; PCI: level, active low).
    static let mpEdgeActiveHigh: UInt16 = 0b0101
    static let mpLevelActiveLow: UInt16 = 0b1111

    /// With a PCI host bridge, its buses come first with IDs equal to their PCI bus
    /// numbers (Linux matches an I/O interrupt's source bus ID against the PCI bus number)
    /// and the ISA bus takes the next ID; without one, the ISA bus is bus 0.
    static func mpTable(cpuCount: Int, irq0ToGSI2: Bool, devices: PlatformDevices = .none) -> [UInt8] {
        let ioapicID = UInt8(cpuCount)
        var entries: [[UInt8]] = []
        for cpu in 0..<cpuCount {
            var entry = [UInt8](repeating: 0, count: 20)
            entry[0] = 0                         // processor
            entry[1] = UInt8(cpu)                // local APIC ID
            entry[2] = 0x14                      // local APIC version
            entry[3] = cpu == 0 ? 0x3 : 0x1      // enabled, bootstrap processor
            entry.putLE(UInt32(0x600), at: 4)      // CPU signature: family 6
            entry.putLE(UInt32(0x201), at: 8)      // feature flags: FPU, APIC
            entries.append(entry)
        }
        let pciBuses = devices.pci.map { Array($0.busRange) } ?? []
        let isaBus = pciBuses.last.map { $0 + 1 } ?? 0
        for bus in pciBuses { entries.append([1, bus] + Array("PCI   ".utf8)) }
        entries.append([1, isaBus] + Array("ISA   ".utf8))
        var ioapic: [UInt8] = [2, ioapicID, 0x11, 0x1, 0, 0, 0, 0]                  // IOAPIC, enabled
        ioapic.putLE(ioAPICAddress, at: 4)
        entries.append(ioapic)
        func interrupt(flags: UInt16, bus: UInt8, source: UInt8, pin: UInt32) -> [UInt8] {
            var entry: [UInt8] = [3, 0, 0, 0, bus, source, ioapicID, UInt8(pin)]  // I/O interrupt, INT
            entry.putLE(flags, at: 2)
            return entry
        }
        for irq in 0..<16 {
            // ISA IRQ -> pin, polarity and trigger conforming to the bus.
            let pin = irq == 0 && irq0ToGSI2 ? 2 : irq
            if irq == 2 && irq0ToGSI2 { continue }
            entries.append(interrupt(flags: 0, bus: isaBus, source: UInt8(irq), pin: UInt32(pin)))
        }
        // virtio-mmio lines above the ISA IRQs: Linux sets up only the pins the table
        // lists, so a kernel that finds the devices on its command line (acpi=off) needs
        // them here. On the ISA bus, edge-triggered and active high, as the DSDT says.
        for device in devices.virtioMMIO where device.gsi >= 16 {
            entries.append(interrupt(flags: mpEdgeActiveHigh, bus: isaBus, source: UInt8(device.gsi), pin: device.gsi))
        }
        // PCI INTx on the root bus: the source IRQ is the device number << 2 | pin (0 = INTA).
        if let pci = devices.pci {
            for slot in pci.slots {
                for (pin, gsi) in slot.gsis.enumerated() {
                    entries.append(interrupt(flags: mpLevelActiveLow, bus: pci.busRange.lowerBound,
                                             source: slot.device << 2 | UInt8(pin), pin: gsi))
                }
            }
        }
        // Local interrupts: ExtINT on LINT0, NMI on LINT1, all local APICs.
        entries.append([4, 3, 0, 0, 0, 0, 0xFF, 0])
        entries.append([4, 1, 0, 0, 0, 0, 0xFF, 1])

        let body = entries.flatMap { $0 }
        var config = [UInt8](repeating: 0, count: 44)
        config.put(bytes: "PCMP".utf8, at: 0)
        config.putLE(UInt16(44 + body.count), at: 4)
        config[6] = 4                                  // spec revision 1.4
        config.put(bytes: oemID + [0x20, 0x20], at: 8)
        config.put(bytes: Array("SWIFTLET    ".utf8), at: 16)
        config.putLE(UInt16(entries.count), at: 34)
        config.putLE(localAPICAddress, at: 36)
        config += body
        config[7] = checksum(config[...])

        var pointer = [UInt8](repeating: 0, count: 16)
        pointer.put(bytes: "_MP_".utf8, at: 0)
        pointer.putLE(UInt32(BootLayout.mpTable + 16), at: 4)
        pointer[8] = 1                                 // length in 16-byte units
        pointer[9] = 4                                 // spec revision 1.4
        pointer[10] = checksum(pointer[...])
        return pointer + config
    }

    // MARK: ACPI (ACPI Specification 6.x, chapter 5)

    /// A system description table header (36 bytes) followed by `body`, checksummed.
    static func sdt(_ signature: String, revision: UInt8, body: [UInt8]) -> [UInt8] {
        var table = [UInt8](repeating: 0, count: 36)
        table.put(bytes: signature.utf8, at: 0)
        table.putLE(UInt32(36 + body.count), at: 4)
        table[8] = revision
        table.put(bytes: oemID, at: 10)
        table.put(bytes: oemTableID, at: 16)
        table.putLE(UInt32(1), at: 24)                  // OEM revision
        table.put(bytes: "SWFT".utf8, at: 28)         // creator ID
        table.putLE(UInt32(1), at: 32)                  // creator revision
        table += body
        table[9] = checksum(table[...])
        return table
    }

    static func rsdp(rsdt: GuestAddress, xsdt: GuestAddress) -> [UInt8] {
        var table = [UInt8](repeating: 0, count: 36)
        table.put(bytes: "RSD PTR ".utf8, at: 0)
        table.put(bytes: oemID, at: 9)
        table[15] = 2                                  // revision: ACPI 2.0+, has the XSDT
        table.putLE(UInt32(rsdt), at: 16)
        table.putLE(UInt32(36), at: 20)
        table.putLE(xsdt, at: 24)
        table[8] = checksum(table[0..<20])
        table[32] = checksum(table[...])
        return table
    }

    static func xsdt(_ tables: [GuestAddress]) -> [UInt8] {
        var body = [UInt8](repeating: 0, count: tables.count * 8)
        for (index, address) in tables.enumerated() { body.putLE(address, at: index * 8) }
        return sdt("XSDT", revision: 1, body: body)
    }

    static func rsdt(_ tables: [GuestAddress]) -> [UInt8] {
        var body = [UInt8](repeating: 0, count: tables.count * 4)
        for (index, address) in tables.enumerated() { body.putLE(UInt32(address), at: index * 4) }
        return sdt("RSDT", revision: 1, body: body)
    }

    static func madt(cpuCount: Int, irq0ToGSI2: Bool) -> [UInt8] {
        var body = [UInt8](repeating: 0, count: 8)
        body.putLE(localAPICAddress, at: 0)
        body.putLE(UInt32(1), at: 4)                     // PCAT_COMPAT: dual 8259s present
        for cpu in 0..<cpuCount {
            // Processor local APIC: UID, APIC ID, enabled.
            body += [0, 8, UInt8(cpu), UInt8(cpu), 1, 0, 0, 0]
        }
        var ioapic: [UInt8] = [1, 12, UInt8(cpuCount), 0, 0, 0, 0, 0, 0, 0, 0, 0]
        ioapic.putLE(ioAPICAddress, at: 4)               // GSI base 0 stays zero
        body += ioapic
        if irq0ToGSI2 {
            body += interruptSourceOverride(irq: 0, gsi: 2, flags: 0)
        }
        // SCI: level-triggered, active high (flags 0b1101), as the FADT names IRQ 9.
        body += interruptSourceOverride(irq: 9, gsi: 9, flags: 0xD)
        // Local APIC NMI on LINT1 for all processors.
        body += [4, 6, 0xFF, 0, 0, 1]
        return sdt("APIC", revision: 5, body: body)
    }

    static func interruptSourceOverride(irq: UInt8, gsi: UInt32, flags: UInt16) -> [UInt8] {
        var entry: [UInt8] = [2, 10, 0, irq, 0, 0, 0, 0, 0, 0]
        entry.putLE(gsi, at: 4)
        entry.putLE(flags, at: 8)
        return entry
    }

    // FADT fields (ACPI 6.5, table 5.9): byte offsets.
    static let fadtFirmwareControl = 36, fadtDSDT = 40, fadtSCIInterrupt = 46, fadtSMICommand = 48
    static let fadtPM1aEventBlock = 56, fadtPM1aControlBlock = 64, fadtPMTimerBlock = 76
    static let fadtPM1EventLength = 88, fadtPM1ControlLength = 89, fadtPMTimerLength = 91
    static let fadtC2Latency = 96, fadtC3Latency = 98, fadtCentury = 108, fadtBootArchitecture = 109
    static let fadtFlags = 112, fadtResetRegister = 116, fadtResetValue = 128, fadtMinorVersion = 131
    static let fadtExtendedFirmwareControl = 132, fadtExtendedDSDT = 140
    static let fadtExtendedPM1aEventBlock = 148, fadtExtendedPM1aControlBlock = 172, fadtExtendedPMTimerBlock = 208
    static let fadtHypervisorVendor = 268, fadtLength = 276

    // FADT flags.
    static let flagWBINVD: UInt32 = 1 << 0          // WBINVD flushes caches correctly
    static let flagProcessorC1: UInt32 = 1 << 2     // C1 (HLT) works on every processor
    static let flagNoPowerButton: UInt32 = 1 << 4   // PWR_BUTTON: no fixed-feature power button
    static let flagNoSleepButton: UInt32 = 1 << 5   // SLP_BUTTON: no fixed-feature sleep button
    static let flagNoRTCWake: UInt32 = 1 << 6       // FIX_RTC: no RTC wake status in PM1
    static let flagResetRegister: UInt32 = 1 << 10  // RESET_REG_SUP
    static let flagHardwareReduced: UInt32 = 1 << 20

    /// IAPC_BOOT_ARCH: LEGACY_DEVICES (ISA devices such as the UART and the RTC) and 8042.
    static let bootArchitecture: UInt16 = 0x3
    /// The CMOS register with the century (``CMOS`` keeps it at 0x32, as PCs do).
    static let cmosCentury: UInt8 = 0x32
    /// ACPI address space ID of port I/O in a generic address structure.
    static let systemIOSpace: UInt8 = 1

    /// A generic address structure (ACPI 6.5, 5.2.3.2): address space, register width and
    /// offset in bits, access size (0 undefined, 1 byte, 2 word, 3 dword, 4 qword), address.
    static func genericAddress(space: UInt8, bitWidth: UInt8, accessSize: UInt8, address: UInt64) -> [UInt8] {
        var bytes: [UInt8] = [space, bitWidth, 0, accessSize, 0, 0, 0, 0, 0, 0, 0, 0]
        bytes.putLE(address, at: 4)
        return bytes
    }

    /// FADT revision 6 (ACPI 6.x) for a PC with ACPI fixed hardware, as QEMU's `pc`
    /// machine has it: SCI on IRQ 9, no SMI command port (the machine is always in ACPI
    /// mode), the PM1a event and control blocks and the 24-bit PM timer at the ports of
    /// ``ACPILayout`` (both in the 32-bit fields and the generic address structures), no
    /// C2/C3, the century in CMOS 0x32, the 8042 and legacy devices present, no
    /// fixed-feature power or sleep button, and the reset register (port 0xCF9, value
    /// 0x06, RESET_REG_SUP). The FACS is named by FIRMWARE_CTRL only (it lies below
    /// 4 GiB; X_FIRMWARE_CTRL stays 0 so the two cannot disagree).
    static func fadt(dsdt: GuestAddress, facs: GuestAddress) -> [UInt8] {
        var table = sdt("FACP", revision: 6, body: [UInt8](repeating: 0, count: fadtLength - 36))
        table.putLE(UInt32(facs), at: fadtFirmwareControl)
        table.putLE(UInt32(dsdt), at: fadtDSDT)
        table.putLE(ACPILayout.sciIRQ, at: fadtSCIInterrupt)
        table.putLE(UInt32(0), at: fadtSMICommand)
        table.putLE(UInt32(ACPILayout.pm1aEventBlock), at: fadtPM1aEventBlock)
        table.putLE(UInt32(ACPILayout.pm1aControlBlock), at: fadtPM1aControlBlock)
        table.putLE(UInt32(ACPILayout.pmTimerBlock), at: fadtPMTimerBlock)
        table[fadtPM1EventLength] = ACPILayout.pm1EventLength
        table[fadtPM1ControlLength] = ACPILayout.pm1ControlLength
        table[fadtPMTimerLength] = ACPILayout.pmTimerLength
        table.putLE(UInt16(0x0FFF), at: fadtC2Latency)   // > 100 µs: no C2
        table.putLE(UInt16(0x0FFF), at: fadtC3Latency)   // > 1000 µs: no C3
        table[fadtCentury] = cmosCentury
        table.putLE(bootArchitecture, at: fadtBootArchitecture)
        table.putLE(flagWBINVD | flagProcessorC1 | flagNoPowerButton | flagNoSleepButton | flagNoRTCWake | flagResetRegister,
                    at: fadtFlags)
        table.put(bytes: genericAddress(space: systemIOSpace, bitWidth: 8, accessSize: 1, address: ACPILayout.resetRegister),
                  at: fadtResetRegister)
        table[fadtResetValue] = ACPILayout.resetValue
        table[fadtMinorVersion] = 0
        table.putLE(dsdt, at: fadtExtendedDSDT)
        table.put(bytes: genericAddress(space: systemIOSpace, bitWidth: ACPILayout.pm1EventLength * 8, accessSize: 0,
                                        address: ACPILayout.pm1aEventBlock), at: fadtExtendedPM1aEventBlock)
        table.put(bytes: genericAddress(space: systemIOSpace, bitWidth: ACPILayout.pm1ControlLength * 8, accessSize: 0,
                                        address: ACPILayout.pm1aControlBlock), at: fadtExtendedPM1aControlBlock)
        table.put(bytes: genericAddress(space: systemIOSpace, bitWidth: ACPILayout.pmTimerLength * 8, accessSize: 0,
                                        address: ACPILayout.pmTimerBlock), at: fadtExtendedPMTimerBlock)
        table.put(bytes: "SWIFTLET".utf8, at: fadtHypervisorVendor)
        table[9] = 0
        table[9] = checksum(table[...])
        return table
    }

    /// The firmware ACPI control structure (ACPI 6.5, 5.2.10): 64 bytes, no checksum.
    /// A non-reduced platform must have one; it holds the global lock (free: there is no
    /// firmware to share it with) and a waking vector Swiftlet never uses (no S1-S4).
    static func facs() -> [UInt8] {
        var table = [UInt8](repeating: 0, count: 64)
        table.put(bytes: "FACS".utf8, at: 0)
        table.putLE(UInt32(64), at: 4)
        table[32] = 2                                  // version
        return table
    }

    /// The MCFG (PCI Firmware Specification 3.2, 4.1.2): 8 reserved bytes, then one
    /// 16-byte entry: the ECAM base, PCI segment 0, the first and the last bus number.
    static func mcfg(_ pci: PCIHostDescription) -> [UInt8] {
        var body = [UInt8](repeating: 0, count: 8 + 16)
        body.putLE(pci.ecamBase, at: 8)
        body.putLE(UInt16(0), at: 16)
        body[18] = pci.busRange.lowerBound
        body[19] = pci.busRange.upperBound
        return sdt("MCFG", revision: 1, body: body)
    }

    /// The DSDT's AML: `Name (\_S5, Package (4) { SLP_TYPa, SLP_TYPb, 0, 0 })`, the sleep
    /// type an operating system writes to PM1_CNT to power off, then the
    /// ``PlatformDevices`` in `Scope (\_SB)` (``deviceTerms(_:)``). There is no `\_S3` or
    /// `\_S4`: Swiftlet has no suspend and no wake-up path, so it offers neither (Linux
    /// then reports "ACPI: PM: (supports S0 S5)").
    static func dsdtTerms(_ devices: PlatformDevices = .none) -> [AML] {
        let s5 = AML.integer(UInt64(ACPILayout.s5SleepType))
        var terms: [AML] = [.name("\\_S5", .package([s5, s5, .integer(0), .integer(0)]))]
        let system = deviceTerms(devices)
        if !system.isEmpty { terms.append(.scope("\\_SB", system)) }
        return terms
    }

    static func dsdt(_ devices: PlatformDevices = .none) -> [UInt8] {
        sdt("DSDT", revision: 2, body: dsdtTerms(devices).flatMap(\.encoded))
    }
}
