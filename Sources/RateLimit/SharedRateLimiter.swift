import Synchronization

/// A ``RateLimiter`` that a device's I/O threads and the API share: every call takes the
/// lock. `generation` counts updates, so that a thread that computed a wait from the
/// old buckets can tell it must look again.
public final class SharedRateLimiter: Sendable {
    private let limiter: Mutex<RateLimiter>
    private let updates = Atomic<UInt64>(0)
    private let unlimited: Atomic<Bool>

    public init(_ configuration: RateLimiterConfiguration?, clock: any RateLimitClock = MonotonicRateLimitClock()) {
        let limiter = RateLimiter(configuration, clock: clock)
        unlimited = Atomic(limiter.isUnlimited)
        self.limiter = Mutex(limiter)
    }

    /// How many times ``update(_:)`` ran.
    public var generation: UInt64 { updates.load(ordering: .acquiring) }

    /// The buckets as configured now.
    public var configuration: RateLimiterConfiguration { limiter.withLock { $0.configuration } }

    /// No bucket (read without the lock: I/O paths skip the limiter when it is off).
    public var isUnlimited: Bool { unlimited.load(ordering: .acquiring) }

    /// See ``RateLimiter/consume(operations:bytes:)``.
    public func consume(operations: UInt64 = 1, bytes: UInt64) -> RateLimitDecision {
        limiter.withLock { $0.consume(operations: operations, bytes: bytes) }
    }

    /// See ``RateLimiter/charge(operations:bytes:)``.
    public func charge(operations: UInt64 = 1, bytes: UInt64) {
        limiter.withLock { $0.charge(operations: operations, bytes: bytes) }
    }

    /// Gives back tokens taken for an I/O that did not happen.
    public func giveBack(operations: UInt64 = 1, bytes: UInt64) {
        limiter.withLock {
            $0.manualReplenish(operations, .ops)
            $0.manualReplenish(bytes, .bytes)
        }
    }

    /// See ``RateLimiter/update(_:)``.
    public func update(_ configuration: RateLimiterConfiguration) {
        limiter.withLock {
            $0.update(configuration)
            unlimited.store($0.isUnlimited, ordering: .releasing)
        }
        updates.add(1, ordering: .releasing)
    }
}
