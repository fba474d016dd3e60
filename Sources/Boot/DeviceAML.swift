/// The DSDT objects that announce ``PlatformDevices`` in `\_SB`, as a stock Linux kernel
/// finds them: its PCI root driver binds `PNP0A08`/`PNP0A03`, its `pnp` system driver
/// reserves what `PNP0C02` lists, and its `virtio_mmio` platform driver matches the ACPI
/// ID `LNRO0005` and takes the first memory range and the first interrupt of `_CRS`.
extension FirmwareTables {
    /// `Device (PCI0)` and `Device (ECAM)` for the host bridge, then `Device (VRnn)` for
    /// each virtio-mmio device; nothing without devices.
    static func deviceTerms(_ devices: PlatformDevices) -> [AML] {
        var terms: [AML] = []
        if let pci = devices.pci {
            terms.append(pciHostBridge(pci))
            terms.append(ecamReservation(pci))
        }
        for (index, device) in devices.virtioMMIO.enumerated() {
            terms.append(virtioMMIODevice(device, index: index))
        }
        return terms
    }

    /// `VR00`, `VR01`, ... `VRFF`: two hex digits.
    static func virtioMMIOName(_ index: Int) -> String {
        let digits = String(index, radix: 16, uppercase: true)
        return "VR" + (digits.count < 2 ? "0" : "") + digits
    }

    /// ```
    /// Device (VRnn) {
    ///     Name (_HID, "LNRO0005")
    ///     Name (_UID, n)
    ///     Name (_CCA, One)
    ///     Name (_CRS, ResourceTemplate () {
    ///         Memory32Fixed (ReadWrite, base, size)
    ///         Interrupt (ResourceConsumer, Edge, ActiveHigh, Exclusive) { gsi }
    ///     })
    /// }
    /// ```
    /// as QEMU's `microvm` and Firecracker write it. `_CCA` (DMA is cache-coherent) is
    /// what x86 assumes anyway; arm64 kernels require it. The interrupt is an edge, active
    /// high, as Firecracker declares it: the machine raises it through an irqfd, a pulse
    /// on the IOAPIC pin (QEMU's `microvm` declares a level line, which its device holds).
    static func virtioMMIODevice(_ device: VirtioMMIODevice, index: Int) -> AML {
        .device(virtioMMIOName(index), [
            .name("_HID", .string("LNRO0005")),
            .name("_UID", .integer(UInt64(index))),
            .name("_CCA", .integer(1)),
            .name("_CRS", .resourceTemplate([
                .memory32Fixed(writable: true, base: UInt32(device.base), length: UInt32(device.size)),
                .interrupt(.init(trigger: .edge, polarity: .activeHigh, shared: false, gsis: [device.gsi])),
            ])),
        ])
    }

    /// ```
    /// Device (PCI0) {
    ///     Name (_HID, EisaId ("PNP0A08"))   // PCI Express root bridge
    ///     Name (_CID, EisaId ("PNP0A03"))   // PCI root bridge
    ///     Name (_SEG, Zero)
    ///     Name (_BBN, first bus)
    ///     Name (_UID, Zero)
    ///     Name (_CRS, ResourceTemplate () {
    ///         WordBusNumber (...)            // the bus range
    ///         IO (Decode16, 0x0CF8, 0x0CF8, 0x01, 0x08)   // configuration mechanism #1
    ///         WordIO (...) ...               // each I/O window (DWordIO if 64 KiB long)
    ///         DWordMemory (...)              // the 32-bit BAR window
    ///     })
    ///     Name (_PRT, Package () {           // per slot and pin:
    ///         Package () { slot << 16 | 0xFFFF, pin, Zero, GSI }, ...
    ///     })
    /// }
    /// ```
    /// The `_CRS` is the one QEMU gives a `q35` root bridge. A `_PRT` entry whose source is
    /// `Zero` names the GSI directly (no interrupt link device); ACPI then defines the
    /// line as level-triggered and active low, which is how PCI INTx works. There is no
    /// `_OSC`: Linux then keeps native PCIe hot-plug, PME and AER off, which Swiftlet does
    /// not have, and says "_OSC: platform retains control of PCIe features".
    static func pciHostBridge(_ pci: PCIHostDescription) -> AML {
        var resources: [AMLResource] = [
            .addressSpace(.init(.busNumber, width: .word, minimum: UInt64(pci.busRange.lowerBound),
                                maximum: UInt64(pci.busRange.upperBound))),
        ]
        if pci.configurationPorts {
            resources.append(.io(minimum: 0xCF8, maximum: 0xCF8, alignment: 1, length: 8))
        }
        for window in pci.ioWindows {
            let wordFits = window.upperBound - window.lowerBound < 0xFFFF    // the length field is 16 bits too
            resources.append(.addressSpace(.init(.io, width: wordFits ? .word : .dword, minimum: UInt64(window.lowerBound),
                                                 maximum: UInt64(window.upperBound))))
        }
        resources.append(.addressSpace(.init(.memory(.nonCacheable, writable: true), width: .dword,
                                             minimum: pci.memoryWindow.lowerBound, maximum: pci.memoryWindow.upperBound - 1)))
        var terms: [AML] = [
            .name("_HID", AML.eisaID("PNP0A08")),
            .name("_CID", AML.eisaID("PNP0A03")),
            .name("_SEG", .integer(0)),
            .name("_BBN", .integer(UInt64(pci.busRange.lowerBound))),
            .name("_UID", .integer(0)),
            .name("_CRS", .resourceTemplate(resources)),
        ]
        let routes: [AML] = pci.slots.flatMap { slot in
            slot.gsis.enumerated().map { pin, gsi in
                AML.package([.integer(UInt64(slot.device) << 16 | 0xFFFF), .integer(UInt64(pin)), .integer(0), .integer(UInt64(gsi))])
            }
        }
        if !routes.isEmpty { terms.append(.name("_PRT", .package(routes))) }
        return .device("PCI0", terms)
    }

    /// ```
    /// Device (ECAM) {
    ///     Name (_HID, EisaId ("PNP0C02"))   // motherboard resources
    ///     Name (_CRS, ResourceTemplate () { Memory32Fixed (ReadWrite, ECAM start, ECAM size) })
    /// }
    /// ```
    /// Linux uses the MCFG's ECAM only when firmware also reserves it, in the e820 map or
    /// as a motherboard resource ("PCI: MMCONFIG at [mem ...] reserved as ACPI motherboard
    /// resource"); otherwise it falls back to the 0xCF8 ports. QEMU's `q35` reserves it the
    /// same way (its `DRAC` device).
    static func ecamReservation(_ pci: PCIHostDescription) -> AML {
        let range = pci.ecamRange
        return .device("ECAM", [
            .name("_HID", AML.eisaID("PNP0C02")),
            .name("_CRS", .resourceTemplate([
                .memory32Fixed(writable: true, base: UInt32(range.lowerBound), length: UInt32(range.upperBound - range.lowerBound)),
            ])),
        ])
    }
}
