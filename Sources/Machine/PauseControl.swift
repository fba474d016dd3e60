import Dispatch
import Synchronization

/// Parks the vCPU threads outside `KVM_RUN` and lets them go again; while parked, a
/// thread runs work handed to it (saving its vCPU's state must happen on the vCPU's own
/// thread).
///
/// A runner parks only after a `KVM_RUN` returned because it was kicked (`EINTR` with
/// `immediate_exit` set): KVM completes an I/O or MMIO exit only on the next `KVM_RUN`,
/// so a vCPU parked right after such an exit would be saved half-way through an
/// instruction. Parking after the kick's `KVM_RUN` leaves every vCPU at an instruction
/// boundary, with its state consistent.
final class PauseControl: Sendable {
    enum Command: Sendable {
        case resume
        case perform(@Sendable () -> Void)
    }

    private struct State {
        var pauseRequested = false
        /// Runner id -> a way to hand it commands while it is parked.
        var parked: [Int: ParkedRunner] = [:]
    }

    /// What a parked runner waits on.
    final class ParkedRunner: Sendable {
        let commands = Mutex<[Command]>([])
        let ready = DispatchSemaphore(value: 0)

        func send(_ command: Command) {
            commands.withLock { $0.append(command) }
            ready.signal()
        }

        func next() -> Command {
            ready.wait()
            return commands.withLock { $0.removeFirst() }
        }
    }

    private let state = Mutex(State())
    /// Signalled once per runner that parks (or ends) after a pause request.
    private let parkedSignal = DispatchSemaphore(value: 0)

    var pauseRequested: Bool { state.withLock { $0.pauseRequested } }

    /// Asks every runner to park. The caller then kicks them and waits with ``awaitParked(count:)``.
    func requestPause() {
        state.withLock { $0.pauseRequested = true }
    }

    /// Waits until `count` runners have parked or ended. Returns false on timeout.
    func awaitParked(count: Int, timeout: Double) -> Bool {
        for _ in 0..<count {
            guard parkedSignal.wait(timeout: .now() + timeout) == .success else { return false }
        }
        return true
    }

    /// Called by a runner thread: parks it until it is told to resume, running the work it
    /// is handed meanwhile. Returns when resumed.
    func park(runner id: Int) {
        let parked = ParkedRunner()
        state.withLock { $0.parked[id] = parked }
        parkedSignal.signal()
        while true {
            switch parked.next() {
            case .resume:
                return
            case let .perform(work):
                work()
            }
        }
    }

    /// Called by a runner whose loop ends (the VM stops): counts as parked for a pending
    /// pause, so a pause never waits for a thread that is gone.
    func runnerEnded() {
        if pauseRequested { parkedSignal.signal() }
    }

    /// Runs `work` on runner `id`'s thread (it must be parked) and waits for it.
    func perform<Result: Sendable>(onRunner id: Int, _ work: @escaping @Sendable () -> Result) -> Result? {
        guard let parked = state.withLock({ $0.parked[id] }) else { return nil }
        let box = Mutex<Result?>(nil)
        let done = DispatchSemaphore(value: 0)
        parked.send(.perform {
            let value = work()
            box.withLock { $0 = value }
            done.signal()
        })
        done.wait()
        return box.withLock { $0 }
    }

    /// Lets every parked runner go.
    func resumeAll() {
        let parked = state.withLock { state -> [ParkedRunner] in
            state.pauseRequested = false
            defer { state.parked.removeAll() }
            return Array(state.parked.values)
        }
        for runner in parked { runner.send(.resume) }
    }
}
