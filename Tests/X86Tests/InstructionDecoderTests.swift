import Testing
@testable import X86

/// Decodes `hex` ("0f ae 54 24 04") in 64-bit code unless told otherwise.
func decode(_ hex: String, _ codeSize: CodeSize = .bits64) -> Instruction? {
    InstructionDecoder.decode(bytes(hex), codeSize: codeSize)
}

func bytes(_ hex: String) -> [UInt8] {
    hex.split(separator: " ").map { UInt8($0, radix: 16)! }
}

@Suite("Instruction decoder: the instructions Swiftlet completes")
struct CompletedInstructionDecodingTests {
    @Test("int3, int n and fwait")
    func interruptsAndWait() throws {
        let int3 = try #require(decode("cc 56 48"))
        #expect(int3.operation == .breakpoint)
        #expect(int3.length == 1)
        #expect(int3.text == "int3")
        let int41 = try #require(decode("cd 41 90"))
        #expect(int41.operation == .softwareInterrupt(vector: 0x41))
        #expect(int41.length == 2)
        #expect(int41.text == "int 0x41")
        #expect(int41.mnemonic == "int")
        let wait = try #require(decode("9b db e3"))
        #expect(wait.operation == .fwait)
        #expect(wait.length == 1)
    }

    @Test("ldmxcsr [rsp+4], the instruction Debian's kernel stopped on")
    func ldmxcsrStackRelative() throws {
        let instruction = try #require(decode("0f ae 54 24 04 c3"))
        #expect(instruction.length == 5)
        #expect(instruction.text == "ldmxcsr [rsp+0x4]")
        guard case let .loadMXCSR(operand) = instruction.operation else { Issue.record("not ldmxcsr"); return }
        #expect(operand.base == .register(4))
        #expect(operand.index == nil)
        #expect(operand.displacement == 4)
        #expect(operand.segment == .ss) // rSP as base: the stack segment
        #expect(operand.addressSize == .bits64)
    }

    @Test("stmxcsr with a negative displacement, RIP-relative, and through GS")
    func stmxcsrForms() throws {
        #expect(decode("0f ae 5c 24 fc")?.text == "stmxcsr [rsp-0x4]")
        let ripRelative = try #require(decode("0f ae 1d 10 00 00 00"))
        #expect(ripRelative.length == 7)
        #expect(ripRelative.text == "stmxcsr [rip+0x10]")
        guard case let .storeMXCSR(operand) = ripRelative.operation else { Issue.record("not stmxcsr"); return }
        #expect(operand.base == .rip)
        // SIB with no base and no index: an absolute disp32, here through GS.
        let throughGS = try #require(decode("65 0f ae 14 25 00 01 00 00"))
        #expect(throughGS.length == 9)
        #expect(throughGS.text == "ldmxcsr gs:[0x100]")
        guard case let .loadMXCSR(absolute) = throughGS.operation else { Issue.record("not ldmxcsr"); return }
        #expect(absolute.base == nil && absolute.index == nil && absolute.segment == .gs)
    }

    @Test("SIB with REX.B and REX.X, scale, and rSP as 'no index'")
    func sibForms() {
        // 41: REX.B; c5 = scale 8, index rax, base rbp|8 = r13; disp8 8.
        #expect(decode("41 0f ae 54 c5 08")?.text == "ldmxcsr [r13+rax*8+0x8]")
        // 42: REX.X; index 4|8 = r12 is a real index.
        #expect(decode("42 0f ae 14 20")?.text == "ldmxcsr [rax+r12]")
        // Index 4 without REX.X means no index.
        #expect(decode("0f ae 14 24")?.text == "ldmxcsr [rsp]")
        // mod 10: disp32.
        #expect(decode("0f ae 97 00 10 00 00")?.text == "ldmxcsr [rdi+0x1000]")
        // 67: 32-bit addresses in 64-bit code.
        let short = decode("67 0f ae 10")
        #expect(short?.text == "ldmxcsr [eax]")
        if case let .loadMXCSR(operand)? = short?.operation { #expect(operand.addressSize == .bits32) }
    }

    @Test("popcnt: register and memory forms, 16/32/64-bit")
    func popcnt() throws {
        let register = try #require(decode("f3 0f b8 c1"))
        #expect(register.operation == .populationCount(size: 4, destination: 0, source: .register(1)))
        #expect(register.text == "popcnt eax, ecx")
        let memory = try #require(decode("f3 48 0f b8 07"))
        #expect(memory.text == "popcnt rax, [rdi]")
        #expect(memory.length == 5)
        #expect(decode("66 f3 0f b8 c1")?.operation == .populationCount(size: 2, destination: 0, source: .register(1)))
        #expect(decode("f3 4d 0f b8 c8")?.text == "popcnt r9, r8")
        // A REX byte followed by a legacy prefix does not count: 32-bit operands.
        #expect(decode("48 f3 0f b8 c1")?.operation == .populationCount(size: 4, destination: 0, source: .register(1)))
        // Without F3 (or with F2 last) 0F B8 is not popcnt.
        #expect(decode("0f b8 c1") == nil)
        #expect(decode("f3 f2 0f b8 c1") == nil)
    }

    @Test("clac and stac; with a 66 prefix they are not")
    func clacStac() {
        #expect(decode("0f 01 ca")?.operation == .clearAC)
        #expect(decode("0f 01 cb")?.operation == .setAC)
        #expect(decode("0f 01 cb")?.length == 3)
        #expect(decode("66 0f 01 ca")?.operation == .other)
    }

    @Test("LOCK makes an instruction one Swiftlet does not complete (the CPU raises #UD)")
    func lockPrefix() {
        #expect(decode("f0 cc")?.operation == .other)
        #expect(decode("f0 cc")?.text == "lock int3")
        #expect(decode("f0 0f ae 10")?.operation == .other)
    }
}

@Suite("Instruction decoder: other modes, names and limits")
struct DecoderEdgeTests {
    @Test("16-bit addressing: [bp+disp] goes through SS, a bare disp16")
    func sixteenBit() throws {
        let bpRelative = try #require(decode("0f ae 56 fc", .bits16))
        #expect(bpRelative.text == "ldmxcsr [bp-0x4]")
        guard case let .loadMXCSR(operand) = bpRelative.operation else { Issue.record("not ldmxcsr"); return }
        #expect(operand.segment == .ss)
        #expect(operand.addressSize == .bits16)
        #expect(decode("0f ae 16 34 12", .bits16)?.text == "ldmxcsr [0x1234]")
        #expect(decode("0f ae 10", .bits16)?.text == "ldmxcsr [bx+si]")
        // 67 in 16-bit code: 32-bit addressing with a SIB byte.
        #expect(decode("67 0f ae 14 24", .bits16)?.text == "ldmxcsr [esp]")
    }

    @Test("32-bit code: mod 0 rm 5 is an absolute address, and 0x40 is inc, not REX")
    func thirtyTwoBit() {
        #expect(decode("0f ae 15 78 56 34 12", .bits32)?.text == "ldmxcsr [0x12345678]")
        #expect(decode("40 cc", .bits32) == nil)
        #expect(decode("66 0f b8 c1", .bits32) == nil)
        #expect(decode("f3 0f b8 c1", .bits32)?.operation == .populationCount(size: 4, destination: 0, source: .register(1)))
        #expect(decode("66 f3 0f b8 c1", .bits16)?.operation == .populationCount(size: 4, destination: 0, source: .register(1)))
    }

    @Test("Instructions named in crash reports but not completed", arguments: [
        ("f0 48 0f c7 0f", "lock cmpxchg16b [rdi]", "cmpxchg16b"),
        ("f0 0f c7 0e", "lock cmpxchg8b [rsi]", "cmpxchg8b"),
        ("66 44 0f 6e f9", "movd xmm15, ecx", "movd"),
        ("66 48 0f 7e c0", "movq rax, xmm0", "movq"),
        ("48 0f ae 2f", "xrstor64 [rdi]", "xrstor64"),
        ("0f ae 27", "xsave [rdi]", "xsave"),
        ("48 0f c7 1f", "xrstors64 [rdi]", "xrstors64"),
        ("0f 01 d1", "xsetbv", "xsetbv"),
        ("db e3", "fninit", "fninit"),
        ("d9 7c 24 fe", "fnstcw [rsp-0x2]", "fnstcw"),
        ("0f 29 44 24 10", "movaps [rsp+0x10], xmm0", "movaps"),
        ("66 0f ef c0", "pxor xmm0, xmm0", "pxor"),
        ("0f ae f0", "mfence", "mfence"),
    ])
    func named(hex: String, text: String, mnemonic: String) throws {
        let instruction = try #require(decode(hex))
        #expect(instruction.operation == .other)
        #expect(instruction.text == text)
        #expect(instruction.mnemonic == mnemonic)
        #expect(instruction.length == bytes(hex).count)
    }

    @Test("Truncated and unknown byte sequences decode to nothing")
    func truncatedAndUnknown() {
        for hex in ["", "0f", "0f ae", "cd", "0f ae 54 24", "0f ae 15 10 00 00", "f3 0f b8", "66", "90", "0f 0b", "c4 e1 78 ae 10"] {
            #expect(decode(hex) == nil, "\(hex)")
        }
    }

    @Test("At most 15 bytes: 14 prefixes and int3 decode, 15 prefixes do not")
    func lengthLimit() {
        let fourteen = Array(repeating: "2e", count: 14).joined(separator: " ")
        #expect(decode(fourteen + " cc")?.length == 15)
        #expect(decode(fourteen + " 2e cc") == nil)
    }
}
