import KVM

/// Completes, in user space, an instruction that KVM's instruction emulator failed on, with
/// the effect the CPU would have had: new register values, guest memory written, or the
/// exception the instruction raises. The caller (the vCPU runner) reads the vCPU's state,
/// asks this type, and applies the answer with `KVM_SET_REGS`/`KVM_SET_SREGS`/`KVM_SET_FPU`,
/// or injects the exception with `KVM_SET_VCPU_EVENTS`.
///
/// Everything here is architectural (Intel SDM volumes 2 and 3) and nothing depends on
/// the KVM in use, so a completion is the same on any host. It issues no ioctl itself:
/// guest memory and the FPU come through ``CompletionEnvironment``, and it is unit-tested
/// with plain memory.
///
/// **Software interrupts** (`int3`, `int n`) are delivered here, through the guest's IDT,
/// not injected with `KVM_SET_VCPU_EVENTS`: KVM cannot take a software interrupt or
/// a #BP from user space in a way that is right on every host. It gives no way to pass the
/// instruction length that VMX pushes past (`event_exit_inst_len` is whatever the last
/// exit left), while SVM decodes the instruction at RIP and skips it itself; so "advance
/// RIP, inject #BP" returns to the wrong place on one of the two. Delivering the interrupt
/// here (the gate checks, including the DPL check of a software interrupt, the stack
/// frame, the new CS:RIP and RFLAGS) uses only registers and memory. Only hardware
/// exceptions (#GP, #PF, #NM ...) are injected, and those KVM delivers the same way
/// everywhere. Delivery is modelled in IA-32e mode without a privilege change; anything
/// else is not completed.
public struct InstructionCompleter {
    let environment: any CompletionEnvironment

    public init(environment: any CompletionEnvironment) {
        self.environment = environment
    }

    /// The effect of `instruction`, which starts at `registers.rip`.
    public func complete(_ instruction: Instruction, registers: kvm_regs, special: kvm_sregs) throws(KVMError) -> CompletionOutcome {
        var execution = Execution(instruction: instruction, registers: registers, special: special, environment: environment)
        do {
            try execution.run()
        } catch {
            switch error {
            case let .exception(exception): return .exception(exception)
            case let .notCompleted(reason): return .notCompleted(reason)
            case let .kvm(error): throw error
            }
        }
        return .completed(registers: execution.registers, special: execution.specialChanged ? execution.special : nil,
                          mxcsr: execution.newMXCSR)
    }
}

/// What completing an instruction comes to.
public enum CompletionOutcome {
    /// Done: write back `registers`; `special` when segment or control registers changed;
    /// `mxcsr` when the instruction loaded MXCSR.
    case completed(registers: kvm_regs, special: kvm_sregs?, mxcsr: UInt32?)
    /// The instruction raises this exception (RIP stays at the instruction, as for a fault).
    case exception(X86Exception)
    /// Swiftlet cannot complete this instruction exactly in this state; says why.
    case notCompleted(String)
}

/// An exception to deliver to the guest.
public struct X86Exception: Sendable, Equatable, CustomStringConvertible {
    public let vector: UInt8
    public let errorCode: UInt32?
    /// The linear address for CR2, with a page fault.
    public let faultAddress: UInt64?

    public init(vector: UInt8, errorCode: UInt32? = nil, faultAddress: UInt64? = nil) {
        self.vector = vector; self.errorCode = errorCode; self.faultAddress = faultAddress
    }

    public static let invalidOpcode = X86Exception(vector: 6)
    public static let deviceNotAvailable = X86Exception(vector: 7)
    public static let mathFault = X86Exception(vector: 16)
    public static func segmentNotPresent(_ code: UInt32) -> X86Exception { X86Exception(vector: 11, errorCode: code) }
    public static func stackFault(_ code: UInt32) -> X86Exception { X86Exception(vector: 12, errorCode: code) }
    public static func generalProtection(_ code: UInt32) -> X86Exception { X86Exception(vector: 13, errorCode: code) }
    public static func pageFault(_ code: UInt32, at address: UInt64) -> X86Exception {
        X86Exception(vector: 14, errorCode: code, faultAddress: address)
    }
    public static let alignmentCheck = X86Exception(vector: 17, errorCode: 0)

    /// The mnemonic, such as `#GP`.
    public var name: String {
        let names: [UInt8: String] = [0: "#DE", 1: "#DB", 3: "#BP", 6: "#UD", 7: "#NM", 8: "#DF", 10: "#TS", 11: "#NP",
                                      12: "#SS", 13: "#GP", 14: "#PF", 16: "#MF", 17: "#AC", 19: "#XM"]
        return names[vector] ?? "vector \(vector)"
    }

    public var description: String {
        var text = name
        if let errorCode { text += "(0x\(String(errorCode, radix: 16)))" }
        if let faultAddress { text += " at 0x\(String(faultAddress, radix: 16))" }
        return text
    }
}

/// The x87/SSE control state an instruction may read.
public struct FloatingPointControl: Sendable, Equatable {
    public var mxcsr: UInt32
    public var x87StatusWord: UInt16

    public init(mxcsr: UInt32, x87StatusWord: UInt16) {
        self.mxcsr = mxcsr
        self.x87StatusWord = x87StatusWord
    }
}

/// What ``InstructionCompleter`` needs besides the registers: guest memory, the FPU, and
/// facts about the CPU the guest runs on.
public protocol CompletionEnvironment {
    var memory: any GuestPhysicalMemory { get }
    /// The MXCSR bits the CPU accepts (FXSAVE's MXCSR_MASK); LDMXCSR of any other bit is #GP(0).
    var mxcsrMask: UInt32 { get }
    /// MAXPHYADDR, for reserved bits in page-table entries.
    var physicalAddressBits: Int { get }
    /// Whether the CPU implements CLAC and STAC (CPUID.(EAX=7,ECX=0):EBX.SMAP[bit 20]).
    var supportsCLACAndSTAC: Bool { get }
    /// The guest's MXCSR and x87 status word (read when an instruction needs them).
    func floatingPointControl() throws(KVMError) -> FloatingPointControl
    /// The guest's PKRU (read when a protection-key check needs it); `nil` when unknown.
    func protectionKeyRights() throws(KVMError) -> UInt32?
}

/// The CPU mode at RIP, as far as decoding and completing need it.
public struct ExecutionMode: Sendable, Equatable {
    public let codeSize: CodeSize
    /// Current privilege level: 0 in real mode, 3 in virtual-8086 mode, else CS.RPL.
    public let cpl: Int
    /// IA-32e mode (EFER.LMA): 64-bit or compatibility mode.
    public let longMode: Bool
    public let virtual8086: Bool

    public init(registers: kvm_regs, special: kvm_sregs) {
        longMode = special.efer & X86Bits.eferLMA != 0
        virtual8086 = special.cr0 & X86Bits.cr0PE != 0 && registers.rflags & X86Bits.flagVM != 0 && !longMode
        if special.cr0 & X86Bits.cr0PE == 0 {
            codeSize = .bits16
            cpl = 0
        } else if virtual8086 {
            codeSize = .bits16
            cpl = 3
        } else {
            codeSize = longMode && special.cs.l != 0 ? .bits64 : special.cs.db != 0 ? .bits32 : .bits16
            cpl = Int(special.cs.selector & 3)
        }
    }

    /// The linear address of RIP: CS base + RIP (CS base counts for nothing in 64-bit code).
    public static func instructionPointer(registers: kvm_regs, special: kvm_sregs) -> UInt64 {
        let mode = ExecutionMode(registers: registers, special: special)
        switch mode.codeSize {
        case .bits64: return registers.rip
        case .bits32: return (special.cs.base &+ (registers.rip & 0xFFFF_FFFF)) & (mode.longMode ? ~0 : 0xFFFF_FFFF)
        case .bits16: return (special.cs.base &+ (registers.rip & 0xFFFF)) & (mode.longMode ? ~0 : 0xFFFF_FFFF)
        }
    }
}

private enum Failure: Error {
    case exception(X86Exception)
    case notCompleted(String)
    case kvm(KVMError)
}

/// One completion in progress: the state as it will be written back.
private struct Execution {
    let instruction: Instruction
    var registers: kvm_regs
    var special: kvm_sregs
    var specialChanged = false
    var newMXCSR: UInt32?
    let environment: any CompletionEnvironment
    let mode: ExecutionMode
    let walker: PageWalker

    init(instruction: Instruction, registers: kvm_regs, special: kvm_sregs, environment: any CompletionEnvironment) {
        self.instruction = instruction
        self.registers = registers
        self.special = special
        self.environment = environment
        mode = ExecutionMode(registers: registers, special: special)
        walker = PageWalker(paging: PagingState(cr0: special.cr0, cr3: special.cr3, cr4: special.cr4, efer: special.efer,
                                                physicalAddressBits: environment.physicalAddressBits),
                            memory: environment.memory,
                            protectionKeyRights: { try? environment.protectionKeyRights() })
    }

    /// The address of the next instruction, wrapped as IP/EIP wrap in 16/32-bit code.
    var nextRIP: UInt64 {
        let next = registers.rip &+ UInt64(instruction.length)
        switch mode.codeSize {
        case .bits64: return next
        case .bits32: return next & 0xFFFF_FFFF
        case .bits16: return next & 0xFFFF
        }
    }

    /// Ends a completed instruction: RIP past it, RF cleared (an instruction that completes
    /// clears it).
    mutating func advance() {
        registers.rip = nextRIP
        registers.rflags &= ~X86Bits.flagRF
    }

    func floatingPointControl() throws(Failure) -> FloatingPointControl {
        do { return try environment.floatingPointControl() } catch { throw .kvm(error) }
    }

    mutating func run() throws(Failure) {
        if registers.rflags & X86Bits.flagTF != 0 {
            throw .notCompleted("RFLAGS.TF is set: the guest is single-stepping, which Swiftlet does not model")
        }
        switch instruction.operation {
        case .breakpoint:
            try deliverSoftwareInterrupt(vector: 3)
        case let .softwareInterrupt(vector):
            try deliverSoftwareInterrupt(vector: vector)
        case .fwait:
            try waitForFPU()
            advance()
        case let .loadMXCSR(operand):
            try checkSSEAvailable()
            let address = try linearAddress(of: operand)
            let value = try readUInt(at: address, bytes: 4)
            guard UInt32(truncatingIfNeeded: value) & ~environment.mxcsrMask == 0 else { throw .exception(.generalProtection(0)) }
            newMXCSR = UInt32(truncatingIfNeeded: value)
            advance()
        case let .storeMXCSR(operand):
            try checkSSEAvailable()
            let address = try linearAddress(of: operand)
            let value = try floatingPointControl().mxcsr
            try writeUInt(UInt64(value), at: address, bytes: 4)
            advance()
        case .clearAC, .setAC:
            guard mode.cpl == 0, !mode.virtual8086, environment.supportsCLACAndSTAC else { throw .exception(.invalidOpcode) }
            if instruction.operation == .setAC { registers.rflags |= X86Bits.flagAC } else { registers.rflags &= ~X86Bits.flagAC }
            advance()
        case let .populationCount(size, destination, source):
            try populationCount(size: size, destination: destination, source: source)
            advance()
        case .other:
            throw .notCompleted("\(instruction.mnemonic) is not among the instructions it completes")
        }
    }

    // MARK: x87 and SSE

    /// FWAIT: #NM when CR0.MP and CR0.TS are both set; #MF when an unmasked x87 exception is
    /// pending (FSW.ES) and CR0.NE selects native error reporting; else nothing.
    func waitForFPU() throws(Failure) {
        if special.cr0 & X86Bits.cr0MP != 0 && special.cr0 & X86Bits.cr0TS != 0 { throw .exception(.deviceNotAvailable) }
        let statusWord = try floatingPointControl().x87StatusWord
        guard statusWord & 0x80 != 0 else { return }
        guard special.cr0 & X86Bits.cr0NE != 0 else {
            throw .notCompleted("an x87 exception is pending with CR0.NE = 0 (reported through FERR#, which Swiftlet does not model)")
        }
        throw .exception(.mathFault)
    }

    /// LDMXCSR/STMXCSR: #UD without CR4.OSFXSR or with CR0.EM, #NM with CR0.TS.
    func checkSSEAvailable() throws(Failure) {
        if special.cr0 & X86Bits.cr0EM != 0 || special.cr4 & X86Bits.cr4OSFXSR == 0 { throw .exception(.invalidOpcode) }
        if special.cr0 & X86Bits.cr0TS != 0 { throw .exception(.deviceNotAvailable) }
    }

    // MARK: POPCNT

    mutating func populationCount(size: Int, destination: Int, source: Operand) throws(Failure) {
        let mask: UInt64 = size == 8 ? ~0 : (UInt64(1) << UInt64(8 * size)) - 1
        let value: UInt64
        switch source {
        case let .register(number): value = registers.generalRegister(number) & mask
        case let .memory(operand): value = try readUInt(at: try linearAddress(of: operand), bytes: size)
        }
        let count = UInt64(value.nonzeroBitCount)
        // ZF says whether the source was zero; OF, SF, AF, CF and PF are cleared.
        registers.rflags &= ~(X86Bits.flagOF | X86Bits.flagSF | X86Bits.flagZF | X86Bits.flagAF | X86Bits.flagCF | X86Bits.flagPF)
        if value == 0 { registers.rflags |= X86Bits.flagZF }
        switch size {
        case 2: // a 16-bit destination keeps its upper bits
            registers.setGeneralRegister(destination, (registers.generalRegister(destination) & ~0xFFFF) | count)
        default: // a 32-bit destination is zero-extended to 64 bits
            registers.setGeneralRegister(destination, count)
        }
    }

    // MARK: Memory operands

    /// The linear address a memory operand names. Modelled in 64-bit code, where only FS
    /// and GS have a base and the address must be canonical (#GP(0), or #SS(0) through SS).
    func linearAddress(of operand: MemoryOperand) throws(Failure) -> UInt64 {
        guard mode.codeSize == .bits64 else {
            throw .notCompleted("memory operands are completed only in 64-bit code (segment limits are not modelled)")
        }
        var offset: UInt64 = UInt64(bitPattern: operand.displacement)
        switch operand.base {
        case let .register(number)?: offset = offset &+ registers.generalRegister(number)
        case .rip?: offset = offset &+ nextRIP
        case nil: break
        }
        if let index = operand.index { offset = offset &+ registers.generalRegister(index) &* UInt64(operand.scale) }
        if operand.addressSize == .bits32 { offset &= 0xFFFF_FFFF }
        let base: UInt64
        switch operand.segment {
        case .fs: base = special.fs.base
        case .gs: base = special.gs.base
        default: base = 0
        }
        let address = base &+ offset
        guard isCanonical(address) else {
            throw .exception(operand.segment == .ss ? .stackFault(0) : .generalProtection(0))
        }
        return address
    }

    func isCanonical(_ address: UInt64) -> Bool {
        let bits: UInt64 = special.cr4 & X86Bits.cr4LA57 != 0 ? 57 : 48
        let top = Int64(bitPattern: address) >> Int64(bits - 1)
        return top == 0 || top == -1
    }

    /// An explicit data access by the instruction (user-mode at CPL 3).
    func dataAccess(_ kind: MemoryAccess.Kind) -> MemoryAccess {
        MemoryAccess(kind: kind, user: mode.cpl == 3, alignmentCheckFlag: registers.rflags & X86Bits.flagAC != 0)
    }

    /// #AC(0) for a misaligned operand at CPL 3 with CR0.AM and RFLAGS.AC set.
    func checkAlignment(_ address: UInt64, bytes: Int) throws(Failure) {
        if mode.cpl == 3 && special.cr0 & X86Bits.cr0AM != 0 && registers.rflags & X86Bits.flagAC != 0
            && address % UInt64(bytes) != 0 {
            throw .exception(.alignmentCheck)
        }
    }

    func readUInt(at address: UInt64, bytes: Int) throws(Failure) -> UInt64 {
        try checkAlignment(address, bytes: bytes)
        let data = try read(at: address, count: bytes, access: dataAccess(.read))
        return data.enumerated().reduce(UInt64(0)) { $0 | UInt64($1.element) << (8 * UInt64($1.offset)) }
    }

    func writeUInt(_ value: UInt64, at address: UInt64, bytes: Int) throws(Failure) {
        try checkAlignment(address, bytes: bytes)
        try write((0..<bytes).map { UInt8(truncatingIfNeeded: value >> (8 * UInt64($0))) }, at: address, access: dataAccess(.write))
    }

    /// Translates every page `[address, address + count)` touches; throws the first fault.
    func translate(_ address: UInt64, count: Int, access: MemoryAccess) throws(Failure) -> [(physical: UInt64, count: Int)] {
        var pieces: [(physical: UInt64, count: Int)] = []
        var linear = address
        var remaining = count
        while remaining > 0 {
            let inPage = min(remaining, Int(4096 - (linear & 0xFFF)))
            switch walker.translate(linear, access) {
            case let .physical(physical): pieces.append((physical, inPage))
            case let .pageFault(code): throw .exception(.pageFault(code, at: linear))
            case let .unsupported(reason): throw .notCompleted(reason)
            }
            linear &+= UInt64(inPage)
            remaining -= inPage
        }
        return pieces
    }

    func read(at address: UInt64, count: Int, access: MemoryAccess) throws(Failure) -> [UInt8] {
        var bytes: [UInt8] = []
        for piece in try translate(address, count: count, access: access) {
            guard let data = environment.memory.read(at: piece.physical, count: piece.count) else {
                throw .notCompleted("the operand at physical 0x\(String(piece.physical, radix: 16)) is not RAM")
            }
            bytes += data
        }
        return bytes
    }

    /// Writes only once every page is known to be writable, as the CPU does.
    func write(_ bytes: [UInt8], at address: UInt64, access: MemoryAccess) throws(Failure) {
        let pieces = try translate(address, count: bytes.count, access: access)
        for piece in pieces where environment.memory.read(at: piece.physical, count: piece.count) == nil {
            throw .notCompleted("the operand at physical 0x\(String(piece.physical, radix: 16)) is not RAM")
        }
        var offset = 0
        for piece in pieces {
            _ = environment.memory.write(Array(bytes[offset..<(offset + piece.count)]), at: piece.physical)
            offset += piece.count
        }
    }

    // MARK: Software interrupts

    /// INT n / INT3 in IA-32e mode (Intel SDM volume 2, INT n pseudo-code, "IA-32e mode"):
    /// the 16-byte gate must lie in the IDT, be an interrupt or trap gate with DPL >= CPL
    /// and be present; its selector names a present 64-bit code segment with DPL <= CPL. The
    /// CPU aligns the stack (RSP or an IST stack) to 16 bytes, pushes SS, RSP, RFLAGS, CS and
    /// the address of the next instruction, clears TF, NT, RF (and IF for an interrupt gate)
    /// and jumps to the gate's offset. Errors use the gate's "IDT" error code, vector * 8 + 2.
    mutating func deliverSoftwareInterrupt(vector: UInt8) throws(Failure) {
        guard mode.longMode else {
            throw .notCompleted("software interrupts are completed only in IA-32e mode (64-bit or compatibility)")
        }
        let idtError = UInt32(vector) * 8 + 2
        let gateOffset = UInt64(vector) * 16
        guard gateOffset + 15 <= UInt64(special.idt.limit) else { throw .exception(.generalProtection(idtError)) }
        let gate = try read(at: special.idt.base &+ gateOffset, count: 16, access: .system(.read))
        let gateType = gate[5] & 0xF
        let gateDPL = Int(gate[5] >> 5) & 3
        // A 64-bit interrupt or trap gate; the type field of its upper half must be zero.
        guard gateType == 0xE || gateType == 0xF, gate[13] & 0x1F == 0 else { throw .exception(.generalProtection(idtError)) }
        guard gateDPL >= mode.cpl else { throw .exception(.generalProtection(idtError)) }
        guard gate[5] & 0x80 != 0 else { throw .exception(.segmentNotPresent(idtError)) }
        let selector = UInt16(gate[2]) | UInt16(gate[3]) << 8
        let stackTable = Int(gate[4] & 7)
        let target = (0..<8).reduce(UInt64(0)) { value, byte in
            let position = byte < 2 ? byte : byte + 4 // offset bits 15:0 at 0-1, 63:16 at 6-11
            return value | UInt64(gate[position]) << (8 * UInt64(byte))
        }

        // The target code segment.
        guard selector & 0xFFFC != 0 else { throw .exception(.generalProtection(0)) }
        let selectorError = UInt32(selector & 0xFFFC)
        let descriptorAddress = try descriptorAddress(selector: selector, error: selectorError)
        let descriptorBytes = try read(at: descriptorAddress, count: 8, access: .system(.read))
        let descriptor = descriptorBytes.enumerated().reduce(UInt64(0)) { $0 | UInt64($1.element) << (8 * UInt64($1.offset)) }
        let type = UInt8((descriptor >> 40) & 0xF)
        let isCode = (descriptor >> 44) & 1 == 1 && type & 0x8 != 0
        let codeDPL = Int((descriptor >> 45) & 3)
        guard isCode, codeDPL <= mode.cpl else { throw .exception(.generalProtection(selectorError)) }
        guard (descriptor >> 53) & 1 == 1, (descriptor >> 54) & 1 == 0 else { throw .exception(.generalProtection(selectorError)) }
        guard (descriptor >> 47) & 1 == 1 else { throw .exception(.segmentNotPresent(selectorError)) }
        let conforming = type & 0x4 != 0
        if !conforming && codeDPL < mode.cpl {
            throw .notCompleted("the interrupt would switch from CPL \(mode.cpl) to CPL \(codeDPL) (a stack switch Swiftlet does not model)")
        }
        guard isCanonical(target) else { throw .exception(.generalProtection(0)) }

        // The stack: the current one, or the IST entry the gate names; aligned to 16 bytes.
        var stack = registers.rsp
        if stackTable != 0 {
            let entry = UInt64(36 + 8 * (stackTable - 1))
            guard entry + 7 <= UInt64(special.tr.limit) else {
                throw .notCompleted("IST\(stackTable) lies beyond the TSS limit (#TS is not modelled)")
            }
            let bytes = try read(at: special.tr.base &+ entry, count: 8, access: .system(.read))
            stack = bytes.enumerated().reduce(UInt64(0)) { $0 | UInt64($1.element) << (8 * UInt64($1.offset)) }
        }
        stack &= ~0xF
        guard isCanonical(stack), isCanonical(stack &- 40) else { throw .exception(.stackFault(0)) }
        let frame: [UInt64] = [nextRIP, UInt64(special.cs.selector), registers.rflags, registers.rsp, UInt64(special.ss.selector)]
        let frameBytes = frame.flatMap { value in (0..<8).map { UInt8(truncatingIfNeeded: value >> (8 * UInt64($0))) } }
        // Pushes to the stack are user-mode accesses when the handler runs at CPL 3.
        try write(frameBytes, at: stack &- 40, access: mode.cpl == 3 ? MemoryAccess(kind: .write, user: true) : .system(.write))

        // Loading CS sets the descriptor's accessed bit, as any segment load does.
        if type & 1 == 0 {
            try write([descriptorBytes[5] | 1], at: descriptorAddress + 5, access: .system(.write))
        }
        special.cs = codeSegment(descriptor: descriptor | (1 << 40), selector: (selector & 0xFFFC) | UInt16(mode.cpl))
        specialChanged = true
        registers.rsp = stack &- 40
        registers.rip = target
        registers.rflags &= ~(X86Bits.flagTF | X86Bits.flagNT | X86Bits.flagRF | X86Bits.flagVM)
        if gateType == 0xE { registers.rflags &= ~X86Bits.flagIF }
    }

    /// The linear address of the descriptor `selector` names, in the GDT or the LDT.
    func descriptorAddress(selector: UInt16, error: UInt32) throws(Failure) -> UInt64 {
        let offset = UInt64(selector & 0xFFF8)
        if selector & 4 != 0 {
            guard special.ldt.unusable == 0, special.ldt.present != 0, offset + 7 <= UInt64(special.ldt.limit) else {
                throw .exception(.generalProtection(error))
            }
            return special.ldt.base &+ offset
        }
        guard offset + 7 <= UInt64(special.gdt.limit) else { throw .exception(.generalProtection(error)) }
        return special.gdt.base &+ offset
    }

    /// KVM's view of a code segment loaded from `descriptor`.
    func codeSegment(descriptor: UInt64, selector: UInt16) -> kvm_segment {
        var segment = kvm_segment()
        let rawLimit = UInt32((descriptor & 0xFFFF) | ((descriptor >> 32) & 0xF_0000))
        let granular = (descriptor >> 55) & 1 == 1
        segment.base = ((descriptor >> 16) & 0xFF_FFFF) | ((descriptor >> 32) & 0xFF00_0000)
        segment.limit = granular ? (rawLimit << 12) | 0xFFF : rawLimit
        segment.selector = selector
        segment.type = UInt8((descriptor >> 40) & 0xF)
        segment.s = 1
        segment.dpl = UInt8((descriptor >> 45) & 3)
        segment.present = 1
        segment.avl = UInt8((descriptor >> 52) & 1)
        segment.l = UInt8((descriptor >> 53) & 1)
        segment.db = UInt8((descriptor >> 54) & 1)
        segment.g = granular ? 1 : 0
        segment.unusable = 0
        return segment
    }
}

extension kvm_regs {
    /// A general-purpose register by its encoding number (0 = RAX, 1 = RCX ... 15 = R15).
    func generalRegister(_ number: Int) -> UInt64 {
        switch number & 15 {
        case 0: return rax
        case 1: return rcx
        case 2: return rdx
        case 3: return rbx
        case 4: return rsp
        case 5: return rbp
        case 6: return rsi
        case 7: return rdi
        case 8: return r8
        case 9: return r9
        case 10: return r10
        case 11: return r11
        case 12: return r12
        case 13: return r13
        case 14: return r14
        default: return r15
        }
    }

    mutating func setGeneralRegister(_ number: Int, _ value: UInt64) {
        switch number & 15 {
        case 0: rax = value
        case 1: rcx = value
        case 2: rdx = value
        case 3: rbx = value
        case 4: rsp = value
        case 5: rbp = value
        case 6: rsi = value
        case 7: rdi = value
        case 8: r8 = value
        case 9: r9 = value
        case 10: r10 = value
        case 11: r11 = value
        case 12: r12 = value
        case 13: r13 = value
        case 14: r14 = value
        default: r15 = value
        }
    }
}
