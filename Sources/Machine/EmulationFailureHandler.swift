import Basics
import KVM
import Memory
import X86

/// Facts about the host CPU that decide how an instruction completes: what the CPU itself
/// implements (its own CPUID, FXSAVE's mask), which is what hardware would apply to the
/// guest's instruction whatever CPUID the guest is shown.
struct HostCPUFacts: Sendable {
    /// FXSAVE's MXCSR_MASK: the MXCSR bits LDMXCSR accepts on this CPU.
    let mxcsrMask: UInt32
    /// MAXPHYADDR (CPUID 0x80000008 EAX[7:0]; 36 when the CPU lacks the leaf).
    let physicalAddressBits: Int
    /// CLAC/STAC exist (CPUID.(EAX=7,ECX=0):EBX.SMAP[bit 20]).
    let supportsCLACAndSTAC: Bool
    /// Where PKRU (XSAVE state component 9) lies in the standard XSAVE layout
    /// (CPUID.(EAX=0xD,ECX=9):EBX), when the CPU has it.
    let protectionKeyOffset: Int?

    init() {
        mxcsrMask = ckvm_host_mxcsr_mask()
        let addressBits = Self.cpuid(0x8000_0008)[0] & 0xFF
        physicalAddressBits = addressBits != 0 ? Int(addressBits) : 36
        supportsCLACAndSTAC = Self.cpuid(7)[1] & (1 << 20) != 0
        let pkru = Self.cpuid(0xD, 9)
        protectionKeyOffset = pkru[0] >= 4 && pkru[1] >= 512 ? Int(pkru[1]) : nil
    }

    private static func cpuid(_ leaf: UInt32, _ subleaf: UInt32 = 0) -> [UInt32] {
        var registers: [UInt32] = [0, 0, 0, 0]
        registers.withUnsafeMutableBufferPointer { ckvm_host_cpuid(leaf, subleaf, $0.baseAddress) }
        return registers
    }
}

/// How the guest's MXCSR and x87 status word are read and written.
///
/// With XSAVE, KVM keeps the guest's state in an XSAVE area, and only `KVM_GET_XSAVE`
/// reports a component the guest has not touched as its initial value; `KVM_GET_FPU`
/// copies the raw legacy area, whose MXCSR need not have been saved (measured: 0 after
/// `KVM_SET_FPU` of 0x1F80), and `KVM_SET_FPU` of MXCSR does not reach the guest there.
enum GuestFPUAccess: Sendable {
    /// `KVM_GET_XSAVE`/`KVM_GET_XSAVE2` and `KVM_SET_XSAVE` (`size`: `KVM_CAP_XSAVE2`, or 0).
    case xsave(size: Int)
    /// `KVM_GET_FPU`/`KVM_SET_FPU`, on a KVM without XSAVE (FXSAVE always stores MXCSR).
    case fpu

    /// Byte offsets in the XSAVE area (Intel SDM volume 1, 13.4.1).
    static let statusWordOffset = 2
    static let mxcsrOffset = 24
    static let stateBitmapOffset = 512

    func control(_ vcpu: VCPU) throws(KVMError) -> FloatingPointControl {
        switch self {
        case let .xsave(size):
            let area = try vcpu.xsave(size: size)
            return FloatingPointControl(mxcsr: area.loadLittleEndian(UInt32.self, at: Self.mxcsrOffset),
                                        x87StatusWord: area.loadLittleEndian(UInt16.self, at: Self.statusWordOffset))
        case .fpu:
            let fpu = try vcpu.fpu()
            return FloatingPointControl(mxcsr: fpu.mxcsr, x87StatusWord: fpu.fsw)
        }
    }

    /// PKRU from the XSAVE area at `offset`; `nil` without XSAVE or outside the area.
    func protectionKeyRights(_ vcpu: VCPU, offset: Int?) throws(KVMError) -> UInt32? {
        guard case let .xsave(size) = self, let offset else { return nil }
        let area = try vcpu.xsave(size: size)
        guard offset + 4 <= area.count else { return nil }
        return area.loadLittleEndian(UInt32.self, at: offset)
    }

    func setMXCSR(_ value: UInt32, _ vcpu: VCPU) throws(KVMError) {
        switch self {
        case let .xsave(size):
            var area = try vcpu.xsave(size: size)
            area.storeLittleEndian(value, at: Self.mxcsrOffset)
            // MXCSR counts only when the SSE (or AVX) component is marked in use: mark SSE.
            // Its XMM registers are then the ones in the area, which KVM filled in.
            let inUse = area.loadLittleEndian(UInt64.self, at: Self.stateBitmapOffset)
            area.storeLittleEndian(inUse | 2, at: Self.stateBitmapOffset)
            try vcpu.setXSAVE(area)
        case .fpu:
            var fpu = try vcpu.fpu()
            fpu.mxcsr = value
            try vcpu.setFPU(fpu)
        }
    }
}

extension Array where Element == UInt8 {
    func loadLittleEndian<T: FixedWidthInteger>(_ type: T.Type, at offset: Int) -> T {
        (0..<MemoryLayout<T>.size).reduce(T.zero) { $0 | T(self[offset + $1]) << (8 * $1) }
    }

    mutating func storeLittleEndian<T: FixedWidthInteger>(_ value: T, at offset: Int) {
        for index in 0..<MemoryLayout<T>.size { self[offset + index] = UInt8(truncatingIfNeeded: value >> (8 * index)) }
    }
}

/// What to do about one `KVM_EXIT_INTERNAL_ERROR` emulation failure.
enum EmulationFailureAction {
    /// The instruction was completed (or raised its exception in the guest); `label` is the
    /// `--trace-exits` row.
    case resumed(label: String)
    /// Stop the VM as a crash with this message.
    case crash(String)
}

/// Handles KVM's emulation failures for one vCPU: reads the failing instruction (from the
/// exit data, else from guest memory through `KVM_TRANSLATE`), decodes it, asks
/// ``InstructionCompleter`` what it does, and applies that with `KVM_SET_REGS`,
/// `KVM_SET_SREGS`, `KVM_GET/SET_XSAVE` (or `KVM_GET/SET_FPU`) and `KVM_SET_VCPU_EVENTS`. What cannot be completed
/// exactly is reported with its bytes and name.
///
/// Used only by the vCPU's own thread.
struct EmulationFailureHandler {
    let vcpu: VCPU
    let memory: GuestMemory
    let host: HostCPUFacts
    let fpuAccess: GuestFPUAccess
    /// Off with `--no-complete-instructions`: every failure stops the VM, as KVM reports it.
    let completeInstructions: Bool
    /// `KVM_CAP_EXIT_ON_EMULATION_FAILURE` is on: failures at CPL > 0 come here too (KVM
    /// would otherwise inject #UD for them itself), and KVM queues no #UD at CPL 0.
    let exitOnEveryFailure: Bool

    func handle(_ failure: EmulationFailure) -> EmulationFailureAction {
        do {
            return try handleThrowing(failure)
        } catch {
            return .crash("KVM could not emulate an instruction, and reading or changing the vCPU's state failed: \(error)")
        }
    }

    private func handleThrowing(_ failure: EmulationFailure) throws(KVMError) -> EmulationFailureAction {
        let registers = try vcpu.registers()
        let special = try vcpu.specialRegisters()
        let mode = ExecutionMode(registers: registers, special: special)
        let bytes = failure.instructionBytes ?? fetchInstructionBytes(registers: registers, special: special)
        let instruction = InstructionDecoder.decode(bytes, codeSize: mode.codeSize)
        let what = Self.describe(instruction, bytes: bytes, rip: registers.rip)

        guard completeInstructions else {
            return .crash("KVM could not emulate \(what) (KVM_EXIT_INTERNAL_ERROR, emulation failure); "
                + "completing instructions is off (--no-complete-instructions)")
        }
        var events = try vcpu.events()
        if !exitOnEveryFailure && events.exception.injected != 0 && events.exception.nr == 6 {
            // Without KVM_CAP_EXIT_ON_EMULATION_FAILURE, KVM queues a #UD before it exits
            // at CPL 0: that is its fallback, not the guest's exception.
            events.exception.injected = 0
        }
        guard events.exception.injected == 0, events.interrupt.injected == 0, events.nmi.injected == 0 else {
            return .crash("KVM could not emulate \(what) while an event was being delivered; Swiftlet does not complete it")
        }

        let outcome: CompletionOutcome
        if let instruction {
            let environment = VCPUCompletionEnvironment(vcpu: vcpu, ram: GuestRAM(memory: memory), host: host, fpuAccess: fpuAccess)
            outcome = try InstructionCompleter(environment: environment)
                .complete(instruction, registers: registers, special: special)
        } else {
            outcome = .notCompleted("Swiftlet does not decode it")
        }
        let mnemonic = instruction?.mnemonic ?? "an unknown instruction"

        switch outcome {
        case let .completed(newRegisters, newSpecial, mxcsr):
            try vcpu.setRegisters(newRegisters)
            if let newSpecial { try vcpu.setSpecialRegisters(newSpecial) }
            if let mxcsr { try fpuAccess.setMXCSR(mxcsr, vcpu) }
            try setEvents(events, exception: nil)
            return .resumed(label: "completed \(mnemonic) (KVM could not emulate it)")
        case let .exception(exception):
            if let address = exception.faultAddress {
                var withCR2 = special
                withCR2.cr2 = address
                try vcpu.setSpecialRegisters(withCR2)
            }
            try setEvents(events, exception: exception)
            return .resumed(label: "completed \(mnemonic) by raising \(exception.name) (KVM could not emulate it)")
        case let .notCompleted(reason):
            if exitOnEveryFailure && mode.cpl > 0 {
                // What KVM does on its own without the capability: a #UD for the guest
                // (user) program rather than stopping the whole VM.
                try setEvents(events, exception: .invalidOpcode)
                return .resumed(label: "#UD injected for \(mnemonic) at CPL \(mode.cpl), as KVM does (KVM could not emulate it)")
            }
            return .crash("KVM could not emulate \(what) (KVM_EXIT_INTERNAL_ERROR, emulation failure), "
                + "and Swiftlet cannot complete it: \(reason)")
        }
    }

    /// Writes back the event state with no interrupt shadow (an instruction that completes
    /// or faults ends it) and `exception`, if any, to be delivered at the next entry. Hardware
    /// exceptions are injected the same way by every KVM: RIP stays at the instruction.
    private func setEvents(_ current: kvm_vcpu_events, exception: X86Exception?) throws(KVMError) {
        var events = current
        events.flags = CKVM_VCPUEVENT_VALID_SHADOW
        events.interrupt.shadow = 0
        events.exception.injected = exception == nil ? 0 : 1
        events.exception.pending = 0
        events.exception.nr = exception?.vector ?? 0
        events.exception.has_error_code = exception?.errorCode == nil ? 0 : 1
        events.exception.error_code = exception?.errorCode ?? 0
        events.exception_has_payload = 0
        events.exception_payload = 0
        try vcpu.setEvents(events)
    }

    /// Up to 15 bytes at CS:RIP, read through the vCPU's page tables (`KVM_TRANSLATE`) and
    /// guest memory's checked access; shorter when a page is unmapped or not RAM.
    private func fetchInstructionBytes(registers: kvm_regs, special: kvm_sregs) -> [UInt8] {
        var bytes: [UInt8] = []
        var linear = ExecutionMode.instructionPointer(registers: registers, special: special)
        while bytes.count < InstructionDecoder.maximumLength {
            let inPage = min(InstructionDecoder.maximumLength - bytes.count, Int(4096 - (linear & 0xFFF)))
            guard let physical = try? vcpu.translate(linearAddress: linear),
                  let chunk = try? memory.read(at: physical, count: inPage) else { break }
            bytes += chunk
            linear &+= UInt64(inPage)
        }
        return bytes
    }

    /// "ldmxcsr [rsp+0x4] at RIP 0x..., bytes 0f ae 54 24 04" or, undecoded, the bytes alone.
    static func describe(_ instruction: Instruction?, bytes: [UInt8], rip: UInt64) -> String {
        let location = "at RIP \(Hex.prefixed(rip))"
        guard let instruction else {
            if bytes.isEmpty { return "the instruction \(location), whose bytes could not be read" }
            return "the instruction \(location), bytes \(hexBytes(bytes)) (not one Swiftlet's decoder knows)"
        }
        return "\(instruction.text) \(location), bytes \(hexBytes(Array(bytes.prefix(instruction.length))))"
    }

    static func hexBytes(_ bytes: [UInt8]) -> String {
        bytes.map { Hex.digits($0, width: 2) }.joined(separator: " ")
    }
}

/// ``CompletionEnvironment`` for a real vCPU: guest RAM, and its FPU state through KVM.
private struct VCPUCompletionEnvironment: CompletionEnvironment {
    let vcpu: VCPU
    let ram: GuestRAM
    let host: HostCPUFacts
    let fpuAccess: GuestFPUAccess

    var memory: any GuestPhysicalMemory { ram }
    var mxcsrMask: UInt32 { host.mxcsrMask }
    var physicalAddressBits: Int { host.physicalAddressBits }
    var supportsCLACAndSTAC: Bool { host.supportsCLACAndSTAC }

    func floatingPointControl() throws(KVMError) -> FloatingPointControl {
        try fpuAccess.control(vcpu)
    }

    func protectionKeyRights() throws(KVMError) -> UInt32? {
        try fpuAccess.protectionKeyRights(vcpu, offset: host.protectionKeyOffset)
    }
}

/// Guest RAM as ``GuestPhysicalMemory``: every access goes through GuestMemory's checked
/// translation; anything outside RAM (the MMIO hole, beyond the end) is refused.
struct GuestRAM: GuestPhysicalMemory {
    let memory: GuestMemory

    func read(at address: UInt64, count: Int) -> [UInt8]? {
        try? memory.read(at: address, count: count)
    }

    func write(_ bytes: [UInt8], at address: UInt64) -> Bool {
        (try? memory.write(bytes, at: address)) != nil
    }

    func compareExchange(at address: UInt64, size: Int, expected: UInt64, desired: UInt64) -> Bool? {
        try? memory.compareExchange(at: address, size: size, expected: expected, desired: desired)
    }
}
