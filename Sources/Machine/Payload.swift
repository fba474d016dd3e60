import Basics
import Boot
import Memory

/// What a machine boots, read into host memory: a flat binary, or a kernel with its
/// initrd and the options for its boot protocol. It lives only between reading the files
/// and copying them into guest RAM.
struct Payload {
    /// Bytes of a kernel file enough to tell its format: a bzImage's setup header, an ELF
    /// header, and a Multiboot header (within the first 8 KiB).
    static let headerBytes = 8192 + 64

    enum Content {
        case flat([UInt8])
        case kernel([UInt8], BootOptions)
    }

    let content: Content
    /// The kernel's format (nil for a flat binary).
    let format: KernelFormat?

    var isMultiboot: Bool { format == .multiboot }

    /// Reads what `boot` names. A kernel file's header is checked before the rest is
    /// read, so a file that is not a kernel (even a huge one) is refused at once; a file
    /// larger than guest RAM cannot be loaded and is refused without being read.
    /// - Parameters:
    ///   - platform: the devices the firmware tables announce (virtio-mmio devices, the
    ///     PCI host bridge).
    ///   - mmioCommandLine: the `virtio_mmio.device=` words for the virtio-mmio devices.
    ///     A Multiboot kernel gets them (it reads no ACPI); a Linux kernel finds the
    ///     devices in the DSDT and gets the words only with `acpi=off` on its command
    ///     line, since a device announced both ways is registered twice by Linux (the
    ///     second registration fails to claim the registers).
    static func read(_ boot: BootSource, memorySize: UInt64, cpuCount: Int, platform: PlatformDevices = .none,
                     mmioCommandLine: [String] = []) throws(MachineError) -> Payload {
        switch boot {
        case .snapshot, .incoming:
            throw .load("a snapshot or a migrated VM is restored, not loaded as a payload")
        case let .flat(source):
            return Payload(content: .flat(try bytes(of: source, purpose: "flat binary", limit: memorySize)), format: nil)
        case let .kernel(kernel):
            var format = KernelFormat.unknown
            let bytes = try Self.bytes(of: kernel.kernel, purpose: "kernel", limit: memorySize) { (header) throws(MachineError) in
                format = KernelImage.detect(header)
                guard format != .unknown else {
                    throw .load("'\(kernel.kernel.name)' is not a kernel Swiftlet can boot: no bzImage header, ELF magic or Multiboot header found")
                }
            }
            let initrd = try kernel.initrd.map { (source) throws(MachineError) in try Self.bytes(of: source, purpose: "initrd", limit: memorySize) }
            let isLinux = format == .bzImage || format == .elf64 || format == .elf32
            // A Multiboot loader passes the kernel's name first, then the arguments, as GRUB
            // and QEMU do; kvm-unit-tests reads its argv that way.
            let given = format == .multiboot
                ? [kernel.kernel.name] + (kernel.commandLine.map { [$0] } ?? [])
                : [kernel.commandLine ?? (isLinux ? MachineConfiguration.defaultLinuxCommandLine : "")]
            let acpiOff = given.contains { $0.split(separator: " ").contains("acpi=off") }
            let extra = format == .multiboot || acpiOff ? mmioCommandLine : []
            let commandLine = (given + extra).filter { !$0.isEmpty }.joined(separator: " ")
            let options = BootOptions(cmdline: commandLine, initrd: initrd, cpuCount: cpuCount,
                                      decompressOnHost: kernel.decompressOnHost, linuxEntry: kernel.linuxEntry,
                                      platformDevices: platform)
            return Payload(content: .kernel(bytes, options), format: format)
        }
    }

    /// Copies the payload into guest RAM; returns the boot vCPU's entry state and a line
    /// saying what was loaded.
    func load(into memory: GuestMemory) throws(MachineError) -> (EntryState, String) {
        switch content {
        case let .flat(bytes):
            do {
                return (try FlatBinary.load(bytes, into: memory), "flat binary, \(bytes.count) bytes at 0x7c00, real mode")
            } catch { throw .load(error.description) }
        case let .kernel(bytes, options):
            do {
                let loaded = try KernelImage.load(bytes, into: memory, options: options)
                return (loaded.entry, loaded.summary)
            } catch {
                throw .load(error.description)
            }
        }
    }

    private static func bytes(of source: ImageSource, purpose: String, limit: UInt64,
                              check: (([UInt8]) throws(MachineError) -> Void)? = nil) throws(MachineError) -> [UInt8] {
        switch source {
        case let .bytes(bytes, _):
            if let check { try check(Array(bytes.prefix(headerBytes))) }
            return bytes
        case let .file(path):
            do {
                return try HostFile.read(path, purpose: purpose, maximumSize: limit, headerBytes: headerBytes,
                                         headerCheck: check.map { check in { header in try check(header) } },
                                         tooLarge: "it is larger than the guest's RAM (\(ByteSize.exact(limit)))")
            } catch let error as HostFileError {
                throw MachineError(error)
            } catch let error as MachineError {
                throw error
            } catch {
                throw .load("\(error)")
            }
        }
    }
}
