import Layout
import Boot
import Memory
import Testing

@Suite("bzImage: setup header and the 64-bit boot protocol")
struct LinuxBzImageTests {
    let noHostDecompression = BootOptions(decompressOnHost: false)

    @Test func parsesTheSetupHeader() throws {
        let header = try SetupHeader(Images.bzImage())
        #expect(header.version == 0x020F)
        #expect(header.has64BitEntry)
        #expect(header.cmdlineSize == 255)
        #expect(header.initrdAddrMax == 0x7FFF_FFFF)
        #expect(header.kernelAlignment == 0x20_0000)
        #expect(header.relocatable)
        #expect(header.prefAddress == 0x100_0000)
        #expect(header.protectedModeOffset == 1024)
        #expect(header.protectedModeSize == 4096)
        #expect(header.rawHeader.count == 0x26C - 0x1F1)
    }

    @Test func setupSectsZeroMeansFour() throws {
        var spec = Images.BzImageSpec()
        spec.setupSects = 0
        #expect(try SetupHeader(Images.bzImage(spec)).protectedModeOffset == 5 * 512)
    }

    @Test func refusesBootProtocolOlderThan206() {
        var spec = Images.BzImageSpec()
        spec.version = 0x0205
        #expect(throws: BootError.unsupportedBootProtocol(version: 0x0205)) { try SetupHeader(Images.bzImage(spec)) }
    }

    @Test func refusesAKernelWithout64BitEntry() {
        var spec = Images.BzImageSpec()
        spec.xloadflags = 0
        #expect(throws: BootError.no64BitEntry) { try SetupHeader(Images.bzImage(spec)) }
    }

    @Test func refusesAZImage() {
        var spec = Images.BzImageSpec()
        spec.loadflags = 0
        let error = #expect(throws: BootError.self) { try SetupHeader(Images.bzImage(spec)) }
        guard case .invalidHeader = error else { Issue.record("got \(String(describing: error))"); return }
    }

    @Test func refusesABadKernelAlignment() {
        var spec = Images.BzImageSpec()
        spec.kernelAlignment = 0x30_0000
        let error = #expect(throws: BootError.self) { try SetupHeader(Images.bzImage(spec)) }
        guard case .invalidHeader = error else { Issue.record("got \(String(describing: error))"); return }
    }

    @Test func refusesATruncatedBzImage() throws {
        let image = Images.bzImage()
        for length in [0x100, 0x210, 1024 + 100, image.count - 1] {
            let error = #expect(throws: BootError.self) { try SetupHeader(Array(image.prefix(length))) }
            guard case .truncated = error else {
                // Below 0x202 the magic is missing: the file is simply no bzImage.
                guard case .notAKernel = error, length < 0x206 else { Issue.record("\(length): \(String(describing: error))"); return }
                continue
            }
        }
        let memory = try Images.memory()
        let error = #expect(throws: BootError.self) {
            try KernelImage.load(Array(image.dropLast(16)), into: memory, options: noHostDecompression)
        }
        guard case .truncated = error else { Issue.record("got \(String(describing: error))"); return }
    }

    @Test func refusesAPayloadOutsideTheProtectedModeKernel() {
        var spec = Images.BzImageSpec()
        spec.payloadOffset = 4000
        spec.payloadLength = 200
        let error = #expect(throws: BootError.self) { try SetupHeader(Images.bzImage(spec)) }
        guard case .truncated = error else { Issue.record("got \(String(describing: error))"); return }
    }

    @Test func loadsThroughThe64BitBootProtocol() throws {
        let memory = try Images.memory()
        var spec = Images.BzImageSpec()
        spec.protectedMode = Images.pattern(8192)
        let image = Images.bzImage(spec)
        let initrd = Images.pattern(10_000, seed: 9)
        let options = BootOptions(cmdline: "console=ttyS0 reboot=k", initrd: initrd, cpuCount: 2, decompressOnHost: false)
        let loaded = try KernelImage.load(image, into: memory, options: options)
        #expect(loaded.format == .bzImage)
        #expect(loaded.bootProtocol == .linux64)
        // Relocatable with pref_address 16 MiB: loaded there, entered at +0x200.
        #expect(loaded.kernelStart == 0x100_0000)
        #expect(try memory.read(at: 0x100_0000, count: 8192) == spec.protectedMode)
        let entry = loaded.entry
        #expect(entry.rip == 0x100_0200)
        #expect(entry.rsi == BootLayout.zeroPage)
        #expect(entry.cs.selector == 0x10 && entry.cs.l && !entry.cs.db)
        #expect(entry.ds.selector == 0x18 && entry.ss.selector == 0x18)
        #expect(entry.cr0 & X86.cr0PG != 0 && entry.cr0 & X86.cr0PE != 0)
        #expect(entry.cr4 & X86.cr4PAE != 0)
        #expect(entry.efer == X86.eferLME | X86.eferLMA)
        #expect(entry.rflags == 0x2)

        // GDT: 64-bit code at 0x10, data at 0x18.
        #expect(try memory.load(UInt64.self, at: entry.gdt.base + 0x10) == 0x00AF_9B00_0000_FFFF)
        #expect(try memory.load(UInt64.self, at: entry.gdt.base + 0x18) == 0x00CF_9300_0000_FFFF)
        // Identity map: 3 GiB + 2 MiB maps to itself.
        let pml4 = try memory.load(UInt64.self, at: entry.cr3)
        let pdpt = try memory.load(UInt64.self, at: (pml4 & ~0xFFF) + 3 * 8)
        let pde = try memory.load(UInt64.self, at: (pdpt & ~0xFFF) + 1 * 8)
        #expect(pde == 0xC020_0000 | 0x83)

        // Zero page.
        let zp = BootLayout.zeroPage
        #expect(try memory.load(UInt16.self, at: zp + 0x1FE) == 0xAA55)
        #expect(try memory.load(UInt32.self, at: zp + 0x202) == 0x5372_6448)
        #expect(try memory.load(UInt16.self, at: zp + 0x206) == 0x020F)
        #expect(try memory.load(UInt8.self, at: zp + 0x210) == 0xFF)
        #expect(try memory.load(UInt8.self, at: zp + 0x211) & 1 == 1)
        let cmdline = try memory.load(UInt32.self, at: zp + 0x228)
        #expect(try memory.read(at: UInt64(cmdline), count: 23) == Array("console=ttyS0 reboot=k".utf8) + [0])
        let ramdisk = try memory.load(UInt32.self, at: zp + 0x218)
        #expect(try memory.load(UInt32.self, at: zp + 0x21C) == 10_000)
        #expect(ramdisk % 4096 == 0)
        #expect(UInt64(ramdisk) + 10_000 <= 64 << 20)
        #expect(UInt64(ramdisk) >= loaded.kernelEnd)
        #expect(try memory.read(at: UInt64(ramdisk), count: 10_000) == initrd)
        #expect(try memory.load(UInt64.self, at: zp + 0x070) == loaded.rsdp)
        // e820: 3 entries for 64 MiB.
        #expect(try memory.load(UInt8.self, at: zp + 0x1E8) == 3)
        #expect(try memory.load(UInt64.self, at: zp + 0x2D0) == 0)
        #expect(try memory.load(UInt64.self, at: zp + 0x2D0 + 8) == 0x9FC00)
        #expect(try memory.load(UInt32.self, at: zp + 0x2D0 + 16) == 1)
        #expect(try memory.load(UInt32.self, at: zp + 0x2D0 + 20 + 16) == 2)
        #expect(try memory.load(UInt64.self, at: zp + 0x2D0 + 40) == 0x100000)
        #expect(try memory.load(UInt64.self, at: zp + 0x2D0 + 48) == (64 << 20) - 0x100000)
    }

    @Test func nonRelocatableKernelLoadsAt1MiB() throws {
        let memory = try Images.memory()
        var spec = Images.BzImageSpec()
        spec.relocatable = 0
        let loaded = try KernelImage.load(Images.bzImage(spec), into: memory, options: noHostDecompression)
        #expect(loaded.kernelStart == 0x100000)
        #expect(loaded.entry.rip == 0x100200)
    }

    @Test func initrdStaysBelowInitrdAddrMax() throws {
        let memory = try Images.memory(128 << 20)
        var spec = Images.BzImageSpec()
        spec.initrdAddrMax = 0x3FF_FFFF
        let options = BootOptions(initrd: Images.pattern(5000), decompressOnHost: false)
        let loaded = try KernelImage.load(Images.bzImage(spec), into: memory, options: options)
        let initrd = try #require(loaded.initrd)
        #expect(initrd.address + initrd.size <= 0x400_0000)
        #expect(initrd.address == 0x400_0000 - 8192)
    }

    @Test func refusesAnInitrdLargerThanAllowed() throws {
        let memory = try Images.memory(32 << 20)
        var spec = Images.BzImageSpec()
        spec.initSize = 0x80_0000   // kernel uses 16..24 MiB, 8 MiB free above
        let options = BootOptions(initrd: [UInt8](repeating: 1, count: 9 << 20), decompressOnHost: false)
        let error = #expect(throws: BootError.self) {
            try KernelImage.load(Images.bzImage(spec), into: memory, options: options)
        }
        guard case let .initrdTooLarge(size, available, _) = error else { Issue.record("got \(String(describing: error))"); return }
        #expect(size == 9 << 20)
        #expect(available == 8 << 20)
    }

    @Test func refusesACommandLineLongerThanCmdlineSize() throws {
        let memory = try Images.memory()
        let options = BootOptions(cmdline: String(repeating: "a", count: 256), decompressOnHost: false)
        #expect(throws: BootError.cmdlineTooLong(length: 256, maximum: 255)) {
            try KernelImage.load(Images.bzImage(), into: memory, options: options)
        }
        let exact = BootOptions(cmdline: String(repeating: "a", count: 255), decompressOnHost: false)
        _ = try KernelImage.load(Images.bzImage(), into: memory, options: exact)
    }

    @Test func refusesAKernelLargerThanMemory() throws {
        let memory = try Images.memory(8 << 20)
        let error = #expect(throws: BootError.self) {
            try KernelImage.load(Images.bzImage(), into: memory, options: noHostDecompression)
        }
        guard case .kernelTooLarge = error else { Issue.record("got \(String(describing: error))"); return }
    }

    @Test func unalignedPrefAddressFallsBackToAlignedLoadAddress() throws {
        let memory = try Images.memory(16 << 20)
        var spec = Images.BzImageSpec()
        spec.prefAddress = 0x10_0000
        let loaded = try KernelImage.load(Images.bzImage(spec), into: memory,
                                          options: BootOptions(decompressOnHost: false, firmwareTables: false))
        // 1 MiB is not 2 MiB-aligned: 1 MiB aligned up to kernel_alignment instead.
        #expect(loaded.kernelStart == 0x20_0000)
        #expect(loaded.kernelEnd == 0x60_0000)
        #expect(loaded.rsdp == nil)
    }

    @Test func kernelNeedsInitSizeAbovePrefAddress() throws {
        // The decompressor never works below LOAD_PHYSICAL_ADDR (pref_address): 16 MiB
        // of RAM cannot hold a kernel that needs 16 MiB + init_size.
        let memory = try Images.memory(16 << 20)
        let error = #expect(throws: BootError.self) {
            try KernelImage.load(Images.bzImage(), into: memory, options: noHostDecompression)
        }
        guard case .kernelTooLarge = error else { Issue.record("got \(String(describing: error))"); return }
    }

    @Test func memoryTooSmallIsAnError() throws {
        let memory = try Images.memory(1 << 20)
        let error = #expect(throws: BootError.self) {
            try KernelImage.load(Images.bzImage(), into: memory, options: noHostDecompression)
        }
        guard case .memoryTooSmall = error else { Issue.record("got \(String(describing: error))"); return }
    }
}
