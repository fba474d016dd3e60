import Layout
import Boot
import Memory
import Testing

@Suite("ELF vmlinux: PVH and 64-bit entry")
struct VmlinuxTests {
    /// A vmlinux-like ELF64: text linked at 0xffffffff81000000 and loaded at 16 MiB, a
    /// data segment with BSS, e_entry physical.
    static func vmlinux(pvh: UInt32? = nil) -> [UInt8] {
        Images.elf(is64: true, entry: 0x100_0000, segments: [
            .init(physical: 0x100_0000, virtual: 0xFFFF_FFFF_8100_0000, data: Images.pattern(6000)),
            .init(physical: 0x120_0000, virtual: 0xFFFF_FFFF_8120_0000, data: Images.pattern(100, seed: 3),
                  memorySize: 0x3000),
        ], notes: pvh.map(Images.pvhNote))
    }

    @Test func parsesProgramHeadersAndThePVHNote() throws {
        let elf = try ELFImage(Self.vmlinux(pvh: 0x100_0850))
        #expect(elf.elfClass == .elf64)
        #expect(elf.machine == 62)
        #expect(elf.loadSegments.count == 2)
        #expect(elf.loadSegments[1].memorySize == 0x3000)
        #expect(elf.pvhEntry == 0x100_0850)
        #expect(try ELFImage(Self.vmlinux()).pvhEntry == nil)
    }

    @Test func entersThroughPVHWhenTheNoteIsThere() throws {
        let memory = try Images.memory()
        let initrd = Images.pattern(3000, seed: 5)
        let options = BootOptions(cmdline: "console=hvc0", initrd: initrd, cpuCount: 4)
        let loaded = try KernelImage.load(Self.vmlinux(pvh: 0x100_0850), into: memory, options: options)
        #expect(loaded.format == .elf64)
        #expect(loaded.bootProtocol == .pvh)
        let entry = loaded.entry
        #expect(entry.rip == 0x100_0850)
        #expect(entry.rbx == BootLayout.pvhStartInfo)
        #expect(entry.cr0 & X86.cr0PE != 0 && entry.cr0 & X86.cr0PG == 0)
        #expect(entry.efer == 0)
        #expect(entry.cs.db && !entry.cs.l && entry.cs.limit == 0xFFFF_FFFF && entry.cs.g)
        #expect(entry.ds.db && entry.ds.type == 0x3)
        #expect(try memory.load(UInt64.self, at: entry.gdt.base + 0x10) == 0x00CF_9B00_0000_FFFF)

        // Segments loaded at their physical addresses, BSS zeroed.
        #expect(try memory.read(at: 0x100_0000, count: 6000) == Images.pattern(6000))
        #expect(try memory.read(at: 0x120_0000, count: 100) == Images.pattern(100, seed: 3))
        #expect(try memory.read(at: 0x120_0000 + 100, count: 0x3000 - 100).allSatisfy { $0 == 0 })
        #expect(loaded.kernelEnd == 0x120_3000)

        // hvm_start_info.
        let info = BootLayout.pvhStartInfo
        #expect(try memory.load(UInt32.self, at: info) == 0x336E_C578)
        #expect(try memory.load(UInt32.self, at: info + 4) == 1)
        #expect(try memory.load(UInt32.self, at: info + 12) == 1)
        let modules = try memory.load(UInt64.self, at: info + 16)
        let cmdline = try memory.load(UInt64.self, at: info + 24)
        #expect(try memory.read(at: cmdline, count: 13) == Array("console=hvc0".utf8) + [0])
        #expect(try memory.load(UInt64.self, at: info + 32) == loaded.rsdp)
        let memmap = try memory.load(UInt64.self, at: info + 40)
        #expect(try memory.load(UInt32.self, at: info + 48) == 3)
        #expect(try memory.load(UInt64.self, at: memmap + 24) == 0x9FC00)          // entry 1: reserved
        #expect(try memory.load(UInt32.self, at: memmap + 24 + 16) == 2)
        #expect(try memory.load(UInt64.self, at: memmap + 48 + 8) == (64 << 20) - 0x100000)
        let initrdAddress = try memory.load(UInt64.self, at: modules)
        #expect(try memory.load(UInt64.self, at: modules + 8) == 3000)
        #expect(try memory.read(at: initrdAddress, count: 3000) == initrd)
        #expect(initrdAddress >= loaded.kernelEnd)
    }

    @Test func entersThe64BitEntryWithoutThePVHNote() throws {
        let memory = try Images.memory()
        let loaded = try KernelImage.load(Self.vmlinux(), into: memory, options: BootOptions(cmdline: "quiet"))
        #expect(loaded.bootProtocol == .linux64)
        #expect(loaded.entry.rip == 0x100_0000)
        #expect(loaded.entry.rsi == BootLayout.zeroPage)
        #expect(loaded.entry.efer & X86.eferLMA != 0)
        let zp = BootLayout.zeroPage
        #expect(try memory.load(UInt16.self, at: zp + 0x1FE) == 0xAA55)
        #expect(try memory.load(UInt32.self, at: zp + 0x202) == 0x5372_6448)
        #expect(try memory.load(UInt8.self, at: zp + 0x210) == 0xFF)
        #expect(try memory.load(UInt8.self, at: zp + 0x1E8) == 3)
    }

    @Test func linux64CanBeForcedAndPVHCanBeRequired() throws {
        let memory = try Images.memory()
        let forced = try KernelImage.load(Self.vmlinux(pvh: 0x100_0850), into: memory,
                                          options: BootOptions(linuxEntry: .linux64))
        #expect(forced.bootProtocol == .linux64)
        let error = #expect(throws: BootError.self) {
            try KernelImage.load(Self.vmlinux(), into: memory, options: BootOptions(linuxEntry: .pvh))
        }
        guard case .unsupportedELF = error else { Issue.record("got \(String(describing: error))"); return }
    }

    @Test func translatesAVirtualEntryPoint() throws {
        let image = Images.elf(is64: true, entry: 0xFFFF_FFFF_8100_0010, segments: [
            .init(physical: 0x100_0000, virtual: 0xFFFF_FFFF_8100_0000, data: Images.pattern(64)),
        ])
        let loaded = try KernelImage.load(image, into: try Images.memory(), options: BootOptions())
        #expect(loaded.entry.rip == 0x100_0010)
    }

    @Test func refusesSegmentsOutsideGuestMemory() throws {
        let memory = try Images.memory()
        for segment in [Images.Segment(physical: 0x400_0000 - 16, data: Images.pattern(64)),        // crosses the end
                        Images.Segment(physical: 0x200_0000, data: [1], memorySize: 0x1000_0000),  // BSS beyond RAM
                        Images.Segment(physical: 0xFEC0_0000, data: [1]),                          // MMIO hole
                        Images.Segment(physical: 0x8000, data: [1])] {                              // boot structures
            let image = Images.elf(is64: true, entry: segment.physical, segments: [segment])
            let error = #expect(throws: BootError.self) {
                try KernelImage.load(image, into: memory, options: BootOptions())
            }
            guard case .segmentOutsideMemory = error else { Issue.record("got \(String(describing: error))"); continue }
        }
    }

    @Test func refusesSegmentsThatWrapTheAddressSpace() {
        let image = Images.elf(is64: true, entry: 0, segments: [
            .init(physical: 0xFFFF_FFFF_FFFF_F000, data: [1], memorySize: 0x2000),
        ])
        let error = #expect(throws: BootError.self) { try ELFImage(image) }
        guard case .unsupportedELF = error else { Issue.record("got \(String(describing: error))"); return }
    }

    @Test func refusesTruncatedAndMalformedELF() {
        let image = Self.vmlinux()
        for length in [20, 60, 100, image.count - 10] {
            let error = #expect(throws: BootError.self) { try ELFImage(Array(image.prefix(length))) }
            guard case .truncated = error else { Issue.record("\(length): \(String(describing: error))"); continue }
        }
        var bigEndian = image
        bigEndian[5] = 2
        #expect(throws: BootError.self) { try ELFImage(bigEndian) }
        let arm = Images.elf(is64: true, machine: 183, entry: 0, segments: [.init(physical: 0x100000, data: [1])])
        #expect(throws: BootError.self) { try ELFImage(arm) }
        var fileSizeTooLarge = image
        // p_filesz > p_memsz in the first program header.
        Images.put(UInt64(0x10_0000), &fileSizeTooLarge, 64 + 32)
        #expect(throws: BootError.self) { try ELFImage(fileSizeTooLarge) }
    }

    @Test func refusesA32BitELFWithoutPVHOrMultiboot() throws {
        let image = Images.elf(is64: false, entry: 0x100000, segments: [.init(physical: 0x100000, data: [0xF4])])
        let error = #expect(throws: BootError.self) {
            try KernelImage.load(image, into: try Images.memory(), options: BootOptions())
        }
        guard case .unsupportedELF = error else { Issue.record("got \(String(describing: error))"); return }
        // With a PVH note it boots through PVH.
        let pvh = Images.elf(is64: false, entry: 0x100000, segments: [.init(physical: 0x100000, data: [0xF4])],
                             notes: Images.pvhNote(0x100000))
        let loaded = try KernelImage.load(pvh, into: try Images.memory(), options: BootOptions())
        #expect(loaded.bootProtocol == .pvh)
        #expect(loaded.format == .elf32)
    }

    @Test func vmlinuxCommandLineLimitIs2047() throws {
        let memory = try Images.memory()
        #expect(throws: BootError.cmdlineTooLong(length: 2048, maximum: 2047)) {
            try KernelImage.load(Self.vmlinux(), into: memory, options: BootOptions(cmdline: String(repeating: "x", count: 2048)))
        }
        #expect(throws: BootError.cmdlineContainsNUL) {
            try KernelImage.load(Self.vmlinux(), into: memory, options: BootOptions(cmdline: "a\u{0}b"))
        }
    }
}
