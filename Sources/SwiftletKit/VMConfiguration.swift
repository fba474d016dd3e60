import RateLimit
import Virtio

/// A virtual machine to run: what it boots and the machine around it.
///
/// ```swift
/// var configuration = VMConfiguration(boot: .kernel(.file("guests/build/multiboot.elf"), commandLine: "hello"))
/// configuration.memorySize = 64 << 20
/// configuration.timeout = .seconds(10)
/// let result = try VM(configuration).run()
/// print(result.exit, result.consoleText)
/// ```
public struct VMConfiguration: Sendable {
    /// Where a kernel, initrd or flat image comes from.
    public enum Image: Sendable {
        /// A host file, read when the VM is built (a FIFO or directory is refused at once).
        case file(String)
        /// Bytes already in memory; `name` stands for the file name (a Multiboot kernel
        /// receives it as the first word of its command line).
        case bytes([UInt8], name: String = "kernel")
    }

    /// What the boot vCPU starts.
    public enum Boot: Sendable {
        /// Raw machine code loaded at 0x7C00 and entered in 16-bit real mode, like a PC
        /// BIOS starts a boot sector (no BIOS services).
        case flat(Image)
        /// A kernel, format detected from its content: a Linux bzImage or vmlinux, or a
        /// Multiboot kernel (kvm-unit-tests' `.flat` files are Multiboot ELFs). `nil`
        /// `commandLine` gives Linux Swiftlet's default (serial console on ttyS0).
        case kernel(Image, initrd: Image? = nil, commandLine: String? = nil)
        /// A snapshot written by ``VM/snapshot(to:diff:)`` (or `swiftlet`): the machine
        /// continues where it was saved. Its RAM, vCPUs, disks and transport come from the
        /// snapshot; the console, timeout and tracing options here apply.
        case snapshot(SnapshotPaths)

        /// The snapshot in `directory` (`directory/state`, `directory/memory`).
        public static func snapshot(directory: String) -> Boot { .snapshot(SnapshotPaths(directory: directory)) }
        /// A VM migrated from another Swiftlet (``VM/migrate(to:)``): listen at `address`
        /// (`unix:PATH` or `tcp:HOST:PORT`; `tcp::PORT` listens on every address), wait for
        /// one source, and run the VM it sends. The source's RAM size, vCPUs, transport and
        /// disks must be this configuration's, or the target refuses it (and the source goes
        /// on). ``VM/init(_:)`` returns once the VM has arrived.
        case incoming(address: String)
    }

    /// Where the guest's serial console (COM1) goes.
    public enum Console: Sendable {
        /// Kept in memory and returned in ``VMResult/console``.
        case capture
        /// This process's standard output.
        case standardOutput
        /// A host file, created or truncated.
        case file(String)
        /// Thrown away.
        case discard
    }

    /// How a Linux ELF kernel is entered.
    public enum LinuxEntry: String, Sendable, CaseIterable {
        /// PVH when the kernel has the Xen PVH note, else the 64-bit boot protocol.
        case automatic = "auto"
        /// The Linux 64-bit boot protocol (long mode, zero page in RSI).
        case linux64
        /// The PVH entry (32-bit protected mode, start info in EBX).
        case pvh
    }

    /// What a triple fault does.
    public enum TripleFault: String, Sendable, CaseIterable {
        /// The VM stops as a crash (status 4) with the vCPU's registers.
        case stop
        /// The VM stops as the guest's reset (status 6), as a PC's chipset turns a triple
        /// fault into a CPU reset (QEMU with `-no-reboot`).
        case reset
    }

    /// A disk image the guest sees as a virtio-blk device.
    public struct Disk: Sendable, Equatable {
        public enum Format: String, Sendable, CaseIterable { case raw, qcow2 }
        public var path: String
        /// Present it read-only; the image is opened read-only and never modified.
        public var readOnly = false
        /// `nil`: detected from the file's content (qcow2 by its magic, else raw).
        public var format: Format?
        /// The device ID the guest reads (Linux: /sys/block/vdX/serial), at most 20 characters.
        public var serial: String?
        /// Request queues (more than one offers multi-queue).
        public var queues = 1
        /// The disk's rate limiter: Firecracker's `bandwidth` (bytes) and `ops` token
        /// buckets; `nil`: unlimited. Change it while the VM runs with
        /// ``VM/updateRateLimiter(disk:_:)``.
        public var rateLimiter: RateLimiterConfiguration?

        public init(path: String, readOnly: Bool = false, format: Format? = nil, serial: String? = nil) {
            self.path = path
            self.readOnly = readOnly
            self.format = format
            self.serial = serial
        }
    }

    /// A network interface the guest sees as a virtio-net device, backed by a Linux TAP.
    public struct Network: Sendable, Equatable {
        /// The TAP interface. One that exists (`ip tuntap add dev NAME mode tap user USER`)
        /// is opened and left as it is; a missing one is created when the process may (root
        /// or CAP_NET_ADMIN), brought up, and removed again when the VM goes away.
        public var tap: String
        /// The guest's MAC address, `XX:XX:XX:XX:XX:XX` (unicast); `nil` gives a random
        /// locally administered one (see ``VM/networkInterfaces``).
        public var mac: String?
        /// Rate limiters of the frames the guest receives and sends (Firecracker's
        /// `rx_rate_limiter` and `tx_rate_limiter`); `nil`: unlimited. Change them while the
        /// VM runs with ``VM/updateRateLimiters(networkInterface:rx:tx:)``.
        public var rxRateLimiter: RateLimiterConfiguration?
        public var txRateLimiter: RateLimiterConfiguration?

        public init(tap: String, mac: String? = nil) {
            self.tap = tap
            self.mac = mac
        }

        /// Whether `name` can name a network interface on Linux: 1 to 15 bytes, not `.`
        /// or `..`, without `/`, `:` or white space.
        public static func isValidInterfaceName(_ name: String) -> Bool {
            let bytes = Array(name.utf8)
            guard (1...15).contains(bytes.count), name != ".", name != ".." else { return false }
            return !bytes.contains { $0 == UInt8(ascii: "/") || $0 == UInt8(ascii: ":") || $0 <= 0x20 || $0 == 0x7F }
        }

        /// Whether `text` is a MAC address an interface can have: six pairs of hexadecimal
        /// digits separated by colons, unicast (bit 0 of the first byte clear), not all zero.
        public static func isValidMAC(_ text: String) -> Bool {
            guard let mac = MACAddress(text) else { return false }
            return !mac.isMulticast && !mac.isZero
        }
    }

    /// How virtio devices are presented to the guest.
    public enum VirtioTransport: String, Sendable, CaseIterable {
        /// virtio-mmio slots, announced on the kernel command line (`virtio_mmio.device=`)
        /// and in the ACPI DSDT.
        case mmio
        /// Functions on a PCI host bridge: what every stock kernel finds by itself.
        case pci
    }

    public var boot: Boot
    /// Guest RAM in bytes: a positive multiple of 4 KiB. Above 3 GiB, RAM continues at
    /// 4 GiB around the 32-bit MMIO hole.
    public var memorySize: UInt64 = 256 << 20
    /// Virtual CPUs, 1 to 254. vCPU 0 boots; the others wait for INIT/SIPI.
    public var cpus = 1
    /// The CPU model the guest sees through CPUID, as QEMU's `-cpu`:
    /// `MODEL[,+feature,-feature...]`. `host` is what this host's KVM offers;
    /// `x86-64-v1` ... `x86-64-v4` are fixed baselines that do not change from host to
    /// host; edits use /proc/cpuinfo's feature names (`x86-64-v3,-avx2,+pcid`). A model or
    /// feature this KVM cannot provide makes ``VM/init(_:)`` throw. See ``CPUModels``.
    public var cpu = "host"
    public var console: Console = .capture
    /// How long the guest may run before the VM stops with ``VMExit/timeout``.
    public var timeout: Duration?
    /// Unpack a compressed bzImage on the host and enter the vmlinux inside it.
    public var decompressKernelOnHost = true
    public var linuxEntry: LinuxEntry = .automatic
    public var tripleFault: TripleFault = .stop
    /// Count VM exits by kind, device and address; the table is in ``VMResult/exitTable``.
    public var traceExits = false
    /// Log the pages the guest writes in each memory slot (``VM/memorySlotTable``,
    /// ``VMResult/memoryReport``) and give the guest the memory slot device at port 0x5A0,
    /// which adds slots while it runs (docs/memory.md).
    public var showMemory = false
    /// Track the pages written from the start, so that ``VM/snapshot(to:diff:)`` can write
    /// only what changed since the snapshot before (KVM's dirty log; costs guest time on
    /// writes).
    public var trackDirtyPages = false
    /// Ask the host for transparent huge pages for guest RAM.
    public var transparentHugePages = true
    /// Complete the instructions some KVMs cannot emulate (int3, int n, fwait, ldmxcsr,
    /// stmxcsr, clac, stac, popcnt) when that can be done exactly, instead of stopping with
    /// ``VMExit/crash(_:)``. See docs/instruction-completion.md.
    public var completeInstructions = true
    /// The KVM device to open.
    public var kvmDevice = "/dev/kvm"
    /// Disks, in order: the first is the guest's first virtio disk (Linux: /dev/vda).
    public var disks: [Disk] = []
    /// Network interfaces, in order (net0 first); they follow the disks on the bus.
    public var networks: [Network] = []
    /// The transport of the virtio devices. PCI by default: a stock kernel enumerates
    /// PCI by itself, while virtio-mmio needs the kernel's command-line support (missing
    /// from some distribution kernels, Debian's cloud kernel among them) or ACPI.
    public var virtioTransport: VirtioTransport = .pci
    /// Called with a one-line message for problems that do not stop the VM (a guest
    /// driver that broke a device's rules).
    public var onWarning: (@Sendable (String) -> Void)?
    /// A Unix socket for the monitor: one command per line (`status`, `stop`, `cont`,
    /// `snapshot [--diff] DIR`, `migrate ADDRESS`, `quit`, `help`), one line back for each, while the
    /// VM runs. Use it with `socat - UNIX-CONNECT:PATH` or `swiftlet monitor PATH COMMAND`.
    public var monitor: String?
    /// Called with a line on a migration's progress (the target listening for its source).
    public var onMigrationEvent: (@Sendable (String) -> Void)?

    // Front-end options: what `swiftlet run` turns on for an interactive user. A library
    // user normally leaves them off.

    /// Forward this process's standard input to the guest's serial port; a terminal is
    /// put in raw mode (restored on every exit path) and `Ctrl-A x` quits.
    public var forwardStandardInput = false
    /// Turn SIGINT, SIGTERM, SIGHUP and SIGQUIT into a clean stop (``VMExit/signal(_:)``).
    /// This blocks those signals in the calling thread and every thread it starts later.
    public var handleTerminationSignals = false
    /// Called once with a one-line message if writing the console output fails (a full
    /// disk, a closed pipe); the guest's further output is dropped.
    public var onConsoleFailure: (@Sendable (String) -> Void)?
    /// Seccomp filters on the VM's threads (see docs/security.md): `on` (the default), `off`
    /// for debugging, or `log` (forbidden calls allowed and written to the kernel's audit log).
    public var seccomp: Seccomp = .on
    /// Confine the thread that calls ``VM/run()`` too, once the VM's threads exist: only for
    /// a process that runs one VM and then ends (the CLI). Off by default.
    public var confineCallingThread = false

    /// Whether the VM's threads run under their seccomp filters.
    public enum Seccomp: String, Sendable, CaseIterable {
        case on, off, log
    }

    public init(boot: Boot) { self.boot = boot }
}

extension VMConfiguration {
    /// The command line a Linux kernel gets when none is given: the serial console on
    /// COM1 (early messages too), reset through the keyboard controller, and no waiting
    /// after a panic.
    public static let defaultLinuxCommandLine = "console=ttyS0 earlyprintk=serial reboot=k panic=-1"
}
