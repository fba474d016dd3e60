import ArgumentParser
import Boot
import Devices
import Glibc
import Machine
import Memory

/// `swiftlet run`: builds a VM from the options and runs it to the end.
struct RunCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "run",
        abstract: "Boot a guest in a new virtual machine.",
        discussion: """
            WHAT TO BOOT
              With neither --kernel nor --flat, Swiftlet boots its built-in guest: the \
            real-mode hello program from guests/hello-real.s.
              --kernel FILE boots a kernel; its format is read from the file, not its \
            name: a Linux bzImage (64-bit boot protocol; its compressed payload is \
            unpacked on the host unless --no-decompress-on-host), a Linux vmlinux ELF \
            (through its PVH entry note when it has one, else the 64-bit entry), or a \
            Multiboot kernel such as a kvm-unit-tests x86/*.flat test. --initrd becomes \
            the Linux initrd or Multiboot module 0. See docs/booting.md.
              --flat FILE loads raw machine code at guest-physical address 0x7C00 and \
            starts the CPU there in 16-bit real mode, like a PC BIOS starts a boot \
            sector (CS:IP = 0000:7C00, SP = 0x7C00, other registers zero, no BIOS \
            services). See guests/README.md.

            DEVICES
              COM1 16550A UART at port 0x3F8, IRQ 4: guest output goes to stdout (or \
            --serial file:PATH); your typing goes to the guest. When stdin is a \
            terminal it is switched to raw mode. Press Ctrl-A then x to quit.
              Exit port 0xF4 (like QEMU's isa-debug-exit): the guest writes V and \
            Swiftlet exits with status (V << 1) | 1.
              Interrupt controllers (PIC, IOAPIC, local APICs) and the PIT timer run \
            inside the host kernel (KVM_CREATE_IRQCHIP, KVM_CREATE_PIT2).

            EXIT STATUS
              (V << 1) | 1  the guest wrote V to port 0xF4
              0             the guest reset or powered off, or you quit with Ctrl-A x
              1             Swiftlet could not build or run the VM (message on stderr)
              2             the command line is wrong
              4             the guest crashed: triple fault, or an exit KVM could not \
            handle (reason and registers on stderr)
              124           --timeout elapsed
              130, 143      interrupted by SIGINT, SIGTERM

            EXAMPLES
              swiftlet run
              swiftlet run --flat guests/build/long-mode.bin --trace-exits
              swiftlet run --flat guest.bin --memory 1G --timeout 10 --serial file:out.txt
              swiftlet run --kernel vmlinuz --initrd initrd.img --memory 1G --cpus 2
              swiftlet run --kernel x86/smptest.flat --cpus 2      (kvm-unit-tests)
            """
    )

    @Option(name: .long, help: ArgumentHelp("A flat binary to load at 0x7C00 and start in real mode.", valueName: "file"))
    var flat: String?

    @Option(name: .long, help: ArgumentHelp("A kernel to boot: bzImage, vmlinux or Multiboot ELF (detected from the content).", valueName: "file"))
    var kernel: String?

    @Option(name: .long, help: ArgumentHelp("An initrd (Linux) or module 0 (Multiboot) to load with --kernel.", valueName: "file"))
    var initrd: String?

    @Option(name: .long, parsing: .unconditional,
            help: ArgumentHelp("The kernel command line (may start with '-'). For Linux the default is '\(RunCommand.defaultLinuxCmdline)'; a Multiboot kernel gets its file name, then this text.", valueName: "text"))
    var cmdline: String?

    @Flag(name: .long, inversion: .prefixedNo, help: "Unpack a compressed bzImage on the host and enter the vmlinux inside, skipping the kernel's own decompressor.")
    var decompressOnHost = true

    @Option(name: .customLong("linux-entry"), help: ArgumentHelp("How to enter a Linux ELF: auto (PVH when the kernel has the note), linux64 or pvh.", valueName: "entry"))
    var linuxEntry: LinuxEntryArgument = .automatic

    @Option(name: [.short, .long], help: ArgumentHelp("Guest RAM, like 64M, 1G or 1536M (a bare number means MiB).", valueName: "size"))
    var memory: MemorySizeArgument = MemorySizeArgument(bytes: 256 << 20)

    @Option(name: .long, help: ArgumentHelp("Number of virtual CPUs.", valueName: "n"))
    var cpus: Int = 1

    @Option(name: .long, help: ArgumentHelp("Where the serial console writes: 'stdio' or 'file:PATH'.", valueName: "target"))
    var serial: SerialTarget = .stdio

    @Option(name: .long, help: ArgumentHelp("Stop the guest after this many seconds (exit status 124).", valueName: "seconds"))
    var timeout: Double?

    @Flag(name: .long, help: "At the end, print a table of VM exits by reason, port and address, with the time spent handling them.")
    var traceExits = false

    @Flag(name: .customLong("no-huge-pages"), help: "Do not ask the host for transparent huge pages for guest RAM.")
    var noHugePages = false

    @Option(name: .customLong("kvm-device"), help: ArgumentHelp("The KVM device to open.", valueName: "path"))
    var kvmDevice: String = "/dev/kvm"

    /// Serial console on COM1, early messages too, reboot through the keyboard
    /// controller, and no waiting after a panic.
    static let defaultLinuxCmdline = "console=ttyS0 earlyprintk=serial reboot=k panic=-1"

    func validate() throws {
        guard cpus >= 1 else { throw ValidationError("--cpus must be at least 1") }
        if kernel != nil && flat != nil { throw ValidationError("--kernel and --flat cannot be used together") }
        if initrd != nil && kernel == nil { throw ValidationError("--initrd needs --kernel") }
        if cmdline != nil && kernel == nil { throw ValidationError("--cmdline needs --kernel") }
        if let timeout, !(timeout > 0) || !timeout.isFinite {
            throw ValidationError("--timeout must be a positive number of seconds")
        }
    }

    func run() throws {
        let payload: Payload
        if let kernel {
            let bytes = try readFile(kernel, what: "kernel")
            let initrdBytes = try initrd.map { try readFile($0, what: "initrd") }
            let format = KernelImage.detect(bytes)
            let isLinux = format == .bzImage || format == .elf64 || format == .elf32
            // A Multiboot loader passes the kernel's file name first, then the arguments,
            // as GRUB and QEMU do; kvm-unit-tests reads its argv that way.
            let commandLine = format == .multiboot
                ? ([kernel] + (cmdline.map { [$0] } ?? [])).joined(separator: " ")
                : cmdline ?? (isLinux ? Self.defaultLinuxCmdline : "")
            let options = BootOptions(cmdline: commandLine,
                                      initrd: initrdBytes, cpuCount: cpus, decompressOnHost: decompressOnHost,
                                      linuxEntry: linuxEntry.entry)
            payload = .kernel(bytes, options)
        } else if let flat {
            payload = .flat(try readFile(flat, what: "flat binary"))
        } else {
            payload = .flat(DefaultGuest.helloReal)
        }

        var configuration = MachineConfiguration(payload: payload)
        configuration.memorySize = memory.bytes
        configuration.cpuCount = cpus
        configuration.timeout = timeout
        configuration.traceExits = traceExits
        configuration.transparentHugePages = !noHugePages
        configuration.kvmPath = kvmDevice
        switch serial {
        case .stdio: break
        case let .file(path):
            do { configuration.serialOutput = try FileDescriptorSink(path: path) } catch { throw Swiftlet.fail(error.description) }
        }

        let machine: Machine
        do {
            machine = try Machine(configuration: configuration)
        } catch {
            throw Swiftlet.fail(error.description)
        }
        let reason = machine.run()
        if traceExits { FileHandleOutput.standardError(machine.exitReport()) }
        switch reason {
        case .fatal, .timeout, .signal:
            FileHandleOutput.standardError("swiftlet: \(reason)")
        default:
            break
        }
        throw ExitCode(reason.exitStatus)
    }

    private func readFile(_ path: String, what: String) throws -> [UInt8] {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { throw Swiftlet.fail("cannot read \(what) '\(path)': \(String(cString: strerror(errno)))") }
        defer { close(fd) }
        var info = stat()
        guard fstat(fd, &info) == 0 else { throw Swiftlet.fail("cannot read \(what) '\(path)': \(String(cString: strerror(errno)))") }
        guard info.st_mode & S_IFMT == S_IFREG else { throw Swiftlet.fail("\(what) '\(path)' is not a regular file") }
        guard info.st_size <= 1 << 32 else { throw Swiftlet.fail("\(what) '\(path)' is larger than 4 GiB") }
        var bytes = [UInt8](repeating: 0, count: Int(info.st_size))
        var offset = 0
        while offset < bytes.count {
            let count = bytes.withUnsafeMutableBytes { pread(fd, $0.baseAddress! + offset, $0.count - offset, off_t(offset)) }
            if count < 0 && errno == EINTR { continue }
            guard count > 0 else { throw Swiftlet.fail("cannot read \(what) '\(path)': \(count < 0 ? String(cString: strerror(errno)) : "file shrank while reading")") }
            offset += count
        }
        return bytes
    }
}

/// `--memory`: a size such as 64M or 1G, checked while the command line is parsed.
struct MemorySizeArgument: ExpressibleByArgument {
    let bytes: UInt64

    init(bytes: UInt64) { self.bytes = bytes }

    init?(argument: String) {
        guard let bytes = try? MemorySize.parse(argument) else { return nil }
        self.bytes = bytes
    }

    var defaultValueDescription: String { MemorySize.format(bytes) }
}

/// `--linux-entry`: which entry point of a Linux ELF to use.
enum LinuxEntryArgument: String, ExpressibleByArgument, CaseIterable {
    case automatic = "auto"
    case linux64
    case pvh

    var entry: LinuxEntry {
        switch self {
        case .automatic: return .automatic
        case .linux64: return .linux64
        case .pvh: return .pvh
        }
    }
}

/// `--serial`: where COM1's output goes.
enum SerialTarget: ExpressibleByArgument {
    case stdio
    case file(String)

    init?(argument: String) {
        if argument == "stdio" {
            self = .stdio
        } else if argument.hasPrefix("file:"), argument.count > 5 {
            self = .file(String(argument.dropFirst(5)))
        } else {
            return nil
        }
    }

    var defaultValueDescription: String { "stdio" }
}
