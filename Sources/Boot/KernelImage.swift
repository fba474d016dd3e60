import Basics
import Layout
import Memory

/// What a kernel file is, decided from its content (never from its name).
public enum KernelFormat: String, Sendable, Equatable, CustomStringConvertible {
    /// A Linux bzImage (setup header with "HdrS").
    case bzImage
    /// A 64-bit ELF without a multiboot header: a Linux vmlinux.
    case elf64
    /// A 32-bit ELF without a multiboot header (bootable only through a PVH note).
    case elf32
    /// A kernel with a Multiboot v1 header (ELF32, ELF64 or an a.out-kludge image).
    case multiboot
    /// Anything else.
    case unknown

    public var description: String { rawValue }
}

/// How the boot vCPU enters the kernel.
public enum BootProtocol: String, Sendable, Equatable {
    /// Linux 64-bit boot protocol: long mode, RSI = zero page.
    case linux64
    /// Xen PVH: 32-bit protected mode, paging off, EBX = hvm_start_info.
    case pvh
    /// Multiboot v1: 32-bit protected mode, EAX = 0x2BADB002, EBX = multiboot info.
    case multiboot
}

/// Where an initrd (or Multiboot module 0) was placed.
public struct InitrdPlacement: Sendable, Equatable {
    public var address: GuestAddress
    public var size: UInt64
}

/// What the machine asks of a kernel load: the `run` options that concern booting.
public struct BootOptions: Sendable {
    /// The kernel command line (`--cmdline`).
    public var cmdline: String
    /// The initrd's bytes (`--initrd`); module 0 for a Multiboot kernel.
    public var initrd: [UInt8]?
    /// vCPUs, for the MP table and the ACPI MADT.
    public var cpuCount: Int
    /// Decompress a bzImage's payload on the host and enter the vmlinux inside
    /// (`--decompress-on-host`). Falls back to the guest decompressor when the payload's
    /// compression is not one Swiftlet decodes.
    public var decompressOnHost: Bool
    /// Entry point choice for a Linux ELF (also a host-decompressed bzImage).
    public var linuxEntry: LinuxEntry
    /// Write the MP table and ACPI tables (RSDP, XSDT, RSDT, MADT, FADT, DSDT, MCFG).
    public var firmwareTables: Bool
    /// The virtio-mmio devices and the PCI host bridge the firmware tables announce.
    public var platformDevices: PlatformDevices

    public init(cmdline: String = "", initrd: [UInt8]? = nil, cpuCount: Int = 1, decompressOnHost: Bool = true,
                linuxEntry: LinuxEntry = .automatic, firmwareTables: Bool = true, platformDevices: PlatformDevices = .none) {
        self.cmdline = cmdline; self.initrd = initrd; self.cpuCount = cpuCount
        self.decompressOnHost = decompressOnHost; self.linuxEntry = linuxEntry; self.firmwareTables = firmwareTables
        self.platformDevices = platformDevices
    }
}

extension BootOptions {
    /// Ranges the memory map reserves besides the BIOS area: the PCI ECAM, when the
    /// firmware tables announce a PCI host bridge. Linux uses the MCFG's ECAM from its
    /// early PCI setup on only when the e820 map reserves it, as PC firmware does.
    var reservedRanges: [Range<UInt64>] {
        guard firmwareTables, let pci = platformDevices.pci else { return [] }
        return [pci.ecamRange]
    }
}

/// The result of loading a kernel: the boot vCPU's entry state plus where everything
/// went, for logging and tests.
public struct LoadedKernel: Sendable, Equatable {
    public var entry: EntryState
    public var format: KernelFormat
    public var bootProtocol: BootProtocol
    /// Guest-physical range the kernel occupies (or may use while it decompresses).
    public var kernelStart: GuestAddress
    public var kernelEnd: GuestAddress
    public var initrd: InitrdPlacement?
    public var cmdline: GuestAddress
    /// The ACPI RSDP, when firmware tables were written.
    public var rsdp: GuestAddress?
    /// The payload compression when a bzImage was decompressed on the host.
    public var decompressedOnHost: PayloadDecompressor.Format?

    /// One line for the log: "bzImage via linux64, kernel 0x1000000-0x..., initrd ...".
    public var summary: String {
        var text = "\(format) kernel via \(bootProtocol.rawValue) entry at \(Hex.prefixed(entry.rip)), "
            + "kernel \(Hex.prefixed(kernelStart))-\(Hex.prefixed(kernelEnd))"
        if let decompressedOnHost { text += " (\(decompressedOnHost.rawValue) payload decompressed on the host)" }
        if let initrd { text += ", initrd \(Hex.prefixed(initrd.address))+\(initrd.size)" }
        return text
    }
}

/// Detects a kernel's format and loads it with the matching boot protocol.
public enum KernelImage {
    /// Classifies `bytes`: bzImage, then multiboot (the header wins over ELF), then ELF
    /// by class.
    public static func detect(_ bytes: [UInt8]) -> KernelFormat {
        if SetupHeader.matches(bytes) { return .bzImage }
        if (try? MultibootHeader.find(in: bytes)) != nil { return .multiboot }
        if ELFImage.hasMagic(bytes), bytes.count > 4 {
            if bytes[4] == 2 { return .elf64 }
            if bytes[4] == 1 { return .elf32 }
        }
        return .unknown
    }

    /// Loads `bytes` into `memory` as `options` ask and returns the entry state. Every
    /// check (format, header, sizes, placement) happens here, before any vCPU exists;
    /// on error guest memory may hold partial writes and must not be run.
    public static func load(_ bytes: [UInt8], into memory: GuestMemory, options: BootOptions) throws(BootError) -> LoadedKernel {
        guard !bytes.isEmpty else { throw .emptyKernel }
        guard memory.lowRAMEnd >= BootLayout.minimumMemory else {
            throw .memoryTooSmall(needed: BootLayout.minimumMemory, available: memory.lowRAMEnd)
        }
        guard options.cpuCount >= 1, options.cpuCount <= FirmwareTables.maximumCPUs else {
            throw .tooManyCPUs(options.cpuCount, maximum: FirmwareTables.maximumCPUs)
        }
        if SetupHeader.matches(bytes) {
            let header = try SetupHeader(bytes)
            return try loadBzImage(bytes, header: header, memory: memory, options: options)
        }
        if let multiboot = try MultibootHeader.find(in: bytes) {
            let elf = ELFImage.hasMagic(bytes) && !multiboot.usesAddressFields ? try ELFImage(bytes) : nil
            let rsdp = try writeFirmware(memory, options)
            var loaded = try MultibootLoader.load(bytes, header: multiboot, elf: elf, memory: memory, options: options)
            loaded.rsdp = rsdp
            return loaded
        }
        if ELFImage.hasMagic(bytes) {
            let elf = try ELFImage(bytes)
            let rsdp = try writeFirmware(memory, options)
            return try LinuxLoader.loadVmlinux(bytes, elf: elf, header: nil, memory: memory, options: options,
                                               rsdp: rsdp, format: elf.elfClass == .elf64 ? .elf64 : .elf32)
        }
        throw .notAKernel(reason: "no bzImage header, ELF magic or multiboot header found")
    }

    static func loadBzImage(_ bytes: [UInt8], header: SetupHeader, memory: GuestMemory,
                            options: BootOptions) throws(BootError) -> LoadedKernel {
        if options.decompressOnHost {
            let payload = header.payload(of: bytes)
            if let format = PayloadDecompressor.detect(payload),
               [.gzip, .xz, .lz4, .zstd].contains(format) {
                // init_size bounds what the kernel itself decompresses into; leave a margin
                // for the ELF headers and the relocation table appended to vmlinux.bin.
                let limit = min(max(Int(header.initSize), 16 << 20) + (16 << 20), 1 << 30)
                let (_, vmlinux) = try PayloadDecompressor.decompress(payload, limit: limit)
                let elf: ELFImage
                do { elf = try ELFImage(vmlinux) } catch {
                    throw .decompressionFailed(format: format.rawValue, reason: "the payload is not an ELF vmlinux (\(error))")
                }
                let rsdp = try writeFirmware(memory, options)
                var loaded = try LinuxLoader.loadVmlinux(vmlinux, elf: elf, header: header, memory: memory,
                                                         options: options, rsdp: rsdp, format: .bzImage)
                loaded.decompressedOnHost = format
                return loaded
            }
        }
        let rsdp = try writeFirmware(memory, options)
        return try LinuxLoader.loadBzImage(bytes, header: header, memory: memory, options: options, rsdp: rsdp)
    }

    static func writeFirmware(_ memory: GuestMemory, _ options: BootOptions) throws(BootError) -> GuestAddress? {
        guard options.firmwareTables else { return nil }
        return try FirmwareTables.write(into: memory, cpuCount: options.cpuCount, devices: options.platformDevices)
    }
}
