import Layout
import Boot
import Memory
import Testing

@Suite("Multiboot v1")
struct MultibootTests {
    /// Like a kvm-unit-tests .flat: ELF32 linked at 4 MiB, multiboot header with flags 0.
    static func flat() -> [UInt8] {
        Images.elf(is64: false, entry: 0x40_0010, segments: [
            .init(physical: 0x40_0000, data: Images.pattern(4096)),
            .init(physical: 0x40_1000, data: Images.pattern(16, seed: 4), memorySize: 0x2000),
        ], prefix: Images.multibootHeader())
    }

    @Test func findsTheHeader() throws {
        let header = try #require(try MultibootHeader.find(in: Self.flat()))
        #expect(header.flags == 0)
        #expect(!header.usesAddressFields)
        #expect(header.offset == 52 + 2 * 32)
    }

    @Test func refusesUnknownRequiredFlags() {
        let image = Images.multibootHeader(flags: 1 << 5) + Images.pattern(100)
        let error = #expect(throws: BootError.self) { try MultibootHeader.find(in: image) }
        guard case .invalidHeader = error else { Issue.record("got \(String(describing: error))"); return }
    }

    @Test func loadsAnELF32KernelWithInfo() throws {
        let memory = try Images.memory(128 << 20)
        let initrd = Array("NR_CPUS=2\n".utf8)
        let loaded = try KernelImage.load(Self.flat(), into: memory,
                                          options: BootOptions(cmdline: "x86/smptest.flat -- arg", initrd: initrd, cpuCount: 2))
        #expect(loaded.format == .multiboot)
        #expect(loaded.bootProtocol == .multiboot)
        let entry = loaded.entry
        #expect(entry.rip == 0x40_0010)
        #expect(entry.rax == 0x2BAD_B002)
        #expect(entry.rbx == BootLayout.multibootInfo)
        #expect(entry.cr0 & X86.cr0PE != 0 && entry.cr0 & X86.cr0PG == 0)
        #expect(entry.cs.db && entry.cs.base == 0 && entry.cs.limit == 0xFFFF_FFFF)
        #expect(try memory.read(at: 0x40_0000, count: 4096) == Images.pattern(4096))
        #expect(try memory.read(at: 0x40_1010, count: 0x1000).allSatisfy { $0 == 0 })

        let info = BootLayout.multibootInfo
        let flags = try memory.load(UInt32.self, at: info)
        #expect(flags == (1 << 0) | (1 << 2) | (1 << 3) | (1 << 6) | (1 << 9))
        #expect(try memory.load(UInt32.self, at: info + 4) == 639)
        #expect(try memory.load(UInt32.self, at: info + 8) == (128 << 10) - 1024)
        let cmdline = try memory.load(UInt32.self, at: info + 16)
        #expect(try memory.read(at: UInt64(cmdline), count: 24) == Array("x86/smptest.flat -- arg".utf8) + [0])
        #expect(try memory.load(UInt32.self, at: info + 20) == 1)
        let module = UInt64(try memory.load(UInt32.self, at: info + 24))
        let start = try memory.load(UInt32.self, at: module)
        let end = try memory.load(UInt32.self, at: module + 4)
        #expect(end - start == UInt32(initrd.count))
        #expect(try memory.read(at: UInt64(start), count: initrd.count) == initrd)
        #expect(UInt64(start) >= 0x40_3000 && start % 4096 == 0)
        // Memory map: size field 20, then base, length, type.
        let mmapLength = try memory.load(UInt32.self, at: info + 44)
        let mmap = UInt64(try memory.load(UInt32.self, at: info + 48))
        #expect(mmapLength == 3 * 24)
        #expect(try memory.load(UInt32.self, at: mmap) == 20)
        #expect(try memory.load(UInt64.self, at: mmap + 4) == 0)
        #expect(try memory.load(UInt64.self, at: mmap + 12) == 0x9FC00)
        #expect(try memory.load(UInt32.self, at: mmap + 20) == 1)
        #expect(try memory.load(UInt64.self, at: mmap + 48 + 4) == 0x100000)
        let name = UInt64(try memory.load(UInt32.self, at: info + 64))
        #expect(try memory.read(at: name, count: 9) == Array("swiftlet".utf8) + [0])
    }

    @Test func withoutInitrdThereAreNoModules() throws {
        let memory = try Images.memory()
        _ = try KernelImage.load(Self.flat(), into: memory, options: BootOptions())
        let flags = try memory.load(UInt32.self, at: BootLayout.multibootInfo)
        #expect(flags & (1 << 3) == 0)
    }

    @Test func loadsAnELF64MultibootKernel() throws {
        let image = Images.elf(is64: true, entry: 0x20_0000, segments: [.init(physical: 0x20_0000, data: [0xF4])],
                               prefix: Images.multibootHeader())
        #expect(KernelImage.detect(image) == .multiboot)
        let loaded = try KernelImage.load(image, into: try Images.memory(), options: BootOptions())
        #expect(loaded.bootProtocol == .multiboot)
        #expect(loaded.entry.rip == 0x20_0000)
    }

    @Test func loadsAnAoutKludgeImage() throws {
        // The header sits 64 bytes into the file, which loads at 1 MiB; 1 KiB of BSS follows.
        let fileSize = 512
        var image = [UInt8](repeating: 0xCC, count: 64)
        image += Images.multibootHeader(addresses: (header: 0x10_0040, load: 0x10_0000, loadEnd: 0x10_0000 + UInt32(fileSize),
                                                    bssEnd: 0x10_0000 + UInt32(fileSize) + 1024, entry: 0x10_0060))
        image += [UInt8](repeating: 0x90, count: fileSize - image.count)
        image += [0xAB, 0xAB]   // beyond load_end_addr: not loaded
        #expect(KernelImage.detect(image) == .multiboot)
        let memory = try Images.memory()
        try memory.write([UInt8](repeating: 0xEE, count: 4096), at: 0x10_0000)
        let loaded = try KernelImage.load(image, into: memory, options: BootOptions())
        #expect(loaded.entry.rip == 0x10_0060)
        #expect(try memory.read(at: 0x10_0000, count: fileSize) == Array(image.prefix(fileSize)))
        #expect(try memory.read(at: 0x10_0000 + UInt64(fileSize), count: 1024).allSatisfy { $0 == 0 })
        #expect(try memory.load(UInt8.self, at: 0x10_0000 + UInt64(fileSize) + 1024) == 0xEE)
    }

    @Test func refusesABadAoutKludge() throws {
        let memory = try Images.memory()
        // load_end_addr beyond the file.
        let truncated = Images.multibootHeader(addresses: (header: 0x10_0000, load: 0x10_0000, loadEnd: 0x11_0000,
                                                           bssEnd: 0, entry: 0x10_0000)) + [UInt8](repeating: 0, count: 100)
        let error = #expect(throws: BootError.self) { try KernelImage.load(truncated, into: memory, options: BootOptions()) }
        guard case .truncated = error else { Issue.record("got \(String(describing: error))"); return }
        // header_addr below load_addr.
        let inverted = Images.multibootHeader(addresses: (header: 0x10_0000, load: 0x20_0000, loadEnd: 0,
                                                          bssEnd: 0, entry: 0x20_0000)) + [UInt8](repeating: 0, count: 100)
        #expect(throws: BootError.self) { try KernelImage.load(inverted, into: memory, options: BootOptions()) }
        // BSS beyond RAM.
        let huge = Images.multibootHeader(addresses: (header: 0x10_0000, load: 0x10_0000, loadEnd: 0,
                                                      bssEnd: 0xF000_0000, entry: 0x10_0000)) + [UInt8](repeating: 0, count: 100)
        let outside = #expect(throws: BootError.self) { try KernelImage.load(huge, into: memory, options: BootOptions()) }
        guard case .segmentOutsideMemory = outside else { Issue.record("got \(String(describing: outside))"); return }
    }

    /// docs/booting.md: a Multiboot ELF may sit below 1 MiB, outside the pages its loader
    /// writes; an image loaded through the address fields may not.
    @Test("Below 1 MiB: a Multiboot ELF segment outside the loader's pages loads, one over them or an a.out-kludge image does not")
    func belowOneMiB() throws {
        let low = Images.elf(is64: false, entry: 0x8000, segments: [.init(physical: 0x8000, data: Images.pattern(512))],
                             prefix: Images.multibootHeader())
        let memory = try Images.memory()
        #expect(try KernelImage.load(low, into: memory, options: BootOptions()).entry.rip == 0x8000)
        #expect(try memory.read(at: 0x8000, count: 512) == Images.pattern(512))

        let overInfo = Images.elf(is64: false, entry: 0x10_000, segments: [.init(physical: 0xF000, data: Images.pattern(8192))],
                                  prefix: Images.multibootHeader())
        let clash = #expect(throws: BootError.self) { try KernelImage.load(overInfo, into: try Images.memory(), options: BootOptions()) }
        #expect(clash?.description.contains("where the multiboot information goes") == true, "\(String(describing: clash))")

        let kludge = Images.multibootHeader(addresses: (header: 0x8000, load: 0x8000, loadEnd: 0, bssEnd: 0, entry: 0x8000))
            + [UInt8](repeating: 0x90, count: 100)
        let refused = #expect(throws: BootError.self) { try KernelImage.load(kludge, into: try Images.memory(), options: BootOptions()) }
        guard case .segmentOutsideMemory = refused else { Issue.record("got \(String(describing: refused))"); return }
    }

    @Test func refusesAModuleThatDoesNotFit() throws {
        let memory = try Images.memory(8 << 20)
        let error = #expect(throws: BootError.self) {
            try KernelImage.load(Self.flat(), into: memory, options: BootOptions(initrd: [UInt8](repeating: 0, count: 4 << 20)))
        }
        guard case .initrdTooLarge = error else { Issue.record("got \(String(describing: error))"); return }
    }
}
