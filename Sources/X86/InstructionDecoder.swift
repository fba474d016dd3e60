/// A small x86 instruction decoder: exactly the instructions Swiftlet completes when KVM
/// cannot emulate them (see ``InstructionCompleter``), plus names for a few it does not
/// complete, so that a crash report can say which instruction stopped the guest.
///
/// It reads legacy prefixes, REX, the opcode, ModRM, SIB and displacements in 16-, 32- and
/// 64-bit code. It issues no KVM call and touches no guest state: it turns bytes into an
/// ``Instruction``, and is unit-tested against byte sequences.

/// The default operand and address size of the code at RIP, from the CPU mode and CS.
public enum CodeSize: Int, Sendable, Equatable {
    case bits16 = 16
    case bits32 = 32
    case bits64 = 64
}

/// A segment register, numbered as in the ModRM `reg` field of `mov Sreg`.
public enum SegmentRegister: Int, Sendable, Equatable, CaseIterable {
    case es = 0, cs, ss, ds, fs, gs

    public var name: String { ["es", "cs", "ss", "ds", "fs", "gs"][rawValue] }
}

/// The prefixes in front of an opcode.
public struct Prefixes: Sendable, Equatable {
    public var lock = false
    /// F2 (REPNE) and F3 (REP/REPE): for SSE instructions they select the operation.
    public var repeatNotEqual = false
    public var repeatEqual = false
    /// 66: operand size (16 bits in 32/64-bit code), or an SSE operation selector.
    public var operandSize = false
    /// 67: address size.
    public var addressSize = false
    public var segment: SegmentRegister?
    /// The REX byte (0x40-0x4F) in 64-bit code, 0 when there is none.
    public var rex: UInt8 = 0

    public init() {}

    var rexW: Bool { rex & 0x8 != 0 }
    var rexR: Int { rex & 0x4 != 0 ? 8 : 0 }
    var rexX: Int { rex & 0x2 != 0 ? 8 : 0 }
    var rexB: Int { rex & 0x1 != 0 ? 8 : 0 }
    /// No 66, F2 or F3: what SSE encodings marked "NP" need.
    var noSSEPrefix: Bool { !operandSize && !repeatEqual && !repeatNotEqual }
}

/// A memory operand as ModRM/SIB encode it: `segment:[base + index * scale + displacement]`.
/// The linear address is computed by ``InstructionCompleter`` from the registers.
public struct MemoryOperand: Sendable, Equatable, CustomStringConvertible {
    public enum Base: Sendable, Equatable {
        /// A general-purpose register, by encoding number (0 = rAX ... 15 = R15).
        case register(Int)
        /// RIP-relative: the displacement is added to the address of the next instruction.
        case rip
    }

    /// The segment the access goes through: the override, or DS (SS for rSP/rBP bases).
    public var segment: SegmentRegister
    /// Whether a prefix chose the segment (it is then shown in the text).
    public var segmentOverridden: Bool
    public var base: Base?
    /// Index register by encoding number; never 4 (rSP cannot be an index).
    public var index: Int?
    /// 1, 2, 4 or 8.
    public var scale: Int
    public var displacement: Int64
    /// Width of the address arithmetic: the sum is truncated to it.
    public var addressSize: CodeSize

    public var description: String {
        var parts: [String] = []
        switch base {
        case let .register(number)?: parts.append(GeneralRegister.name(number, bytes: addressSize.rawValue / 8))
        case .rip?: parts.append(addressSize == .bits64 ? "rip" : "eip")
        case nil: break
        }
        if let index {
            let name = GeneralRegister.name(index, bytes: addressSize.rawValue / 8)
            parts.append(scale == 1 ? name : "\(name)*\(scale)")
        }
        var text = parts.joined(separator: "+")
        if displacement != 0 || parts.isEmpty {
            let magnitude = "0x" + String(displacement.magnitude, radix: 16)
            if parts.isEmpty { text = magnitude } else { text += (displacement < 0 ? "-" : "+") + magnitude }
        }
        return (segmentOverridden ? "\(segment.name):" : "") + "[\(text)]"
    }
}

/// General-purpose register names by encoding number and width.
public enum GeneralRegister {
    static let names64 = ["rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi"]

    /// `rax`/`eax`/`ax` for number 0 ... `r15`/`r15d`/`r15w` for 15.
    public static func name(_ number: Int, bytes: Int) -> String {
        if number >= 8 {
            switch bytes {
            case 8: return "r\(number)"
            case 4: return "r\(number)d"
            case 2: return "r\(number)w"
            default: return "r\(number)b"
            }
        }
        let base = names64[number]
        switch bytes {
        case 8: return base
        case 4: return "e" + base.dropFirst()
        case 2: return String(base.dropFirst())
        default: return ["al", "cl", "dl", "bl", "spl", "bpl", "sil", "dil"][number]
        }
    }
}

/// A register or memory operand (the ModRM `r/m` side).
public enum Operand: Sendable, Equatable {
    /// A general-purpose register by encoding number.
    case register(Int)
    case memory(MemoryOperand)
}

/// One decoded instruction.
public struct Instruction: Sendable, Equatable {
    public enum Operation: Sendable, Equatable {
        /// `int3` (CC): the breakpoint trap, vector 3.
        case breakpoint
        /// `int imm8` (CD ib).
        case softwareInterrupt(vector: UInt8)
        /// `fwait`/`wait` (9B).
        case fwait
        /// `ldmxcsr m32` (NP 0F AE /2).
        case loadMXCSR(MemoryOperand)
        /// `stmxcsr m32` (NP 0F AE /3).
        case storeMXCSR(MemoryOperand)
        /// `clac` (NP 0F 01 CA).
        case clearAC
        /// `stac` (NP 0F 01 CB).
        case setAC
        /// `popcnt r, r/m` (F3 0F B8 /r), `size` bytes (2, 4 or 8).
        case populationCount(size: Int, destination: Int, source: Operand)
        /// Decoded and named (``Instruction/text``), but not one Swiftlet completes.
        case other
    }

    public let operation: Operation
    /// Bytes from the first prefix to the end.
    public let length: Int
    public let prefixes: Prefixes
    /// Intel-syntax assembly, such as `ldmxcsr [rsp+0x4]` or `lock cmpxchg16b [rdi]`.
    public let text: String

    /// The mnemonic alone (the first word after any `lock`/`rep`), for counting.
    public var mnemonic: String {
        let words = text.split(separator: " ")
        let skipped = words.drop(while: { ["lock", "rep", "repne"].contains($0) })
        return String(skipped.first ?? Substring(text))
    }
}

/// Turns bytes into an ``Instruction``. See the file comment.
public enum InstructionDecoder {
    /// The architectural maximum length of an instruction.
    public static let maximumLength = 15

    /// Decodes the instruction at the start of `bytes` in code of `codeSize`. Returns `nil`
    /// when the bytes are not an instruction this decoder knows, or end before it does.
    public static func decode(_ bytes: [UInt8], codeSize: CodeSize) -> Instruction? {
        var cursor = Cursor(bytes: Array(bytes.prefix(maximumLength)))
        var prefixes = Prefixes()
        // Legacy prefixes in any order; in 64-bit code a REX prefix counts only when it
        // comes last, right before the opcode.
        prefixLoop: while let byte = cursor.peek() {
            switch byte {
            case 0xF0: prefixes.lock = true
            case 0xF2: prefixes.repeatNotEqual = true; prefixes.repeatEqual = false
            case 0xF3: prefixes.repeatEqual = true; prefixes.repeatNotEqual = false
            case 0x66: prefixes.operandSize = true
            case 0x67: prefixes.addressSize = true
            case 0x26: prefixes.segment = .es
            case 0x2E: prefixes.segment = .cs
            case 0x36: prefixes.segment = .ss
            case 0x3E: prefixes.segment = .ds
            case 0x64: prefixes.segment = .fs
            case 0x65: prefixes.segment = .gs
            case 0x40...0x4F where codeSize == .bits64:
                cursor.advance()
                prefixes.rex = byte
                continue prefixLoop
            default:
                break prefixLoop
            }
            cursor.advance()
            prefixes.rex = 0 // a legacy prefix after REX cancels it
        }
        var decoder = Decoder(cursor: cursor, prefixes: prefixes, codeSize: codeSize)
        return decoder.decodeOpcode()
    }
}

/// Reads bytes one at a time; runs off the end as `nil`.
private struct Cursor {
    let bytes: [UInt8]
    var position = 0

    func peek() -> UInt8? { position < bytes.count ? bytes[position] : nil }
    mutating func advance() { position += 1 }

    mutating func next() -> UInt8? {
        guard let byte = peek() else { return nil }
        position += 1
        return byte
    }

    /// A little-endian signed value of `count` bytes (1, 2 or 4).
    mutating func signed(_ count: Int) -> Int64? {
        guard position + count <= bytes.count else { return nil }
        var value: UInt64 = 0
        for offset in 0..<count { value |= UInt64(bytes[position + offset]) << (8 * offset) }
        position += count
        let shift = UInt64(64 - 8 * count)
        return Int64(bitPattern: value << shift) >> Int64(shift)
    }
}

/// The ModRM byte split into its fields, with REX extensions applied.
private struct ModRM {
    let mod: UInt8
    /// The `reg` field with REX.R (a register number or an opcode extension `/n`).
    let reg: Int
    /// The `reg` field alone (0-7), the opcode extension.
    let extensionDigit: Int
    let operand: Operand
}

private struct Decoder {
    var cursor: Cursor
    let prefixes: Prefixes
    let codeSize: CodeSize

    /// The operand size in bytes of a 16/32/64-bit general-purpose instruction.
    var operandBytes: Int {
        if codeSize == .bits64 && prefixes.rexW { return 8 }
        if codeSize == .bits16 { return prefixes.operandSize ? 4 : 2 }
        return prefixes.operandSize ? 2 : 4
    }

    var addressSize: CodeSize {
        switch codeSize {
        case .bits64: return prefixes.addressSize ? .bits32 : .bits64
        case .bits32: return prefixes.addressSize ? .bits16 : .bits32
        case .bits16: return prefixes.addressSize ? .bits32 : .bits16
        }
    }

    func finish(_ operation: Instruction.Operation, _ text: String) -> Instruction {
        var words: [String] = []
        if prefixes.lock { words.append("lock") }
        words.append(text)
        return Instruction(operation: operation, length: cursor.position, prefixes: prefixes, text: words.joined(separator: " "))
    }

    mutating func decodeOpcode() -> Instruction? {
        guard let opcode = cursor.next() else { return nil }
        switch opcode {
        case 0xCC:
            return finish(prefixes.lock ? .other : .breakpoint, "int3")
        case 0xCD:
            guard let vector = cursor.next() else { return nil }
            return finish(prefixes.lock ? .other : .softwareInterrupt(vector: vector), "int 0x" + String(vector, radix: 16))
        case 0x9B:
            return finish(prefixes.lock ? .other : .fwait, "fwait")
        case 0x0F:
            return decodeTwoByte()
        case 0xD8...0xDF:
            return decodeX87(opcode)
        default:
            return nil
        }
    }

    // MARK: 0F xx

    mutating func decodeTwoByte() -> Instruction? {
        guard let opcode = cursor.next() else { return nil }
        switch opcode {
        case 0x01:
            guard let byte = cursor.next() else { return nil }
            let plain = prefixes.noSSEPrefix && !prefixes.lock
            switch byte {
            case 0xCA: return finish(plain ? .clearAC : .other, "clac")
            case 0xCB: return finish(plain ? .setAC : .other, "stac")
            case 0xD0: return finish(.other, "xgetbv")
            case 0xD1: return finish(.other, "xsetbv")
            case 0xF9: return finish(.other, "rdtscp")
            default: return nil
            }
        case 0xAE:
            return decodeGroup15()
        case 0xB8:
            guard prefixes.repeatEqual, let modrm = readModRM() else { return nil }
            let size = operandBytes
            let text = "popcnt \(GeneralRegister.name(modrm.reg, bytes: size)), \(describe(modrm.operand, bytes: size))"
            return finish(prefixes.lock ? .other : .populationCount(size: size, destination: modrm.reg, source: modrm.operand), text)
        case 0xC7:
            guard let modrm = readModRM() else { return nil }
            guard case let .memory(memory) = modrm.operand else {
                switch modrm.extensionDigit {
                case 6: return finish(.other, "rdrand \(describe(modrm.operand, bytes: operandBytes))")
                case 7: return finish(.other, "rdseed \(describe(modrm.operand, bytes: operandBytes))")
                default: return nil
                }
            }
            let suffix = prefixes.rexW ? "64" : ""
            switch modrm.extensionDigit {
            case 1: return finish(.other, (prefixes.rexW ? "cmpxchg16b " : "cmpxchg8b ") + memory.description)
            case 3: return finish(.other, "xrstors\(suffix) \(memory)")
            case 4: return finish(.other, "xsavec\(suffix) \(memory)")
            case 5: return finish(.other, "xsaves\(suffix) \(memory)")
            default: return nil
            }
        default:
            return decodeSSEMove(opcode)
        }
    }

    /// 0F AE: the MXCSR and FXSAVE/XSAVE family, fences, FS/GS base access.
    mutating func decodeGroup15() -> Instruction? {
        guard let modrm = readModRM() else { return nil }
        let suffix = prefixes.rexW ? "64" : ""
        switch modrm.operand {
        case let .memory(memory):
            if prefixes.noSSEPrefix {
                switch modrm.extensionDigit {
                case 0: return finish(.other, "fxsave\(suffix) \(memory)")
                case 1: return finish(.other, "fxrstor\(suffix) \(memory)")
                case 2: return finish(prefixes.lock ? .other : .loadMXCSR(memory), "ldmxcsr \(memory)")
                case 3: return finish(prefixes.lock ? .other : .storeMXCSR(memory), "stmxcsr \(memory)")
                case 4: return finish(.other, "xsave\(suffix) \(memory)")
                case 5: return finish(.other, "xrstor\(suffix) \(memory)")
                case 6: return finish(.other, "xsaveopt\(suffix) \(memory)")
                default: return finish(.other, "clflush \(memory)")
                }
            }
            if prefixes.operandSize && modrm.extensionDigit == 7 { return finish(.other, "clflushopt \(memory)") }
            return nil
        case let .register(number):
            if prefixes.repeatEqual && codeSize == .bits64 && modrm.extensionDigit < 4 {
                let names = ["rdfsbase", "rdgsbase", "wrfsbase", "wrgsbase"]
                return finish(.other, "\(names[modrm.extensionDigit]) \(GeneralRegister.name(number, bytes: prefixes.rexW ? 8 : 4))")
            }
            guard prefixes.noSSEPrefix else { return nil }
            switch modrm.extensionDigit {
            case 5: return finish(.other, "lfence")
            case 6: return finish(.other, "mfence")
            case 7: return finish(.other, "sfence")
            default: return nil
            }
        }
    }

    /// A few SSE moves and logic operations the kernel uses, by name only.
    mutating func decodeSSEMove(_ opcode: UInt8) -> Instruction? {
        let selector: Int = prefixes.repeatEqual ? 3 : prefixes.repeatNotEqual ? 2 : prefixes.operandSize ? 1 : 0
        // name per prefix (none, 66, F2, F3), and whether the xmm register is the destination.
        let table: [UInt8: (names: [String?], xmmFirst: Bool)] = [
            0x10: (["movups", "movupd", "movsd", "movss"], true),
            0x11: (["movups", "movupd", "movsd", "movss"], false),
            0x28: (["movaps", "movapd", nil, nil], true),
            0x29: (["movaps", "movapd", nil, nil], false),
            0x57: (["xorps", "xorpd", nil, nil], true),
            0x6F: ([nil, "movdqa", nil, "movdqu"], true),
            0x7F: ([nil, "movdqa", nil, "movdqu"], false),
            0xEF: ([nil, "pxor", nil, nil], true),
        ]
        switch opcode {
        case 0x6E where selector == 1, 0x7E where selector == 1:
            // movd/movq between an xmm register and a general register or memory.
            guard let modrm = readModRM() else { return nil }
            let bytes = prefixes.rexW ? 8 : 4
            let name = prefixes.rexW ? "movq" : "movd"
            let xmm = "xmm\(modrm.reg)"
            let other = describe(modrm.operand, bytes: bytes)
            return finish(.other, opcode == 0x6E ? "\(name) \(xmm), \(other)" : "\(name) \(other), \(xmm)")
        default:
            guard let entry = table[opcode], let name = entry.names[selector], let modrm = readModRM() else { return nil }
            let xmm = "xmm\(modrm.reg)"
            let other: String
            switch modrm.operand {
            case let .register(number): other = "xmm\(number)"
            case let .memory(memory): other = memory.description
            }
            return finish(.other, entry.xmmFirst ? "\(name) \(xmm), \(other)" : "\(name) \(other), \(xmm)")
        }
    }

    /// A few x87 control instructions, by name only.
    mutating func decodeX87(_ opcode: UInt8) -> Instruction? {
        guard let byte = cursor.peek() else { return nil }
        switch (opcode, byte) {
        case (0xDB, 0xE3): cursor.advance(); return finish(.other, "fninit")
        case (0xDB, 0xE2): cursor.advance(); return finish(.other, "fnclex")
        case (0xDF, 0xE0): cursor.advance(); return finish(.other, "fnstsw ax")
        default: break
        }
        guard let modrm = readModRM(), case let .memory(memory) = modrm.operand else { return nil }
        switch (opcode, modrm.extensionDigit) {
        case (0xD9, 5): return finish(.other, "fldcw \(memory)")
        case (0xD9, 7): return finish(.other, "fnstcw \(memory)")
        case (0xDD, 7): return finish(.other, "fnstsw \(memory)")
        case (0xD9, 4): return finish(.other, "fldenv \(memory)")
        case (0xD9, 6): return finish(.other, "fnstenv \(memory)")
        case (0xDD, 4): return finish(.other, "frstor \(memory)")
        case (0xDD, 6): return finish(.other, "fnsave \(memory)")
        default: return nil
        }
    }

    func describe(_ operand: Operand, bytes: Int) -> String {
        switch operand {
        case let .register(number): return GeneralRegister.name(number, bytes: bytes)
        case let .memory(memory): return memory.description
        }
    }

    // MARK: ModRM, SIB, displacement

    mutating func readModRM() -> ModRM? {
        guard let byte = cursor.next() else { return nil }
        let mod = byte >> 6
        let reg = Int((byte >> 3) & 7)
        let rm = Int(byte & 7)
        if mod == 3 {
            return ModRM(mod: mod, reg: reg | prefixes.rexR, extensionDigit: reg, operand: .register(rm | prefixes.rexB))
        }
        let memory: MemoryOperand?
        switch addressSize {
        case .bits16: memory = readAddress16(mod: mod, rm: rm)
        case .bits32, .bits64: memory = readAddress32Or64(mod: mod, rm: rm)
        }
        guard let memory else { return nil }
        return ModRM(mod: mod, reg: reg | prefixes.rexR, extensionDigit: reg, operand: .memory(memory))
    }

    func memoryOperand(base: MemoryOperand.Base?, index: Int?, scale: Int, displacement: Int64, stackDefault: Bool) -> MemoryOperand {
        MemoryOperand(segment: prefixes.segment ?? (stackDefault ? .ss : .ds), segmentOverridden: prefixes.segment != nil,
                      base: base, index: index, scale: scale, displacement: displacement, addressSize: addressSize)
    }

    /// 16-bit addressing: BX/BP plus SI/DI, or a 16-bit displacement alone.
    mutating func readAddress16(mod: UInt8, rm: Int) -> MemoryOperand? {
        // (base, index) by rm; register numbers: bx 3, bp 5, si 6, di 7.
        let forms: [(Int?, Int?)] = [(3, 6), (3, 7), (5, 6), (5, 7), (nil, 6), (nil, 7), (5, nil), (3, nil)]
        if mod == 0 && rm == 6 {
            guard let displacement = cursor.signed(2) else { return nil }
            return memoryOperand(base: nil, index: nil, scale: 1, displacement: displacement, stackDefault: false)
        }
        var displacement: Int64 = 0
        if mod == 1 { guard let value = cursor.signed(1) else { return nil }; displacement = value }
        if mod == 2 { guard let value = cursor.signed(2) else { return nil }; displacement = value }
        let (base, index) = forms[rm]
        // With a base of BP the access goes through SS.
        return memoryOperand(base: base.map { .register($0) }, index: index, scale: 1, displacement: displacement,
                             stackDefault: base == 5)
    }

    /// 32- and 64-bit addressing: base + index * scale + displacement, with a SIB byte
    /// when rm is 4, and RIP-relative (64-bit code) or an absolute disp32 when mod is 0
    /// and rm is 5.
    mutating func readAddress32Or64(mod: UInt8, rm: Int) -> MemoryOperand? {
        var base: MemoryOperand.Base?
        var index: Int?
        var scale = 1
        var stackDefault = false
        if rm == 4 {
            guard let sib = cursor.next() else { return nil }
            scale = 1 << Int(sib >> 6)
            let indexNumber = Int((sib >> 3) & 7) | prefixes.rexX
            index = indexNumber == 4 ? nil : indexNumber
            let baseLow = Int(sib & 7)
            if baseLow == 5 && mod == 0 {
                base = nil // disp32 with no base
            } else {
                base = .register(baseLow | prefixes.rexB)
                stackDefault = baseLow == 4 || baseLow == 5
            }
            if index == nil { scale = 1 }
        } else if rm == 5 && mod == 0 {
            base = codeSize == .bits64 ? .rip : nil
        } else {
            base = .register(rm | prefixes.rexB)
            stackDefault = rm == 5
        }
        var displacement: Int64 = 0
        if mod == 1 {
            guard let value = cursor.signed(1) else { return nil }
            displacement = value
        } else if mod == 2 || (mod == 0 && base == nil) || base == .rip {
            guard let value = cursor.signed(4) else { return nil }
            displacement = value
        }
        return memoryOperand(base: base, index: index, scale: scale, displacement: displacement, stackDefault: stackDefault)
    }
}
