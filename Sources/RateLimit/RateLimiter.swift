/// Which bucket of a ``RateLimiter`` tokens come from.
public enum TokenType: Sendable {
    case bytes, ops
}

/// What a ``RateLimiter`` says about an I/O.
public enum RateLimitDecision: Sendable, Equatable {
    /// Go ahead: the tokens were taken.
    case proceed
    /// Not now: nothing was taken. Ask again after `nanoseconds` (the I/O waits; it does
    /// not fail).
    case wait(nanoseconds: UInt64)
}

/// A bandwidth bucket (bytes) and an ops bucket (operations) with Firecracker's rules
/// (its `rate_limiter` module): an I/O takes one op and its bytes, both or neither; when
/// either bucket is short, the I/O waits and the limiter is *blocked* (every I/O waits)
/// until the tokens it needs have accrued; an I/O larger than a whole bucket goes and
/// blocks the limiter while the bucket repays it.
///
/// Unlike Firecracker, which retries every 100 ms after a shortage, the limiter says
/// exactly how long to wait, so a device arms its timer once per shortage.
///
/// A plain value, not thread-safe: a device keeps it behind its own lock. The clock is
/// injectable for tests.
public struct RateLimiter: Sendable {
    public private(set) var bandwidth: TokenBucket?
    public private(set) var ops: TokenBucket?
    /// Every I/O waits until this instant (nanoseconds on `clock`).
    public private(set) var blockedUntil: UInt64?
    public let clock: any RateLimitClock

    /// A limiter with full buckets as `configuration` describes (`nil`: unlimited).
    public init(_ configuration: RateLimiterConfiguration? = nil, clock: any RateLimitClock = MonotonicRateLimitClock()) {
        self.clock = clock
        let now = clock.nanoseconds()
        bandwidth = configuration?.bandwidth.flatMap { TokenBucket($0, now: now) }
        ops = configuration?.ops.flatMap { TokenBucket($0, now: now) }
    }

    /// The buckets as configured (what Firecracker reports in `GET /vm/config`).
    public var configuration: RateLimiterConfiguration {
        RateLimiterConfiguration(bandwidth: bandwidth?.configuration, ops: ops?.configuration)
    }

    /// No bucket: every I/O proceeds at once.
    public var isUnlimited: Bool { bandwidth == nil && ops == nil }

    /// Whether I/O must wait now, and for how long (nanoseconds), after a shortage or an
    /// over-consumption.
    public var blockedFor: UInt64? {
        guard let blockedUntil else { return nil }
        let now = clock.nanoseconds()
        return now < blockedUntil ? blockedUntil - now : nil
    }

    /// Takes `operations` ops and `bytes` bytes for one I/O, all or nothing.
    public mutating func consume(operations: UInt64 = 1, bytes: UInt64) -> RateLimitDecision {
        if isUnlimited { return .proceed }
        let now = clock.nanoseconds()
        if let blockedUntil {
            if now < blockedUntil { return .wait(nanoseconds: blockedUntil - now) }
            self.blockedUntil = nil
        }
        if let wait = take(operations, from: \.ops, now: now) { return block(now: now, for: wait) }
        if let wait = take(bytes, from: \.bandwidth, now: now) {
            ops?.forceReplenish(operations)
            return block(now: now, for: wait)
        }
        return .proceed
    }

    /// Takes `tokens` of one type (Firecracker's `consume`): false when the limiter is
    /// blocked or that bucket is short (the limiter is then blocked until it is not).
    public mutating func consume(_ tokens: UInt64, _ type: TokenType) -> Bool {
        let decision = type == .ops ? consume(operations: tokens, bytes: 0) : consume(operations: 0, bytes: tokens)
        return decision == .proceed
    }

    /// Gives back tokens taken for an I/O that did not happen.
    public mutating func manualReplenish(_ tokens: UInt64, _ type: TokenType) {
        switch type {
        case .bytes: bandwidth?.forceReplenish(tokens)
        case .ops: ops?.forceReplenish(tokens)
        }
    }

    /// Takes tokens for an I/O that already happened (a frame already received): what
    /// the buckets lack is owed, and the limiter is blocked until it is repaid.
    public mutating func charge(operations: UInt64 = 1, bytes: UInt64) {
        let now = clock.nanoseconds()
        let debt = max(ops?.charge(operations, now: now) ?? 0, bandwidth?.charge(bytes, now: now) ?? 0)
        if debt > 0 { _ = block(now: now, for: debt) }
    }

    /// Changes the buckets while I/O runs, as Firecracker's `PATCH` does: a bucket
    /// missing from `configuration` stays as it is; one with size or refill time 0 is
    /// removed; any other is replaced by a new, full one with its one-time burst. A wait
    /// in progress was computed from the old buckets and ends: the next I/O asks the new
    /// ones. (Firecracker's pending retry timer runs out first, at most 100 ms later.)
    public mutating func update(_ configuration: RateLimiterConfiguration) {
        let now = clock.nanoseconds()
        if let change = configuration.bandwidth { bandwidth = TokenBucket(change, now: now) }
        if let change = configuration.ops { ops = TokenBucket(change, now: now) }
        blockedUntil = nil
    }

    /// Takes `tokens` from a bucket; returns nil on success (or over-consumption, which
    /// blocks the limiter but lets this I/O go) or the nanoseconds to wait.
    private mutating func take(_ tokens: UInt64, from bucket: WritableKeyPath<RateLimiter, TokenBucket?>,
                               now: UInt64) -> UInt64? {
        guard tokens > 0, self[keyPath: bucket] != nil else { return nil }
        switch self[keyPath: bucket]!.reduce(tokens, now: now) {
        case .success:
            return nil
        case .failure:
            return max(1, self[keyPath: bucket]!.waitTime(for: tokens, now: now))
        case let .overConsumption(nanoseconds):
            if nanoseconds > 0 { _ = block(now: now, for: nanoseconds) }
            return nil
        }
    }

    private mutating func block(now: UInt64, for nanoseconds: UInt64) -> RateLimitDecision {
        let (until, overflow) = now.addingReportingOverflow(nanoseconds)
        let deadline = overflow ? UInt64.max : until
        blockedUntil = max(blockedUntil ?? 0, deadline)
        return .wait(nanoseconds: nanoseconds)
    }
}
