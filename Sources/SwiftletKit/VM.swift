import Devices
import DiskImage
import Machine
import RateLimit
import Sandbox
import Virtio
import X86

/// Why a VM stopped. Each case has the exit status `swiftlet run` uses for it: a guest's
/// exit-port value always gives an odd status, everything else an even one.
public enum VMExit: Sendable, Equatable, CustomStringConvertible {
    /// The guest wrote `value` to the exit port (0xF4): status `(value << 1) | 1`.
    case guestExit(value: UInt32)
    /// The guest powered off (ACPI S5, ...): status 0.
    case powerOff(how: String)
    /// The guest asked for a reset (keyboard controller, port 0xCF9, ACPI reset register,
    /// a triple fault configured as reset): status 6.
    case reset(how: String)
    /// The guest crashed (triple fault, an instruction KVM could not emulate): status 4.
    /// The message includes the vCPU's registers.
    case crash(String)
    /// ``VMConfiguration/timeout`` elapsed: status 124.
    case timeout
    /// A termination signal arrived (with ``VMConfiguration/handleTerminationSignals``).
    case signal(Int32)
    /// The user typed `Ctrl-A x` on the console (or `quit` on the monitor): status 0.
    case userQuit
    /// The VM migrated to another Swiftlet (``VM/migrate(to:)``), which runs it now: status 0.
    case migrated(to: String)

    /// The status `swiftlet run` exits with (a signal: 128 + its number, as shells show it).
    public var exitStatus: Int32 { stopReason.exitStatus }

    public var description: String { stopReason.description }

    /// Swiftlet's own failure (it could not build or run the VM, or its command line is
    /// wrong): status 2, which no guest exit value can produce.
    public static let failureStatus: Int32 = StopReason.failureStatus

    init(_ reason: StopReason) {
        switch reason {
        case let .guestExit(value): self = .guestExit(value: value)
        case let .powerOff(how): self = .powerOff(how: how)
        case let .reset(how): self = .reset(how: how)
        case let .crash(message): self = .crash(message)
        case .timeout: self = .timeout
        case let .signal(number): self = .signal(number)
        case .userQuit: self = .userQuit
        case let .migrated(destination): self = .migrated(to: destination)
        }
    }

    var stopReason: StopReason {
        switch self {
        case let .guestExit(value): return .guestExit(value: value)
        case let .powerOff(how): return .powerOff(how: how)
        case let .reset(how): return .reset(how: how)
        case let .crash(message): return .crash(message)
        case .timeout: return .timeout
        case let .signal(number): return .signal(number)
        case .userQuit: return .userQuit
        case let .migrated(destination): return .migrated(to: destination)
        }
    }
}

/// What a snapshot wrote: where, the state file's size, the pages of RAM written (zero
/// pages are holes) and how long it took.
public typealias SnapshotSummary = MachineSnapshotSummary
/// Where a snapshot's state file and memory file are.
public typealias SnapshotPaths = SnapshotFiles
/// This Swiftlet's version (`swiftlet --version`; recorded in snapshots).
public let swiftletVersion = SwiftletVersion.current

/// What a migration did: rounds, pages and bytes sent, total time and the guest's downtime.
public typealias MigrationSummary = MachineMigrationSummary
/// When a migration stops copying while the guest runs (downtime target, most rounds).
public typealias MigrationOptions = MachineMigrationOptions

/// Where a VM is in its life.
public enum VMState: String, Sendable, Equatable {
    /// Built, not yet run.
    case created
    case running
    /// Every vCPU parked, devices quiet; ``VM/resume()`` continues it.
    case paused
    /// It ran and stopped; it cannot run again.
    case stopped
}

/// What a run produced.
public struct VMResult: Sendable {
    public let exit: VMExit
    /// The console output, with ``VMConfiguration/Console/capture``; empty otherwise.
    public let console: [UInt8]
    /// The exit table, with ``VMConfiguration/traceExits``.
    public let exitTable: String?
    /// With ``VMConfiguration/showMemory``: every memory slot and the guest pages written
    /// in it during the run, as runs of addresses.
    public var memoryReport: String? = nil
    /// Why console output stopped, if writing it failed.
    public let consoleFailure: String?

    /// The console output as text (invalid UTF-8 repaired).
    public var consoleText: String { String(decoding: console, as: UTF8.self) }
}

/// One of the guest's network interfaces, as built.
public struct VMNetworkInterface: Sendable, Equatable {
    /// `net0`, `net1`, ...
    public let name: String
    /// The TAP interface on the host.
    public let tap: String
    /// The guest's MAC address, `xx:xx:xx:xx:xx:xx`.
    public let mac: String
    /// Swiftlet created the TAP (it did not exist): it goes away with the VM.
    public let createdTAP: Bool
}

/// Swiftlet could not build or run the VM: a missing or wrong file, no usable
/// `/dev/kvm`, a configuration out of range. The message is one line for a user.
public struct SwiftletError: Error, CustomStringConvertible, Sendable {
    public let message: String
    public var description: String { message }
}

/// A virtual machine on `/dev/kvm`: built by `init` (files read and checked, guest RAM
/// loaded, vCPUs created), then run once by ``run()``.
///
/// Several VMs may run at once in one process, each on its own threads.
public final class VM: Sendable {
    private let machine: Machine
    private let capture: CapturingSink?
    private let fileSink: FileDescriptorSink?
    private let traceExits: Bool
    private let showMemory: Bool

    /// One line saying what was loaded and how it is entered.
    public var loadSummary: String { machine.loadSummary }

    /// The memory slots KVM has now (guest-physical range, size, host address, flags),
    /// one line each: before ``run()``, guest RAM.
    public var memorySlotTable: String { machine.memorySlotTable() }

    public init(_ configuration: VMConfiguration) throws(SwiftletError) {
        var boot: BootSource
        switch configuration.boot {
        case let .flat(image):
            boot = .flat(ImageSource(image))
        case let .kernel(image, initrd, commandLine):
            var kernel = KernelBoot(kernel: ImageSource(image), initrd: initrd.map(ImageSource.init), commandLine: commandLine)
            kernel.decompressOnHost = configuration.decompressKernelOnHost
            switch configuration.linuxEntry {
            case .automatic: kernel.linuxEntry = .automatic
            case .linux64: kernel.linuxEntry = .linux64
            case .pvh: kernel.linuxEntry = .pvh
            }
            boot = .kernel(kernel)
        case let .snapshot(paths):
            boot = .snapshot(paths)
        case let .incoming(address):
            do { boot = .incoming(try MigrationAddress(parsing: address)) } catch { throw SwiftletError(message: error.description) }
        }
        var machineConfiguration = MachineConfiguration(boot: boot)
        machineConfiguration.memorySize = configuration.memorySize
        machineConfiguration.cpuCount = configuration.cpus
        do {
            machineConfiguration.cpuModel = try CPUModelSpec(parsing: configuration.cpu)
        } catch {
            throw SwiftletError(message: error.description)
        }
        machineConfiguration.transparentHugePages = configuration.transparentHugePages
        machineConfiguration.timeout = configuration.timeout.map { Double($0.components.seconds) + Double($0.components.attoseconds) / 1e18 }
        machineConfiguration.traceExits = configuration.traceExits
        machineConfiguration.showMemory = configuration.showMemory
        machineConfiguration.trackDirtyPages = configuration.trackDirtyPages
        machineConfiguration.tripleFault = configuration.tripleFault == .reset ? .reset : .stop
        machineConfiguration.kvmPath = configuration.kvmDevice
        machineConfiguration.completeInstructions = configuration.completeInstructions
        machineConfiguration.forwardStandardInput = configuration.forwardStandardInput
        machineConfiguration.handleTerminationSignals = configuration.handleTerminationSignals
        machineConfiguration.virtioTransport = configuration.virtioTransport == .mmio ? .mmio : .pci
        machineConfiguration.sandbox = Sandbox(mode: SeccompMode(rawValue: configuration.seccomp.rawValue) ?? .on)
        machineConfiguration.confineCallingThread = configuration.confineCallingThread
        machineConfiguration.disks = configuration.disks.map { disk in
            var converted = DiskConfiguration(path: disk.path, readOnly: disk.readOnly, format: disk.format.flatMap { ImageFormat(rawValue: $0.rawValue) },
                                              serial: disk.serial)
            converted.queues = disk.queues
            converted.rateLimiter = disk.rateLimiter
            return converted
        }
        machineConfiguration.networks = try configuration.networks.enumerated().map { (index, network) throws(SwiftletError) in
            guard VMConfiguration.Network.isValidInterfaceName(network.tap) else {
                throw SwiftletError(message: "net\(index): '\(network.tap)' is not an interface name (1 to 15 bytes, "
                                    + "no '/', ':' or spaces)")
            }
            var converted = NetworkConfiguration(tap: network.tap)
            converted.rxRateLimiter = network.rxRateLimiter
            converted.txRateLimiter = network.txRateLimiter
            guard let text = network.mac else { return converted }
            guard VMConfiguration.Network.isValidMAC(text), let mac = MACAddress(text) else {
                throw SwiftletError(message: "net\(index): '\(text)' is not a unicast MAC address (like 02:00:00:00:00:01)")
            }
            converted.mac = mac
            return converted
        }
        machineConfiguration.onWarning = configuration.onWarning
        machineConfiguration.monitorPath = configuration.monitor
        machineConfiguration.onMigrationEvent = configuration.onMigrationEvent
        if let timeout = machineConfiguration.timeout, !(timeout > 0) {
            throw SwiftletError(message: "the timeout must be positive")
        }

        var capture: CapturingSink?
        var fileSink: FileDescriptorSink?
        switch configuration.console {
        case .capture:
            capture = CapturingSink()
            machineConfiguration.serialOutput = capture!
        case .standardOutput:
            fileSink = FileDescriptorSink.standardOutput
        case let .file(path):
            do { fileSink = try FileDescriptorSink(path: path) } catch { throw SwiftletError(message: error.description) }
        case .discard:
            machineConfiguration.serialOutput = DiscardingSink()
        }
        if let fileSink {
            if let report = configuration.onConsoleFailure { fileSink.onFailure(report) }
            machineConfiguration.serialOutput = fileSink
        }
        self.capture = capture
        self.fileSink = fileSink
        self.traceExits = configuration.traceExits
        self.showMemory = configuration.showMemory
        do {
            machine = try Machine(configuration: machineConfiguration)
        } catch {
            throw SwiftletError(message: error.description)
        }
    }

    /// Changes disk `index`'s rate limiter while the VM runs (or before, or while paused),
    /// from any thread, as Firecracker's `PATCH /drives/{id}` does: a bucket left out of
    /// `configuration` stays as it is, one with `size` or `refill_time` 0 is removed, any
    /// other replaces the old one and starts full (with its one-time burst). `nil` changes
    /// nothing. A request waiting for tokens looks at the new buckets at once.
    public func updateRateLimiter(disk index: Int, _ configuration: RateLimiterConfiguration?) throws(SwiftletError) {
        do { try machine.updateRateLimiter(disk: index, configuration) } catch { throw SwiftletError(message: error.description) }
    }

    /// Changes network interface `index`'s receive and transmit rate limiters, from any
    /// thread, with the rules of ``updateRateLimiter(disk:_:)``; `nil` leaves one as it is.
    public func updateRateLimiters(networkInterface index: Int, rx: RateLimiterConfiguration?,
                                   tx: RateLimiterConfiguration?) throws(SwiftletError) {
        do {
            try machine.updateRateLimiters(networkInterface: index, receive: rx, transmit: tx)
        } catch {
            throw SwiftletError(message: error.description)
        }
    }

    /// Each disk's rate limiter as it is now (``updateRateLimiter(disk:_:)`` included):
    /// what Firecracker's `GET /vm/config` reports. An unlimited disk has no bucket.
    public var diskRateLimiters: [RateLimiterConfiguration] { machine.diskRateLimiters }

    /// The guest's network interfaces, in the order of ``VMConfiguration/networks``, with
    /// the MAC address each got.
    public var networkInterfaces: [VMNetworkInterface] {
        machine.networkInterfaces.map { VMNetworkInterface(name: $0.name, tap: $0.tap.name, mac: $0.mac.description,
                                                           createdTAP: $0.tap.created) }
    }

    /// Runs the guest until it stops, and says why.
    public func run() throws(SwiftletError) -> VMResult {
        let reason: StopReason
        do { reason = try machine.run() } catch { throw SwiftletError(message: error.description) }
        var result = VMResult(exit: VMExit(reason), console: capture?.bytes ?? [],
                              exitTable: traceExits ? machine.exitReport() : nil, consoleFailure: fileSink?.failure)
        if showMemory { result.memoryReport = machine.writtenPagesReport() }
        return result
    }

    /// Where the VM is in its life: `created` (built), `running`, `paused` or `stopped`.
    public var state: VMState { VMState(rawValue: machine.state.rawValue) ?? .stopped }

    /// Parks every vCPU at an instruction boundary and quiesces the devices; the guest
    /// sees nothing but time passing. Throws when the VM is not running.
    public func pause() throws(SwiftletError) {
        do { try machine.pause() } catch { throw SwiftletError(message: error.description) }
    }

    /// Continues a paused VM exactly where it stopped. Throws when it is not paused.
    public func resume() throws(SwiftletError) {
        do { try machine.resume() } catch { throw SwiftletError(message: error.description) }
    }

    /// Writes the paused VM to `directory` (made if missing): a state file and a memory
    /// file, which ``VMConfiguration/Boot/snapshot(directory:)`` restores in this or
    /// another process. The VM stays paused. `diff`: see ``snapshot(to:diff:)-(SnapshotPaths,_)``.
    @discardableResult
    public func snapshot(to directory: String, diff: Bool = false) throws(SwiftletError) -> SnapshotSummary {
        try snapshot(to: SnapshotPaths(directory: directory), diff: diff)
    }

    /// Writes the paused VM to a state file and a memory file (Firecracker's
    /// `snapshot_path` and `mem_file_path`). With `diff`, the memory file holds only the
    /// pages written since the VM's previous snapshot (or the one it was restored from),
    /// and the state file names that one as its parent; it needs
    /// ``VMConfiguration/trackDirtyPages`` or ``startDirtyTracking()`` before that
    /// snapshot. The VM stays paused.
    @discardableResult
    public func snapshot(to paths: SnapshotPaths, diff: Bool = false) throws(SwiftletError) -> SnapshotSummary {
        do { return try machine.snapshot(to: paths, diff: diff) } catch { throw SwiftletError(message: error.description) }
    }

    /// Starts tracking the pages of RAM written (by the guest and by devices), for diff
    /// snapshots and migration. Works while the VM runs.
    public func startDirtyTracking() throws(SwiftletError) {
        do { try machine.startDirtyTracking() } catch { throw SwiftletError(message: error.description) }
    }

    /// Types `bytes` into the guest's serial console, as ``VMConfiguration/forwardStandardInput``
    /// would from standard input; allowed while paused too (the bytes are then saved in a
    /// snapshot with the UART). Returns how many were taken (the UART holds up to 64 KiB).
    @discardableResult
    public func typeOnConsole(_ bytes: [UInt8]) -> Int {
        machine.typeOnConsole(bytes)
    }

    /// Moves the running (or paused) VM to a Swiftlet started with
    /// ``VMConfiguration/Boot/incoming(address:)`` at `address` (`unix:PATH` or
    /// `tcp:HOST:PORT`): RAM is copied while the guest runs, then the guest pauses for the
    /// last pages and the vCPU and device state, and the target runs it. On success this VM
    /// has stopped (``run()`` returns ``VMExit/migrated(to:)``); on any failure it goes on
    /// as before and this throws. Blocks until the migration ends.
    @discardableResult
    public func migrate(to address: String, options: MigrationOptions = MigrationOptions()) throws(SwiftletError) -> MigrationSummary {
        do {
            return try machine.migrate(to: try MigrationAddress(parsing: address), options: options)
        } catch {
            throw SwiftletError(message: error.description)
        }
    }

    /// Stops a running VM from another thread; ``run()`` then returns `exit`.
    public func stop(_ exit: VMExit = .userQuit) {
        machine.requestStop(exit.stopReason)
    }
}

extension ImageSource {
    init(_ image: VMConfiguration.Image) {
        switch image {
        case let .file(path): self = .file(path)
        case let .bytes(bytes, name): self = .bytes(bytes, name: name)
        }
    }
}

/// A console that keeps nothing.
struct DiscardingSink: ByteSink {
    func write(_ bytes: UnsafeRawBufferPointer) {}
}
