import CLinux
#if canImport(Glibc)
import Glibc
#endif

/// A timer on CLOCK_MONOTONIC delivered as a readable descriptor (`timerfd_create(2)`):
/// `--timeout`, and later device timers, without a thread that sleeps.
public final class TimerFD: Sendable {
    public let descriptor: OwnedFileDescriptor
    public var rawValue: Int32 { descriptor.rawValue }

    public init() throws(SystemError) {
        let fd = timerfd_create(CLOCK_MONOTONIC, Int32(TFD_CLOEXEC | TFD_NONBLOCK))
        guard fd >= 0 else { throw SystemError("timerfd_create", errno: errno) }
        descriptor = OwnedFileDescriptor(owning: fd)
    }

    /// Fires once after `delay`, then every `interval` if given. A zero delay is raised to
    /// one nanosecond (zero would disarm the timer).
    public func arm(after delay: Duration, repeating interval: Duration? = nil) throws(SystemError) {
        var specification = itimerspec()
        specification.it_value = Self.timespec(delay, minimum: 1)
        if let interval { specification.it_interval = Self.timespec(interval, minimum: 0) }
        guard timerfd_settime(rawValue, 0, &specification, nil) == 0 else { throw SystemError("timerfd_settime", errno: errno) }
    }

    /// Stops the timer.
    public func disarm() {
        var specification = itimerspec()
        _ = timerfd_settime(rawValue, 0, &specification, nil)
    }

    /// How many times the timer fired since the last call (0 if none, non-blocking).
    @discardableResult
    public func expirations() -> UInt64 {
        readValue(rawValue, as: UInt64.self) ?? 0
    }

    static func timespec(_ duration: Duration, minimum: Int) -> Glibc.timespec {
        let (seconds, attoseconds) = duration.components
        guard seconds >= 0 else { return Glibc.timespec(tv_sec: 0, tv_nsec: minimum) }
        let nanoseconds = Int(attoseconds / 1_000_000_000)
        if seconds == 0 && nanoseconds < minimum { return Glibc.timespec(tv_sec: 0, tv_nsec: minimum) }
        return Glibc.timespec(tv_sec: Int(clamping: seconds), tv_nsec: nanoseconds)
    }
}
