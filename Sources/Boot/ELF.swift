import Basics

/// A parsed ELF executable (32- or 64-bit, little-endian, x86): the header fields a
/// loader needs, the program headers, and the Xen PVH entry point when the file carries
/// the `XEN_ELFNOTE_PHYS32_ENTRY` note. Owns copies of those values only; the file's
/// bytes stay with the caller.
public struct ELFImage: Sendable, Equatable {
    public enum ELFClass: Sendable, Equatable { case elf32, elf64 }

    /// One program header.
    public struct ProgramHeader: Sendable, Equatable {
        public var type: UInt32
        public var flags: UInt32
        public var offset: UInt64
        public var virtualAddress: UInt64
        public var physicalAddress: UInt64
        public var fileSize: UInt64
        public var memorySize: UInt64
        public var alignment: UInt64
    }

    public static let ptLoad: UInt32 = 1
    public static let ptNote: UInt32 = 4
    /// `XEN_ELFNOTE_PHYS32_ENTRY`: the 32-bit physical PVH entry point.
    public static let xenElfnotePhys32Entry: UInt32 = 18
    /// Upper bound on program headers we look at (vmlinux has ~5, real files < 100).
    public static let maximumProgramHeaders = 512

    public let elfClass: ELFClass
    public let machine: UInt16
    public let entry: UInt64
    public let programHeaders: [ProgramHeader]
    /// The PVH entry point (`XEN_ELFNOTE_PHYS32_ENTRY`), if any.
    public let pvhEntry: UInt32?

    public var loadSegments: [ProgramHeader] {
        programHeaders.filter { $0.type == Self.ptLoad && $0.memorySize > 0 }
    }

    /// `true` when `bytes` starts with the ELF magic.
    public static func hasMagic(_ bytes: [UInt8]) -> Bool {
        bytes.count >= 4 && bytes[0] == 0x7F && bytes[1] == 0x45 && bytes[2] == 0x4C && bytes[3] == 0x46
    }

    /// Parses and checks the ELF header, the program headers and the notes.
    public init(_ bytes: [UInt8]) throws(BootError) {
        guard Self.hasMagic(bytes) else { throw .notAKernel(reason: "no ELF magic") }
        guard bytes.count >= 52 else { throw .truncated(what: "the ELF header", needed: 52, available: UInt64(bytes.count)) }
        let is64: Bool
        switch bytes[4] {
        case 1: is64 = false
        case 2: is64 = true
        default: throw .unsupportedELF("unknown ELF class \(bytes[4])")
        }
        guard bytes[5] == 1 else { throw .unsupportedELF("not little-endian") }
        let headerSize = is64 ? 64 : 52
        guard bytes.count >= headerSize else {
            throw .truncated(what: "the ELF header", needed: UInt64(headerSize), available: UInt64(bytes.count))
        }
        let type = bytes.le(UInt16.self, at: 16) ?? 0
        guard type == 2 else { throw .unsupportedELF("e_type \(type) is not an executable (ET_EXEC)") }
        let machine = bytes.le(UInt16.self, at: 18) ?? 0
        guard machine == 3 || machine == 62 else {
            throw .unsupportedELF("e_machine \(machine) is neither x86 (3) nor x86-64 (62)")
        }
        let entry: UInt64
        let phoff: UInt64
        let phentsize: Int
        let phnum: Int
        if is64 {
            entry = bytes.le(UInt64.self, at: 24) ?? 0
            phoff = bytes.le(UInt64.self, at: 32) ?? 0
            phentsize = Int(bytes.le(UInt16.self, at: 54) ?? 0)
            phnum = Int(bytes.le(UInt16.self, at: 56) ?? 0)
        } else {
            entry = UInt64(bytes.le(UInt32.self, at: 24) ?? 0)
            phoff = UInt64(bytes.le(UInt32.self, at: 28) ?? 0)
            phentsize = Int(bytes.le(UInt16.self, at: 42) ?? 0)
            phnum = Int(bytes.le(UInt16.self, at: 44) ?? 0)
        }
        let minimumEntrySize = is64 ? 56 : 32
        guard phnum > 0 else { throw .unsupportedELF("no program headers") }
        guard phnum <= Self.maximumProgramHeaders else {
            throw .unsupportedELF("\(phnum) program headers (at most \(Self.maximumProgramHeaders) accepted)")
        }
        guard phentsize >= minimumEntrySize else {
            throw .unsupportedELF("program header entries of \(phentsize) bytes (need \(minimumEntrySize))")
        }
        let tableSize = UInt64(phentsize) * UInt64(phnum)
        guard bytes.contains(offset: phoff, length: tableSize) else {
            throw .truncated(what: "the program header table", needed: phoff &+ tableSize, available: UInt64(bytes.count))
        }
        var headers: [ProgramHeader] = []
        headers.reserveCapacity(phnum)
        for index in 0..<phnum {
            let base = Int(phoff) + index * phentsize
            let header: ProgramHeader
            if is64 {
                header = ProgramHeader(
                    type: bytes.le(UInt32.self, at: base) ?? 0, flags: bytes.le(UInt32.self, at: base + 4) ?? 0,
                    offset: bytes.le(UInt64.self, at: base + 8) ?? 0,
                    virtualAddress: bytes.le(UInt64.self, at: base + 16) ?? 0,
                    physicalAddress: bytes.le(UInt64.self, at: base + 24) ?? 0,
                    fileSize: bytes.le(UInt64.self, at: base + 32) ?? 0,
                    memorySize: bytes.le(UInt64.self, at: base + 40) ?? 0,
                    alignment: bytes.le(UInt64.self, at: base + 48) ?? 0)
            } else {
                func word(_ offset: Int) -> UInt64 { UInt64(bytes.le(UInt32.self, at: base + offset) ?? 0) }
                header = ProgramHeader(
                    type: UInt32(word(0)), flags: UInt32(word(24)), offset: word(4),
                    virtualAddress: word(8), physicalAddress: word(12), fileSize: word(16),
                    memorySize: word(20), alignment: word(28))
            }
            if header.type == Self.ptLoad || header.type == Self.ptNote {
                guard bytes.contains(offset: header.offset, length: header.fileSize) else {
                    throw .truncated(what: "ELF segment \(index)", needed: header.offset &+ header.fileSize,
                                     available: UInt64(bytes.count))
                }
            }
            if header.type == Self.ptLoad {
                guard header.fileSize <= header.memorySize else {
                    throw .unsupportedELF("segment \(index) has p_filesz \(header.fileSize) > p_memsz \(header.memorySize)")
                }
                guard !header.physicalAddress.addingReportingOverflow(header.memorySize).overflow else {
                    throw .unsupportedELF("segment \(index) wraps around the address space")
                }
            }
            headers.append(header)
        }
        guard headers.contains(where: { $0.type == Self.ptLoad && $0.memorySize > 0 }) else {
            throw .unsupportedELF("no loadable (PT_LOAD) segment")
        }
        elfClass = is64 ? .elf64 : .elf32
        self.machine = machine
        self.entry = entry
        programHeaders = headers
        pvhEntry = Self.findPVHEntry(bytes, headers)
    }

    /// Scans every PT_NOTE segment for a "Xen" note of type 18; its descriptor (4 or 8
    /// bytes) holds the 32-bit physical entry point.
    static func findPVHEntry(_ bytes: [UInt8], _ headers: [ProgramHeader]) -> UInt32? {
        for header in headers where header.type == ptNote {
            // Bounds were checked in init; offsets fit in Int.
            var position = Int(header.offset)
            let end = position + Int(header.fileSize)
            while position + 12 <= end {
                guard let nameSize = bytes.le(UInt32.self, at: position),
                      let descSize = bytes.le(UInt32.self, at: position + 4),
                      let type = bytes.le(UInt32.self, at: position + 8) else { return nil }
                let nameStart = position + 12
                guard let namePadded = alignUp(UInt64(nameSize), 4), let descPadded = alignUp(UInt64(descSize), 4),
                      UInt64(nameStart) + namePadded + descPadded <= UInt64(end) else { break }
                let descStart = nameStart + Int(namePadded)
                if type == xenElfnotePhys32Entry, nameSize == 4,
                   bytes[nameStart..<(nameStart + 3)].elementsEqual([0x58, 0x65, 0x6E]), // "Xen"
                   descSize >= 4, let value = bytes.le(UInt32.self, at: descStart) {
                    return value
                }
                position = descStart + Int(descPadded)
            }
        }
        return nil
    }

    /// Translates a virtual address inside a loadable segment to its physical address;
    /// addresses outside every segment are returned unchanged (already physical, as the
    /// x86-64 vmlinux's `e_entry` is).
    public func physicalAddress(ofVirtual address: UInt64) -> UInt64 {
        for segment in loadSegments where address >= segment.virtualAddress
            && address - segment.virtualAddress < segment.memorySize {
            return segment.physicalAddress &+ (address - segment.virtualAddress)
        }
        return address
    }
}
