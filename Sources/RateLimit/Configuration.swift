// The rate limiter's configuration, with Firecracker's field names and meaning (its
// swagger `RateLimiter` and `TokenBucket` definitions), so that an API body decodes
// straight into it.

/// One token bucket: `size` tokens at most, refilled at a constant rate of `size` tokens
/// per `refillTime` milliseconds; `oneTimeBurst` extra tokens are spent first, once, and
/// never refill. A bucket with `size` 0 or `refillTime` 0 limits nothing.
public struct TokenBucketConfiguration: Codable, Sendable, Equatable {
    /// The most tokens the bucket holds (bytes or operations).
    public var size: UInt64
    /// Tokens available once, before the bucket itself is drawn on (`nil` or 0: none).
    public var oneTimeBurst: UInt64?
    /// Milliseconds it takes to refill the bucket from empty.
    public var refillTime: UInt64

    enum CodingKeys: String, CodingKey {
        case size
        case oneTimeBurst = "one_time_burst"
        case refillTime = "refill_time"
    }

    public init(size: UInt64, oneTimeBurst: UInt64? = nil, refillTime: UInt64) {
        self.size = size
        self.oneTimeBurst = oneTimeBurst
        self.refillTime = refillTime
    }

    /// Whether the bucket limits anything: a size and a refill time (Firecracker turns a
    /// bucket with either at 0 off, and so does a refill time too long for 64-bit
    /// nanoseconds).
    public var isLimiting: Bool {
        size > 0 && refillTime > 0 && refillTime.multipliedReportingOverflow(by: TokenBucket.nanosecondsPerMillisecond).overflow == false
    }
}

/// A rate limiter: a `bandwidth` bucket whose tokens are bytes and an `ops` bucket whose
/// tokens are operations (requests, frames). A missing bucket limits nothing.
///
/// When it updates a running limiter (``RateLimiter/update(_:)``), a missing bucket
/// means "leave that bucket as it is" and a bucket with size or refill time 0 turns it
/// off, as Firecracker's `PATCH` does.
public struct RateLimiterConfiguration: Codable, Sendable, Equatable {
    /// Tokens are bytes.
    public var bandwidth: TokenBucketConfiguration?
    /// Tokens are operations.
    public var ops: TokenBucketConfiguration?

    public init(bandwidth: TokenBucketConfiguration? = nil, ops: TokenBucketConfiguration? = nil) {
        self.bandwidth = bandwidth
        self.ops = ops
    }

    /// Whether either bucket limits anything.
    public var isLimiting: Bool {
        (bandwidth?.isLimiting ?? false) || (ops?.isLimiting ?? false)
    }
}
