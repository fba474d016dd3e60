/// What the kernel does with a system call (`SECCOMP_RET_*`).
public enum SeccompAction: Sendable, Equatable {
    case allow
    /// SIGSYS to the thread: Swiftlet's handler names the thread and the call, then ends.
    case trap
    /// Allowed, and written to the kernel's audit log: for measuring what a thread needs.
    case log
    case killProcess
    case errno(UInt16)

    var value: UInt32 {
        switch self {
        case .allow: return 0x7fff_0000
        case .trap: return 0x0003_0000
        case .log: return 0x7ffc_0000
        case .killProcess: return 0x8000_0000
        case let .errno(number): return 0x0005_0000 | UInt32(number)
        }
    }
}

/// A condition on one argument of a system call: `(argument & mask)` is one of `values`.
///
/// Arguments the kernel declares `int` or `unsigned int` (a descriptor, an ioctl request, a
/// prctl option, futex operation) are compared on their low 32 bits, which is all the kernel
/// reads of them; `full` compares all 64 bits (clone flags).
public struct ArgumentCondition: Sendable, Equatable {
    public let index: Int
    public let mask: UInt64
    public let values: [UInt64]
    public let full: Bool

    public init(index: Int, mask: UInt64 = 0xFFFF_FFFF, values: [UInt64], full: Bool = false) {
        self.index = index
        self.mask = mask
        self.values = values
        self.full = full
    }

    /// Argument `index` (0-5) is one of `values` (low 32 bits).
    public static func argument(_ index: Int, is values: UInt64...) -> ArgumentCondition {
        ArgumentCondition(index: index, values: values)
    }

    /// Argument `index` is one of `values` (low 32 bits).
    public static func argument(_ index: Int, in values: [UInt64]) -> ArgumentCondition {
        ArgumentCondition(index: index, values: values)
    }

    /// `argument & mask == value` on the low 32 bits: `maskedArgument(2, 0x4, 0)` says bit 2
    /// is clear.
    public static func argument(_ index: Int, masked mask: UInt64, is value: UInt64) -> ArgumentCondition {
        ArgumentCondition(index: index, mask: mask, values: [value])
    }

    /// All 64 bits of argument `index` equal `value`.
    public static func fullArgument(_ index: Int, is value: UInt64) -> ArgumentCondition {
        ArgumentCondition(index: index, mask: .max, values: [value], full: true)
    }
}

/// One allowed system call, with conditions on its arguments that must all hold. Several
/// rules for one call mean any of them allows it.
public struct SeccompRule: Sendable, Equatable {
    public let call: SystemCall
    public let conditions: [ArgumentCondition]
    /// What the call gets when the conditions hold: ``SeccompAction/allow``, or an error
    /// for a call that must fail quietly rather than end the VM.
    public let action: SeccompAction
    /// Why the thread makes this call (where in Swiftlet or the runtime), for audits.
    public let reason: String

    public init(_ call: SystemCall, when conditions: [ArgumentCondition] = [], action: SeccompAction = .allow, _ reason: String = "") {
        self.call = call
        self.conditions = conditions
        self.action = action
        self.reason = reason
    }

    /// The call fails with `errno` instead of ending the VM: for calls the C library makes on
    /// its own and copes with failing.
    public static func fail(_ call: SystemCall, errno: Int32, because reason: String) -> SeccompRule {
        SeccompRule(call, action: .errno(UInt16(errno)), reason)
    }

    public static func allow(_ call: SystemCall, _ reason: String = "") -> SeccompRule { SeccompRule(call, reason) }
    public static func allow(_ call: SystemCall, when conditions: ArgumentCondition..., because reason: String = "") -> SeccompRule {
        SeccompRule(call, when: conditions, reason)
    }
}

/// A seccomp filter as data: the rules, and what happens to every other call.
public struct SeccompFilter: Sendable {
    public let rules: [SeccompRule]
    public let otherwise: SeccompAction

    public init(rules: [SeccompRule], otherwise: SeccompAction = .trap) {
        self.rules = rules
        self.otherwise = otherwise
    }

    /// The system calls some rule allows (with or without conditions).
    public var calls: Set<SystemCall> { Set(rules.map(\.call)) }

    /// `AUDIT_ARCH_X86_64`: a filter checks it first, so a call made through another ABI
    /// (32-bit `int 0x80`) cannot reach a number that means something else there.
    static let auditArchX86_64: UInt32 = 0xC000_003E
    /// System call numbers with this bit set are x32 calls, which share the x86-64 ABI.
    static let x32Bit: UInt32 = 0x4000_0000

    /// Compiles the filter to BPF: architecture check, x32 refusal, then one comparison per
    /// system call in the order of the rules (put the hot ones first), each followed by its
    /// argument checks, and `otherwise` at the end.
    public func compile() throws(BPFAssemblyError) -> [BPFInstruction] {
        var asm = BPFAssembler()
        asm.emit(.load(offset: 4)) // seccomp_data.arch
        let archOK = asm.newLabel()
        asm.jump(BPFInstruction.jeq, Self.auditArchX86_64, ifTrue: archOK, ifFalse: nil)
        asm.emit(.return(SeccompAction.killProcess.value))
        asm.place(archOK)
        asm.emit(.load(offset: 0)) // seccomp_data.nr
        let nativeCall = asm.newLabel()
        asm.jump(BPFInstruction.jge, Self.x32Bit, ifTrue: nil, ifFalse: nativeCall)
        asm.emit(.return(SeccompAction.killProcess.value))
        asm.place(nativeCall)

        var order: [SystemCall] = []
        var byCall: [SystemCall: [SeccompRule]] = [:]
        for rule in rules {
            for condition in rule.conditions {
                guard (0..<6).contains(condition.index), !condition.values.isEmpty, !(condition.full && condition.values.count != 1) else {
                    throw BPFAssemblyError(description: "\(rule.call): bad condition on argument \(condition.index)")
                }
            }
            if byCall[rule.call] == nil { order.append(rule.call) }
            byCall[rule.call, default: []].append(rule)
        }
        for call in order {
            let group = byCall[call]!
            let nextCall = asm.newLabel()
            asm.jump(BPFInstruction.jeq, UInt32(call.rawValue), ifTrue: nil, ifFalse: nextCall)
            if let unconditional = group.first(where: { $0.conditions.isEmpty }) {
                asm.emit(.return(unconditional.action.value))
            } else {
                for rule in group {
                    let ruleFails = asm.newLabel()
                    for condition in rule.conditions { Self.emit(condition, failing: ruleFails, into: &asm) }
                    asm.emit(.return(rule.action.value))
                    asm.place(ruleFails)
                }
                asm.emit(.return(otherwise.value))
            }
            asm.place(nextCall)
        }
        asm.emit(.return(otherwise.value))
        return try asm.assemble()
    }

    /// Argument `i` lives at offset 16 + 8i of `struct seccomp_data`, low word first.
    private static func emit(_ condition: ArgumentCondition, failing: BPFAssembler.Label, into asm: inout BPFAssembler) {
        let low = UInt32(16 + 8 * condition.index)
        if condition.full {
            let value = condition.values[0]
            asm.emit(.load(offset: low + 4))
            asm.jump(BPFInstruction.jeq, UInt32(truncatingIfNeeded: value >> 32), ifTrue: nil, ifFalse: failing)
            asm.emit(.load(offset: low))
            asm.jump(BPFInstruction.jeq, UInt32(truncatingIfNeeded: value), ifTrue: nil, ifFalse: failing)
            return
        }
        asm.emit(.load(offset: low))
        let mask = UInt32(truncatingIfNeeded: condition.mask)
        if mask != 0xFFFF_FFFF {
            asm.emit(BPFInstruction(code: 0x04 | 0x50 | 0x00, k: mask)) // alu and k
        }
        let holds = asm.newLabel()
        for (position, value) in condition.values.enumerated() {
            let last = position == condition.values.count - 1
            asm.jump(BPFInstruction.jeq, UInt32(truncatingIfNeeded: value), ifTrue: last ? nil : holds, ifFalse: last ? failing : nil)
        }
        asm.place(holds)
    }
}
