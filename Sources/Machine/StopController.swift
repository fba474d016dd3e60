import Dispatch
import Synchronization

/// Why the VM stopped, and the process exit status that goes with it.
public enum StopReason: Sendable, Equatable, CustomStringConvertible {
    /// The guest wrote to the exit port; the status is `(V << 1) | 1`.
    case guestExit(status: Int32)
    /// The guest asked for a reset or power-off (i8042 reset, system event).
    case guestReset
    /// The user pressed `Ctrl-A x` on the console.
    case userQuit
    /// `--timeout` elapsed.
    case timeout
    /// SIGINT or SIGTERM.
    case signal(Int32)
    /// A vCPU hit an exit Swiftlet cannot continue from (triple fault, emulation failure).
    case fatal(String)

    /// The process exit status: documented in `swiftlet run --help`.
    public var exitStatus: Int32 {
        switch self {
        case let .guestExit(status): return status
        case .guestReset, .userQuit: return 0
        case .timeout: return 124
        case let .signal(number): return 128 + number
        case .fatal: return 4
        }
    }

    public var description: String {
        switch self {
        case let .guestExit(status): return "guest requested exit (status \(status))"
        case .guestReset: return "guest requested a reset"
        case .userQuit: return "quit from the console"
        case .timeout: return "timed out"
        case let .signal(number): return "stopped by signal \(number)"
        case let .fatal(message): return message
        }
    }
}

/// Owns the one decision "the VM is stopping, and why": the first reason wins, later
/// ones are ignored. Whoever waits for the VM to end blocks in ``wait(timeout:)``.
public final class StopController: Sendable {
    private let reason = Mutex<StopReason?>(nil)
    private let stopped = DispatchSemaphore(value: 0)
    private let listeners = Mutex<[@Sendable () -> Void]>([])

    public init() {}

    /// Records `reason` if it is the first, and wakes the waiter and every listener
    /// (the vCPU threads' kick).
    public func stop(_ newReason: StopReason) {
        let first = reason.withLock { current -> Bool in
            guard current == nil else { return false }
            current = newReason
            return true
        }
        guard first else { return }
        for listener in listeners.withLock({ $0 }) { listener() }
        stopped.signal()
    }

    /// Registers work to do when the VM stops (kicking a vCPU out of `KVM_RUN`).
    func onStop(_ listener: @escaping @Sendable () -> Void) {
        listeners.withLock { $0.append(listener) }
    }

    public var isStopping: Bool { reason.withLock { $0 != nil } }
    public var stopReason: StopReason? { reason.withLock { $0 } }

    /// Blocks until a stop is requested or `timeout` seconds pass (then stops with
    /// ``StopReason/timeout``). Returns the reason.
    public func wait(timeout: Double?) -> StopReason {
        if let timeout {
            if stopped.wait(timeout: .now() + timeout) == .timedOut { stop(.timeout) }
        } else {
            stopped.wait()
        }
        return reason.withLock { $0 }!
    }
}
