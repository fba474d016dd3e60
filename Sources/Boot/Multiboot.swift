import Basics
import Layout
import Memory

/// A Multiboot v1 header found in the first 8192 bytes of a kernel file (Multiboot
/// Specification 0.6.96, section 3.1). Owns the decoded fields and the file offset.
public struct MultibootHeader: Sendable, Equatable {
    public static let magic: UInt32 = 0x1BAD_B002
    /// EAX at entry.
    public static let bootloaderMagic: UInt32 = 0x2BAD_B002
    public static let searchLimit = 8192

    /// Flag bits 0-15 are requirements; the loader must refuse unknown ones.
    public static let flagPageAlignModules: UInt32 = 1 << 0
    public static let flagMemoryInfo: UInt32 = 1 << 1
    public static let flagVideoMode: UInt32 = 1 << 2
    /// The "a.out kludge": the address fields below are valid and used for loading.
    public static let flagAddresses: UInt32 = 1 << 16

    /// The header's offset in the file.
    public let offset: Int
    public let flags: UInt32
    public let headerAddress: UInt32
    public let loadAddress: UInt32
    public let loadEndAddress: UInt32
    public let bssEndAddress: UInt32
    public let entryAddress: UInt32

    public var usesAddressFields: Bool { flags & Self.flagAddresses != 0 }

    /// Finds the first 4-byte-aligned magic with a valid checksum in the first 8 KiB.
    /// Returns `nil` when there is none; throws when the header is there but unusable.
    public static func find(in bytes: [UInt8]) throws(BootError) -> MultibootHeader? {
        let limit = min(bytes.count, searchLimit)
        var offset = 0
        while offset + 12 <= limit {
            if bytes.le(UInt32.self, at: offset) == magic,
               let flags = bytes.le(UInt32.self, at: offset + 4),
               let checksum = bytes.le(UInt32.self, at: offset + 8),
               magic &+ flags &+ checksum == 0 {
                return try MultibootHeader(bytes, offset: offset, flags: flags)
            }
            offset += 4
        }
        return nil
    }

    init(_ bytes: [UInt8], offset: Int, flags: UInt32) throws(BootError) {
        self.offset = offset
        self.flags = flags
        let unknown = flags & 0xFFFF & ~(Self.flagPageAlignModules | Self.flagMemoryInfo | Self.flagVideoMode)
        guard unknown == 0 else {
            throw .invalidHeader("multiboot header requires unknown features (flags \(Hex.prefixed(UInt64(flags))))")
        }
        if flags & Self.flagAddresses != 0 {
            guard let header = bytes.le(UInt32.self, at: offset + 12), let load = bytes.le(UInt32.self, at: offset + 16),
                  let loadEnd = bytes.le(UInt32.self, at: offset + 20), let bssEnd = bytes.le(UInt32.self, at: offset + 24),
                  let entry = bytes.le(UInt32.self, at: offset + 28) else {
                throw .truncated(what: "the multiboot address fields", needed: UInt64(offset + 32), available: UInt64(bytes.count))
            }
            headerAddress = header; loadAddress = load; loadEndAddress = loadEnd
            bssEndAddress = bssEnd; entryAddress = entry
        } else {
            headerAddress = 0; loadAddress = 0; loadEndAddress = 0; bssEndAddress = 0; entryAddress = 0
        }
    }
}

/// Loads a Multiboot v1 kernel: an ELF (32- or 64-bit; segments at their physical
/// addresses) or an image described by the header's address fields. Writes the Multiboot
/// information structure (memory sizes, memory map, command line, modules, loader name)
/// and enters in 32-bit protected mode with paging off, EAX = 0x2BADB002 and EBX = the
/// information structure.
public enum MultibootLoader {
    /// Information structure flags.
    static let infoMemory: UInt32 = 1 << 0
    static let infoCmdline: UInt32 = 1 << 2
    static let infoModules: UInt32 = 1 << 3
    static let infoMemoryMap: UInt32 = 1 << 6
    static let infoLoaderName: UInt32 = 1 << 9

    /// Multiboot gives the kernel 32-bit physical addresses only.
    static let addressLimit: UInt64 = 1 << 32

    static func load(_ bytes: [UInt8], header: MultibootHeader, elf: ELFImage?, memory: GuestMemory,
                     options: BootOptions) throws(BootError) -> LoadedKernel {
        guard !options.cmdline.utf8.contains(0) else { throw .cmdlineContainsNUL }
        guard UInt64(options.cmdline.utf8.count) < BootLayout.cmdlineCapacity else {
            throw .cmdlineTooLong(length: options.cmdline.utf8.count, maximum: BootLayout.cmdlineCapacity - 1)
        }
        let start: UInt64, end: UInt64, entry: UInt64
        if header.usesAddressFields {
            (start, end, entry) = try loadImage(bytes, header: header, memory: memory)
        } else if let elf {
            // Multiboot kernels may sit below 1 MiB (kvm-unit-tests' realmode test is
            // linked at 0x8000): only what this loader writes is off limits.
            let cmdlineEnd = BootLayout.cmdline + UInt64(options.cmdline.utf8.count) + 1
            let reserved: [(range: Range<UInt64>, what: String)] = [
                (0..<0x1000, "the first page: real-mode interrupt vectors and the GDT"),
                (BootLayout.multibootInfo..<(BootLayout.multibootInfo + 0x1000), "where the multiboot information goes"),
                (BootLayout.cmdline..<cmdlineEnd, "where the command line goes"),
                (BootLayout.ebda..<BootLayout.highMemory, "the BIOS area holding the firmware tables"),
            ]
            (start, end) = try LinuxLoader.loadSegments(bytes, elf: elf, memory: memory, reserved: reserved)
            entry = elf.physicalAddress(ofVirtual: elf.entry)
        } else {
            throw .invalidHeader("multiboot kernel is not ELF and its header has no address fields (flag 16)")
        }
        guard entry < addressLimit else {
            throw .segmentOutsideMemory(what: "the multiboot entry point", address: entry, size: 1)
        }

        // Module 0 (the initrd) goes page-aligned right above the kernel.
        var module: InitrdPlacement?
        if let initrd = options.initrd, !initrd.isEmpty {
            let address = alignUp(max(end, BootLayout.highMemory), 4096) ?? UInt64.max
            let top = min(memory.lowRAMEnd, addressLimit)
            let available = top > address ? top - address : 0
            guard UInt64(initrd.count) <= available else {
                throw .initrdTooLarge(size: UInt64(initrd.count), available: available, limit: top - 1)
            }
            try memory.copy(initrd, offset: 0, length: initrd.count, to: address, what: "module 0 (the initrd)")
            module = InitrdPlacement(address: address, size: UInt64(initrd.count))
        }
        let cmdline = try LinuxLoader.writeCmdline(options.cmdline, memory: memory)
        try writeInfo(memory: memory, cmdline: cmdline, module: module, reserved: options.reservedRanges)

        var state = try X86Tables.protectedModeEntry(memory, rip: entry)
        state.rax = UInt64(MultibootHeader.bootloaderMagic)
        state.rbx = BootLayout.multibootInfo
        return LoadedKernel(entry: state, format: .multiboot, bootProtocol: .multiboot,
                            kernelStart: start, kernelEnd: end, initrd: module, cmdline: cmdline,
                            rsdp: nil, decompressedOnHost: nil)
    }

    /// Loads the image the address fields describe: the file from the header's offset
    /// minus (header_addr - load_addr) up to load_end_addr goes to load_addr, and
    /// [load_end_addr, bss_end_addr) is zeroed.
    static func loadImage(_ bytes: [UInt8], header: MultibootHeader,
                          memory: GuestMemory) throws(BootError) -> (UInt64, UInt64, UInt64) {
        let load = UInt64(header.loadAddress)
        guard header.headerAddress >= header.loadAddress else {
            throw .invalidHeader("multiboot header_addr \(Hex.prefixed(UInt64(header.headerAddress))) is below load_addr \(Hex.prefixed(load))")
        }
        let headerDistance = UInt64(header.headerAddress - header.loadAddress)
        guard headerDistance <= UInt64(header.offset) else {
            throw .invalidHeader("multiboot load_addr lies before the start of the file")
        }
        let fileStart = UInt64(header.offset) - headerDistance
        let fileAvailable = UInt64(bytes.count) - fileStart
        let loadSize: UInt64
        if header.loadEndAddress == 0 {
            loadSize = fileAvailable
        } else {
            guard header.loadEndAddress >= header.loadAddress else {
                throw .invalidHeader("multiboot load_end_addr is below load_addr")
            }
            loadSize = UInt64(header.loadEndAddress - header.loadAddress)
            guard loadSize <= fileAvailable else {
                throw .truncated(what: "the multiboot image (load_addr..load_end_addr)",
                                 needed: fileStart + loadSize, available: UInt64(bytes.count))
            }
        }
        let loadEnd = load + loadSize
        var end = loadEnd
        if header.bssEndAddress != 0 {
            guard UInt64(header.bssEndAddress) >= loadEnd else {
                throw .invalidHeader("multiboot bss_end_addr is below the end of the loaded image")
            }
            end = UInt64(header.bssEndAddress)
        }
        guard load >= BootLayout.highMemory else {
            throw .segmentOutsideMemory(what: "the multiboot image (below 1 MiB, where the boot structures live)",
                                        address: load, size: end - load)
        }
        guard memory.contains(load, count: end - load) else {
            throw .segmentOutsideMemory(what: "the multiboot image", address: load, size: end - load)
        }
        try memory.copy(bytes, offset: Int(fileStart), length: Int(loadSize), to: load, what: "the multiboot image")
        try memory.zeroRange(at: loadEnd, count: end - loadEnd, what: "the multiboot BSS")
        return (load, end, UInt64(header.entryAddress))
    }

    /// Writes the information structure and what it points to.
    static func writeInfo(memory: GuestMemory, cmdline: GuestAddress, module: InitrdPlacement?,
                          reserved: [Range<UInt64>] = []) throws(BootError) {
        let map = E820Map.build(for: memory, reserving: reserved).filter { $0.address < addressLimit }
        var info = [UInt8](repeating: 0, count: 128)
        var flags = infoMemory | infoCmdline | infoMemoryMap | infoLoaderName
        // mem_lower: KiB from 0 (at most 640); mem_upper: KiB from 1 MiB to the first hole.
        let lowRAM = map.first { $0.address == 0 && $0.kind == .ram }?.size ?? 0
        let upperRAM = map.first { $0.address == BootLayout.highMemory && $0.kind == .ram }?.size ?? 0
        info.putLE(UInt32(min(lowRAM, 640 * 1024) / 1024), at: 4)
        info.putLE(UInt32(truncatingIfNeeded: upperRAM / 1024), at: 8)
        info.putLE(UInt32(cmdline), at: 16)
        if let module {
            flags |= infoModules
            info.putLE(UInt32(1), at: 20)
            info.putLE(UInt32(BootLayout.multibootModules), at: 24)
            var entry = [UInt8](repeating: 0, count: 16)
            entry.putLE(UInt32(module.address), at: 0)
            entry.putLE(UInt32(module.address + module.size), at: 4)
            // The module's string: an empty one, right after the loader name.
            entry.putLE(UInt32(BootLayout.multibootLoaderName + 16), at: 8)
            try memory.put(entry, at: BootLayout.multibootModules, what: "the multiboot module list")
        }
        var table = [UInt8](repeating: 0, count: map.count * 24)
        for (index, entry) in map.enumerated() {
            let offset = index * 24
            table.putLE(UInt32(20), at: offset)   // size of the rest of the entry
            table.putLE(entry.address, at: offset + 4)
            table.putLE(entry.size, at: offset + 12)
            table.putLE(entry.kind.rawValue, at: offset + 20)
        }
        info.putLE(UInt32(table.count), at: 44)
        info.putLE(UInt32(BootLayout.multibootMemoryMap), at: 48)
        try memory.put(table, at: BootLayout.multibootMemoryMap, what: "the multiboot memory map")
        info.putLE(UInt32(BootLayout.multibootLoaderName), at: 64)
        // "swiftlet" NUL-terminated, then an empty string at +16 for the module's name.
        var name = [UInt8](repeating: 0, count: 32)
        name.put(bytes: "swiftlet".utf8, at: 0)
        try memory.put(name, at: BootLayout.multibootLoaderName, what: "the boot loader name")
        info.putLE(flags, at: 0)
        try memory.put(info, at: BootLayout.multibootInfo, what: "the multiboot information")
    }
}
