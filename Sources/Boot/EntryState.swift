/// One x86 segment register as KVM's `struct kvm_segment` describes it: the visible
/// selector plus the hidden descriptor cache (base, limit, attributes) the CPU loads
/// from the GDT. At entry we fill the cache directly, so no GDT walk is needed.
public struct SegmentState: Sendable, Equatable {
    public var selector: UInt16
    public var base: UInt64
    public var limit: UInt32
    /// Descriptor type (bits 8-11 of the access byte): 0xB = code execute/read accessed,
    /// 0x3 = data read/write accessed, 0xB for a busy TSS.
    public var type: UInt8
    public var present: Bool = true
    public var dpl: UInt8 = 0
    /// Default operation size: true for 32-bit segments.
    public var db: Bool = false
    /// true for code/data segments, false for system segments (TSS, LDT).
    public var s: Bool = true
    /// Long-mode (64-bit) code segment.
    public var l: Bool = false
    /// Granularity: limit counted in 4 KiB units.
    public var g: Bool = false

    public init(selector: UInt16, base: UInt64, limit: UInt32, type: UInt8, present: Bool = true,
                dpl: UInt8 = 0, db: Bool = false, s: Bool = true, l: Bool = false, g: Bool = false) {
        self.selector = selector; self.base = base; self.limit = limit; self.type = type
        self.present = present; self.dpl = dpl; self.db = db; self.s = s; self.l = l; self.g = g
    }

    /// A real-mode segment: base = selector * 16, 64 KiB limit.
    public static func realMode(_ selector: UInt16, code: Bool = false) -> SegmentState {
        SegmentState(selector: selector, base: UInt64(selector) << 4, limit: 0xFFFF, type: code ? 0xB : 0x3)
    }

    /// A flat 4 GiB protected-mode segment.
    public static func flat32(selector: UInt16, code: Bool) -> SegmentState {
        SegmentState(selector: selector, base: 0, limit: 0xFFFF_FFFF, type: code ? 0xB : 0x3, db: true, g: true)
    }

    /// A 64-bit code segment (L=1) or a flat data segment for long mode.
    public static func flat64(selector: UInt16, code: Bool) -> SegmentState {
        SegmentState(selector: selector, base: 0, limit: 0xFFFF_FFFF, type: code ? 0xB : 0x3,
                     db: !code, l: code, g: true)
    }
}

/// A descriptor-table register (GDTR or IDTR).
public struct DescriptorTable: Sendable, Equatable {
    public var base: UInt64
    public var limit: UInt16
    public init(base: UInt64, limit: UInt16) { self.base = base; self.limit = limit }
}

/// The CPU state a loader asks the boot vCPU to start in: what a boot protocol defines
/// as "the state at entry". The machine turns it into `KVM_SET_REGS` / `KVM_SET_SREGS`.
///
/// Loaders in this module write everything the state points at (GDT, page tables,
/// boot parameters) into guest memory themselves.
public struct EntryState: Sendable, Equatable {
    public var rip: UInt64 = 0
    public var rsp: UInt64 = 0
    public var rbp: UInt64 = 0
    public var rax: UInt64 = 0
    public var rbx: UInt64 = 0
    public var rcx: UInt64 = 0
    public var rdx: UInt64 = 0
    public var rsi: UInt64 = 0
    public var rdi: UInt64 = 0
    /// Bit 1 is reserved and always set; interrupts start disabled.
    public var rflags: UInt64 = 0x2

    public var cs = SegmentState.realMode(0, code: true)
    public var ds = SegmentState.realMode(0)
    public var es = SegmentState.realMode(0)
    public var fs = SegmentState.realMode(0)
    public var gs = SegmentState.realMode(0)
    public var ss = SegmentState.realMode(0)

    public var gdt = DescriptorTable(base: 0, limit: 0xFFFF)
    public var idt = DescriptorTable(base: 0, limit: 0xFFFF)

    /// Reset value: CD and NW clear (caches on), ET set, PE clear.
    public var cr0: UInt64 = 0x10
    public var cr3: UInt64 = 0
    public var cr4: UInt64 = 0
    public var efer: UInt64 = 0

    public init() {}

    /// Sets every data segment (DS, ES, FS, GS, SS) to `segment`.
    public mutating func setDataSegments(_ segment: SegmentState) {
        ds = segment; es = segment; fs = segment; gs = segment; ss = segment
    }
}

/// Control-register and EFER bits used by the loaders.
public enum X86 {
    public static let cr0PE: UInt64 = 1 << 0
    public static let cr0ET: UInt64 = 1 << 4
    public static let cr0NE: UInt64 = 1 << 5
    public static let cr0WP: UInt64 = 1 << 16
    public static let cr0PG: UInt64 = 1 << 31
    public static let cr4PAE: UInt64 = 1 << 5
    public static let eferLME: UInt64 = 1 << 8
    public static let eferLMA: UInt64 = 1 << 10
}
