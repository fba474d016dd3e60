import ArgumentParser
import Basics
import Glibc
import SwiftletKit

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
              Reset and power-off: the keyboard controller (ports 0x60/0x64), system \
            control port A (0x92), the reset control register (0xCF9) and the ACPI PM1a \
            registers with the PM timer (0x600-0x60B), all described by the ACPI tables \
            a kernel gets.

            DISKS
              --disk PATH[,readonly][,format=raw|qcow2][,serial=TEXT][,queues=N][,bps=RATE]... gives \
            the guest a virtio-blk disk backed by an image file; repeat it for more \
            disks (the first is Linux's /dev/vda). The format is read from the file \
            unless given; qcow2 images with backing files and compressed clusters work. \
            An image opened for writing is locked, as QEMU locks it, so two VMs cannot \
            write one image at once; 'readonly' opens it read-only and the guest cannot \
            change it. A path containing a comma writes it twice (',,').
              Rate limits (Firecracker's token buckets; an I/O over the limit waits, it \
            does not fail): bps=RATE caps the bytes per second read and written (K, M, \
            G are binary: bps=10M is 10 MiB/s), iops=N the requests per second; \
            bps_max=BYTES and iops_max=N set how much may go at full speed after an idle \
            time (the bucket; default one second's worth), bps_burst=BYTES and \
            iops_burst=N an extra one-time burst at the start. Example: --disk \
            root.img,bps=1M,iops=500,bps_burst=64M. See docs/virtio.md.
              --virtio-transport pci (the default) puts virtio devices on a PCI host \
            bridge (ports 0xCF8-0xCFF, ECAM at 0xE0000000), which every stock kernel \
            enumerates by itself; mmio puts them in virtio-mmio slots from 0xFEB00000 \
            (IRQ 5, 6, 7, ...) announced in the ACPI DSDT and on the kernel command line \
            (virtio_mmio.device=, which some distribution kernels, Debian's among them, \
            do not read). See docs/virtio.md.

            NETWORK
              --net tap=NAME[,mac=XX:XX:XX:XX:XX:XX] gives the guest a virtio-net \
            interface backed by the Linux TAP device NAME; repeat it for more interfaces \
            (net0, net1, ... after the disks on the bus). A TAP that exists is opened and \
            left as it is: make one for your user with 'ip tuntap add dev NAME mode tap \
            user $USER' and 'ip link set NAME up'. A missing one is created when Swiftlet \
            may (root or CAP_NET_ADMIN), brought up, and removed again when Swiftlet \
            exits. Without mac=, a random locally administered MAC is generated; each \
            interface's MAC is printed on stderr ('swiftlet: net0: tap0, MAC 02:...'). \
            Checksum and segmentation offloads are negotiated with the TAP, so large \
            transfers are not cut up in software. Frames move in Swiftlet itself (no \
            vhost-net). --trace-exits adds each interface's frame counters, dropped \
            frames among them. Rate limits, as for disks, per direction: rx_bps, \
            rx_pps (frames per second), rx_bps_max, rx_pps_max, rx_bps_burst, \
            rx_pps_burst, and the same with tx_ (what the guest sends). Example: --net \
            tap=tap0,tx_bps=1M,rx_bps=4M. See docs/virtio.md.

            MEMORY SLOTS
              --show-memory prints the memory slots (KVM_SET_USER_MEMORY_REGION: \
            guest-physical range, host address, flags) before the guest starts and, at \
            the end, the guest pages written in each slot, as runs of addresses \
            (KVM_GET_DIRTY_LOG; every slot logs dirty pages). It also gives the guest the \
            memory slot device at ports 0x5A0-0x5A7, with which a guest asks for 2 MiB of \
            RAM at 0xF0000000 and 2 MiB of read-only memory (KVM_MEM_READONLY) at \
            0xF0200000 while it runs, and reads the dirty log. See docs/memory.md and \
            guests/memory-slots.s.

            SNAPSHOTS
              A snapshot is the whole machine on disk: every vCPU's registers, the \
            in-kernel interrupt controllers and timer, every device's state, and guest RAM \
            as a separate memory file (zero pages are holes). --restore DIR continues it \
            where it was taken, in this new process: RAM is mapped from the memory file \
            (MAP_PRIVATE: pages are read when the guest first touches them, and the file is \
            never changed), so a restore does not read all of RAM first. The snapshot \
            decides the machine (RAM, vCPUs, CPU model, disks, network interfaces, \
            transport), so --restore refuses the options that would build another one; the \
            console, --timeout and tracing options apply. A snapshot from a newer Swiftlet, \
            for a CPU feature this host lacks, damaged or truncated, is refused before the \
            guest runs. Disks are not copied: the restored VM continues with the same image \
            files, so restore a snapshot once, or copy the disks with it.
              --track-dirty-pages has KVM log the pages the guest writes from the start \
            (and Swiftlet the pages its devices write), so that a later snapshot can be a \
            diff: only the pages written since the snapshot before, naming that one as its \
            parent. It costs guest time on writes. Take snapshots with the monitor \
            (--monitor) or the API (--api-sock). See docs/lifecycle.md.

            CPU MODEL
              --cpu MODEL[,+feature,-feature...] chooses what the guest sees through \
            CPUID, as QEMU's -cpu. 'host' (the default) is everything this host's KVM \
            offers. x86-64-v1, x86-64-v2, x86-64-v3 and x86-64-v4 are fixed CPUs after \
            the x86-64 psABI levels (v2: SSE4.2, POPCNT; v3: AVX2, BMI, FMA; v4: \
            AVX-512): vendor, family/model/stepping, brand, every feature bit, XSAVE \
            layout and address width are the same on every host, so a guest (and later \
            its snapshot) can move between hosts that support the level.
              Edits apply in order after the model, by /proc/cpuinfo names: +pcid adds, \
            -avx2 removes (with everything that needs it: -xsave removes the AVX family). \
            Swiftlet refuses a model or feature this KVM cannot provide, and an unknown \
            name, with one line and status 2. 'swiftlet cpu' lists models and features; \
            'swiftlet cpu --show MODEL' shows what a vCPU gets here. See docs/booting.md.

            MONITOR AND MIGRATION
              --monitor PATH serves a monitor on the Unix socket PATH while the VM \
            runs: one command per line, one line back ('socat - UNIX-CONNECT:PATH', or \
            'swiftlet monitor PATH COMMAND'). Commands, as in QEMU's monitor: status, \
            stop (pause), cont (resume), snapshot [--diff] DIR (a running VM pauses for it and \
            goes on), migrate unix:PATH|tcp:HOST:PORT, quit, help.
              --incoming unix:PATH|tcp:HOST:PORT starts a migration target: it waits \
            for one source at that address and runs the VM it receives. Give it the \
            source's machine options (--memory, --cpus, --disk, --virtio-transport); \
            --kernel and --flat are not read. A target refuses a VM whose RAM, vCPUs or \
            disks differ, and the source goes on. On the source, 'migrate ADDRESS' on \
            the monitor copies RAM while the guest runs, pauses it for the last pages \
            and the vCPU and device state, and ends with status 0 and a line saying \
            where the VM went once the target runs it. A migration that fails at any \
            step leaves the source running; a target whose source went away exits with \
            status 2. A writable disk image is handed over: the source flushes it and \
            gives up its lock just before the target opens it. Network interfaces \
            cannot be migrated yet. See docs/migration.md.

            FIRECRACKER'S API
              --api-sock PATH serves Firecracker's REST API (HTTP/1.1 on a Unix socket): \
            the VM is configured with PUT /machine-config, /boot-source, /drives/ID, \
            /network-interfaces/ID and started with PUT /actions InstanceStart; PATCH /vm \
            pauses and resumes it, PUT /snapshot/create and /snapshot/load save and restore \
            it. --config-file PATH boots Firecracker's JSON configuration without any call. \
            Run through a symlink named 'firecracker', swiftlet takes Firecracker's own \
            flags. See docs/api.md.

            EXIT STATUS
              A guest's exit value always gives an odd status; everything Swiftlet \
            decides itself is even, so the two cannot be confused.
              (V << 1) | 1  the guest wrote V to port 0xF4 (V = 0 gives 1, the usual \
            "success" of test guests)
              0             the VM migrated to another Swiftlet (the source's status); \
            the guest powered off: ACPI sleep state S5, SLP_EN with \
            SLP_TYP 0 (0x2000) written to PM1a_CNT at port 0x604; or you quit with Ctrl-A x
              2             Swiftlet could not build or run the VM, or the command line \
            is wrong (one line on stderr says why)
              4             the guest crashed: a triple fault (with --triple-fault stop, \
            the default), or an exit KVM could not handle, such as an instruction its \
            emulator fails on that Swiftlet cannot complete (reason, instruction bytes and \
            registers on stderr)
              6             the guest asked for a reset: 0xFE to the keyboard controller \
            (port 0x64); a byte with bit 2 set to the reset control register (port 0xCF9, \
            which the FADT's RESET_REG names with value 0x06); bit 0 of port 0x92 going \
            from 0 to 1; or a triple fault with --triple-fault reset
              8             a Swiftlet thread made a system call its seccomp filter \
            forbids (one line on stderr names the thread and the call); see \
            docs/security.md
              124           --timeout elapsed
              SIGINT, SIGTERM, SIGHUP or SIGQUIT stop the VM cleanly (the terminal is \
            restored), then Swiftlet ends by that same signal: a shell shows 128 + its \
            number (130, 143, 129, 131).
              A reset or power-off prints one line on stderr naming the path; see \
            "Reset and power-off" in docs/booting.md.

            EXAMPLES
              swiftlet run
              swiftlet run --flat guests/build/long-mode.bin --trace-exits
              swiftlet run --flat guest.bin --memory 1G --timeout 10 --serial file:out.txt
              swiftlet run --kernel vmlinuz --initrd initrd.img --memory 1G --cpus 2
              swiftlet run --kernel x86/smptest.flat --cpus 2      (kvm-unit-tests)
              swiftlet run --kernel vmlinux --cpu x86-64-v3,-avx2,+pcid
              swiftlet run --kernel bzImage --disk root.qcow2 --net tap=tap0
              swiftlet run --restore /var/tmp/vm1-snapshot
            """
    )

    @Option(name: .long, help: ArgumentHelp("A flat binary to load at 0x7C00 and start in real mode.", valueName: "file"))
    var flat: String?

    @Option(name: .long, help: ArgumentHelp("A kernel to boot: bzImage, vmlinux or Multiboot ELF (detected from the content).", valueName: "file"))
    var kernel: String?

    @Option(name: .long, help: ArgumentHelp("An initrd (Linux) or module 0 (Multiboot) to load with --kernel.", valueName: "file"))
    var initrd: String?

    @Option(name: .long, parsing: .unconditional,
            help: ArgumentHelp("The kernel command line (may start with '-'). For Linux the default is '\(VMConfiguration.defaultLinuxCommandLine)'; a Multiboot kernel gets its file name, then this text.", valueName: "text"))
    var cmdline: String?

    @Flag(name: .long, inversion: .prefixedNo, help: "Unpack a compressed bzImage on the host and enter the vmlinux inside, skipping the kernel's own decompressor (default: on; --kernel only).")
    var decompressOnHost: Bool?

    @Option(name: .customLong("linux-entry"), help: ArgumentHelp("How to enter a Linux ELF: auto (PVH when the kernel has the note), linux64 or pvh (--kernel only).", valueName: "entry"))
    var linuxEntry: VMConfiguration.LinuxEntry?

    @Option(name: [.short, .long], help: ArgumentHelp("Guest RAM, like 64M, 1G or 1536M (a bare number means MiB; default 256M).", valueName: "size"))
    var memory: MemorySizeArgument?

    @Option(name: .long, help: ArgumentHelp("Number of virtual CPUs (1 to 254; default 1).", valueName: "n"))
    var cpus: Int?

    @Option(name: .long, help: ArgumentHelp("The CPU the guest sees: host (the default), x86-64-v1 ... x86-64-v4, then +feature/-feature edits (see CPU MODEL).", valueName: "model"))
    var cpu: String?

    @Option(name: .long, help: ArgumentHelp("Continue the VM saved in a snapshot (a directory, or its state file) instead of booting one (see SNAPSHOTS).", valueName: "snapshot"))
    var restore: String?

    @Flag(name: .customLong("track-dirty-pages"), help: "Track the guest pages written from the start, so that a snapshot can be a diff over the one before (see SNAPSHOTS).")
    var trackDirtyPages = false

    @Option(name: .long, help: ArgumentHelp("Where the serial console writes: 'stdio' or 'file:PATH' (a regular file or a character device).", valueName: "target"))
    var serial: SerialTarget = .stdio

    @Option(name: .long, help: ArgumentHelp("Stop the guest after this many seconds (exit status 124).", valueName: "seconds"))
    var timeout: Double?

    @Option(name: .customLong("triple-fault"), help: ArgumentHelp("What a triple fault does: stop (a crash, status 4, with the registers) or reset (the guest's reset, status 6, like QEMU's -no-reboot).", valueName: "action"))
    var tripleFault: VMConfiguration.TripleFault?

    @Flag(name: .long, help: "At the end, print a table of VM exits by reason, device and address, with the time spent handling them.")
    var traceExits = false

    @Flag(name: .customLong("show-memory"), help: "Print the memory slots at the start and, at the end, the guest pages written in each (dirty log); give the guest the memory slot device at port 0x5A0 (see MEMORY SLOTS).")
    var showMemory = false

    @Flag(name: .customLong("no-complete-instructions"), help: "Stop (status 4) when KVM cannot emulate an instruction, instead of completing the ones Swiftlet can complete exactly (int3, int n, fwait, ldmxcsr, stmxcsr, clac, stac, popcnt).")
    var noCompleteInstructions = false

    @Flag(name: .customLong("no-huge-pages"), help: "Do not ask the host for transparent huge pages for guest RAM.")
    var noHugePages = false

    @Option(name: .customLong("kvm-device"), help: ArgumentHelp("The KVM device to open.", valueName: "path"))
    var kvmDevice: String = "/dev/kvm"

    @Option(name: .long, help: ArgumentHelp("A disk image for the guest, as a virtio-blk device; repeatable (see DISKS).",
                                            valueName: "path[,readonly][,format=raw|qcow2][,serial=text][,queues=n][,bps=rate][,iops=n]..."))
    var disk: [DiskArgument] = []

    @Option(name: .long, help: ArgumentHelp("A network interface for the guest, as a virtio-net device over a TAP; repeatable (see NETWORK).",
                                            valueName: "tap=name[,mac=xx:xx:xx:xx:xx:xx][,rx_bps=rate][,tx_bps=rate]..."))
    var net: [NetArgument] = []

    @Option(name: .long, help: ArgumentHelp("Serve the monitor on this Unix socket (see MONITOR AND MIGRATION).", valueName: "path"))
    var monitor: String?

    @Option(name: .long, help: ArgumentHelp("Wait at this address for a VM migrated from another Swiftlet and run it.", valueName: "unix:path|tcp:host:port"))
    var incoming: String?

    @Option(name: .customLong("virtio-transport"), help: ArgumentHelp("How virtio devices appear: pci (default) or mmio (see DISKS).", valueName: "transport"))
    var virtioTransport: VMConfiguration.VirtioTransport?

    @Option(name: .customLong("api-sock"), help: ArgumentHelp("Serve Firecracker's REST API on this Unix socket; the VM is configured and started through it (see docs/api.md).", valueName: "path"))
    var apiSocket: String?

    @Option(name: .customLong("config-file"), help: ArgumentHelp("Boot the VM described by this Firecracker JSON configuration (boot-source, drives, machine-config, network-interfaces).", valueName: "path"))
    var configFile: String?

    @Option(name: .long, help: ArgumentHelp("The instance ID the API reports (with --api-sock or --config-file).", valueName: "id"))
    var id: String = "anonymous-instance"

    @Option(name: .long, help: ArgumentHelp("Seccomp filters on every thread: on (default), off (debugging only: no filters), or log (forbidden calls are allowed and logged by the kernel's audit).", valueName: "mode"))
    var seccomp: VMConfiguration.Seccomp = .on

    func validate() throws {
        if apiSocket != nil || configFile != nil {
            for (given, option) in [(kernel != nil, "--kernel"), (flat != nil, "--flat"), (!disk.isEmpty, "--disk"), (!net.isEmpty, "--net"),
                                    (initrd != nil, "--initrd"), (cmdline != nil, "--cmdline"), (restore != nil, "--restore"), (monitor != nil, "--monitor"), (incoming != nil, "--incoming")] where given {
                throw ValidationError("\(option) cannot be used with --api-sock or --config-file (the VM is configured through the API)")
            }
        }
        if let cpus, cpus < 1 { throw ValidationError("--cpus must be at least 1") }
        if kernel != nil && flat != nil { throw ValidationError("--kernel and --flat cannot be used together") }
        if restore != nil && incoming != nil { throw ValidationError("--restore and --incoming cannot be used together") }
        if restore != nil {
            // The snapshot is the machine: what would build another one contradicts it.
            let machineOptions: [(Bool, String)] = [
                (kernel != nil, "--kernel"), (flat != nil, "--flat"), (memory != nil, "--memory"), (cpus != nil, "--cpus"),
                (cpu != nil, "--cpu"), (!disk.isEmpty, "--disk"), (!net.isEmpty, "--net"), (virtioTransport != nil, "--virtio-transport"),
                (tripleFault != nil, "--triple-fault"), (noCompleteInstructions, "--no-complete-instructions"), (showMemory, "--show-memory"),
            ]
            for (given, option) in machineOptions where given {
                throw ValidationError("\(option) cannot be used with --restore: the snapshot records the machine it continues")
            }
        }
        if kernel == nil {
            for (given, option) in [(initrd != nil, "--initrd"), (cmdline != nil, "--cmdline"),
                                    (linuxEntry != nil, "--linux-entry"), (decompressOnHost != nil, "--[no-]decompress-on-host")] where given {
                throw ValidationError("\(option) applies only to --kernel")
            }
        }
        // The names are checked before any file is read; what KVM supports, when the VM is built.
        do { try CPUModels.validate(cpu ?? "host") } catch { throw ValidationError(error.message) }
        if let timeout, !(timeout > 0) || !timeout.isFinite {
            throw ValidationError("--timeout must be a positive number of seconds")
        }
    }

    func run() throws {
        if apiSocket != nil || configFile != nil {
            var frontEnd = APIFrontEnd()
            frontEnd.socketPath = apiSocket
            frontEnd.configFile = configFile
            frontEnd.instanceID = id
            frontEnd.transport = virtioTransport ?? .pci
            frontEnd.timeout = timeout.map { .milliseconds(Int64(($0 * 1000).rounded(.up))) }
            frontEnd.seccomp = seccomp
            if seccomp != .on {
                FileHandleOutput.standardError("swiftlet: WARNING: --seccomp \(seccomp.rawValue): the VM's threads run without "
                    + "their filters enforced. Use this only for debugging.")
            }
            switch serial {
            case .stdio: frontEnd.console = .standardOutput
            case let .file(path): frontEnd.console = .file(path)
            }
            frontEnd.run()
        }
        let boot: VMConfiguration.Boot
        if let incoming {
            boot = .incoming(address: incoming)
        } else if let restore {
            var status = stat()
            if stat(restore, &status) == 0, status.st_mode & S_IFMT == S_IFDIR {
                boot = .snapshot(directory: restore)
            } else {
                boot = .snapshot(SnapshotPaths(state: restore, memory: nil))
            }
        } else if let kernel {
            boot = .kernel(.file(kernel), initrd: initrd.map { .file($0) }, commandLine: cmdline)
        } else if let flat {
            boot = .flat(.file(flat))
        } else {
            boot = .flat(.bytes(DefaultGuest.helloReal, name: "hello-real"))
        }

        var configuration = VMConfiguration(boot: boot)
        configuration.memorySize = memory?.bytes ?? 256 << 20
        configuration.cpus = cpus ?? 1
        configuration.cpu = cpu ?? "host"
        configuration.trackDirtyPages = trackDirtyPages
        configuration.timeout = timeout.map { .milliseconds(Int64(($0 * 1000).rounded(.up))) }
        configuration.traceExits = traceExits
        configuration.showMemory = showMemory
        configuration.transparentHugePages = !noHugePages
        configuration.kvmDevice = kvmDevice
        configuration.disks = disk.map(\.disk)
        configuration.networks = net.map(\.network)
        configuration.virtioTransport = virtioTransport ?? .pci
        configuration.onWarning = { message in FileHandleOutput.standardError("swiftlet: warning: \(message)") }
        configuration.tripleFault = tripleFault ?? .stop
        configuration.completeInstructions = !noCompleteInstructions
        configuration.decompressKernelOnHost = decompressOnHost ?? true
        configuration.linuxEntry = linuxEntry ?? .automatic
        configuration.forwardStandardInput = true
        configuration.handleTerminationSignals = true
        configuration.onConsoleFailure = { message in FileHandleOutput.standardError("swiftlet: \(message)") }
        configuration.seccomp = seccomp
        configuration.confineCallingThread = true
        if seccomp != .on {
            let what = seccomp == .off ? "the VM's threads run WITHOUT seccomp filters"
                : "system calls the filters forbid are ALLOWED and only logged by the kernel"
            FileHandleOutput.standardError("swiftlet: WARNING: --seccomp \(seccomp.rawValue): \(what). A guest that exploits a "
                + "bug in a device model gets everything this process may do. Use this only for debugging.")
        }
        configuration.monitor = monitor
        configuration.onMigrationEvent = { message in FileHandleOutput.standardError("swiftlet: \(message)") }
        switch serial {
        case .stdio: configuration.console = .standardOutput
        case let .file(path): configuration.console = .file(path)
        }

        let result: VMResult
        do {
            let vm = try VM(configuration)
            for interface in vm.networkInterfaces {
                FileHandleOutput.standardError("swiftlet: \(interface.name): \(interface.tap), MAC \(interface.mac)")
            }
            if showMemory { FileHandleOutput.standardError(vm.memorySlotTable) }
            result = try vm.run()
        } catch {
            throw SwiftletCommand.fail(error.message)
        }
        if let table = result.exitTable { FileHandleOutput.standardError(table) }
        if let report = result.memoryReport { FileHandleOutput.standardError(report) }
        switch result.exit {
        case .crash, .timeout, .reset, .powerOff, .signal, .migrated:
            FileHandleOutput.standardError("swiftlet: \(result.exit)")
        default:
            break
        }
        if case let .signal(number) = result.exit { Self.endBySignal(number) }
        throw ExitCode(result.exit.exitStatus)
    }

    /// Ends the process by `signal` itself, so that whoever started Swiftlet sees the signal
    /// (a shell prints 128 + its number) and not an exit status a guest could also produce.
    /// SIGQUIT's default action would dump core: that is switched off first.
    static func endBySignal(_ number: Int32) -> Never {
        if number == SIGQUIT {
            var none = rlimit(rlim_cur: 0, rlim_max: 0)
            setrlimit(__rlimit_resource_t(RLIMIT_CORE.rawValue), &none)
        }
        signal(number, SIG_DFL)
        var set = sigset_t()
        sigemptyset(&set)
        sigaddset(&set, number)
        pthread_sigmask(SIG_UNBLOCK, &set, nil)
        raise(number)
        Glibc.exit(128 + number) // not reached: the signal's default action ends the process
    }
}

/// `--memory`: a size such as 64M or 1G, checked while the command line is parsed.
struct MemorySizeArgument: ExpressibleByArgument {
    let bytes: UInt64

    init(bytes: UInt64) { self.bytes = bytes }

    init?(argument: String) {
        guard let bytes = try? ByteSize.parse(argument, defaultUnit: .mebibytes) else { return nil }
        self.bytes = bytes
    }

    var defaultValueDescription: String { ByteSize.exact(bytes) }
}

extension VMConfiguration.LinuxEntry: ExpressibleByArgument {}
extension VMConfiguration.VirtioTransport: ExpressibleByArgument {}
extension VMConfiguration.Seccomp: ExpressibleByArgument {}

/// `--disk PATH[,readonly][,format=raw|qcow2][,serial=TEXT][,queues=N][,bps=R][,iops=N]...`
/// (rate limits: ``RateLimitOptions``), QEMU-style: options
/// after the path, separated by commas; a comma inside the path is written twice.
struct DiskArgument: ExpressibleByArgument {
    let disk: VMConfiguration.Disk

    init?(argument: String) {
        guard let parsed = try? Self.parse(argument) else { return nil }
        disk = parsed
    }

    struct Invalid: Error {}

    static func parse(_ text: String) throws -> VMConfiguration.Disk {
        // Split on single commas; ",," stands for a comma.
        var parts: [String] = [""]
        var characters = Array(text)[...]
        while let character = characters.popFirst() {
            if character == "," {
                if characters.first == "," {
                    characters.removeFirst()
                    parts[parts.count - 1].append(",")
                } else {
                    parts.append("")
                }
            } else {
                parts[parts.count - 1].append(character)
            }
        }
        guard let path = parts.first, !path.isEmpty else { throw Invalid() }
        var disk = VMConfiguration.Disk(path: path)
        var limits = RateLimitOptions()
        for option in parts.dropFirst() {
            let pieces = option.split(separator: "=", maxSplits: 1).map(String.init)
            if pieces.count == 2, try limits.accept(key: pieces[0], value: pieces[1], opsName: "iops") { continue }
            switch (pieces.first ?? "", pieces.count == 2 ? pieces[1] : nil) {
            case ("readonly", nil), ("readonly", "on"): disk.readOnly = true
            case ("readonly", "off"): disk.readOnly = false
            case let ("format", value?): guard let format = VMConfiguration.Disk.Format(rawValue: value) else { throw Invalid() }
                disk.format = format
            case let ("serial", value?): disk.serial = value
            case let ("queues", value?): guard let queues = Int(value), (1...16).contains(queues) else { throw Invalid() }
                disk.queues = queues
            default: throw Invalid()
            }
        }
        disk.rateLimiter = try limits.configuration()
        return disk
    }

    static var defaultCompletionKind: CompletionKind { .file() }
}
/// `--net tap=NAME[,mac=XX:XX:XX:XX:XX:XX][,rx_bps=R][,tx_pps=N]...`: options separated by
/// commas, `tap=` required (rate limits: ``RateLimitOptions``).
struct NetArgument: ExpressibleByArgument {
    let network: VMConfiguration.Network

    init?(argument: String) {
        guard let parsed = Self.parse(argument) else { return nil }
        network = parsed
    }

    static func parse(_ text: String) -> VMConfiguration.Network? {
        var tap: String?
        var mac: String?
        var receive = RateLimitOptions()
        var transmit = RateLimitOptions()
        for option in text.split(separator: ",", omittingEmptySubsequences: false) {
            let pieces = option.split(separator: "=", maxSplits: 1).map(String.init)
            guard pieces.count == 2 else { return nil }
            do {
                if try receive.accept(key: pieces[0], value: pieces[1], prefix: "rx_", opsName: "pps") { continue }
                if try transmit.accept(key: pieces[0], value: pieces[1], prefix: "tx_", opsName: "pps") { continue }
            } catch {
                return nil
            }
            switch pieces[0] {
            case "tap" where tap == nil && VMConfiguration.Network.isValidInterfaceName(pieces[1]): tap = pieces[1]
            case "mac" where mac == nil && VMConfiguration.Network.isValidMAC(pieces[1]): mac = pieces[1]
            default: return nil
            }
        }
        guard let tap else { return nil }
        var network = VMConfiguration.Network(tap: tap, mac: mac)
        do {
            network.rxRateLimiter = try receive.configuration()
            network.txRateLimiter = try transmit.configuration()
        } catch {
            return nil
        }
        return network
    }
}

extension VMConfiguration.TripleFault: ExpressibleByArgument {}

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
