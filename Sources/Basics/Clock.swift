#if canImport(Glibc)
import Glibc
#endif

/// Reading CLOCK_MONOTONIC: exit timings, benchmarks, timeouts.
public enum MonotonicClock {
    /// Nanoseconds on CLOCK_MONOTONIC, the clock Python's `time.monotonic_ns()` reads too.
    @inline(__always)
    public static func nanoseconds() -> UInt64 {
        var now = timespec()
        clock_gettime(CLOCK_MONOTONIC, &now)
        return UInt64(now.tv_sec) * 1_000_000_000 + UInt64(now.tv_nsec)
    }
}
