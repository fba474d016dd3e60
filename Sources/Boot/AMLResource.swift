/// One resource descriptor inside an AML `ResourceTemplate` (ACPI 6.5, section 6.4): what a
/// device decodes or raises (ports, memory, interrupts), or for a bridge what it forwards
/// to the devices behind it (bus numbers, I/O and memory windows). ``encoded`` gives the
/// descriptor's bytes as `iasl` writes them; ``AML/resourceTemplate(_:)`` wraps a list of
/// them in a buffer with the end tag.
///
/// Like ``AML``, descriptors are built from Swiftlet's own numbers: a value that does not
/// fit its field (a maximum below its minimum, a length past the descriptor's width, more
/// than 255 interrupts) is a Swiftlet bug and stops with a precondition failure.
public enum AMLResource: Equatable, Sendable {
    /// `IO (Decode16, minimum, maximum, alignment, length)`: I/O ports decoded with all 16
    /// address bits (small descriptor, tag 0x47).
    case io(minimum: UInt16, maximum: UInt16, alignment: UInt8, length: UInt8)
    /// `Memory32Fixed (ReadWrite, base, length)`, or `ReadOnly` (large descriptor 0x86).
    case memory32Fixed(writable: Bool, base: UInt32, length: UInt32)
    /// `Interrupt (...) { GSI, ... }` (extended interrupt descriptor 0x89).
    case interrupt(Interrupt)
    /// `WordBusNumber`, `WordIO`, `DWordIO`, `DWordMemory`, `QWordMemory`...: an address
    /// range a bridge produces (address space descriptors 0x88, 0x87, 0x8A).
    case addressSpace(AddressSpace)

    /// An extended interrupt descriptor: `Interrupt (ResourceConsumer, Edge|Level,
    /// ActiveHigh|ActiveLow, Exclusive|Shared) { gsis }`. The numbers are GSIs.
    public struct Interrupt: Equatable, Sendable {
        public enum Trigger: Equatable, Sendable { case edge, level }
        public enum Polarity: Equatable, Sendable { case activeHigh, activeLow }
        public var trigger: Trigger
        public var polarity: Polarity
        public var shared: Bool
        public var gsis: [UInt32]

        public init(trigger: Trigger, polarity: Polarity, shared: Bool, gsis: [UInt32]) {
            self.trigger = trigger; self.polarity = polarity; self.shared = shared; self.gsis = gsis
        }
    }

    /// An address space descriptor as a host bridge's `_CRS` uses it: `ResourceProducer,
    /// PosDecode, MinFixed, MaxFixed`, granularity 0, no translation, and a length of
    /// `maximum - minimum + 1`; I/O ranges are `EntireRange`.
    public struct AddressSpace: Equatable, Sendable {
        public enum Kind: Equatable, Sendable {
            /// Memory; `ReadWrite` when `writable`.
            case memory(Caching, writable: Bool)
            /// I/O ports.
            case io
            /// PCI bus numbers.
            case busNumber
        }
        /// The `_MEM` field of a memory range.
        public enum Caching: UInt8, Equatable, Sendable {
            case nonCacheable = 0, cacheable = 1, writeCombining = 2, prefetchable = 3
        }
        /// Word (16-bit fields), DWord (32-bit) or QWord (64-bit).
        public enum Width: Equatable, Sendable { case word, dword, qword }

        public var kind: Kind
        public var width: Width
        public var minimum: UInt64
        public var maximum: UInt64

        public init(_ kind: Kind, width: Width, minimum: UInt64, maximum: UInt64) {
            self.kind = kind; self.width = width; self.minimum = minimum; self.maximum = maximum
        }
    }

    // Tags (ACPI 6.5, sections 6.4.2 and 6.4.3).
    static let ioTag: UInt8 = 0x47
    static let endTag: UInt8 = 0x79
    static let memory32FixedTag: UInt8 = 0x86
    static let dwordAddressTag: UInt8 = 0x87
    static let wordAddressTag: UInt8 = 0x88
    static let extendedInterruptTag: UInt8 = 0x89
    static let qwordAddressTag: UInt8 = 0x8A

    /// The descriptor's bytes.
    public var encoded: [UInt8] {
        switch self {
        case let .io(minimum, maximum, alignment, length):
            precondition(minimum <= maximum, "IO: maximum below minimum")
            // Information byte bit 0: the device decodes 16 address bits (Decode16).
            return [Self.ioTag, 0x01] + Array.littleEndian(minimum) + Array.littleEndian(maximum) + [alignment, length]
        case let .memory32Fixed(writable, base, length):
            return Self.large(Self.memory32FixedTag, [writable ? 1 : 0] + Array.littleEndian(base) + Array.littleEndian(length))
        case let .interrupt(interrupt):
            precondition((1...255).contains(interrupt.gsis.count), "Interrupt: 1 to 255 interrupt numbers")
            // Flags: bit 0 consumer, bit 1 edge, bit 2 active low, bit 3 shared.
            var flags: UInt8 = 0x01
            if interrupt.trigger == .edge { flags |= 0x02 }
            if interrupt.polarity == .activeLow { flags |= 0x04 }
            if interrupt.shared { flags |= 0x08 }
            return Self.large(Self.extendedInterruptTag,
                              [flags, UInt8(interrupt.gsis.count)] + interrupt.gsis.flatMap { Array.littleEndian($0) })
        case let .addressSpace(space):
            return Self.addressSpace(space)
        }
    }

    /// A large descriptor: the tag, the length of what follows (16 bits), the fields.
    static func large(_ tag: UInt8, _ fields: [UInt8]) -> [UInt8] {
        [tag] + Array.littleEndian(UInt16(fields.count)) + fields
    }

    static func addressSpace(_ space: AddressSpace) -> [UInt8] {
        precondition(space.minimum <= space.maximum, "address space: maximum below minimum")
        let type: UInt8, typeFlags: UInt8
        switch space.kind {
        case let .memory(caching, writable): (type, typeFlags) = (0, caching.rawValue << 1 | (writable ? 1 : 0))
        case .io: (type, typeFlags) = (1, 0x03)           // EntireRange
        case .busNumber: (type, typeFlags) = (2, 0)
        }
        // General flags: producer (bit 0 clear), positive decode (bit 1 clear), MinFixed
        // (bit 2), MaxFixed (bit 3).
        let header: [UInt8] = [type, 0x0C, typeFlags]
        let (length, overflow) = (space.maximum - space.minimum).addingReportingOverflow(1)
        let fields = [0, space.minimum, space.maximum, 0, length]   // granularity, min, max, translation, length
        switch space.width {
        case .word:
            precondition(!overflow && fields.allSatisfy { $0 <= 0xFFFF }, "a Word address space holds 16-bit values")
            return large(wordAddressTag, header + fields.flatMap { Array.littleEndian(UInt16($0)) })
        case .dword:
            precondition(!overflow && fields.allSatisfy { $0 <= 0xFFFF_FFFF }, "a DWord address space holds 32-bit values")
            return large(dwordAddressTag, header + fields.flatMap { Array.littleEndian(UInt32($0)) })
        case .qword:
            precondition(!overflow, "a QWord address space's length must fit 64 bits")
            return large(qwordAddressTag, header + fields.flatMap { Array.littleEndian($0) })
        }
    }
}
