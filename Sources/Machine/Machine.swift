import Basics
import Boot
import Devices
import KVM
import Memory
import Synchronization
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

    /// Builds the VM. Nothing runs yet.
    public init(configuration: MachineConfiguration) throws(MachineError) {
        guard configuration.cpuCount >= 1 else { throw .invalidConfiguration("the machine needs at least one vCPU") }
        guard configuration.cpuCount <= Self.maximumCPUs else {
            throw .invalidConfiguration("\(configuration.cpuCount) vCPUs are more than Swiftlet supports (\(Self.maximumCPUs): "
                + "APIC IDs are 8 bits, 255 is the broadcast ID and the IOAPIC takes one)")
        }
        timeout = configuration.timeout
        forwardStandardInput = configuration.forwardStandardInput
        handleTerminationSignals = configuration.handleTerminationSignals
        serialOutput = configuration.serialOutput

        // Read (and check) the payload before touching /dev/kvm: a wrong file is reported
        // at once. The bytes live only until they are copied into guest RAM.
        var payload: Payload? = try Payload.read(configuration.boot, memorySize: configuration.memorySize, cpuCount: configuration.cpuCount)
        board = try Board(configuration: configuration, stop: stop, withTestDevice: payload?.format == .multiboot)
        let entry: EntryState
        (entry, loadSummary) = try payload!.load(into: board.memory)
        payload = nil

        do {
            let maximum = board.system.maximumVCPUs
            guard configuration.cpuCount <= maximum else {
                throw MachineError.invalidConfiguration("\(configuration.cpuCount) vCPUs are more than this KVM allows (\(maximum))")
            }
            let supportedCPUID = try board.system.supportedCPUID()
            // With completion on, have KVM report emulation failures at every CPL (it would
            // inject #UD at CPL > 0 itself) and queue no #UD of its own at CPL 0.
            let exitOnEveryFailure = configuration.completeInstructions && board.system.check(.exitOnEmulationFailure) > 0
            if exitOnEveryFailure { try board.vm.enable(.exitOnEmulationFailure, arguments: [1]) }
            let host = HostCPUFacts()
            let fpuAccess: GuestFPUAccess = board.system.check(.xsave) > 0 ? .xsave(size: Int(board.vm.check(.xsave2))) : .fpu
            var runners: [VCPURunner] = []
            var cpuModel: CPUModel?
            for id in 0..<configuration.cpuCount {
                let vcpu = try board.vm.createVCPU(id: id)
                // The TSC frequency is a vCPU ioctl: ask the first vCPU, once.
                let model = cpuModel ?? CPUModel(supported: supportedCPUID, cpuCount: configuration.cpuCount, tscKHz: vcpu.tscKHz())
                cpuModel = model
                try VCPUSetup.configure(vcpu, cpuid: model.entries(forAPICID: UInt32(id)))
                let emulationFailures = EmulationFailureHandler(vcpu: vcpu, memory: board.memory, host: host, fpuAccess: fpuAccess,
                                                                completeInstructions: configuration.completeInstructions,
                                                                exitOnEveryFailure: exitOnEveryFailure)
                runners.append(VCPURunner(vcpu: vcpu, portBus: board.portBus, mmioBus: board.mmioBus, stop: stop,
                                          traceExits: configuration.traceExits, tripleFault: configuration.tripleFault,
                                          emulationFailures: emulationFailures))
            }
            self.runners = runners
            // vCPU 0 is the bootstrap processor; the others wait in the in-kernel local
            // APIC for INIT and Startup IPIs from it, as on a PC.
            try EntryStateApplier.apply(entry, to: runners[0].vcpu)
        } catch let error as MachineError {
            throw error
        } catch let error as KVMError {
            throw .kvm(error)
        } catch {
            throw .invalidConfiguration("\(error)")
        }
    }

    /// Runs the vCPUs until the guest exits, the timeout passes, a signal arrives or the
    /// user quits. Returns why it stopped. Throws only when a thread cannot be started;
    /// the vCPUs already started are stopped first.
    public func run() throws(MachineError) -> StopReason {
        Signals.installKickHandler()
        do {
            if handleTerminationSignals {
                Signals.blockTermination()
                try Signals.forwardTermination(to: stop)
            }
            if forwardStandardInput {
                try Console(serial: board.serial, stop: stop, output: serialOutput).start()
            }
            for runner in runners { try runner.start() }
        } catch {
            stop.stop(.crash("could not start the VM"))
            finishRunners()
            Console.restoreTerminal()
            throw .thread(error)
        }
        let reason = stop.wait(timeout: timeout)
        finishRunners()
        Console.restoreTerminal()
        return reason
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
        if !late.isEmpty {
            report += "\nnot counted: vCPU \(late.sorted().map(String.init).joined(separator: ", ")) did not stop within \(Int(Self.stopGracePeriod)) s"
        }
        return report
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
    /// Stops the machine from any thread; ``run()`` returns `reason` (unless another
    /// reason came first).
    public func requestStop(_ reason: StopReason) {
        stop.stop(reason)
    }
}
