import Basics
import Layout
import Memory

/// One entry of the firmware memory map (`struct boot_e820_entry`: 20 bytes, packed).
public struct E820Entry: Sendable, Equatable {
    public enum Kind: UInt32, Sendable {
        case ram = 1
        case reserved = 2
        case acpi = 3
        case nvs = 4
    }
    public var address: UInt64
    public var size: UInt64
    public var kind: Kind
    public var end: UInt64 { address + size }

    public init(address: UInt64, size: UInt64, kind: Kind) {
        self.address = address; self.size = size; self.kind = kind
    }
}

/// Builds the e820 map the kernel sees, from the RAM layout of `GuestMemory`.
public enum E820Map {
    /// RAM below the EBDA, the EBDA/VGA/BIOS area reserved, RAM from 1 MiB to the end of
    /// the low region, and RAM from 4 GiB when the layout has a high region. The MMIO hole
    /// (3-4 GiB) is not listed, except the ranges in `reserved` (device ranges outside RAM
    /// that firmware reserves, such as the PCI ECAM), which are listed as reserved, the
    /// whole map in address order.
    public static func build(for memory: GuestMemory, reserving reserved: [Range<UInt64>] = []) -> [E820Entry] {
        let map = build(regions: memory.regions.map { ($0.guestBase, $0.size) })
        guard !reserved.isEmpty else { return map }
        let extra = reserved.filter { !$0.isEmpty }.map {
            E820Entry(address: $0.lowerBound, size: $0.upperBound - $0.lowerBound, kind: .reserved)
        }
        return (map + extra).sorted { $0.address < $1.address }
    }

    static func build(regions: [(base: UInt64, size: UInt64)]) -> [E820Entry] {
        var map: [E820Entry] = []
        for (base, size) in regions where size > 0 {
            let end = base + size
            if base < BootLayout.highMemory {
                let lowEnd = min(end, BootLayout.ebda)
                if lowEnd > base { map.append(E820Entry(address: base, size: lowEnd - base, kind: .ram)) }
                if end > BootLayout.ebda {
                    map.append(E820Entry(address: BootLayout.ebda, size: BootLayout.highMemory - BootLayout.ebda,
                                         kind: .reserved))
                }
                if end > BootLayout.highMemory {
                    map.append(E820Entry(address: BootLayout.highMemory, size: end - BootLayout.highMemory, kind: .ram))
                }
            } else {
                map.append(E820Entry(address: base, size: size, kind: .ram))
            }
        }
        return map
    }
}

/// Writers for the x86 structures every protected-mode or long-mode entry needs: the
/// GDT and identity page tables at their ``BootLayout`` addresses.
enum X86Tables {
    static let codeSelector: UInt16 = 0x10
    static let dataSelector: UInt16 = 0x18

    /// Writes a 4-entry GDT: null, null, code at 0x10 (64-bit when `longMode`, else flat
    /// 32-bit), flat 32-bit data at 0x18. Returns the GDTR value.
    static func writeGDT(_ memory: GuestMemory, longMode: Bool) throws(BootError) -> DescriptorTable {
        let code: UInt64 = longMode ? 0x00AF_9B00_0000_FFFF : 0x00CF_9B00_0000_FFFF
        let data: UInt64 = 0x00CF_9300_0000_FFFF
        var table = [UInt8](repeating: 0, count: 32)
        table.putLE(code, at: 16)
        table.putLE(data, at: 24)
        try memory.put(table, at: BootLayout.gdt, what: "the GDT")
        return DescriptorTable(base: BootLayout.gdt, limit: UInt16(table.count - 1))
    }

    /// Identity-maps the first 4 GiB with 2 MiB pages (PML4 -> one PDPT -> four page
    /// directories). Returns CR3.
    static func writeIdentityPageTables(_ memory: GuestMemory) throws(BootError) -> UInt64 {
        var pml4 = [UInt8](repeating: 0, count: 4096)
        pml4.putLE(BootLayout.pdpt | 0x3, at: 0)
        var pdpt = [UInt8](repeating: 0, count: 4096)
        var directories = [UInt8](repeating: 0, count: 4 * 4096)
        for gib in 0..<4 {
            pdpt.putLE((BootLayout.pageDirectories + UInt64(gib) * 4096) | 0x3, at: gib * 8)
            for entry in 0..<512 {
                let address = (UInt64(gib) << 30) | (UInt64(entry) << 21)
                // Present, writable, page size (2 MiB).
                directories.putLE(address | 0x83, at: (gib * 512 + entry) * 8)
            }
        }
        try memory.put(pml4, at: BootLayout.pml4, what: "the page tables")
        try memory.put(pdpt, at: BootLayout.pdpt, what: "the page tables")
        try memory.put(directories, at: BootLayout.pageDirectories, what: "the page tables")
        return BootLayout.pml4
    }

    /// 64-bit long mode, paging on with the identity map, flat segments, interrupts off.
    static func longModeEntry(_ memory: GuestMemory, rip: UInt64) throws(BootError) -> EntryState {
        var state = EntryState()
        state.gdt = try writeGDT(memory, longMode: true)
        state.idt = DescriptorTable(base: 0, limit: 0)
        state.cr3 = try writeIdentityPageTables(memory)
        state.cr0 = X86.cr0PE | X86.cr0ET | X86.cr0PG
        state.cr4 = X86.cr4PAE
        state.efer = X86.eferLME | X86.eferLMA
        state.cs = .flat64(selector: codeSelector, code: true)
        state.setDataSegments(.flat64(selector: dataSelector, code: false))
        state.rip = rip
        state.rsp = BootLayout.stackTop
        return state
    }

    /// 32-bit protected mode, paging off, flat 4 GiB segments, interrupts off.
    static func protectedModeEntry(_ memory: GuestMemory, rip: UInt64) throws(BootError) -> EntryState {
        var state = EntryState()
        state.gdt = try writeGDT(memory, longMode: false)
        state.idt = DescriptorTable(base: 0, limit: 0)
        state.cr0 = X86.cr0PE | X86.cr0ET
        state.cs = .flat32(selector: codeSelector, code: true)
        state.setDataSegments(.flat32(selector: dataSelector, code: false))
        state.rip = rip
        return state
    }
}
