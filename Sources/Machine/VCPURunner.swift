import Devices
import Dispatch
import Glibc
import KVM
import Synchronization

/// Runs one vCPU on its own thread: the exit loop.
///
/// `KVM_RUN` enters the guest; when the guest does something the kernel leaves to user
/// space (an `in`/`out`, an access to an address with no RAM), the ioctl returns and
/// the exit is handed to a device on the port or MMIO bus. Then the loop enters the
/// guest again. A stop request sets `immediate_exit` and sends a signal, which makes a
/// `KVM_RUN` in progress return `EINTR`.
final class VCPURunner: @unchecked Sendable {
    // @unchecked Sendable: `statistics` and `firstRunAt` are written only by the vCPU's
    // own thread and read by the main thread after `finished` is signalled.

    let vcpu: VCPU
    private let portBus: IOBus
    private let mmioBus: IOBus
    private let stop: StopController
    private let traceExits: Bool
    private let thread = Mutex<pthread_t?>(nil)
    private let finished = DispatchSemaphore(value: 0)

    private(set) var statistics = ExitStatistics()
    /// CLOCK_MONOTONIC time of the first `KVM_RUN`.
    private(set) var firstRunAt: UInt64?

    init(vcpu: VCPU, portBus: IOBus, mmioBus: IOBus, stop: StopController, traceExits: Bool) {
        self.vcpu = vcpu
        self.portBus = portBus
        self.mmioBus = mmioBus
        self.stop = stop
        self.traceExits = traceExits
    }

    /// Starts the thread `vcpu<N>` and arranges for it to be kicked on stop.
    func start() {
        stop.onStop { [self] in kick() }
        NamedThread.spawn(name: "vcpu\(vcpu.id)") { [self] in
            // The thread publishes its own handle, and withdraws it before it ends, both
            // under the lock `kick()` signals under: a detached thread's handle must
            // never be signalled once the thread is gone.
            thread.withLock { $0 = pthread_self() }
            SignalSetup.unblockKickSignal()
            runLoop()
            thread.withLock { $0 = nil }
            finished.signal()
        }
    }

    /// Waits up to `seconds` for the thread to leave its loop.
    @discardableResult
    func waitUntilFinished(seconds: Double) -> Bool {
        finished.wait(timeout: .now() + seconds) == .success
    }

    /// Makes `KVM_RUN` return now or at its next entry. `immediate_exit` covers a thread
    /// that has not entered the guest yet (or not even published its handle).
    private func kick() {
        vcpu.requestImmediateExit()
        thread.withLock { handle in
            if let handle { pthread_kill(handle, SignalSetup.kickSignal) }
        }
    }

    private func runLoop() {
        firstRunAt = monotonicNanoseconds()
        while !stop.isStopping {
            let exit: VCPUExit
            do {
                exit = try vcpu.run()
            } catch {
                fail("KVM_RUN failed: \(error)")
                return
            }
            if traceExits {
                let start = monotonicNanoseconds()
                let key = handle(exit)
                statistics.record(key, nanoseconds: monotonicNanoseconds() - start)
            } else {
                _ = handle(exit)
            }
        }
    }

    /// Handles one exit and returns what it is counted as.
    private func handle(_ exit: VCPUExit) -> ExitStatistics.Key {
        switch exit {
        case let .io(port, isWrite, size, count, data):
            // `rep ins/outs` arrive as `count` accesses of `size` bytes in one buffer.
            for index in 0..<count {
                let slice = UnsafeMutableRawBufferPointer(rebasing: data[(index * size)..<((index + 1) * size)])
                if isWrite {
                    portBus.write(UInt64(port), from: UnsafeRawBufferPointer(slice))
                } else {
                    portBus.read(UInt64(port), into: slice)
                }
            }
            return isWrite ? .portOut(port) : .portIn(port)
        case let .mmio(address, isWrite, data):
            if isWrite {
                mmioBus.write(address, from: UnsafeRawBufferPointer(data))
            } else {
                mmioBus.read(address, into: data)
            }
            return isWrite ? .mmioWrite(address) : .mmioRead(address)
        case .interrupted:
            return .other("interrupted (signal)")
        case .irqWindowOpen:
            return .other("IRQ window open")
        case .halt:
            // Only reached without an in-kernel irqchip: nothing can wake the CPU.
            stop.stop(.guestReset)
            return .other("HLT")
        case .shutdown:
            fail("the guest triple-faulted (KVM_EXIT_SHUTDOWN): an exception occurred while the CPU could not deliver one")
            return .other("SHUTDOWN")
        case let .failEntry(reason, cpu):
            fail("VM entry failed (KVM_EXIT_FAIL_ENTRY, hardware reason 0x\(String(reason, radix: 16)), CPU \(cpu)): the vCPU state is invalid")
            return .other("FAIL_ENTRY")
        case let .internalError(suberror, data):
            let what = suberror == 1 ? "emulation failure: KVM could not emulate an instruction" : "suberror \(suberror)"
            fail("KVM internal error (KVM_EXIT_INTERNAL_ERROR, \(what)); data: \(data.map { "0x" + String($0, radix: 16) }.joined(separator: " "))")
            return .other("INTERNAL_ERROR")
        case let .systemEvent(type, _):
            switch type {
            case CKVM_SYSTEM_EVENT_SHUTDOWN, CKVM_SYSTEM_EVENT_RESET: stop.stop(.guestReset)
            case CKVM_SYSTEM_EVENT_CRASH: fail("the guest reported a crash (KVM_SYSTEM_EVENT_CRASH)")
            default: fail("unknown KVM system event \(type)")
            }
            return .other("SYSTEM_EVENT")
        case let .other(reason):
            fail("unhandled KVM exit reason \(reason)")
            return .other("exit \(reason)")
        }
    }

    /// Stops the VM with a fatal reason and a register dump of this vCPU.
    private func fail(_ message: String) {
        var report = "vCPU \(vcpu.id): \(message)"
        if let regs = try? vcpu.registers(), let sregs = try? vcpu.specialRegisters() {
            report += "\n" + RegisterDump.format(regs, sregs)
        }
        stop.stop(.fatal(report))
    }
}

/// Signal masks for the VMM's threads.
///
/// SIGINT and SIGTERM are blocked everywhere and taken synchronously by one thread
/// (`sigwait`), which turns them into a clean stop. The kick signal is blocked too,
/// except in vCPU threads, where its no-op handler interrupts `KVM_RUN`.
enum SignalSetup {
    static let kickSignal = ckvm_kick_signal()

    /// Call on the main thread before any other thread starts: they inherit the mask.
    static func blockProcessSignals() {
        _ = ckvm_install_kick_handler(kickSignal)
        var set = sigset_t()
        sigemptyset(&set)
        sigaddset(&set, SIGINT)
        sigaddset(&set, SIGTERM)
        sigaddset(&set, kickSignal)
        pthread_sigmask(SIG_BLOCK, &set, nil)
    }

    static func unblockKickSignal() {
        var set = sigset_t()
        sigemptyset(&set)
        sigaddset(&set, kickSignal)
        pthread_sigmask(SIG_UNBLOCK, &set, nil)
    }

    /// Starts the thread that turns SIGINT/SIGTERM into a stop.
    static func forwardTerminationSignals(to stop: StopController) {
        NamedThread.spawn(name: "signals") {
            var set = sigset_t()
            sigemptyset(&set)
            sigaddset(&set, SIGINT)
            sigaddset(&set, SIGTERM)
            var received: Int32 = 0
            while sigwait(&set, &received) != 0 {}
            stop.stop(.signal(received))
        }
    }
}
