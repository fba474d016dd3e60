import Basics
import Devices
import Dispatch
import Glibc
import KVM
import Sandbox
import Synchronization
import X86

/// Runs one vCPU on its own thread: the exit loop.
///
/// `KVM_RUN` enters the guest; when the guest does something the kernel leaves to user
/// space (an `in`/`out`, an access to an address with no RAM), the ioctl returns and
/// the exit is handed to a device on the port or MMIO bus. Then the loop enters the
/// guest again. A stop request sets `immediate_exit` and sends a signal, which makes a
/// `KVM_RUN` in progress return `EINTR`.
final class VCPURunner: @unchecked Sendable {
    // @unchecked Sendable: `statistics` and `firstRunAt` are written only by the vCPU's
    // own thread and read by the machine only after `finish(within:)` saw it end.

    let vcpu: VCPU
    private let portBus: IOBus
    private let mmioBus: IOBus
    private let stop: StopController
    private let traceExits: Bool
    private let tripleFault: TripleFaultAction
    private let emulationFailures: EmulationFailureHandler
    private let pause: PauseControl
    /// The file the guest came from, for the crash report's disassembly hint.
    private let guestImage: GuestImage?
    /// How the thread confines itself before it enters the guest.
    private let sandbox: Sandbox
    private let thread = Mutex<NamedThread?>(nil)
    private let finished = DispatchSemaphore(value: 0)

    private(set) var statistics = ExitStatistics()
    /// CLOCK_MONOTONIC time of the first `KVM_RUN`.
    private(set) var firstRunAt: UInt64?

    init(vcpu: VCPU, portBus: IOBus, mmioBus: IOBus, stop: StopController, traceExits: Bool, tripleFault: TripleFaultAction,
         emulationFailures: EmulationFailureHandler, pause: PauseControl, guestImage: GuestImage? = nil,
         sandbox: Sandbox = .off) {
        self.pause = pause
        self.sandbox = sandbox
        self.vcpu = vcpu
        self.portBus = portBus
        self.mmioBus = mmioBus
        self.stop = stop
        self.traceExits = traceExits
        self.tripleFault = tripleFault
        self.emulationFailures = emulationFailures
        self.guestImage = guestImage
    }

    /// Starts the thread `vcpu<N>` and arranges for it to be kicked on stop. The thread
    /// waits for `gate` before it enters the guest, so that no vCPU runs until every
    /// thread of the machine exists.
    func start(after gate: DispatchGroup) throws(ThreadStartError) {
        let name = "vcpu\(vcpu.id)"
        let started = try NamedThread(name: name) { [self] in
            Signals.unblockKick()
            SandboxedThreads.confine(sandbox, .vcpu, name: name)
            gate.wait()
            runLoop()
            pause.runnerEnded()
            finished.signal()
        }
        thread.withLock { $0 = started }
        // Weak: the stop controller outlives the run (the board's devices hold it), and a
        // strong reference would keep this runner, its buses and every device on them
        // (with their disk images, locks included) alive after the machine is gone.
        stop.onStop { [weak self] in self?.kick() }
    }

    /// Waits up to `seconds` for the thread to leave its loop, then joins it. Returns
    /// `false` when it did not stop in time (its statistics must not be read then).
    func finish(within seconds: Double) -> Bool {
        guard let started = thread.withLock({ $0 }) else { return true }
        guard finished.wait(timeout: .now() + seconds) == .success else { return false }
        started.join()
        finished.signal() // later calls return at once
        return true
    }

    /// Makes `KVM_RUN` return now or at its next entry. `immediate_exit` covers a thread
    /// that has not entered the guest yet; the signal one that is inside it. The thread
    /// is joinable, so its handle stays valid even after its loop ended.
    func kick() {
        vcpu.requestImmediateExit()
        thread.withLock { $0?.signal(Signals.kick) }
    }

    private func runLoop() {
        firstRunAt = MonotonicClock.nanoseconds()
        while !stop.isStopping {
            let exit: VCPUExit
            do {
                exit = try vcpu.run()
            } catch {
                crash("KVM_RUN failed: \(error)")
                return
            }
            if case .interrupted = exit, pause.pauseRequested, !stop.isStopping {
                // Kicked for a pause: this KVM_RUN completed any I/O the previous exit left
                // pending, so the vCPU is at an instruction boundary. Park until resumed;
                // the next KVM_RUN must not return at once.
                pause.park(runner: vcpu.id)
                vcpu.clearImmediateExit()
                // A pause requested between the resume and the line above had its kick
                // undone by the clear: ask for the exit again.
                if pause.pauseRequested || stop.isStopping { vcpu.requestImmediateExit() }
                continue
            }
            if traceExits {
                let start = MonotonicClock.nanoseconds()
                handle(exit, counting: true, since: start)
            } else {
                handle(exit, counting: false, since: 0)
            }
        }
    }

    /// Handles one exit; with `counting`, records it in ``statistics``.
    private func handle(_ exit: VCPUExit, counting: Bool, since start: UInt64) {
        switch exit {
        case let .io(port, isWrite, size, count, data):
            // `rep ins/outs` arrive as `count` accesses of `size` bytes in one buffer.
            var device: IOBus.Entry?
            for index in 0..<count {
                let slice = UnsafeMutableRawBufferPointer(rebasing: data[(index * size)..<((index + 1) * size)])
                device = isWrite ? portBus.write(UInt64(port), from: UnsafeRawBufferPointer(slice))
                                 : portBus.read(UInt64(port), into: slice)
            }
            if counting {
                statistics.recordPort(port, isWrite ? .write : .read, device: device?.name,
                                      nanoseconds: MonotonicClock.nanoseconds() - start)
            }
        case let .mmio(address, isWrite, data):
            let device = isWrite ? mmioBus.write(address, from: UnsafeRawBufferPointer(data)) : mmioBus.read(address, into: data)
            if counting {
                statistics.recordMMIO(address, isWrite ? .write : .read,
                                      device: device.map { ($0.name, $0.length, address - $0.base) },
                                      nanoseconds: MonotonicClock.nanoseconds() - start)
            }
        case .interrupted:
            if counting { statistics.recordEvent("interrupted (signal)", nanoseconds: MonotonicClock.nanoseconds() - start) }
        case .irqWindowOpen:
            if counting { statistics.recordEvent("IRQ window open", nanoseconds: MonotonicClock.nanoseconds() - start) }
        case .halt:
            // Only reached without an in-kernel irqchip: nothing can wake the CPU.
            crash("the vCPU halted with no interrupt controller to wake it (KVM_EXIT_HLT)")
        case .shutdown:
            switch tripleFault {
            case .reset:
                stop.stop(.reset(how: "triple fault on vCPU \(vcpu.id)"))
            case .stop:
                crash("the guest triple-faulted (KVM_EXIT_SHUTDOWN): an exception occurred while the CPU could not deliver one")
            }
        case let .failEntry(reason, cpu):
            crash("VM entry failed (KVM_EXIT_FAIL_ENTRY, hardware reason 0x\(Hex.digits(reason)), CPU \(cpu)): the vCPU state is invalid")
        case let .internalError(suberror, data):
            if let failure = EmulationFailure(suberror: suberror, data: data) {
                // KVM's instruction emulator gave up: complete the instruction if it can be
                // done exactly (see EmulationFailureHandler), else stop with its bytes.
                switch emulationFailures.handle(failure) {
                case let .resumed(label):
                    if counting { statistics.recordEvent(label, nanoseconds: MonotonicClock.nanoseconds() - start) }
                case let .crash(message):
                    crash(message)
                }
                return
            }
            let what = suberror == 1 ? "emulation failure: KVM could not emulate an instruction" : "suberror \(suberror)"
            crash("KVM internal error (KVM_EXIT_INTERNAL_ERROR, \(what)); data: \(data.map { Hex.prefixed($0) }.joined(separator: " "))")
        case let .systemEvent(type, _):
            switch type {
            case CKVM_SYSTEM_EVENT_SHUTDOWN: stop.stop(.powerOff(how: "KVM system event"))
            case CKVM_SYSTEM_EVENT_RESET: stop.stop(.reset(how: "KVM system event"))
            case CKVM_SYSTEM_EVENT_CRASH: crash("the guest reported a crash (KVM_SYSTEM_EVENT_CRASH)")
            default: crash("unknown KVM system event \(type)")
            }
        case let .other(reason):
            crash("unhandled KVM exit reason \(reason)")
        }
    }

    /// Stops the VM as a guest crash, with a register dump of this vCPU.
    private func crash(_ message: String) {
        var report = "vCPU \(vcpu.id): \(message)"
        if let regs = try? vcpu.registers(), let sregs = try? vcpu.specialRegisters() {
            // Where RIP lies in guest memory: through the guest's page tables when paging is on.
            let linear = RegisterDump.linearRIP(regs, sregs)
            let physical = sregs.cr0 & (1 << 31) != 0 ? ((try? vcpu.translate(linearAddress: linear)) ?? nil) : linear
            report += "\n" + RegisterDump.format(regs, sregs, image: guestImage, physicalRIP: physical)
        }
        stop.stop(.crash(report))
    }
}

