#if canImport(Glibc)
import Glibc
#endif

/// Where a rate limiter reads the time: monotonic nanoseconds. Tests inject their own.
public protocol RateLimitClock: Sendable {
    /// Nanoseconds since some fixed point; never goes back.
    func nanoseconds() -> UInt64
}

/// CLOCK_MONOTONIC, the clock timerfds count on.
public struct MonotonicRateLimitClock: RateLimitClock {
    public init() {}

    public func nanoseconds() -> UInt64 {
        var now = timespec()
        clock_gettime(CLOCK_MONOTONIC, &now)
        return UInt64(now.tv_sec) * 1_000_000_000 + UInt64(now.tv_nsec)
    }
}
