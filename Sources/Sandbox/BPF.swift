/// Classic BPF, the little of it seccomp filters use: loads from `struct seccomp_data`,
/// compares, jumps and returns. ``BPFAssembler`` turns labelled code into the instruction
/// array the kernel takes (`struct sock_filter`), checking every jump distance.
public struct BPFInstruction: Sendable, Equatable, CustomStringConvertible {
    public var code: UInt16
    public var jumpIfTrue: UInt8
    public var jumpIfFalse: UInt8
    public var k: UInt32

    public init(code: UInt16, jumpIfTrue: UInt8 = 0, jumpIfFalse: UInt8 = 0, k: UInt32) {
        self.code = code
        self.jumpIfTrue = jumpIfTrue
        self.jumpIfFalse = jumpIfFalse
        self.k = k
    }

    // Opcode parts (<linux/bpf_common.h>).
    static let ld: UInt16 = 0x00, jmp: UInt16 = 0x05, ret: UInt16 = 0x06
    static let w: UInt16 = 0x00, abs: UInt16 = 0x20
    static let ja: UInt16 = 0x00, jeq: UInt16 = 0x10, jgt: UInt16 = 0x20, jge: UInt16 = 0x30, jset: UInt16 = 0x40
    static let k: UInt16 = 0x00

    /// `ld [offset]`: a 32-bit word of `struct seccomp_data` into the accumulator.
    static func load(offset: UInt32) -> BPFInstruction { BPFInstruction(code: ld | w | abs, k: offset) }
    static func `return`(_ value: UInt32) -> BPFInstruction { BPFInstruction(code: ret | k, k: value) }

    /// The instruction as `bpf_dbg`/`seccomp-tools` would print it, for audits.
    public var description: String {
        switch code {
        case Self.ld | Self.w | Self.abs: return "ld [\(k)]"
        case Self.ret | Self.k: return "ret \(Hex.word(k))"
        case Self.jmp | Self.ja: return "ja +\(k)"
        case Self.jmp | Self.jeq | Self.k: return "jeq \(Hex.word(k)), +\(jumpIfTrue), +\(jumpIfFalse)"
        case Self.jmp | Self.jge | Self.k: return "jge \(Hex.word(k)), +\(jumpIfTrue), +\(jumpIfFalse)"
        case Self.jmp | Self.jgt | Self.k: return "jgt \(Hex.word(k)), +\(jumpIfTrue), +\(jumpIfFalse)"
        case Self.jmp | Self.jset | Self.k: return "jset \(Hex.word(k)), +\(jumpIfTrue), +\(jumpIfFalse)"
        case 0x54: return "and \(Hex.word(k))"
        default: return "code \(Hex.word(UInt32(code))) jt \(jumpIfTrue) jf \(jumpIfFalse) k \(Hex.word(k))"
        }
    }
}

enum Hex {
    static func word(_ value: UInt32) -> String { "0x" + String(value, radix: 16) }
}

/// Why a filter could not be assembled (a programming error in a policy, found by tests).
public struct BPFAssemblyError: Error, CustomStringConvertible {
    public let description: String
}

/// Assembles BPF with symbolic jump targets. Conditional jumps reach at most 255
/// instructions forward (8-bit offsets); ``assemble()`` refuses a longer one rather than
/// truncating it, and refuses a label that is used but never placed.
struct BPFAssembler {
    typealias Label = Int

    private enum Item {
        case fixed(BPFInstruction)
        case conditional(code: UInt16, k: UInt32, ifTrue: Label?, ifFalse: Label?)
        case always(Label)
    }

    private var items: [Item] = []
    private var places: [Label: Int] = [:]
    private var nextLabel = 0

    mutating func newLabel() -> Label {
        defer { nextLabel += 1 }
        return nextLabel
    }

    /// Places `label` at the next instruction.
    mutating func place(_ label: Label) { places[label] = items.count }

    mutating func emit(_ instruction: BPFInstruction) { items.append(.fixed(instruction)) }

    /// A conditional jump on the accumulator; `nil` means "the next instruction".
    mutating func jump(_ code: UInt16, _ k: UInt32, ifTrue: Label?, ifFalse: Label?) {
        items.append(.conditional(code: BPFInstruction.jmp | code | BPFInstruction.k, k: k, ifTrue: ifTrue, ifFalse: ifFalse))
    }

    mutating func jumpAlways(_ label: Label) { items.append(.always(label)) }

    func assemble() throws(BPFAssemblyError) -> [BPFInstruction] {
        guard items.count <= 4096 else { throw BPFAssemblyError(description: "\(items.count) instructions; the kernel takes at most 4096") }
        var program: [BPFInstruction] = []
        for (index, item) in items.enumerated() {
            func offset(_ label: Label?, limit: Int) throws(BPFAssemblyError) -> Int {
                guard let label else { return 0 }
                guard let target = places[label] else { throw BPFAssemblyError(description: "label \(label) is never placed") }
                let distance = target - index - 1
                guard distance >= 0 else { throw BPFAssemblyError(description: "jump backwards at \(index)") }
                guard distance <= limit else { throw BPFAssemblyError(description: "jump of \(distance) at \(index) is too far") }
                return distance
            }
            switch item {
            case let .fixed(instruction):
                program.append(instruction)
            case let .conditional(code, k, ifTrue, ifFalse):
                program.append(BPFInstruction(code: code, jumpIfTrue: UInt8(try offset(ifTrue, limit: 255)),
                                              jumpIfFalse: UInt8(try offset(ifFalse, limit: 255)), k: k))
            case let .always(label):
                program.append(BPFInstruction(code: BPFInstruction.jmp | BPFInstruction.ja, k: UInt32(try offset(label, limit: Int(UInt32.max)))))
            }
        }
        return program
    }
}
