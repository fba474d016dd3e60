import Dispatch
import Synchronization

/// Why the VM stopped, and the process exit status that goes with it.
///
/// Statuses are chosen so that they cannot be confused: a guest's exit-port value V
/// always gives an odd status `(V << 1) | 1`, and everything Swiftlet decides itself is
/// even. A signal is passed on by `swiftlet run` as the signal itself.
public enum StopReason: Sendable, Equatable, CustomStringConvertible {
    /// The guest wrote V to the exit port (0xF4).
    case guestExit(value: UInt32)
    /// The guest powered the machine off; `how` names the path (ACPI sleep state S5, ...).
    case powerOff(how: String)
    /// The guest asked for a reset; `how` names the path (i8042 reset line, port 0xCF9, ...).
    case reset(how: String)
    /// The user pressed `Ctrl-A x` on the console.
    case userQuit
    /// The timeout elapsed.
    case timeout
    /// SIGINT, SIGTERM, SIGHUP or SIGQUIT.
    case signal(Int32)
    /// The guest crashed: a triple fault (unless configured as a reset), an instruction KVM
    /// could not emulate, an invalid vCPU state. The message has the vCPU's registers.
    case crash(String)
    /// The VM migrated to another Swiftlet (at this address), which runs it now.
    case migrated(to: String)

    /// Status for a guest crash.
    public static let crashStatus: Int32 = 4
    /// Status for a guest reset.
    public static let resetStatus: Int32 = 6
    /// Status for a timeout (as `timeout(1)` uses).
    public static let timeoutStatus: Int32 = 124
    /// Status when Swiftlet itself could not build or run the VM, or its command line is
    /// wrong (set by `swiftlet`, not by a stop).
    public static let failureStatus: Int32 = 2

    /// The process exit status: documented in `swiftlet run --help`.
    public var exitStatus: Int32 {
        switch self {
        case let .guestExit(value): return Self.guestExitStatus(value)
        case .powerOff, .userQuit, .migrated: return 0
        case .reset: return Self.resetStatus
        case .timeout: return Self.timeoutStatus
        case let .signal(number): return 128 + number
        case .crash: return Self.crashStatus
        }
    }

    /// `(V << 1) | 1`, reduced to the 8 bits a process exit status carries: always odd.
    public static func guestExitStatus(_ value: UInt32) -> Int32 {
        Int32(truncatingIfNeeded: ((value << 1) | 1) & 0xFF)
    }

    public var description: String {
        switch self {
        case let .guestExit(value): return "the guest wrote \(value) to the exit port (status \(exitStatus))"
        case let .powerOff(how): return "the guest powered off (\(how))"
        case let .reset(how): return "the guest asked for a reset (\(how))"
        case .userQuit: return "quit from the console"
        case .timeout: return "timed out"
        case let .signal(number): return "stopped by signal \(number)"
        case let .crash(message): return message
        case let .migrated(destination): return "the VM migrated to \(destination), which runs it now"
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

    /// Registers work to do when the VM stops (kicking a vCPU out of `KVM_RUN`). A
    /// listener added after the stop runs at once.
    func onStop(_ listener: @escaping @Sendable () -> Void) {
        let alreadyStopped = listeners.withLock { listeners -> Bool in
            listeners.append(listener)
            return reason.withLock { $0 != nil }
        }
        if alreadyStopped { listener() }
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
