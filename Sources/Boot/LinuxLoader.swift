import Basics
import Layout
import Memory

/// Which entry point a Linux kernel is started through.
public enum LinuxEntry: Sendable, Equatable {
    /// PVH when the ELF carries the Xen PVH note, else the 64-bit boot protocol.
    case automatic
    /// Always the 64-bit boot protocol (zero page in RSI, long mode).
    case linux64
    /// Always PVH; fails when the kernel has no PVH note.
    case pvh
}

/// The limits a Linux kernel puts on its command line and initrd.
struct LinuxLimits {
    /// Longest command line in bytes, without the NUL.
    var cmdlineMax: UInt64
    /// Highest address the initrd's last byte may occupy.
    var initrdAddrMax: UInt64

    /// `COMMAND_LINE_SIZE` on x86 is 2048 including the NUL; a vmlinux has no header to
    /// say otherwise. 0x7FFFFFFF is what every x86-64 bzImage declares as initrd_addr_max.
    static let vmlinux = LinuxLimits(cmdlineMax: 2047, initrdAddrMax: 0x7FFF_FFFF)

    init(cmdlineMax: UInt64, initrdAddrMax: UInt64) {
        self.cmdlineMax = cmdlineMax; self.initrdAddrMax = initrdAddrMax
    }

    init(_ header: SetupHeader) {
        cmdlineMax = UInt64(header.cmdlineSize)
        // Before 2.03 the field did not exist and the limit was 0x37FFFFFF.
        initrdAddrMax = header.initrdAddrMax == 0 ? 0x37FF_FFFF : UInt64(header.initrdAddrMax)
    }
}

/// Loads Linux: a bzImage through the 64-bit boot protocol (zero page), or an ELF vmlinux
/// (also the one decompressed on the host from a bzImage) through PVH or the 64-bit
/// entry. Writes the kernel, zero page or `hvm_start_info`, e820 map, command line,
/// initrd, GDT and page tables into guest memory, and returns the entry state.
public enum LinuxLoader {
    /// boot_params offsets (`arch/x86/include/uapi/asm/bootparam.h`).
    enum ZeroPage {
        static let size = 4096
        static let acpiRSDPAddress = 0x070
        static let extRamdiskImage = 0x0C0
        static let extRamdiskSize = 0x0C4
        static let extCmdLinePtr = 0x0C8
        static let e820Entries = 0x1E8
        static let typeOfLoader = 0x210
        static let loadflags = 0x211
        static let code32Start = 0x214
        static let ramdiskImage = 0x218
        static let ramdiskSize = 0x21C
        static let cmdLinePtr = 0x228
        static let e820Table = 0x2D0
        static let e820MaxEntries = 128
    }

    /// `hvm_start_info` magic (`xen/include/public/arch-x86/hvm/start_info.h`).
    public static let pvhMagic: UInt32 = 0x336E_C578

    // MARK: bzImage

    /// Loads a bzImage as is: the guest runs its own decompressor. The protected-mode
    /// kernel goes to `pref_address` (relocatable kernels, when it fits) or 0x100000;
    /// entry is its start + 0x200 in long mode with RSI = zero page.
    static func loadBzImage(_ bytes: [UInt8], header: SetupHeader, memory: GuestMemory,
                            options: BootOptions, rsdp: GuestAddress?) throws(BootError) -> LoadedKernel {
        let limits = LinuxLimits(header)
        try checkCmdline(options.cmdline, limits)
        let size = header.protectedModeSize
        let needed = max(UInt64(header.initSize), size)
        let alignment = header.relocatable ? max(UInt64(header.kernelAlignment), 1) : 1
        let lowEnd = memory.lowRAMEnd
        var load: UInt64 = BootLayout.highMemory
        if header.relocatable {
            let preferred = header.prefAddress
            if preferred >= BootLayout.highMemory, preferred % alignment == 0,
               preferred <= lowEnd, needed <= lowEnd - preferred {
                load = preferred
            } else {
                load = alignUp(BootLayout.highMemory, alignment) ?? BootLayout.highMemory
            }
        }
        guard load <= lowEnd, needed <= lowEnd - load else {
            throw .kernelTooLarge(needed: needed, available: lowEnd > load ? lowEnd - load : 0)
        }
        // The decompressor works in [max(align_up(load), pref_address), + init_size).
        let workStart = header.relocatable ? max(alignUp(load, alignment) ?? UInt64.max, header.prefAddress) : load
        let (workEnd, overflow) = workStart.addingReportingOverflow(UInt64(header.initSize))
        let kernelEnd = max(load + size, overflow ? UInt64.max : workEnd)
        guard kernelEnd <= lowEnd else {
            throw .kernelTooLarge(needed: kernelEnd - load, available: lowEnd - load)
        }
        try memory.copy(bytes, offset: header.protectedModeOffset, length: Int(size), to: load, what: "the protected-mode kernel")
        let initrd = try placeInitrd(options.initrd, after: kernelEnd, limits: limits, memory: memory)
        let cmdline = try writeCmdline(options.cmdline, memory: memory)
        var zeroPage = [UInt8](repeating: 0, count: ZeroPage.size)
        zeroPage.put(bytes: header.rawHeader, at: SetupHeader.setupSectsOffset)
        zeroPage.putLE(UInt32(truncatingIfNeeded: load), at: ZeroPage.code32Start)
        try finishZeroPage(&zeroPage, memory: memory, cmdline: cmdline, initrd: initrd, rsdp: rsdp,
                               reserved: options.reservedRanges)
        let entry = try X86Tables.longModeEntry(memory, rip: load + 0x200)
        return LoadedKernel(entry: withZeroPage(entry), format: .bzImage, bootProtocol: .linux64,
                            kernelStart: load, kernelEnd: kernelEnd, initrd: initrd, cmdline: cmdline,
                            rsdp: rsdp, decompressedOnHost: nil)
    }

    // MARK: vmlinux

    /// Loads an ELF vmlinux at its physical addresses and enters it through PVH or the
    /// 64-bit protocol as `options.linuxEntry` asks. `header` is the bzImage's setup
    /// header when the ELF came out of one (host decompression): its limits apply and it
    /// is copied into the zero page.
    static func loadVmlinux(_ bytes: [UInt8], elf: ELFImage, header: SetupHeader?, memory: GuestMemory,
                            options: BootOptions, rsdp: GuestAddress?,
                            format: KernelFormat) throws(BootError) -> LoadedKernel {
        var limits = header.map(LinuxLimits.init) ?? .vmlinux
        let usePVH: Bool
        switch options.linuxEntry {
        case .automatic: usePVH = elf.pvhEntry != nil
        case .linux64: usePVH = false
        case .pvh:
            guard elf.pvhEntry != nil else {
                throw .unsupportedELF("PVH entry requested but the kernel has no XEN_ELFNOTE_PHYS32_ENTRY note")
            }
            usePVH = true
        }
        if !usePVH && elf.elfClass == .elf32 {
            throw .unsupportedELF("a 32-bit ELF kernel needs a PVH note or a multiboot header")
        }
        if usePVH && header == nil { limits.initrdAddrMax = 0xFFFF_FFFF }
        try checkCmdline(options.cmdline, limits)
        let (start, end) = try loadSegments(bytes, elf: elf, memory: memory)
        let initrd = try placeInitrd(options.initrd, after: end, limits: limits, memory: memory)
        let cmdline = try writeCmdline(options.cmdline, memory: memory)
        let entry: EntryState
        if usePVH, let pvh = elf.pvhEntry {
            try writeStartInfo(memory: memory, cmdline: cmdline, initrd: initrd, rsdp: rsdp,
                               reserved: options.reservedRanges)
            var state = try X86Tables.protectedModeEntry(memory, rip: UInt64(pvh))
            state.rbx = BootLayout.pvhStartInfo
            state.rsp = BootLayout.stackTop
            entry = state
        } else {
            var zeroPage = [UInt8](repeating: 0, count: ZeroPage.size)
            if let header {
                zeroPage.put(bytes: header.rawHeader, at: SetupHeader.setupSectsOffset)
            } else {
                zeroPage.putLE(SetupHeader.bootFlag, at: SetupHeader.bootFlagOffset)
                zeroPage.putLE(SetupHeader.magic, at: SetupHeader.magicOffset)
                zeroPage.putLE(UInt16(0x020F), at: SetupHeader.versionOffset)
                zeroPage[ZeroPage.loadflags] = SetupHeader.loadedHigh
                zeroPage.putLE(UInt32(0x7FFF_FFFF), at: SetupHeader.initrdAddrMaxOffset)
                zeroPage.putLE(UInt32(0x0100_0000), at: SetupHeader.kernelAlignmentOffset)
                zeroPage[SetupHeader.relocatableOffset] = 1
                zeroPage.putLE(SetupHeader.xlfKernel64, at: SetupHeader.xloadflagsOffset)
                zeroPage.putLE(UInt32(limits.cmdlineMax), at: SetupHeader.cmdlineSizeOffset)
            }
            zeroPage.putLE(UInt32(truncatingIfNeeded: start), at: ZeroPage.code32Start)
            try finishZeroPage(&zeroPage, memory: memory, cmdline: cmdline, initrd: initrd, rsdp: rsdp,
                               reserved: options.reservedRanges)
            entry = withZeroPage(try X86Tables.longModeEntry(memory, rip: elf.physicalAddress(ofVirtual: elf.entry)))
        }
        return LoadedKernel(entry: entry, format: format, bootProtocol: usePVH ? .pvh : .linux64,
                            kernelStart: start, kernelEnd: end, initrd: initrd, cmdline: cmdline,
                            rsdp: rsdp, decompressedOnHost: nil)
    }

    /// Copies every PT_LOAD segment to its physical address and zeroes its BSS part.
    /// Returns the lowest and highest (exclusive) physical address used.
    /// Guest memory a loader writes its own structures into, which no kernel segment may
    /// overlap: for Linux everything below 1 MiB (GDT, page tables, zero page, start info,
    /// command line, firmware tables).
    static let linuxReserved: [(range: Range<UInt64>, what: String)] = [
        (0..<BootLayout.highMemory, "below 1 MiB, where the boot structures live"),
    ]

    static func loadSegments(_ bytes: [UInt8], elf: ELFImage, memory: GuestMemory,
                             reserved: [(range: Range<UInt64>, what: String)] = linuxReserved) throws(BootError) -> (UInt64, UInt64) {
        var start = UInt64.max, end: UInt64 = 0
        for (index, segment) in elf.loadSegments.enumerated() {
            let what = "ELF segment \(index)"
            guard memory.contains(segment.physicalAddress, count: segment.memorySize) else {
                throw .segmentOutsideMemory(what: what, address: segment.physicalAddress, size: segment.memorySize)
            }
            // contains() rules out overflow, so the segment's range is well formed.
            let segmentRange = segment.physicalAddress..<(segment.physicalAddress + segment.memorySize)
            if let clash = reserved.first(where: { $0.range.overlaps(segmentRange) }) {
                throw .segmentOutsideMemory(what: what + " (\(clash.what))",
                                            address: segment.physicalAddress, size: segment.memorySize)
            }
            // ELFImage checked offset + filesz against the file and filesz <= memsz.
            try memory.copy(bytes, offset: Int(segment.offset), length: Int(segment.fileSize),
                            to: segment.physicalAddress, what: what)
            try memory.zeroRange(at: segment.physicalAddress + segment.fileSize,
                                 count: segment.memorySize - segment.fileSize, what: what)
            start = min(start, segment.physicalAddress)
            end = max(end, segment.physicalAddress + segment.memorySize)
        }
        return (start, end)
    }

    // MARK: Shared pieces

    static func checkCmdline(_ cmdline: String, _ limits: LinuxLimits) throws(BootError) {
        let length = cmdline.utf8.count
        guard !cmdline.utf8.contains(0) else { throw .cmdlineContainsNUL }
        let maximum = min(limits.cmdlineMax, BootLayout.cmdlineCapacity - 1)
        guard UInt64(length) <= maximum else { throw .cmdlineTooLong(length: length, maximum: maximum) }
    }

    /// Writes the NUL-terminated command line at ``BootLayout/cmdline``.
    static func writeCmdline(_ cmdline: String, memory: GuestMemory) throws(BootError) -> GuestAddress {
        try memory.put(Array(cmdline.utf8) + [0], at: BootLayout.cmdline, what: "the command line")
        return BootLayout.cmdline
    }

    /// Places the initrd page-aligned as high as allowed: below min(initrd_addr_max + 1,
    /// end of RAM below 4 GiB) and above `kernelEnd`.
    static func placeInitrd(_ initrd: [UInt8]?, after kernelEnd: UInt64, limits: LinuxLimits,
                            memory: GuestMemory) throws(BootError) -> InitrdPlacement? {
        guard let initrd, !initrd.isEmpty else { return nil }
        let size = UInt64(initrd.count)
        let top = min(limits.initrdAddrMax &+ 1 == 0 ? UInt64(1) << 32 : limits.initrdAddrMax + 1, memory.lowRAMEnd)
        let bottom = alignUp(kernelEnd, 4096) ?? UInt64.max
        let available = top > bottom ? top - bottom : 0
        guard size <= available else {
            throw .initrdTooLarge(size: size, available: available, limit: limits.initrdAddrMax)
        }
        let address = alignDown(top - size, 4096)
        try memory.copy(initrd, offset: 0, length: initrd.count, to: address, what: "the initrd")
        return InitrdPlacement(address: address, size: size)
    }

    /// Fills the loader-owned fields of a zero page and writes it at ``BootLayout/zeroPage``.
    static func finishZeroPage(_ page: inout [UInt8], memory: GuestMemory, cmdline: GuestAddress,
                               initrd: InitrdPlacement?, rsdp: GuestAddress?, reserved: [Range<UInt64>] = []) throws(BootError) {
        page[ZeroPage.typeOfLoader] = 0xFF
        page[ZeroPage.loadflags] |= SetupHeader.loadedHigh
        page.putLE(UInt32(truncatingIfNeeded: cmdline), at: ZeroPage.cmdLinePtr)
        page.putLE(UInt32(truncatingIfNeeded: cmdline >> 32), at: ZeroPage.extCmdLinePtr)
        if let initrd {
            page.putLE(UInt32(truncatingIfNeeded: initrd.address), at: ZeroPage.ramdiskImage)
            page.putLE(UInt32(truncatingIfNeeded: initrd.size), at: ZeroPage.ramdiskSize)
            page.putLE(UInt32(truncatingIfNeeded: initrd.address >> 32), at: ZeroPage.extRamdiskImage)
            page.putLE(UInt32(truncatingIfNeeded: initrd.size >> 32), at: ZeroPage.extRamdiskSize)
        }
        if let rsdp { page.putLE(rsdp, at: ZeroPage.acpiRSDPAddress) }
        let map = E820Map.build(for: memory, reserving: reserved).prefix(ZeroPage.e820MaxEntries)
        page[ZeroPage.e820Entries] = UInt8(map.count)
        for (index, entry) in map.enumerated() {
            let offset = ZeroPage.e820Table + index * 20
            page.putLE(entry.address, at: offset)
            page.putLE(entry.size, at: offset + 8)
            page.putLE(entry.kind.rawValue, at: offset + 16)
        }
        try memory.put(page, at: BootLayout.zeroPage, what: "the zero page")
    }

    static func withZeroPage(_ state: EntryState) -> EntryState {
        var state = state
        state.rsi = BootLayout.zeroPage
        return state
    }

    /// Writes `hvm_start_info` (version 1, with the memory map), its module list (the
    /// initrd) and memory map at their ``BootLayout`` addresses.
    static func writeStartInfo(memory: GuestMemory, cmdline: GuestAddress, initrd: InitrdPlacement?,
                               rsdp: GuestAddress?, reserved: [Range<UInt64>] = []) throws(BootError) {
        let map = E820Map.build(for: memory, reserving: reserved)
        var info = [UInt8](repeating: 0, count: 56)
        info.putLE(pvhMagic, at: 0)
        info.putLE(UInt32(1), at: 4)                       // version
        info.putLE(UInt32(0), at: 8)                       // flags
        info.putLE(UInt32(initrd == nil ? 0 : 1), at: 12)  // nr_modules
        info.putLE(initrd == nil ? UInt64(0) : BootLayout.pvhModules, at: 16)
        info.putLE(cmdline, at: 24)
        info.putLE(rsdp ?? 0, at: 32)
        info.putLE(BootLayout.pvhMemoryMap, at: 40)
        info.putLE(UInt32(map.count), at: 48)
        try memory.put(info, at: BootLayout.pvhStartInfo, what: "the PVH start info")
        if let initrd {
            var module = [UInt8](repeating: 0, count: 32)
            module.putLE(initrd.address, at: 0)
            module.putLE(initrd.size, at: 8)
            try memory.put(module, at: BootLayout.pvhModules, what: "the PVH module list")
        }
        var table = [UInt8](repeating: 0, count: map.count * 24)
        for (index, entry) in map.enumerated() {
            table.putLE(entry.address, at: index * 24)
            table.putLE(entry.size, at: index * 24 + 8)
            table.putLE(entry.kind.rawValue, at: index * 24 + 16)
        }
        try memory.put(table, at: BootLayout.pvhMemoryMap, what: "the PVH memory map")
    }
}
