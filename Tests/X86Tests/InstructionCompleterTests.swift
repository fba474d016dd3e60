import KVM
import Testing
@testable import X86

/// The environment a real vCPU gives the completer, with plain memory and fixed FPU state.
struct TestEnvironment: CompletionEnvironment {
    let ram: TestRAM
    var control = FloatingPointControl(mxcsr: 0x1F80, x87StatusWord: 0)
    var supportsCLACAndSTAC = true
    var pkru: UInt32? = 0
    var memory: any GuestPhysicalMemory { ram }
    func protectionKeyRights() throws(KVMError) -> UInt32? { pkru }
    var mxcsrMask: UInt32 { 0xFFFF }
    var physicalAddressBits: Int { 46 }
    func floatingPointControl() throws(KVMError) -> FloatingPointControl { control }
}

/// A 64-bit CPL 0 machine: the page tables of ``longModeTables`` (0-2 MiB identity, then the
/// 4 KiB pages at 0x200000), the IDT at 0x10000, the GDT at 0x11000, the TSS at 0x12000.
struct Machine64 {
    static let idt: UInt64 = 0x10000
    static let gdt: UInt64 = 0x11000
    static let tss: UInt64 = 0x12000
    static let code: UInt64 = 0x40000
    static let handler: UInt64 = 0x50000

    let ram = TestRAM()
    var registers = kvm_regs()
    var special = kvm_sregs()
    var environment: TestEnvironment

    init() {
        environment = TestEnvironment(ram: ram)
        longModeTables(ram)
        // GDT: null, 0x08 64-bit code (accessed bit clear), 0x10 data, 0x18 32-bit code,
        // 0x20 data, 0x28 64-bit code DPL 3, 0x30 conforming 64-bit code, 0x38 data DPL 3.
        let descriptors: [UInt64] = [0, 0x00AF_9A00_0000_FFFF, 0x00CF_9300_0000_FFFF, 0x00CF_9B00_0000_FFFF,
                                     0x00CF_9300_0000_FFFF, 0x00AF_FB00_0000_FFFF, 0x00AF_9F00_0000_FFFF, 0x00CF_F300_0000_FFFF]
        for (index, descriptor) in descriptors.enumerated() { ram.store(descriptor, at: Self.gdt + UInt64(index * 8)) }
        registers.rip = Self.code
        registers.rsp = 0x20008
        registers.rflags = 0x202
        special.cr0 = 0x8001_0031 // PG, WP, NE, ET, PE
        special.cr3 = 0x1000
        special.cr4 = 0x220       // OSFXSR, PAE
        special.efer = 0xD00      // NXE, LMA, LME
        special.cs = segment(selector: 0x08, type: 0xB, code64: true)
        special.ss = segment(selector: 0x10, type: 0x3, code64: false)
        special.ds = special.ss
        special.idt.base = Self.idt
        special.idt.limit = 0xFFF
        special.gdt.base = Self.gdt
        special.gdt.limit = UInt16(descriptors.count * 8 - 1)
        special.tr.base = Self.tss
        special.tr.limit = 0x67
        special.tr.present = 1
        special.tr.type = 0xB
    }

    func segment(selector: UInt16, type: UInt8, code64: Bool, dpl: UInt8 = 0) -> kvm_segment {
        var segment = kvm_segment()
        segment.selector = selector
        segment.type = type
        segment.s = 1
        segment.present = 1
        segment.dpl = dpl
        segment.l = code64 ? 1 : 0
        segment.db = code64 ? 0 : 1
        segment.g = 1
        segment.limit = 0xFFFF_FFFF
        return segment
    }

    /// Runs as CPL 3: user code and stack selectors.
    mutating func enterUserMode() {
        special.cs = segment(selector: 0x2B, type: 0xB, code64: true, dpl: 3)
        special.ss = segment(selector: 0x3B, type: 0x3, code64: false, dpl: 3)
    }

    /// Writes IDT entry `vector`.
    func gate(_ vector: UInt8, offset: UInt64 = Machine64.handler, selector: UInt16 = 0x08, ist: UInt8 = 0,
              type: UInt8 = 0xE, dpl: UInt8 = 0, present: Bool = true) {
        let low = (offset & 0xFFFF) | UInt64(selector) << 16 | UInt64(ist) << 32
            | UInt64(type | dpl << 5 | (present ? 0x80 : 0)) << 40 | ((offset >> 16) & 0xFFFF) << 48
        ram.store(low, at: Self.idt + UInt64(vector) * 16)
        ram.store(offset >> 32, at: Self.idt + UInt64(vector) * 16 + 8)
    }

    func complete(_ hex: String) throws -> CompletionOutcome {
        let instruction = try #require(InstructionDecoder.decode(bytes(hex), codeSize: ExecutionMode(registers: registers, special: special).codeSize))
        return try InstructionCompleter(environment: environment).complete(instruction, registers: registers, special: special)
    }
}

/// The registers of a completed outcome, or a recorded issue.
func completed(_ outcome: CompletionOutcome, sourceLocation: SourceLocation = #_sourceLocation) -> (registers: kvm_regs, special: kvm_sregs?, mxcsr: UInt32?)? {
    guard case let .completed(registers, special, mxcsr) = outcome else {
        Issue.record("expected a completion, got \(outcome)", sourceLocation: sourceLocation)
        return nil
    }
    return (registers, special, mxcsr)
}

func raised(_ outcome: CompletionOutcome) -> X86Exception? {
    if case let .exception(exception) = outcome { return exception }
    return nil
}

func notCompleted(_ outcome: CompletionOutcome) -> Bool {
    if case .notCompleted = outcome { return true }
    return false
}

@Suite("Completing int3 and int n: delivery through the guest's IDT")
struct SoftwareInterruptTests {
    @Test("int3 through an interrupt gate: the frame, the aligned stack, CS, RIP, IF cleared, the accessed bit")
    func int3() throws {
        let machine = Machine64()
        machine.gate(3, dpl: 3)
        let result = try #require(completed(try machine.complete("cc")))
        // RSP 0x20008 is aligned down to 0x20000, then five quadwords are pushed.
        #expect(result.registers.rsp == 0x1FFD8)
        #expect(machine.ram.load(0x1FFD8) == Machine64.code + 1, "RIP of the next instruction")
        #expect(machine.ram.load(0x1FFE0) == 0x08)
        #expect(machine.ram.load(0x1FFE8) == 0x202)
        #expect(machine.ram.load(0x1FFF0) == 0x20008, "the RSP before alignment")
        #expect(machine.ram.load(0x1FFF8) == 0x10)
        #expect(result.registers.rip == Machine64.handler)
        #expect(result.registers.rflags == 0x2, "an interrupt gate clears IF")
        let cs = try #require(result.special?.cs)
        #expect(cs.selector == 0x08 && cs.l == 1 && cs.db == 0 && cs.type == 0xB && cs.dpl == 0 && cs.present == 1)
        #expect(machine.ram.load(Machine64.gdt + 8)! >> 40 & 0xFF == 0x9B, "loading CS sets the descriptor's accessed bit")
    }

    @Test("int 0x41 through a trap gate on IST2: IF kept, the IST stack, a handler above 4 GiB")
    func trapGateOnIST() throws {
        var machine = Machine64()
        machine.gate(0x41, offset: 0xFFFF_FFFF_8100_0000, ist: 2, type: 0xF)
        machine.ram.store(0x30008, at: Machine64.tss + 36 + 8)
        machine.registers.rflags = 0x246
        let result = try #require(completed(try machine.complete("cd 41")))
        #expect(result.registers.rsp == 0x2FFD8)
        #expect(machine.ram.load(0x2FFD8) == Machine64.code + 2)
        #expect(machine.ram.load(0x2FFF0) == 0x20008, "the interrupted RSP, not the IST one")
        #expect(result.registers.rip == 0xFFFF_FFFF_8100_0000)
        #expect(result.registers.rflags == 0x246, "a trap gate keeps IF")
    }

    @Test("TF, NT and RF are cleared; the pushed RFLAGS keeps them")
    func flagsCleared() throws {
        var machine = Machine64()
        machine.gate(0x80, type: 0xF)
        machine.registers.rflags = 0x2 | (1 << 14) | (1 << 16)
        let result = try #require(completed(try machine.complete("cd 80")))
        #expect(result.registers.rflags == 0x2)
        #expect(machine.ram.load(0x1FFE8) == 0x2 | (1 << 14) | (1 << 16))
    }

    @Test("A conforming handler segment keeps the CPL as its RPL")
    func conforming() throws {
        let machine = Machine64()
        machine.gate(3, selector: 0x30)
        let result = try #require(completed(try machine.complete("cc")))
        #expect(result.special?.cs.selector == 0x30)
        #expect(result.special?.cs.type == 0xF)
    }

    @Test("Gate checks: limit, type, DPL against CPL, present; errors carry vector * 8 + 2")
    func gateChecks() throws {
        var machine = Machine64()
        machine.special.idt.limit = 3 * 16 + 14 // one byte short of gate 3
        machine.gate(3)
        #expect(raised(try machine.complete("cc")) == .generalProtection(3 * 8 + 2))
        machine.special.idt.limit = 0xFFF
        machine.gate(3, type: 0xC) // a call gate
        #expect(raised(try machine.complete("cc")) == .generalProtection(3 * 8 + 2))
        machine.gate(3, present: false)
        #expect(raised(try machine.complete("cc")) == .segmentNotPresent(3 * 8 + 2))
        machine.enterUserMode()
        machine.gate(0x41, dpl: 0)
        #expect(raised(try machine.complete("cd 41")) == .generalProtection(0x41 * 8 + 2), "int n at CPL 3 through a DPL 0 gate")
        machine.gate(0x41, dpl: 3)
        #expect(notCompleted(try machine.complete("cd 41")), "CPL 3 -> 0 switches stacks: not modelled")
        machine.gate(0x42, selector: 0x28, dpl: 3)
        #expect(raised(try machine.complete("cd 42")) == .pageFault(7, at: 0x1FFD8), "at CPL 3 the frame is a user-mode write")
        machine.registers.rsp = 0x202FF8
        let user = try #require(completed(try machine.complete("cd 42")))
        #expect(user.registers.rip == Machine64.handler, "a DPL 3 handler at CPL 3, on the user stack")
        #expect(user.registers.rsp == 0x202FC8)
        #expect(user.special?.cs.selector == 0x2B)
    }

    @Test("Target segment checks: null, outside the GDT, not code, not 64-bit")
    func segmentChecks() throws {
        let machine = Machine64()
        machine.gate(3, selector: 0)
        #expect(raised(try machine.complete("cc")) == .generalProtection(0))
        machine.gate(3, selector: 0x40)
        #expect(raised(try machine.complete("cc")) == .generalProtection(0x40))
        machine.gate(3, selector: 0x20)
        #expect(raised(try machine.complete("cc")) == .generalProtection(0x20))
        machine.gate(3, selector: 0x18)
        #expect(raised(try machine.complete("cc")) == .generalProtection(0x18))
        machine.gate(3, offset: 0x0000_8000_0000_0000)
        #expect(raised(try machine.complete("cc")) == .generalProtection(0), "a non-canonical handler address")
    }

    @Test("A stack that is not mapped: #PF for the write, at the frame's address")
    func stackFault() throws {
        var machine = Machine64()
        machine.gate(3)
        machine.registers.rsp = 0x204010
        #expect(raised(try machine.complete("cc")) == .pageFault(2, at: 0x203FE8))
        machine.registers.rsp = 0x0000_8000_0000_0010
        #expect(raised(try machine.complete("cc")) == .stackFault(0))
    }

    @Test("Outside IA-32e mode software interrupts are not completed")
    func protectedMode() throws {
        var machine = Machine64()
        machine.special.efer = 0
        machine.special.cr0 = 0x11
        machine.special.cs = machine.segment(selector: 0x18, type: 0xB, code64: false)
        #expect(notCompleted(try machine.complete("cc")))
    }
}

@Suite("Completing ldmxcsr and stmxcsr")
struct MXCSRTests {
    @Test("ldmxcsr [rsp+4]: reads four bytes, sets MXCSR, advances RIP")
    func load() throws {
        let machine = Machine64()
        machine.ram.store(0x1FA0, at: 0x2000C, size: 4)
        let result = try #require(completed(try machine.complete("0f ae 54 24 04")))
        #expect(result.mxcsr == 0x1FA0)
        #expect(result.registers.rip == Machine64.code + 5)
        #expect(result.special == nil)
    }

    @Test("Addressing: RIP-relative, GS base, SIB with index and scale, 32-bit addresses, across a page boundary")
    func addressing() throws {
        var machine = Machine64()
        machine.ram.store(0x1111, at: Machine64.code + 7 + 0x10, size: 4)
        #expect(completed(try machine.complete("0f ae 15 10 00 00 00"))?.mxcsr == 0x1111)
        machine.special.gs.base = 0x30000
        machine.ram.store(0x2222, at: 0x30100, size: 4)
        #expect(completed(try machine.complete("65 0f ae 14 25 00 01 00 00"))?.mxcsr == 0x2222)
        machine.registers.r13 = 0x30000
        machine.registers.rax = 3
        machine.ram.store(0x3333, at: 0x30000 + 3 * 8 + 8, size: 4)
        #expect(completed(try machine.complete("41 0f ae 54 c5 08"))?.mxcsr == 0x3333)
        machine.registers.rax = 0xFFFF_FFFF_0003_0200 // 67: only EAX counts
        machine.ram.store(0x4444, at: 0x30200, size: 4)
        #expect(completed(try machine.complete("67 0f ae 10"))?.mxcsr == 0x4444)
        // Linear 0x200FFE..0x201001 lies on two pages: physical 0x8FFE and 0x9000.
        machine.registers.rsi = 0x200FFE
        machine.ram.store(0x5A5A, at: 0x8FFE, size: 2)
        machine.ram.store(0x0000, at: 0x9000, size: 2)
        #expect(completed(try machine.complete("0f ae 16"))?.mxcsr == 0x5A5A)
    }

    @Test("Faults: reserved bits #GP(0), CR0.TS #NM, no OSFXSR or CR0.EM #UD, non-canonical #GP/#SS, unmapped #PF")
    func faults() throws {
        var machine = Machine64()
        machine.ram.store(0x1_0000, at: 0x2000C, size: 4)
        #expect(raised(try machine.complete("0f ae 54 24 04")) == .generalProtection(0))
        machine.special.cr0 |= 1 << 3
        #expect(raised(try machine.complete("0f ae 54 24 04")) == .deviceNotAvailable)
        machine.special.cr0 |= 1 << 2
        #expect(raised(try machine.complete("0f ae 54 24 04")) == .invalidOpcode)
        machine = Machine64()
        machine.special.cr4 = 0x20
        #expect(raised(try machine.complete("0f ae 54 24 04")) == .invalidOpcode)
        machine = Machine64()
        machine.registers.rsi = 0x0000_8000_0000_0000
        #expect(raised(try machine.complete("0f ae 16")) == .generalProtection(0))
        machine.registers.rsp = 0x0000_8000_0000_0000
        #expect(raised(try machine.complete("0f ae 14 24")) == .stackFault(0))
        machine.registers.rsi = 0x203000
        #expect(raised(try machine.complete("0f ae 16")) == .pageFault(0, at: 0x203000))
    }

    @Test("At CPL 3: user pages only, and #AC for a misaligned operand with CR0.AM and RFLAGS.AC")
    func userMode() throws {
        var machine = Machine64()
        machine.enterUserMode()
        machine.ram.store(0x1F80, at: 0xA004, size: 4)
        machine.registers.rsi = 0x202004
        #expect(completed(try machine.complete("0f ae 16"))?.mxcsr == 0x1F80)
        machine.registers.rsi = 0x200000
        #expect(raised(try machine.complete("0f ae 16")) == .pageFault(5, at: 0x200000))
        machine.special.cr0 |= 1 << 18
        machine.registers.rflags |= 1 << 18
        machine.registers.rsi = 0x202001
        #expect(raised(try machine.complete("0f ae 16")) == .alignmentCheck)
    }

    @Test("stmxcsr writes MXCSR; a read-only page or a write half on an unmapped page writes nothing")
    func store() throws {
        var machine = Machine64()
        machine.environment.control.mxcsr = 0x9FC0
        let result = try #require(completed(try machine.complete("0f ae 5c 24 fc")))
        #expect(machine.ram.load(0x20004, size: 4) == 0x9FC0)
        #expect(result.mxcsr == nil)
        #expect(result.registers.rip == Machine64.code + 5)
        machine.registers.rdi = 0x201000
        #expect(raised(try machine.complete("0f ae 1f")) == .pageFault(3, at: 0x201000))
        #expect(machine.ram.load(0x9000, size: 4) == 0)
        machine.registers.rdi = 0x202FFE
        #expect(raised(try machine.complete("0f ae 1f")) == .pageFault(2, at: 0x203000))
        #expect(machine.ram.load(0xAFFE, size: 2) == 0, "the first half is not written either")
    }

    @Test("Outside 64-bit code memory operands are not completed")
    func compatibilityMode() throws {
        var machine = Machine64()
        machine.special.cs = machine.segment(selector: 0x18, type: 0xB, code64: false)
        #expect(notCompleted(try machine.complete("0f ae 16")))
    }
}

@Suite("Completing popcnt, clac, stac and fwait")
struct OtherCompletionTests {
    @Test("popcnt r32, r32: the count, ZF from the source, the other flags cleared, zero-extended")
    func popcntRegister() throws {
        var machine = Machine64()
        machine.registers.rflags = 0x2 | 0x8D5 // CF PF AF ZF SF OF all set
        machine.registers.rcx = 0xFFFF_FFFF_0000_F0F1
        machine.registers.rax = 0xFFFF_FFFF_FFFF_FFFF
        let result = try #require(completed(try machine.complete("f3 0f b8 c1")))
        #expect(result.registers.rax == 9)
        #expect(result.registers.rflags == 0x2)
        #expect(result.registers.rip == Machine64.code + 4)
        machine.registers.rcx = 0xFFFF_FFFF_0000_0000
        let zero = try #require(completed(try machine.complete("f3 0f b8 c1")))
        #expect(zero.registers.rax == 0)
        #expect(zero.registers.rflags == 0x2 | 0x40)
    }

    @Test("popcnt r16 keeps the upper bits; r64 from memory; REX registers")
    func popcntSizes() throws {
        var machine = Machine64()
        machine.registers.rax = 0x1234_5678_9ABC_0000
        machine.registers.rcx = 0xFFFF_00FF
        #expect(completed(try machine.complete("66 f3 0f b8 c1"))?.registers.rax == 0x1234_5678_9ABC_0008)
        machine.registers.rdi = 0x30000
        machine.ram.store(~0, at: 0x30000)
        #expect(completed(try machine.complete("f3 48 0f b8 07"))?.registers.rax == 64)
        machine.registers.r8 = 0b1011
        #expect(completed(try machine.complete("f3 4d 0f b8 c8"))?.registers.r9 == 3)
        machine.registers.rdi = 0x203000
        #expect(raised(try machine.complete("f3 48 0f b8 07")) == .pageFault(0, at: 0x203000))
    }

    @Test("clac and stac at CPL 0 change RFLAGS.AC; #UD at CPL 3 or without SMAP in the CPU")
    func clacStac() throws {
        var machine = Machine64()
        let set = try #require(completed(try machine.complete("0f 01 cb")))
        #expect(set.registers.rflags == 0x202 | (1 << 18))
        #expect(set.registers.rip == Machine64.code + 3)
        machine.registers.rflags = set.registers.rflags
        #expect(completed(try machine.complete("0f 01 ca"))?.registers.rflags == 0x202)
        machine.environment.supportsCLACAndSTAC = false
        #expect(raised(try machine.complete("0f 01 ca")) == .invalidOpcode)
        machine.environment.supportsCLACAndSTAC = true
        machine.enterUserMode()
        #expect(raised(try machine.complete("0f 01 cb")) == .invalidOpcode)
    }

    @Test("fwait: nothing pending advances; a pending unmasked x87 exception is #MF; TS with MP is #NM")
    func fwait() throws {
        var machine = Machine64()
        #expect(completed(try machine.complete("9b"))?.registers.rip == Machine64.code + 1)
        machine.environment.control.x87StatusWord = 0x80 | 0x04 // ES and ZE
        #expect(raised(try machine.complete("9b")) == .mathFault)
        machine.special.cr0 &= ~(1 << 5)
        #expect(notCompleted(try machine.complete("9b")), "CR0.NE = 0 reports through FERR#")
        machine.special.cr0 |= (1 << 1) | (1 << 3)
        #expect(raised(try machine.complete("9b")) == .deviceNotAvailable)
    }

    @Test("Not completed: single-stepping, and instructions the decoder only names")
    func notCompletedCases() throws {
        var machine = Machine64()
        #expect(notCompleted(try machine.complete("f0 48 0f c7 0f")))
        machine.registers.rflags |= 1 << 8
        #expect(notCompleted(try machine.complete("9b")))
    }

    @Test("RF is cleared when an instruction completes")
    func resumeFlag() throws {
        var machine = Machine64()
        machine.registers.rflags = 0x2 | (1 << 16)
        #expect(completed(try machine.complete("9b"))?.registers.rflags == 0x2)
    }
}
