import Boot
import DiskImage
import Devices
import KVM
import RateLimit
import Sandbox
import Virtio
import X86

/// Where the bytes of a kernel, initrd or flat image come from.
public enum ImageSource: Sendable {
    /// A host file, read when the machine is built. It must be a regular file: a FIFO or
    /// a directory is refused without blocking.
    case file(String)
    /// Bytes the caller already holds (a test that builds its guest in memory).
    case bytes([UInt8], name: String)

    /// How messages and a Multiboot command line name it.
    public var name: String {
        switch self {
        case let .file(path): return path
        case let .bytes(_, name): return name
        }
    }
}

/// A kernel and what goes with it.
public struct KernelBoot: Sendable {
    public var kernel: ImageSource
    /// The Linux initrd, or Multiboot module 0.
    public var initrd: ImageSource?
    /// The kernel command line. `nil` gives a Linux kernel ``MachineConfiguration/defaultLinuxCommandLine``
    /// and a Multiboot kernel nothing; a Multiboot kernel always gets its own name first, as
    /// GRUB and QEMU pass it.
    public var commandLine: String?
    /// Unpack a compressed bzImage on the host and enter the vmlinux inside.
    public var decompressOnHost = true
    /// Which entry of a Linux ELF to use.
    public var linuxEntry: LinuxEntry = .automatic

    public init(kernel: ImageSource, initrd: ImageSource? = nil, commandLine: String? = nil) {
        self.kernel = kernel
        self.initrd = initrd
        self.commandLine = commandLine
    }
}

/// What to boot.
public enum BootSource: Sendable {
    /// Raw machine code loaded at 0x7C00 and entered in 16-bit real mode, like a PC BIOS
    /// starts a boot sector (see ``FlatBinary``).
    case flat(ImageSource)
    /// A kernel whose format is detected from its content: a Linux bzImage or vmlinux
    /// (64-bit or PVH entry), or a Multiboot kernel (see ``KernelImage``).
    case kernel(KernelBoot)
    /// A snapshot directory (``Machine/snapshot(to:)`` wrote it): the machine it describes
    /// continues where it was saved. The configuration's machine shape (RAM, vCPUs, disks,
    /// transport) comes from the snapshot; its run-time options (console, timeout) apply.
    case snapshot(SnapshotFiles)
    /// A VM migrated from another Swiftlet: wait at this address for one source, receive
    /// the machine (which must match this configuration's RAM, vCPUs and disks) and run it.
    case incoming(MigrationAddress)
}

/// What a triple fault does. On a PC the chipset turns a triple fault into a CPU reset;
/// a VMM that does not reboot its guest either reports it as the guest's reset or stops
/// as a crash with the registers printed.
public enum TripleFaultAction: String, Sendable, CaseIterable {
    /// Stop as a crash (status 4) with a register dump: best for debugging a guest.
    case stop
    /// Treat it as the guest asking for a reset (status 6), like QEMU's `-no-reboot`.
    case reset
}

/// A disk for the guest: an image file presented as a virtio-blk device.
public struct DiskConfiguration: Sendable, Equatable {
    public var path: String
    /// Present it read-only (the image is then opened read-only too and never modified).
    public var readOnly = false
    /// The image format; detected from the content when `nil`.
    public var format: ImageFormat?
    /// The device ID the guest reads (Linux: /sys/block/vdX/serial), at most 20 characters.
    public var serial: String?
    /// Request queues (more than one offers virtio-blk's multi-queue feature).
    public var queues = 1
    /// The disk's rate limiter (Firecracker's token buckets); `nil`: unlimited. Changed
    /// while the machine runs with ``Machine/updateRateLimiter(disk:_:)``.
    public var rateLimiter: RateLimiterConfiguration?

    public init(path: String, readOnly: Bool = false, format: ImageFormat? = nil, serial: String? = nil) {
        self.path = path
        self.readOnly = readOnly
        self.format = format
        self.serial = serial
    }
}

/// A network interface for the guest: a Linux TAP device presented as a virtio-net device.
public struct NetworkConfiguration: Sendable, Equatable {
    /// The TAP interface. One that exists is opened (and left as it is); a missing one is
    /// created when the process may (root or CAP_NET_ADMIN), brought up, and removed again
    /// when the machine goes away.
    public var tap: String
    /// The guest's MAC address; `nil` gives a random locally administered one.
    public var mac: MACAddress?
    /// Rate limiters of what the guest receives and sends (Firecracker's token buckets);
    /// `nil`: unlimited. Changed while the machine runs with
    /// ``Machine/updateRateLimiters(networkInterface:receive:transmit:)``.
    public var rxRateLimiter: RateLimiterConfiguration?
    public var txRateLimiter: RateLimiterConfiguration?

    public init(tap: String, mac: MACAddress? = nil) {
        self.tap = tap
        self.mac = mac
    }
}

/// Everything that decides how a machine is built and run.
public struct MachineConfiguration: Sendable {
    /// Serial console on COM1, early messages too, reboot through the keyboard controller,
    /// and no waiting after a panic.
    public static let defaultLinuxCommandLine = "console=ttyS0 earlyprintk=serial reboot=k panic=-1"

    public var boot: BootSource
    /// Guest RAM in bytes: a positive multiple of 4 KiB.
    public var memorySize: UInt64 = 256 << 20
    /// Virtual CPUs, 1 to 254.
    public var cpuCount = 1
    /// What the vCPUs report through CPUID: `host` (what KVM offers) or a fixed baseline,
    /// with feature edits. Checked against this host's KVM when the machine is built.
    public var cpuModel: CPUModelSpec = .host
    /// Ask the host for transparent huge pages for guest RAM.
    public var transparentHugePages = true
    /// Where COM1's output goes.
    public var serialOutput: any ByteSink = FileDescriptorSink.standardOutput
    /// Forward this process's standard input to COM1 (raw mode when it is a terminal,
    /// with QEMU's `Ctrl-A x` to quit). Off for a library user; `swiftlet run` turns it on.
    public var forwardStandardInput = false
    /// Turn SIGINT, SIGTERM, SIGHUP and SIGQUIT into a clean stop. This changes the
    /// process's signal mask, so it is off for a library user; `swiftlet run` turns it on.
    public var handleTerminationSignals = false
    /// Seconds before the VM is stopped with ``StopReason/timeout``.
    public var timeout: Double?
    /// Count VM exits by kind, device and address, with the time spent on each.
    public var traceExits = false
    /// What a triple fault does.
    public var tripleFault: TripleFaultAction = .stop
    /// Log the pages the guest writes in every memory slot (`KVM_MEM_LOG_DIRTY_PAGES`), for
    /// ``Machine/memorySlotTable()`` and ``Machine/writtenPagesReport()``, and give the guest
    /// the ``SlotControl`` device, which adds memory slots while it runs.
    public var showMemory = false
    /// Track the pages the guest and the devices write from the start (KVM's dirty log on
    /// the RAM slots and Swiftlet's own write log), so that a snapshot can be a diff over
    /// the one before it. Costs guest time on writes (KVM maps RAM with 4 KiB pages and
    /// write-protects them, or the CPU logs them with PML).
    public var trackDirtyPages = false
    /// How virtio devices are presented. PCI by default: every stock kernel finds PCI
    /// devices by enumerating the bus, while virtio-mmio needs `virtio_mmio.device=` on the
    /// command line (a kernel option some distributions leave out: Debian's cloud kernel
    /// has no CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES) or the ACPI DSDT.
    public var virtioTransport: VirtioTransportKind = .pci
    /// Disks, each a virtio-blk device, in order (the first is the guest's vda).
    public var disks: [DiskConfiguration] = []
    /// Network interfaces, each a virtio-net device over a TAP, in order (net0 first). They
    /// come after the disks on the PCI bus or in the virtio-mmio slots.
    public var networks: [NetworkConfiguration] = []
    /// Called with a one-line message when something goes wrong that does not stop the
    /// VM: a guest driver that broke a device's rules (the device then needs a reset).
    public var onWarning: (@Sendable (String) -> Void)?
    /// Complete, in Swiftlet, the instructions KVM's emulator fails on when that can be done
    /// exactly (int3, int n, fwait, ldmxcsr, stmxcsr, clac, stac, popcnt; see
    /// docs/instruction-completion.md). Off: every such failure stops the VM (status 4).
    public var completeInstructions = true
    /// The KVM device to open.
    public var kvmPath = KVMSystem.defaultPath
    /// How the machine's threads are confined (seccomp filter per thread kind, Landlock).
    /// On by default; see docs/security.md.
    public var sandbox = Sandbox()
    /// Confine the thread that calls ``Machine/run()`` too (as ``ThreadKind/control``),
    /// once the other threads exist: for a process that runs one VM and ends (the CLI).
    public var confineCallingThread = false
    /// A Unix socket to serve the monitor on (``MonitorServer``): `status`, `stop`, `cont`,
    /// `snapshot`, `migrate`, `quit`, one line each.
    public var monitorPath: String?
    /// Called with a line on a migration's progress (the target listening, ...).
    public var onMigrationEvent: (@Sendable (String) -> Void)?

    public init(boot: BootSource) { self.boot = boot }
}
