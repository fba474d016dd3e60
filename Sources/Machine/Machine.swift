import Basics
import Boot
import Devices
import Dispatch
import EventLoop
import KVM
import Memory
import RateLimit
import Sandbox
import Synchronization
import Virtio
import X86

/// A virtual machine, built and ready to run: owns the ``Board`` (VM, RAM, devices) and
/// one ``VCPURunner`` per vCPU.
///
/// Building it reads the payload (a kernel's header is checked before the rest of the
/// file is read), builds the board, loads the payload into guest RAM and drops the host
/// copy, then creates each vCPU (`KVM_CREATE_VCPU`) and sets it up through ``VCPUSetup``
/// (CPUID, MSRs, FPU, LAPIC) and ``EntryStateApplier`` (the boot vCPU's registers).
public final class Machine: Sendable {
    /// The most vCPUs a machine may have: xAPIC IDs are 8 bits, 0xFF is the broadcast ID
    /// and the IOAPIC takes the ID after the last vCPU (see ``FirmwareTables``).
    public static let maximumCPUs = FirmwareTables.maximumCPUs
    /// How long a stopping vCPU thread may take to leave `KVM_RUN`.
    static let stopGracePeriod = 2.0

    let board: Board
    let stop = StopController()
    let pauseControl = PauseControl()
    private let lifecycle = Mutex(LifecycleState.created)
    /// Whether a migration is under way (``migrate(to:options:beforeStop:)``).
    let migration = Mutex(false)
    /// What the monitor's `migrate` uses (`migrate_set_parameter`).
    let migrationParameters = Mutex(MachineMigrationOptions())
    /// The machine's event loop: made with the board (devices register with it), run on
    /// its own thread by ``run()``.
    let loop: EventLoop
    let runners: [VCPURunner]
    private let timeout: Double?
    private let forwardStandardInput: Bool
    private let handleTerminationSignals: Bool
    private let serialOutput: any ByteSink
    /// One line on what was loaded, for logs (`--verbose`-style reporting, tests).
    public let loadSummary: String
    /// Runners whose thread did not stop within the grace period (their statistics are
    /// not read).
    private let unfinished = SendableBox<[Int]>([])

    /// Size of the XSAVE area of this KVM's vCPUs (`KVM_CAP_XSAVE2`), for snapshots.
    let xsaveSize: Int
    /// The configuration the machine was built with (after a restore: the snapshot's).
    let configuration: MachineConfiguration
    /// With the pc-testdev (a Multiboot kernel): a restore builds it again.
    let hasTestDevice: Bool
    /// The CPUID leaves each vCPU was given (`KVM_SET_CPUID2`), by vCPU id: a snapshot
    /// records these rather than what `KVM_GET_CPUID2` reads back, which some KVMs fill
    /// with bits of their own.
    let cpuidTables: [[CPUIDEntry]]
    /// Whether written pages are being tracked, and the snapshot a diff would build on.
    let tracking = Mutex(DirtyTracking())

    /// How the machine starts: a payload booted from its entry point, or a snapshot
    /// continued where it was taken.
    private enum Start {
        case boot(Payload)
        case restore(LoadedSnapshot)
        /// A VM arriving from another Swiftlet: RAM and state received, not yet committed.
        case incoming(IncomingMigration)
    }

    /// Builds the VM. Nothing runs yet. With ``BootSource/snapshot(_:)``, the machine is the
    /// one the snapshot describes, in the state it was saved in; the snapshot is checked
    /// (format, checksum, CPU features, memory file) before any vCPU exists. With
    /// ``BootSource/incoming(_:)``, it waits for a migration and is the machine that arrived
    /// (the source is told when building it fails, and resumes its own).
    public convenience init(configuration given: MachineConfiguration) throws(MachineError) {
        var configuration = given
        let start: Start
        if case let .incoming(address) = given.boot {
            let session = try IncomingMigration.receive(at: address, configuration: given, report: given.onMigrationEvent)
            do { configuration = try given.applying(session.manifest.machine) } catch {
                session.fail("the VM's configuration: \(error)")
                throw .migration("the VM's configuration: \(error)")
            }
            start = .incoming(session)
        } else if case let .snapshot(paths) = given.boot {
            let snapshot = try LoadedSnapshot.load(paths: paths)
            do { configuration = try given.applying(snapshot.manifest.machine) } catch { throw .snapshot(path: paths.description, error) }
            start = .restore(snapshot)
        } else {
            // Read (and check) the payload before touching /dev/kvm: a wrong file is
            // reported at once. The bytes live only until they are copied into guest RAM.
            let virtioDevices = configuration.disks.count + configuration.networks.count
            let virtioWords = Board.virtioCommandLine(deviceCount: virtioDevices, transport: configuration.virtioTransport)
            let platform = Board.platformDevices(deviceCount: virtioDevices, transport: configuration.virtioTransport)
            start = .boot(try Payload.read(configuration.boot, memorySize: configuration.memorySize,
                                           cpuCount: configuration.cpuCount, platform: platform, mmioCommandLine: virtioWords))
        }
        do {
            try self.init(configuration: configuration, start: start)
        } catch {
            if case let .incoming(session) = start { session.fail(error.description) }
            throw error
        }
    }

    private init(configuration: MachineConfiguration, start: Start) throws(MachineError) {
        guard configuration.cpuCount >= 1 else { throw .invalidConfiguration("the machine needs at least one vCPU") }
        guard configuration.cpuCount <= Self.maximumCPUs else {
            throw .invalidConfiguration("\(configuration.cpuCount) vCPUs are more than Swiftlet supports (\(Self.maximumCPUs): "
                + "APIC IDs are 8 bits, 255 is the broadcast ID and the IOAPIC takes one)")
        }
        self.configuration = configuration
        timeout = configuration.timeout
        forwardStandardInput = configuration.forwardStandardInput
        handleTerminationSignals = configuration.handleTerminationSignals
        serialOutput = configuration.serialOutput

        do { loop = try EventLoop() } catch { throw .invalidConfiguration("cannot make the VM's event loop: \(error)") }
        switch start {
        case let .boot(payload):
            hasTestDevice = payload.format == .multiboot
            board = try Board(configuration: configuration, stop: stop, loop: loop, withTestDevice: hasTestDevice)
        case let .restore(snapshot):
            hasTestDevice = snapshot.manifest.machine.testDevice
            board = try Board(configuration: configuration, stop: stop, loop: loop, withTestDevice: hasTestDevice,
                              memory: try snapshot.mapMemory(transparentHugePages: configuration.transparentHugePages))
        case let .incoming(session):
            hasTestDevice = session.manifest.machine.testDevice
            board = try Board(configuration: configuration, stop: stop, loop: loop, withTestDevice: hasTestDevice, memory: session.memory)
        }
        var entry: EntryState?
        var guestImage: GuestImage?
        switch start {
        case let .boot(payload):
            (entry, loadSummary) = try payload.load(into: board.memory)
            guestImage = Self.guestImage(configuration.boot, format: payload.format)
        case let .restore(snapshot):
            loadSummary = "restored the snapshot \(snapshot.paths) (\(configuration.cpuCount) vCPU, "
                + "\(ByteSize.exact(configuration.memorySize)) of RAM, taken by Swiftlet \(snapshot.manifest.swiftletVersion))"
        case let .incoming(session):
            loadSummary = "received the VM migrated to \(session.address) (\(configuration.cpuCount) vCPU, "
                + "\(ByteSize.exact(configuration.memorySize)) of RAM, \(session.pagesReceived) pages, from Swiftlet \(session.hello.swiftletVersion))"
        }

        do {
            let maximum = board.system.maximumVCPUs
            guard configuration.cpuCount <= maximum else {
                throw MachineError.invalidConfiguration("\(configuration.cpuCount) vCPUs are more than this KVM allows (\(maximum))")
            }
            if case let .restore(snapshot) = start { try snapshot.checkCPUFeatures(supported: try board.system.supportedCPUID()) }
            let cpu = try Self.resolveCPU(configuration.cpuModel, system: board.system, memoryEnd: board.memory.end)
            // KVM refuses EFER.LME for a vCPU whose CPUID lacks long mode; say why first.
            if let entry, entry.efer & Boot.X86.eferLME != 0, !cpu.hasLongMode {
                throw MachineError.invalidConfiguration("the kernel is entered in 64-bit mode, but CPU model "
                    + "\(configuration.cpuModel) has no long mode (lm); use a 32-bit entry or keep lm")
            }
            // With completion on, have KVM report emulation failures at every CPL (it would
            // inject #UD at CPL > 0 itself) and queue no #UD of its own at CPL 0.
            let exitOnEveryFailure = configuration.completeInstructions && board.system.check(.exitOnEmulationFailure) > 0
            if exitOnEveryFailure { try board.vm.enable(.exitOnEmulationFailure, arguments: [1]) }
            let host = HostCPUFacts()
            xsaveSize = board.system.check(.xsave) > 0 ? max(4096, Int(board.vm.check(.xsave2))) : 0
            let fpuAccess: GuestFPUAccess = xsaveSize > 0 ? .xsave(size: xsaveSize) : .fpu
            var runners: [VCPURunner] = []
            var cpuModel: CPUModel?
            var tables: [[CPUIDEntry]] = []
            for id in 0..<configuration.cpuCount {
                let vcpu = try board.vm.createVCPU(id: id)
                switch start {
                case .boot:
                    // The TSC frequency is a vCPU ioctl: ask the first vCPU, once.
                    let model = cpuModel ?? CPUModel(base: cpu.table.entries, cpuCount: configuration.cpuCount, tscKHz: vcpu.tscKHz())
                    cpuModel = model
                    let entries = model.entries(forAPICID: UInt32(id))
                    try VCPUSetup.configure(vcpu, cpuid: entries)
                    tables.append(entries)
                case let .restore(snapshot):
                    tables.append(snapshot.manifest.vcpus[id].cpuid.map(\.entry))
                case let .incoming(session):
                    tables.append(session.manifest.vcpus[id].cpuid.map(\.entry))
                }
                let emulationFailures = EmulationFailureHandler(vcpu: vcpu, memory: board.memory, host: host, fpuAccess: fpuAccess,
                                                                completeInstructions: configuration.completeInstructions,
                                                                exitOnEveryFailure: exitOnEveryFailure)
                runners.append(VCPURunner(vcpu: vcpu, portBus: board.portBus, mmioBus: board.mmioBus, stop: stop,
                                          traceExits: configuration.traceExits, tripleFault: configuration.tripleFault,
                                          emulationFailures: emulationFailures, pause: pauseControl, guestImage: guestImage,
                                          sandbox: configuration.sandbox))
            }
            self.runners = runners
            cpuidTables = tables
            switch start {
            case .boot:
                // vCPU 0 is the bootstrap processor; the others wait in the in-kernel local
                // APIC for INIT and Startup IPIs from it, as on a PC.
                try EntryStateApplier.apply(entry!, to: runners[0].vcpu)
            case let .restore(snapshot):
                try snapshot.restore(vm: board.vm, vcpus: runners.map(\.vcpu), board: board)
            case let .incoming(session):
                try session.restore(vm: board.vm, vcpus: runners.map(\.vcpu), board: board)
            }
        } catch let error as MachineError {
            throw error
        } catch let error as KVMError {
            throw .kvm(error)
        } catch {
            throw .invalidConfiguration("\(error)")
        }
        if configuration.trackDirtyPages {
            try startDirtyTracking()
            // A restored machine's RAM is its snapshot's: the first diff builds on that.
            if case let .restore(snapshot) = start {
                tracking.withLock { $0.base = (snapshot.absoluteStatePath, snapshot.manifest.id) }
            }
        }
        // The last step of an incoming migration: ready, and run only once the source commits.
        if case let .incoming(session) = start { try session.complete() }
    }

    /// The file the guest was booted from, as the crash report's disassembly hint names it.
    static func guestImage(_ boot: BootSource, format: KernelFormat?) -> GuestImage? {
        switch boot {
        case let .flat(source):
            return .flat(path: source.name, loadAddress: FlatBinary.loadAddress)
        case let .kernel(kernel):
            return format == .bzImage ? .bzImage(path: kernel.kernel.name) : .elf(path: kernel.kernel.name)
        case .snapshot, .incoming:
            return nil
        }
    }

    /// The CPU model checked against this KVM (`KVM_GET_SUPPORTED_CPUID`) and against the
    /// guest's RAM, which must fit in the model's physical address width.
    static func resolveCPU(_ spec: CPUModelSpec, system: KVMSystem, memoryEnd: UInt64) throws(MachineError) -> CPUDefinition {
        let definition: CPUDefinition
        do {
            definition = try CPUDefinition.resolve(spec, supported: try system.supportedCPUID())
            try definition.requireSupported()
        } catch let error as CPUModelError {
            throw .invalidConfiguration(error.description)
        } catch let error as KVMError {
            throw .kvm(error)
        } catch {
            throw .invalidConfiguration("\(error)")
        }
        let bits = definition.table.physicalAddressBits
        guard bits >= 64 || memoryEnd <= 1 << UInt64(bits) else {
            throw .invalidConfiguration("guest RAM ends at \(ByteSize.exact(memoryEnd)), beyond the \(bits)-bit physical "
                + "addresses of CPU model \(spec); use less memory or another model")
        }
        return definition
    }

    /// Runs the vCPUs until the guest exits, the timeout passes, a signal arrives or the
    /// user quits. Returns why it stopped. Throws only when the event loop or a thread
    /// cannot be started; the vCPUs already started are stopped first.
    ///
    /// Threads: one per vCPU, and `events`, the event loop, which waits on the timeout's
    /// timerfd, the termination signals' signalfd and standard input. The calling thread
    /// waits for the stop decision.
    public func run() throws(MachineError) -> StopReason {
        try move(from: [.created], to: .running, doing: "run")
        defer { lifecycle.withLock { $0 = .stopped } }
        Signals.installKickHandler()
        var loopThread: NamedThread?
        var monitor: MonitorServer?
        // vCPU threads wait here until all of them exist: a machine that cannot get its
        // threads (a process limit) fails before the guest runs at all.
        let gate = DispatchGroup()
        gate.enter()
        do {
            try watchStopSources(on: loop)
            if let path = configuration.monitorPath {
                monitor = try MonitorServer(path: path, loop: loop) { [self] line, reply in monitorCommand(line, reply: reply) }
            }
            // With a monitor, the event loop serves snapshot and migrate commands (files,
            // sockets): it is the migration kind's thread, whose list is not measured yet, so
            // it stays unconfined (docs/security.md, "Not covered").
            let confineLoop = configuration.monitorPath == nil
            loopThread = try NamedThread(name: "events") { [loop, sandbox = configuration.sandbox] in
                if confineLoop { SandboxedThreads.confine(sandbox, .eventLoop, name: "events") }
                loop.run()
            }
            stop.onStop { [loop] in loop.stop() }
            // A stop while paused lets the parked vCPU threads go, so they can end.
            stop.onStop { [pauseControl] in pauseControl.resumeAll() }
            for runner in runners { try runner.start(after: gate) }
            // Every thread exists: the calling thread is confined last (the CLI's).
            // With a monitor, the calling thread ends the migration and removes the monitor's
            // socket: like the event loop, it waits for the migration kind's measured list.
            if configuration.confineCallingThread && configuration.monitorPath == nil {
                SandboxedThreads.confine(configuration.sandbox, .control, name: "swiftlet")
            }
            gate.leave()
        } catch {
            stop.stop(.crash("could not start the VM"))
            gate.leave()
            finishRunners()
            loopThread?.join()
            monitor?.close()
            board.detachDevices()
            Console.restoreTerminal()
            if let error = error as? ThreadStartError { throw .thread(error) }
            if let error = error as? MachineError { throw error }
            throw .invalidConfiguration("cannot start the VM's event loop: \(error)")
        }
        let reason = stop.wait(timeout: nil)
        finishRunners()
        loopThread?.join()
        monitor?.close()
        board.detachDevices()
        Console.restoreTerminal()
        return reason
    }

    /// Registers what can stop the VM from outside: the timeout, the termination signals,
    /// and the console (whose `Ctrl-A x` quits).
    private func watchStopSources(on loop: EventLoop) throws {
        if let timeout {
            let timer = try TimerFD()
            try loop.register(timer.rawValue, for: .readable, owner: timer) { [stop] _ in
                if timer.expirations() > 0 { stop.stop(.timeout) }
            }
            try timer.arm(after: .nanoseconds(Int64(min(timeout, 1e9) * 1e9)))
        }
        if handleTerminationSignals {
            try Signals.watchTermination(on: loop, stop: stop)
        }
        if forwardStandardInput {
            try Console(serial: board.serial, stop: stop, output: serialOutput).attach(to: loop)
        }
    }

    private func finishRunners() {
        let late = runners.filter { !$0.finish(within: Self.stopGracePeriod) }.map(\.vcpu.id)
        unfinished.value = late
    }

    /// The merged exit table and the time of the first `KVM_RUN`, for `--trace-exits`.
    public func exitReport() -> String {
        let late = Set(unfinished.value)
        var merged = ExitStatistics()
        let finished = runners.filter { !late.contains($0.vcpu.id) }
        for runner in finished { merged.merge(runner.statistics) }
        var report = merged.formattedTable()
        if let first = finished.compactMap(\.firstRunAt).min() {
            report += "\nfirst KVM_RUN: monotonic \(first) ns"
        }
        for interface in board.networkInterfaces {
            report += "\nvirtio-net \(interface.name) (TAP \(interface.tap.name)): \(interface.device.statistics.summary)"
        }
        report += "\ninterrupt lines Swiftlet drove (KVM_IRQ_LINE): "
            + board.interruptLines.map(\.summary).joined(separator: "; ")
        report += "\n(the PIT's timer ticks, the PIC, IOAPIC and local APIC registers, EOIs and hlt stay inside KVM: they never appear above)"
        if !late.isEmpty {
            report += "\nnot counted: vCPU \(late.sorted().map(String.init).joined(separator: ", ")) did not stop within \(Int(Self.stopGracePeriod)) s"
        }
        return report
    }
}

extension Machine {
    /// The memory slots as KVM has them now, one line each (`--show-memory`).
    public func memorySlotTable() -> String {
        board.slots.slotTable(withSlotDevice: board.slots.logDirtyPages)
    }

    /// Every memory slot with the guest pages written in it during the run (`--show-memory`;
    /// call it once ``run()`` returned).
    public func writtenPagesReport() -> String {
        board.slots.writtenPagesReport()
    }
}

/// A value set once by one thread and read later by another, under a lock.
final class SendableBox<Value: Sendable>: Sendable {
    private let storage: Mutex<Value>
    init(_ value: Value) { storage = Mutex(value) }
    var value: Value {
        get { storage.withLock { $0 } }
        set { storage.withLock { $0 = newValue } }
    }
}

extension Machine {
    /// The guest's network interfaces: names, TAPs and MAC addresses.
    public var networkInterfaces: [NetworkInterface] { board.networkInterfaces }

    /// The virtio-blk device of each disk, in configuration order.
    var diskDevices: [VirtioBlock] { board.virtioTransports.compactMap { $0.device as? VirtioBlock } }

    /// The rate limiter of each disk as it is now (updates included).
    public var diskRateLimiters: [RateLimiterConfiguration] { diskDevices.map(\.rateLimiterConfiguration) }

    /// Changes disk `index`'s rate limiter, from any thread, in any state (Firecracker's
    /// `PATCH /drives/{id}` rules: a bucket left out stays as it is; size or refill time 0
    /// removes it; another starts full). `nil` changes nothing.
    public func updateRateLimiter(disk index: Int, _ configuration: RateLimiterConfiguration?) throws(MachineError) {
        let devices = diskDevices
        guard devices.indices.contains(index) else {
            throw .invalidConfiguration("there is no disk \(index) (the machine has \(devices.count))")
        }
        if let configuration { devices[index].updateRateLimiter(configuration) }
    }

    /// Changes network interface `index`'s rate limiters, from any thread, in any state;
    /// `nil` leaves that direction as it is (rules as ``updateRateLimiter(disk:_:)``).
    public func updateRateLimiters(networkInterface index: Int, receive: RateLimiterConfiguration?,
                                   transmit: RateLimiterConfiguration?) throws(MachineError) {
        let interfaces = board.networkInterfaces
        guard interfaces.indices.contains(index) else {
            throw .invalidConfiguration("there is no network interface \(index) (the machine has \(interfaces.count))")
        }
        interfaces[index].device.updateRateLimiters(receive: receive, transmit: transmit)
    }

    /// Stops the machine from any thread; ``run()`` returns `reason` (unless another
    /// reason came first).
    public func requestStop(_ reason: StopReason) {
        stop.stop(reason)
    }
}

/// Where a machine is in its life: built, running, paused, or stopped for good.
public enum LifecycleState: String, Sendable, Equatable {
    case created, running, paused, stopped
}

extension Machine {
    /// The machine's state now.
    public var state: LifecycleState { lifecycle.withLock { $0 } }

    /// Moves to `next` if the state is one of `allowed`, or throws naming both.
    private func move(from allowed: Set<LifecycleState>, to next: LifecycleState, doing action: String) throws(MachineError) {
        try lifecycle.withLock { (state) throws(MachineError) in
            guard allowed.contains(state) else { throw .invalidTransition(action: action, state: state.rawValue) }
            state = next
        }
    }

    /// How long a pause may wait for a vCPU to leave `KVM_RUN`.
    static let pauseTimeout = 5.0

    /// Parks every vCPU outside `KVM_RUN`, at an instruction boundary, then quiesces the
    /// devices (no request half-done). Returns once the machine is still. From `running`
    /// only.
    public func pause() throws(MachineError) {
        try move(from: [.running], to: .paused, doing: "pause")
        pauseControl.requestPause()
        for runner in runners { runner.kick() }
        guard pauseControl.awaitParked(count: runners.count, timeout: Self.pauseTimeout) else {
            stop.stop(.crash("a vCPU did not stop for a pause within \(Int(Self.pauseTimeout)) s"))
            throw .invalidConfiguration("the VM could not be paused: a vCPU did not leave KVM_RUN")
        }
        for core in board.virtioTransports { core.device.pause() }
        // A guest with kvmclock learns it was paused (KVM_KVMCLOCK_CTRL), so its watchdogs
        // do not take the pause for a hung CPU. EINVAL (no kvmclock set up) is expected.
        if board.vm.check(.kvmclockControl) > 0 {
            for runner in runners {
                let vcpu = runner.vcpu
                _ = pauseControl.perform(onRunner: vcpu.id) { () -> Bool in (try? vcpu.notifyPaused()) != nil }
            }
        }
    }

    /// Lets the devices and the vCPUs go on exactly where they stopped. From `paused` only.
    public func resume() throws(MachineError) {
        try move(from: [.paused], to: .running, doing: "resume")
        for core in board.virtioTransports { core.device.resume() }
        pauseControl.resumeAll()
    }
}
