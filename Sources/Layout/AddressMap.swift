/// The guest-physical address map of Swiftlet's x86 machine, and how interrupt lines
/// (GSIs) are given out: the one place that says where things are. Everything else
/// (guest RAM, the loaders, the firmware tables, the devices, the board) takes its
/// addresses from here. Firecracker's `arch/x86_64/layout.rs` plays the same part.
///
/// ```
/// 0x0000_0000 ┬ RAM (low memory: boot structures, see LowMemory)
///             │ ...
/// 0x0009_FC00 ├ reserved: EBDA, VGA hole, BIOS area; ACPI tables at 0xE0000, MP table at 0xF0000
/// 0x0010_0000 ├ RAM: the kernel, its initrd, the rest of the guest
///             │ ...  (up to 3 GiB; RAM beyond that continues at 4 GiB)
/// 0xC000_0000 ├ MMIO hole. PCI 32-bit memory window (BARs): 0xC000_0000-0xDFFF_FFFF
/// 0xE000_0000 ├ PCI ECAM (MMCONFIG) for bus 0: 1 MiB
/// 0xF000_0000 ├ slots added at run time with --show-memory: RAM, then read-only (2 MiB each)
/// 0xFEB0_0000 ├ virtio-mmio slots, 0x200 bytes each (as QEMU's microvm)
/// 0xFEC0_0000 ├ IOAPIC (in KVM)
/// 0xFEE0_0000 ├ local APICs (in KVM)
/// 0xFF00_0000 ├ pc-testdev I/O RAM, 64 KiB (Multiboot kernels only)
/// 0xFFFB_C000 ├ VMX identity-map page, then the real-mode TSS (3 pages)
/// 0x1_0000_0000 RAM above 3 GiB continues here
/// ```
public enum AddressMap {
    // MARK: RAM

    /// Start of the 32-bit MMIO hole: RAM above this address moves to 4 GiB.
    public static let mmioHoleStart: UInt64 = 0xC000_0000
    /// End of the 32-bit MMIO hole, where high RAM resumes.
    public static let mmioHoleEnd: UInt64 = 0x1_0000_0000

    // MARK: The MMIO hole

    /// Where the PCI host bridge places device BARs (32-bit, non-prefetchable).
    public static let pciMemoryWindowStart: UInt64 = 0xC000_0000
    public static let pciMemoryWindowSize: UInt64 = 0x2000_0000
    /// PCI Express enhanced configuration space (ECAM), announced in the ACPI MCFG table:
    /// 4 KiB per function, 1 MiB per bus. Swiftlet has one bus, 0.
    public static let pciECAMStart: UInt64 = 0xE000_0000
    public static let pciECAMSize: UInt64 = 0x10_0000
    /// virtio-mmio devices: slot N at `virtioMMIOStart + N * virtioMMIOSlotSize`.
    public static let virtioMMIOStart: UInt64 = 0xFEB0_0000
    public static let virtioMMIOSlotSize: UInt64 = 0x200
    public static let virtioMMIOSlotCount = 16
    /// The IOAPIC's registers (KVM's in-kernel IOAPIC).
    public static let ioAPIC: UInt64 = 0xFEC0_0000
    /// The local APICs' registers (in KVM; each vCPU sees its own at this address).
    public static let localAPIC: UInt64 = 0xFEE0_0000
    /// QEMU's pc-testdev "I/O RAM", memory that is MMIO (kvm-unit-tests).
    public static let testDeviceRAM: UInt64 = 0xFF00_0000
    public static let testDeviceRAMSize: UInt64 = 0x1_0000
    /// One page Intel VMX uses as an identity page table while the guest runs unpaged
    /// (`KVM_SET_IDENTITY_MAP_ADDR`), then three pages for its real-mode TSS
    /// (`KVM_SET_TSS_ADDR`): just below the BIOS area at the top of the 32-bit space.
    public static let identityMapPage: UInt64 = 0xFFFB_C000
    public static let realModeTSS: UInt64 = 0xFFFB_D000

    /// Where `swiftlet run --show-memory`'s slot device adds memory slots while the guest
    /// runs (a teaching aid, see docs/memory.md): 2 MiB of RAM here, then 2 MiB of
    /// read-only memory right after it. Free space in the MMIO hole, above the ECAM.
    public static let runtimeSlotRAM: UInt64 = 0xF000_0000
    public static let runtimeSlotReadOnly: UInt64 = 0xF020_0000
    public static let runtimeSlotSize: UInt64 = 0x20_0000

    /// The guest-physical address of virtio-mmio slot `index`.
    public static func virtioMMIOSlot(_ index: Int) -> UInt64 {
        virtioMMIOStart + UInt64(index) * virtioMMIOSlotSize
    }
}

/// A range of ports or guest-physical addresses that one of KVM's in-kernel devices
/// claims. KVM handles every access there inside the host kernel, so it never reaches
/// Swiftlet: a device model placed there would never see one (``KVMOwned``).
public struct KVMOwnedRange: Sendable, Equatable {
    public let base: UInt64
    public let length: UInt64
    /// The device, and the ioctl that put it in the kernel.
    public let owner: String

    public init(base: UInt64, length: UInt64, owner: String) {
        self.base = base
        self.length = length
        self.owner = owner
    }
}

/// What `KVM_CREATE_IRQCHIP` and `KVM_CREATE_PIT2` put inside the host kernel, by address.
public enum KVMOwned {
    /// Ports of the in-kernel 8259 PICs (with their ELCR) and 8254 PIT (with port 0x61,
    /// whose speaker bits KVM's PIT emulates).
    public static let ports: [KVMOwnedRange] = [
        KVMOwnedRange(base: 0x20, length: 2, owner: "the master 8259 PIC (KVM_CREATE_IRQCHIP)"),
        KVMOwnedRange(base: 0x40, length: 4, owner: "the 8254 PIT (KVM_CREATE_PIT2)"),
        KVMOwnedRange(base: 0x61, length: 1, owner: "the PC speaker port of the 8254 PIT (KVM_CREATE_PIT2)"),
        KVMOwnedRange(base: 0xA0, length: 2, owner: "the slave 8259 PIC (KVM_CREATE_IRQCHIP)"),
        KVMOwnedRange(base: 0x4D0, length: 2, owner: "the 8259 PICs' edge/level control registers, ELCR (KVM_CREATE_IRQCHIP)"),
    ]
    /// The register pages of the in-kernel IOAPIC and local APICs.
    public static let mmio: [KVMOwnedRange] = [
        KVMOwnedRange(base: AddressMap.ioAPIC, length: 0x1000, owner: "the IOAPIC (KVM_CREATE_IRQCHIP)"),
        KVMOwnedRange(base: AddressMap.localAPIC, length: 0x1000, owner: "the local APIC (KVM_CREATE_IRQCHIP)"),
    ]
}

/// How interrupt lines are given out. KVM's in-kernel IOAPIC has 24 pins, GSI 0-23; GSI
/// 0-15 also reach the 8259 PICs as ISA IRQs. Message-signalled interrupts (virtio-pci's
/// MSI-X vectors) get GSIs from 24 up, each routed to its message with
/// `KVM_SET_GSI_ROUTING` and raised through an irqfd.
public enum InterruptMap {
    /// The PIT (in KVM).
    public static let timer: UInt32 = 0
    /// The i8042 keyboard.
    public static let keyboard: UInt32 = 1
    /// COM1.
    public static let com1: UInt32 = 4
    /// The RTC (CMOS).
    public static let rtc: UInt32 = 8
    /// The ACPI system control interrupt (SCI).
    public static let acpiSCI: UInt32 = 9
    /// ISA IRQs free for virtio-mmio devices, slot by slot (as edge-free level lines on the
    /// IOAPIC, each its own GSI).
    public static let virtioMMIO: [UInt32] = [5, 6, 7, 10, 11, 12, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23]
    /// PCI INTx: INTA-INTD of bus 0 go to GSI 16-19 (device d, pin p: 16 + (d + p) % 4),
    /// a fallback for drivers without MSI-X.
    public static let pciINTxBase: UInt32 = 16
    /// IOAPIC pins, GSI 0 to this minus one.
    public static let ioAPICPins: UInt32 = 24
    /// The first GSI given to an MSI route.
    public static let firstMSI: UInt32 = 24
}

/// Low memory, below 1 MiB: where the loaders put the structures a boot protocol hands
/// the kernel (the first megabyte is RAM, but a kernel loads above it).
public enum BootLayout {
    public static let gdt: UInt64 = 0x500
    public static let pvhStartInfo: UInt64 = 0x6000
    public static let pvhModules: UInt64 = 0x6040
    public static let pvhMemoryMap: UInt64 = 0x6100
    public static let zeroPage: UInt64 = 0x7000
    public static let stackTop: UInt64 = 0x8FF0
    public static let pml4: UInt64 = 0x9000
    public static let pdpt: UInt64 = 0xA000
    public static let pageDirectories: UInt64 = 0xB000
    public static let multibootInfo: UInt64 = 0x10000
    public static let multibootModules: UInt64 = 0x10080
    public static let multibootMemoryMap: UInt64 = 0x10100
    public static let multibootLoaderName: UInt64 = 0x10800
    public static let cmdline: UInt64 = 0x20000
    /// Longest command line the layout has room for (below the EBDA).
    public static let cmdlineCapacity: UInt64 = 0x9F000 - 0x20000
    /// The extended BIOS data area and what follows up to 1 MiB (VGA hole, BIOS area) are
    /// reserved in the e820 map.
    public static let ebda: UInt64 = 0x9FC00
    public static let acpiTables: UInt64 = 0xE0000
    public static let mpTable: UInt64 = 0xF0000
    public static let highMemory: UInt64 = 0x100000
    /// The loaders need the first megabyte plus something to load a kernel into.
    public static let minimumMemory: UInt64 = 2 << 20
}
