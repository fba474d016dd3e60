import Testing
@testable import X86

/// A few hundred KiB of plain guest-physical RAM for page tables and data, with a switch
/// to make compare-and-exchange lose races (another vCPU changing an entry).
final class TestRAM: GuestPhysicalMemory {
    var bytes: [UInt8]
    /// How many of the next compare-and-exchange calls fail as if the entry had changed.
    var racesToLose = 0

    init(size: Int = 0x80000) { bytes = Array(repeating: 0, count: size) }

    func read(at address: UInt64, count: Int) -> [UInt8]? {
        guard address <= UInt64(bytes.count), UInt64(count) <= UInt64(bytes.count) - address else { return nil }
        return Array(bytes[Int(address)..<(Int(address) + count)])
    }

    func write(_ data: [UInt8], at address: UInt64) -> Bool {
        guard address <= UInt64(bytes.count), UInt64(data.count) <= UInt64(bytes.count) - address else { return false }
        bytes.replaceSubrange(Int(address)..<(Int(address) + data.count), with: data)
        return true
    }

    func compareExchange(at address: UInt64, size: Int, expected: UInt64, desired: UInt64) -> Bool? {
        guard load(address, size: size) != nil else { return nil }
        if racesToLose > 0 { racesToLose -= 1; return false }
        guard load(address, size: size) == expected else { return false }
        store(desired, at: address, size: size)
        return true
    }

    func load(_ address: UInt64, size: Int = 8) -> UInt64? {
        read(at: address, count: size).map { $0.enumerated().reduce(UInt64(0)) { $0 | UInt64($1.element) << (8 * UInt64($1.offset)) } }
    }

    func store(_ value: UInt64, at address: UInt64, size: Int = 8) {
        _ = write((0..<size).map { UInt8(truncatingIfNeeded: value >> (8 * UInt64($0))) }, at: address)
    }
}

let P: UInt64 = 1, W: UInt64 = 2, U: UInt64 = 4, PS: UInt64 = 0x80, A: UInt64 = 0x20, D: UInt64 = 0x40

/// 4-level tables at 0x1000 (PML4), 0x2000 (PDPT), 0x3000 (PD), 0x4000 (PT):
///   linear 0x000000-0x1FFFFF  2 MiB page at 0 (supervisor, writable)
///   linear 0x200000           4 KiB page at 0x8000 (supervisor, writable)
///   linear 0x201000           4 KiB page at 0x9000 (supervisor, read-only)
///   linear 0x202000           4 KiB page at 0xA000 (user, writable; every level user)
///   linear 0x203000           not present
func longModeTables(_ ram: TestRAM, userAtUpperLevels: Bool = true) {
    let upper = P | W | (userAtUpperLevels ? U : 0)
    ram.store(0x2000 | upper, at: 0x1000)
    ram.store(0x3000 | upper, at: 0x2000)
    ram.store(0 | P | W | PS, at: 0x3000)
    ram.store(0x4000 | upper, at: 0x3008)
    ram.store(0x8000 | P | W, at: 0x4000)
    ram.store(0x9000 | P, at: 0x4008)
    ram.store(0xA000 | P | W | U, at: 0x4010)
}

let cr0Paging: UInt64 = 0x8000_0011 // PG, ET, PE
let wp: UInt64 = 1 << 16

func longMode(cr0: UInt64 = cr0Paging | wp, cr4: UInt64 = 0x20, efer: UInt64 = 0x500 | 0x800, bits: Int = 46) -> PagingState {
    PagingState(cr0: cr0, cr3: 0x1000, cr4: cr4, efer: efer, physicalAddressBits: bits)
}

@Suite("Page walker: 4-level paging")
struct LongModeWalkTests {
    @Test("A 4 KiB page: the offset is kept, A is set on every level, D only on a write")
    func fourKilobytePage() {
        let ram = TestRAM()
        longModeTables(ram)
        let walker = PageWalker(paging: longMode(), memory: ram)
        #expect(walker.translate(0x200123, MemoryAccess(kind: .read)) == .physical(0x8123))
        for entry: UInt64 in [0x1000, 0x2000, 0x3008, 0x4000] { #expect(ram.load(entry)! & A != 0) }
        #expect(ram.load(0x4000)! & D == 0)
        #expect(walker.translate(0x200FFC, MemoryAccess(kind: .write)) == .physical(0x8FFC))
        #expect(ram.load(0x4000)! & D != 0)
        #expect(ram.load(0x3008)! & D == 0, "D belongs only to the entry that maps the page")
    }

    @Test("A 2 MiB page, and a 1 GiB page")
    func largePages() {
        let ram = TestRAM()
        longModeTables(ram)
        let walker = PageWalker(paging: longMode(), memory: ram)
        #expect(walker.translate(0x1F_FFF8, MemoryAccess(kind: .read)) == .physical(0x1F_FFF8))
        ram.store(0x4000_0000 | P | W | PS, at: 0x2008) // PDPT[1]: 1 GiB at 1 GiB
        #expect(walker.translate(0x7654_3210, MemoryAccess(kind: .read)) == .physical(0x7654_3210))
    }

    @Test("Not present: #PF with P = 0 and the access bits")
    func notPresent() {
        let ram = TestRAM()
        longModeTables(ram)
        let walker = PageWalker(paging: longMode(), memory: ram)
        #expect(walker.translate(0x203000, MemoryAccess(kind: .read)) == .pageFault(errorCode: 0))
        #expect(walker.translate(0x203000, MemoryAccess(kind: .write)) == .pageFault(errorCode: 2))
        #expect(walker.translate(0x203000, MemoryAccess(kind: .write, user: true)) == .pageFault(errorCode: 6))
        #expect(walker.translate(0x80_0000_0000, MemoryAccess(kind: .read)) == .pageFault(errorCode: 0)) // PML4[1]
    }

    @Test("Read-only page: a supervisor write faults with CR0.WP and succeeds without it")
    func writeProtect() {
        let ram = TestRAM()
        longModeTables(ram)
        #expect(PageWalker(paging: longMode(), memory: ram).translate(0x201000, MemoryAccess(kind: .write)) == .pageFault(errorCode: 3))
        #expect(PageWalker(paging: longMode(cr0: cr0Paging), memory: ram).translate(0x201000, MemoryAccess(kind: .write)) == .physical(0x9000))
        #expect(PageWalker(paging: longMode(), memory: ram).translate(0x201000, MemoryAccess(kind: .read)) == .physical(0x9000))
    }

    @Test("User accesses: only to pages that are user at every level, writes only if writable everywhere")
    func userAccess() {
        let ram = TestRAM()
        longModeTables(ram)
        let walker = PageWalker(paging: longMode(), memory: ram)
        #expect(walker.translate(0x202004, MemoryAccess(kind: .write, user: true)) == .physical(0xA004))
        #expect(walker.translate(0x200000, MemoryAccess(kind: .read, user: true)) == .pageFault(errorCode: 5))
        #expect(walker.translate(0x201000, MemoryAccess(kind: .read, user: true)) == .pageFault(errorCode: 5))
        let supervisorAbove = TestRAM()
        longModeTables(supervisorAbove, userAtUpperLevels: false)
        #expect(PageWalker(paging: longMode(), memory: supervisorAbove).translate(0x202000, MemoryAccess(kind: .read, user: true))
            == .pageFault(errorCode: 5))
    }

    @Test("SMAP: supervisor data access to a user page faults unless explicit with RFLAGS.AC")
    func smap() {
        let ram = TestRAM()
        longModeTables(ram)
        let smap = PageWalker(paging: longMode(cr4: 0x20 | (1 << 21)), memory: ram)
        #expect(smap.translate(0x202000, MemoryAccess(kind: .read)) == .pageFault(errorCode: 1))
        #expect(smap.translate(0x202000, MemoryAccess(kind: .write)) == .pageFault(errorCode: 3))
        #expect(smap.translate(0x202000, MemoryAccess(kind: .read, alignmentCheckFlag: true)) == .physical(0xA000))
        #expect(smap.translate(0x202000, MemoryAccess(kind: .read, implicit: true, alignmentCheckFlag: true)) == .pageFault(errorCode: 1))
        #expect(smap.translate(0x200000, MemoryAccess(kind: .read, implicit: true)) == .physical(0x8000))
        // Without SMAP the kernel may read user pages.
        #expect(PageWalker(paging: longMode(), memory: ram).translate(0x202000, MemoryAccess(kind: .read)) == .physical(0xA000))
    }

    @Test("Reserved bits: above MAXPHYADDR, XD without EFER.NXE, PS in a PML4 entry, low bits of a 2 MiB page")
    func reservedBits() {
        let reservedFault = Translation.pageFault(errorCode: 1 | 8)
        let aboveMaxPhys = TestRAM()
        longModeTables(aboveMaxPhys)
        aboveMaxPhys.store(0x8000 | P | W | (1 << 47), at: 0x4000)
        #expect(PageWalker(paging: longMode(bits: 46), memory: aboveMaxPhys).translate(0x200000, MemoryAccess(kind: .read)) == reservedFault)
        #expect(PageWalker(paging: longMode(bits: 48), memory: aboveMaxPhys).translate(0x200000, MemoryAccess(kind: .read))
            == .physical(0x8000 | (1 << 47)))

        let noExecute = TestRAM()
        longModeTables(noExecute)
        noExecute.store(0x8000 | P | W | (1 << 63), at: 0x4000)
        #expect(PageWalker(paging: longMode(efer: 0x500), memory: noExecute).translate(0x200000, MemoryAccess(kind: .read)) == reservedFault)
        #expect(PageWalker(paging: longMode(), memory: noExecute).translate(0x200000, MemoryAccess(kind: .read)) == .physical(0x8000))

        let largePML4 = TestRAM()
        longModeTables(largePML4)
        largePML4.store(0x2000 | P | W | PS, at: 0x1000)
        #expect(PageWalker(paging: longMode(), memory: largePML4).translate(0x1000, MemoryAccess(kind: .read)) == reservedFault)

        let misaligned = TestRAM()
        longModeTables(misaligned)
        misaligned.store(0x2000 | P | W | PS, at: 0x3000) // a 2 MiB page with bit 13 set
        #expect(PageWalker(paging: longMode(), memory: misaligned).translate(0x1000, MemoryAccess(kind: .read)) == reservedFault)
    }

    @Test("5-level paging (CR4.LA57) adds a level above the PML4")
    func fiveLevel() {
        let ram = TestRAM()
        longModeTables(ram)
        ram.store(0x1000 | P | W, at: 0x5000) // PML5[0] -> the PML4
        let paging = PagingState(cr0: cr0Paging, cr3: 0x5000, cr4: 0x20 | (1 << 12), efer: 0xD00, physicalAddressBits: 46)
        #expect(PageWalker(paging: paging, memory: ram).translate(0x200010, MemoryAccess(kind: .read)) == .physical(0x8010))
    }

    @Test("A lost race on the accessed bit makes the walk start again; tables outside RAM are refused")
    func racesAndOutsideRAM() {
        let ram = TestRAM()
        longModeTables(ram)
        ram.racesToLose = 2
        #expect(PageWalker(paging: longMode(), memory: ram).translate(0x200000, MemoryAccess(kind: .read)) == .physical(0x8000))
        ram.racesToLose = 100
        ram.store(0x8000 | P | W, at: 0x4000) // clear A again
        if case .unsupported = PageWalker(paging: longMode(), memory: ram).translate(0x200000, MemoryAccess(kind: .read)) {} else {
            Issue.record("a walk that never settles must give up")
        }
        ram.racesToLose = 0
        ram.store(0x4000_0000 | P | W, at: 0x1008) // PML4[1] -> a PDPT far outside this RAM
        if case .unsupported = PageWalker(paging: longMode(), memory: ram).translate(0x80_0000_0000, MemoryAccess(kind: .read)) {} else {
            Issue.record("a table outside RAM must not be read")
        }
    }

    @Test("Protection keys: AD forbids any data access to a user page, WD writes (supervisor ones only with CR0.WP)")
    func protectionKeys() {
        let ram = TestRAM()
        longModeTables(ram)
        ram.store(0xA000 | P | W | U | (5 << 59), at: 0x4010) // the user page, key 5
        let pke: UInt64 = 0x20 | (1 << 22)
        func walk(_ pkru: UInt32?, cr0: UInt64 = cr0Paging | wp, _ access: MemoryAccess) -> Translation {
            PageWalker(paging: longMode(cr0: cr0, cr4: pke), memory: ram, protectionKeyRights: { pkru }).translate(0x202000, access)
        }
        let accessDisable: UInt32 = 1 << 10, writeDisable: UInt32 = 1 << 11
        #expect(walk(0, MemoryAccess(kind: .write, user: true)) == .physical(0xA000))
        #expect(walk(accessDisable, MemoryAccess(kind: .read, user: true)) == .pageFault(errorCode: 0x20 | 5))
        #expect(walk(accessDisable, MemoryAccess(kind: .read)) == .pageFault(errorCode: 0x20 | 1), "supervisor reads too")
        #expect(walk(writeDisable, MemoryAccess(kind: .read, user: true)) == .physical(0xA000))
        #expect(walk(writeDisable, MemoryAccess(kind: .write, user: true)) == .pageFault(errorCode: 0x20 | 7))
        #expect(walk(writeDisable, MemoryAccess(kind: .write)) == .pageFault(errorCode: 0x20 | 3))
        #expect(walk(writeDisable, cr0: cr0Paging, MemoryAccess(kind: .write)) == .physical(0xA000), "CR0.WP = 0")
        #expect(walk(1 << 0, MemoryAccess(kind: .read, user: true)) == .physical(0xA000), "another key's bits")
        // Supervisor pages have no key; PKRU unknown on a user page: not completed.
        #expect(PageWalker(paging: longMode(cr4: pke), memory: ram, protectionKeyRights: { ~0 }).translate(0x200000, MemoryAccess(kind: .read))
            == .physical(0x8000))
        if case .unsupported = walk(nil, MemoryAccess(kind: .read)) {} else { Issue.record("PKRU unknown") }
        // Supervisor protection keys are not modelled.
        if case .unsupported = PageWalker(paging: longMode(cr4: 0x20 | (1 << 24)), memory: ram).translate(0x200000, MemoryAccess(kind: .read)) {} else {
            Issue.record("PKS")
        }
    }
}

@Suite("Page walker: without paging, 32-bit paging, PAE")
struct LegacyWalkTests {
    @Test("Paging off: linear is physical, 32 bits")
    func pagingOff() {
        let walker = PageWalker(paging: PagingState(cr0: 0x11, cr3: 0, cr4: 0, efer: 0, physicalAddressBits: 36), memory: TestRAM())
        #expect(walker.translate(0x1_0000_7C00, MemoryAccess(kind: .write)) == .physical(0x7C00))
    }

    @Test("32-bit paging: 4 KiB pages through a page table, 4 MiB pages with CR4.PSE")
    func thirtyTwoBit() {
        let ram = TestRAM()
        ram.store(0x2000 | P | W, at: 0x1000, size: 4)          // PDE[0] -> PT at 0x2000
        ram.store(0x8000 | P | W, at: 0x2000 + 5 * 4, size: 4)  // PTE[5] -> 0x8000
        ram.store(0x0040_0000 | P | W | PS, at: 0x1004, size: 4) // PDE[1]: 4 MiB page at 4 MiB
        let pse = PagingState(cr0: cr0Paging, cr3: 0x1000, cr4: 0x10, efer: 0, physicalAddressBits: 36)
        let walker = PageWalker(paging: pse, memory: ram)
        #expect(walker.translate(0x5ABC, MemoryAccess(kind: .write)) == .physical(0x8ABC))
        #expect(ram.load(0x2014, size: 4)! & (A | D) == A | D)
        #expect(walker.translate(0x0045_6789, MemoryAccess(kind: .read)) == .physical(0x0045_6789))
        #expect(walker.translate(0x0080_0000, MemoryAccess(kind: .read)) == .pageFault(errorCode: 0))
        // Bit 21 of a 4 MiB PDE is reserved.
        ram.store(0x0040_0000 | P | W | PS | (1 << 21), at: 0x1004, size: 4)
        #expect(walker.translate(0x0045_6789, MemoryAccess(kind: .read)) == .pageFault(errorCode: 9))
    }

    @Test("PAE paging outside long mode is not modelled")
    func pae() {
        let walker = PageWalker(paging: PagingState(cr0: cr0Paging, cr3: 0x1000, cr4: 0x20, efer: 0, physicalAddressBits: 36), memory: TestRAM())
        if case .unsupported = walker.translate(0x1000, MemoryAccess(kind: .read)) {} else { Issue.record("PAE") }
    }
}
