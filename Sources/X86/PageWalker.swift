/// Guest-physical memory as the x86 logic sees it: bounded reads and writes of RAM, and the
/// locked compare-and-exchange a CPU uses to set accessed and dirty bits in page tables.
/// Every address comes from the guest: an implementation checks each one and answers
/// `nil`/`false` for anything that is not RAM.
public protocol GuestPhysicalMemory {
    /// `count` bytes at `address`, or `nil` when any of them is not RAM.
    func read(at address: UInt64, count: Int) -> [UInt8]?
    /// Writes `bytes` at `address`; `false` (and nothing written) when any byte is not RAM.
    func write(_ bytes: [UInt8], at address: UInt64) -> Bool
    /// Replaces the naturally aligned `size`-byte word (4 or 8) at `address` with `desired`
    /// if it still holds `expected`, atomically. `nil` when it is not RAM, `false` when the
    /// word had changed.
    func compareExchange(at address: UInt64, size: Int, expected: UInt64, desired: UInt64) -> Bool?
}

/// The registers that decide how a linear address becomes a physical one.
public struct PagingState: Sendable, Equatable {
    public var cr0: UInt64
    public var cr3: UInt64
    public var cr4: UInt64
    public var efer: UInt64
    /// MAXPHYADDR: physical-address bits above it are reserved in page-table entries.
    public var physicalAddressBits: Int

    public init(cr0: UInt64, cr3: UInt64, cr4: UInt64, efer: UInt64, physicalAddressBits: Int) {
        self.cr0 = cr0; self.cr3 = cr3; self.cr4 = cr4; self.efer = efer
        self.physicalAddressBits = min(max(physicalAddressBits, 32), 52)
    }

    var pagingEnabled: Bool { cr0 & X86Bits.cr0PG != 0 }
    var longMode: Bool { efer & X86Bits.eferLMA != 0 }
}

/// How an access uses memory, which decides the permission checks (Intel SDM volume 3,
/// 4.6 "Access rights").
public struct MemoryAccess: Sendable, Equatable {
    public enum Kind: Sendable, Equatable { case read, write }

    public var kind: Kind
    /// An explicit access by code at CPL 3 (a user-mode access).
    public var user: Bool
    /// An implicit supervisor-mode access: the CPU reading the IDT, GDT or TSS, or pushing
    /// an interrupt frame. SMAP forbids those to user pages whatever RFLAGS.AC says.
    public var implicit: Bool
    /// RFLAGS.AC: an explicit supervisor access may touch user pages under SMAP when set.
    public var alignmentCheckFlag: Bool

    public init(kind: Kind, user: Bool = false, implicit: Bool = false, alignmentCheckFlag: Bool = false) {
        self.kind = kind; self.user = user; self.implicit = implicit; self.alignmentCheckFlag = alignmentCheckFlag
    }

    /// A read or write of the CPU's own structures (IDT, GDT, TSS, interrupt stack).
    public static func system(_ kind: Kind) -> MemoryAccess { MemoryAccess(kind: kind, implicit: true) }
}

/// Where a linear address leads.
public enum Translation: Sendable, Equatable {
    case physical(UInt64)
    /// The access faults: a #PF with this error code (CR2 is the linear address).
    case pageFault(errorCode: UInt32)
    /// The walk needs something Swiftlet does not model (a page table outside RAM, PAE
    /// paging, protection keys): the caller must not complete the instruction.
    case unsupported(String)
}

/// Bits of control registers, flags and page-table entries used by the x86 logic.
enum X86Bits {
    static let cr0PE: UInt64 = 1 << 0
    static let cr0MP: UInt64 = 1 << 1
    static let cr0EM: UInt64 = 1 << 2
    static let cr0TS: UInt64 = 1 << 3
    static let cr0NE: UInt64 = 1 << 5
    static let cr0WP: UInt64 = 1 << 16
    static let cr0AM: UInt64 = 1 << 18
    static let cr0PG: UInt64 = 1 << 31
    static let cr4PSE: UInt64 = 1 << 4
    static let cr4PAE: UInt64 = 1 << 5
    static let cr4OSFXSR: UInt64 = 1 << 9
    static let cr4LA57: UInt64 = 1 << 12
    static let cr4SMAP: UInt64 = 1 << 21
    static let cr4PKE: UInt64 = 1 << 22
    static let cr4PKS: UInt64 = 1 << 24
    static let eferNXE: UInt64 = 1 << 11
    static let eferLMA: UInt64 = 1 << 10

    static let flagCF: UInt64 = 1 << 0
    static let flagPF: UInt64 = 1 << 2
    static let flagAF: UInt64 = 1 << 4
    static let flagZF: UInt64 = 1 << 6
    static let flagSF: UInt64 = 1 << 7
    static let flagTF: UInt64 = 1 << 8
    static let flagIF: UInt64 = 1 << 9
    static let flagOF: UInt64 = 1 << 11
    static let flagNT: UInt64 = 1 << 14
    static let flagRF: UInt64 = 1 << 16
    static let flagVM: UInt64 = 1 << 17
    static let flagAC: UInt64 = 1 << 18

    static let pagePresent: UInt64 = 1 << 0
    static let pageWritable: UInt64 = 1 << 1
    static let pageUser: UInt64 = 1 << 2
    static let pageAccessed: UInt64 = 1 << 5
    static let pageDirty: UInt64 = 1 << 6
    static let pageSize: UInt64 = 1 << 7
    static let pageNoExecute: UInt64 = 1 << 63

    // #PF error code bits.
    static let faultPresent: UInt32 = 1 << 0
    static let faultWrite: UInt32 = 1 << 1
    static let faultUser: UInt32 = 1 << 2
    static let faultReserved: UInt32 = 1 << 3
    static let faultProtectionKey: UInt32 = 1 << 5
}

/// Walks the guest's page tables the way the CPU does for a data access: checks presence,
/// reserved bits and access rights (U/S, R/W with CR0.WP, SMAP, protection keys), and sets
/// the accessed and dirty bits with a locked compare-and-exchange. Paging off, 32-bit
/// paging (with 4 MiB pages) and 4- or 5-level paging are modelled; PAE paging outside long
/// mode and supervisor protection keys (CR4.PKS) are reported as unsupported.
///
/// A walk translates one byte's page; callers split accesses at 4 KiB boundaries.
public struct PageWalker {
    public let paging: PagingState
    public let memory: any GuestPhysicalMemory
    /// PKRU, read only when a walk needs it (CR4.PKE and a user page); `nil` when it cannot
    /// be read, which makes such a walk unsupported.
    public let protectionKeyRights: () -> UInt32?

    public init(paging: PagingState, memory: any GuestPhysicalMemory, protectionKeyRights: @escaping () -> UInt32? = { nil }) {
        self.paging = paging
        self.memory = memory
        self.protectionKeyRights = protectionKeyRights
    }

    /// One page-table entry the walk went through.
    private struct Step {
        let address: UInt64
        let size: Int
        let value: UInt64
    }

    private enum WalkResult {
        case done(Translation)
        /// Another CPU changed an entry while we set its accessed/dirty bits: walk again.
        case retry
    }

    public func translate(_ linear: UInt64, _ access: MemoryAccess) -> Translation {
        guard paging.pagingEnabled else {
            // Without paging a linear address is physical (32 bits: long mode needs paging).
            return .physical(linear & 0xFFFF_FFFF)
        }
        for _ in 0..<8 {
            let result: WalkResult
            if paging.longMode {
                result = walkLongMode(linear, access)
            } else if paging.cr4 & X86Bits.cr4PAE != 0 {
                return .unsupported("PAE paging outside long mode is not modelled")
            } else {
                result = walk32Bit(linear & 0xFFFF_FFFF, access)
            }
            if case let .done(translation) = result { return translation }
        }
        return .unsupported("the page tables kept changing while Swiftlet walked them")
    }

    /// The #PF error code bits that describe the access itself.
    private func accessBits(_ access: MemoryAccess) -> UInt32 {
        (access.kind == .write ? X86Bits.faultWrite : 0) | (access.user ? X86Bits.faultUser : 0)
    }

    private func load(_ address: UInt64, size: Int) -> UInt64? {
        guard let bytes = memory.read(at: address, count: size) else { return nil }
        return bytes.enumerated().reduce(UInt64(0)) { $0 | UInt64($1.element) << (8 * UInt64($1.offset)) }
    }

    // MARK: 4- and 5-level paging

    private func walkLongMode(_ linear: UInt64, _ access: MemoryAccess) -> WalkResult {
        let levels = paging.cr4 & X86Bits.cr4LA57 != 0 ? 5 : 4
        let addressMask = ((UInt64(1) << UInt64(paging.physicalAddressBits)) - 1) & ~UInt64(0xFFF)
        // Bits MAXPHYADDR..51 are reserved in every entry; so is XD without EFER.NXE.
        var reservedHigh = ((UInt64(1) << 52) - 1) & ~((UInt64(1) << UInt64(paging.physicalAddressBits)) - 1)
        if paging.efer & X86Bits.eferNXE == 0 { reservedHigh |= X86Bits.pageNoExecute }
        var table = paging.cr3 & addressMask
        var steps: [Step] = []
        for level in stride(from: levels, through: 1, by: -1) {
            let shift = UInt64(12 + 9 * (level - 1))
            let entryAddress = table + ((linear >> shift) & 0x1FF) * 8
            guard let entry = load(entryAddress, size: 8) else {
                return .done(.unsupported("a page-table entry at physical 0x\(String(entryAddress, radix: 16)) is not in RAM"))
            }
            guard entry & X86Bits.pagePresent != 0 else { return .done(.pageFault(errorCode: accessBits(access))) }
            let large = entry & X86Bits.pageSize != 0
            var reserved = entry & reservedHigh
            if level >= 4 && large { reserved |= X86Bits.pageSize } // no large pages at PML4/PML5
            if level == 3 && large { reserved |= entry & 0x3FFF_E000 } // 1 GiB page: bits 29:13
            if level == 2 && large { reserved |= entry & 0x001F_E000 } // 2 MiB page: bits 20:13
            guard reserved == 0 else {
                return .done(.pageFault(errorCode: X86Bits.faultPresent | X86Bits.faultReserved | accessBits(access)))
            }
            steps.append(Step(address: entryAddress, size: 8, value: entry))
            if level == 1 || (level <= 3 && large) {
                let pageBytes = UInt64(1) << shift
                let physical = (entry & addressMask & ~(pageBytes - 1)) | (linear & (pageBytes - 1))
                return finish(physical, steps: steps, access)
            }
            table = entry & addressMask
        }
        return .done(.unsupported("page walk did not end")) // not reached: level 1 always ends it
    }

    // MARK: 32-bit paging

    private func walk32Bit(_ linear: UInt64, _ access: MemoryAccess) -> WalkResult {
        let directoryEntry = (paging.cr3 & 0xFFFF_F000) + ((linear >> 22) & 0x3FF) * 4
        guard let pde = load(directoryEntry, size: 4) else {
            return .done(.unsupported("a page-directory entry at physical 0x\(String(directoryEntry, radix: 16)) is not in RAM"))
        }
        guard pde & X86Bits.pagePresent != 0 else { return .done(.pageFault(errorCode: accessBits(access))) }
        if pde & X86Bits.pageSize != 0 && paging.cr4 & X86Bits.cr4PSE != 0 {
            // A 4 MiB page; PSE-36 puts physical bits 39:32 in bits 20:13. Bit 21 and the
            // bits beyond MAXPHYADDR (at most 40 here) are reserved.
            let highBits = min(paging.physicalAddressBits, 40) - 32
            let reservedMask: UInt64 = (1 << 21) | ((UInt64(0xFF) << UInt64(13 + highBits)) & 0x1F_E000)
            guard pde & reservedMask == 0 else {
                return .done(.pageFault(errorCode: X86Bits.faultPresent | X86Bits.faultReserved | accessBits(access)))
            }
            let physical = (pde & 0xFFC0_0000) | (((pde >> 13) & 0xFF) << 32) | (linear & 0x3F_FFFF)
            return finish(physical, steps: [Step(address: directoryEntry, size: 4, value: pde)], access)
        }
        let tableEntry = (pde & 0xFFFF_F000) + ((linear >> 12) & 0x3FF) * 4
        guard let pte = load(tableEntry, size: 4) else {
            return .done(.unsupported("a page-table entry at physical 0x\(String(tableEntry, radix: 16)) is not in RAM"))
        }
        guard pte & X86Bits.pagePresent != 0 else { return .done(.pageFault(errorCode: accessBits(access))) }
        let physical = (pte & 0xFFFF_F000) | (linear & 0xFFF)
        return finish(physical, steps: [Step(address: directoryEntry, size: 4, value: pde), Step(address: tableEntry, size: 4, value: pte)], access)
    }

    // MARK: Access rights, accessed and dirty bits

    private func finish(_ physical: UInt64, steps: [Step], _ access: MemoryAccess) -> WalkResult {
        let userPage = steps.allSatisfy { $0.value & X86Bits.pageUser != 0 }
        let writable = steps.allSatisfy { $0.value & X86Bits.pageWritable != 0 }
        let protectionFault = WalkResult.done(.pageFault(errorCode: X86Bits.faultPresent | accessBits(access)))
        if paging.longMode && !userPage && paging.cr4 & X86Bits.cr4PKS != 0 {
            return .done(.unsupported("supervisor protection keys (CR4.PKS) are not modelled"))
        }
        // Protection keys (4- and 5-level paging, CR4.PKE): PKRU's access-disable bit for the
        // page's key forbids every data access to a user page, supervisor ones too; its
        // write-disable bit forbids writes, except supervisor writes with CR0.WP clear. The
        // check comes before the others: a fault that fails both reports PK.
        if paging.longMode && userPage && paging.cr4 & X86Bits.cr4PKE != 0 {
            guard let rights = protectionKeyRights() else {
                return .done(.unsupported("PKRU could not be read for a protection-key check"))
            }
            let key = UInt32((steps[steps.count - 1].value >> 59) & 0xF)
            let accessDisabled = (rights >> (2 * key)) & 1 != 0
            let writeDisabled = (rights >> (2 * key + 1)) & 1 != 0
            if accessDisabled || (access.kind == .write && writeDisabled && (access.user || paging.cr0 & X86Bits.cr0WP != 0)) {
                return .done(.pageFault(errorCode: X86Bits.faultPresent | X86Bits.faultProtectionKey | accessBits(access)))
            }
        }
        if access.user {
            guard userPage else { return protectionFault }
            if access.kind == .write && !writable { return protectionFault }
        } else {
            if userPage && paging.cr4 & X86Bits.cr4SMAP != 0 && (access.implicit || !access.alignmentCheckFlag) {
                return protectionFault
            }
            if access.kind == .write && !writable && paging.cr0 & X86Bits.cr0WP != 0 { return protectionFault }
        }
        // Set A in every entry used, and D in the last one for a write, as the CPU does,
        // without losing a concurrent change by another vCPU.
        for (position, step) in steps.enumerated() {
            var wanted = step.value | X86Bits.pageAccessed
            if position == steps.count - 1 && access.kind == .write { wanted |= X86Bits.pageDirty }
            guard wanted != step.value else { continue }
            switch memory.compareExchange(at: step.address, size: step.size, expected: step.value, desired: wanted) {
            case true?: continue
            case false?: return .retry
            case nil: return .done(.unsupported("a page-table entry at physical 0x\(String(step.address, radix: 16)) is not in RAM"))
            }
        }
        return .done(.physical(physical))
    }
}
