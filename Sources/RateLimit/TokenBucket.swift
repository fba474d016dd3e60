/// What asking a ``TokenBucket`` for tokens did.
public enum TokenBucketReduction: Sendable, Equatable {
    /// The tokens were taken.
    case success
    /// Not enough tokens now; nothing was taken.
    case failure
    /// More tokens than the bucket can ever hold were asked for: they were taken anyway
    /// (the budget is empty and the bucket owes the rest), and repaying that takes
    /// `nanoseconds` of refill.
    case overConsumption(nanoseconds: UInt64)
}

/// A token bucket with Firecracker's semantics: it starts full (`size` tokens) with an
/// extra one-time burst that is spent first and never refills; it refills continuously at
/// `size` tokens per `refillTime` milliseconds, up to `size`. Time is passed in (monotonic
/// nanoseconds), so the bucket is a plain value that tests drive with a fake clock.
///
/// Refill is computed when tokens are asked for, in whole tokens, and the time a partial
/// token has accrued is kept for the next time (no rounding drift).
///
/// Two differences from Firecracker, on purpose, both where Firecracker lets more through
/// than its configuration says:
/// - Refill is brought up to date on every request. Firecracker refills only when a
///   request finds the budget short, from the last refill: after an idle time with a full
///   bucket, it spends the bucket, then credits the whole idle time again, so up to twice
///   `size` goes at once. Here a full bucket stays at `size`.
/// - A request larger than the whole bucket is let through in both, but here the bucket
///   then owes exactly the excess (its refill starts that much later), while Firecracker
///   empties it, blocks the limiter for the excess and lets the bucket refill meanwhile,
///   which lets such requests go up to twice the configured rate.
public struct TokenBucket: Sendable, Equatable {
    static let nanosecondsPerMillisecond: UInt64 = 1_000_000

    /// The most tokens the bucket holds.
    public let size: UInt64
    /// The one-time burst it was configured with.
    public let initialOneTimeBurst: UInt64
    /// Milliseconds to refill from empty.
    public let refillTime: UInt64
    /// What is left of the one-time burst.
    public private(set) var oneTimeBurst: UInt64
    /// Tokens in the bucket (the burst apart), as of the last refill.
    public private(set) var budget: UInt64
    /// Refill accrues from this instant (nanoseconds). In the future while the bucket owes
    /// tokens after an over-consumption.
    public private(set) var lastUpdate: UInt64
    /// `size` and the refill time in nanoseconds divided by their greatest common divisor:
    /// `capacity` tokens arrive every `period` nanoseconds.
    private let capacity: UInt64
    private let period: UInt64

    /// A full bucket as `configuration` describes it, or `nil` when that bucket limits
    /// nothing (size 0, refill time 0, or a refill time beyond 64-bit nanoseconds).
    public init?(_ configuration: TokenBucketConfiguration, now: UInt64) {
        guard configuration.isLimiting else { return nil }
        size = configuration.size
        refillTime = configuration.refillTime
        initialOneTimeBurst = configuration.oneTimeBurst ?? 0
        oneTimeBurst = initialOneTimeBurst
        budget = size
        lastUpdate = now
        let refillNanoseconds = refillTime * Self.nanosecondsPerMillisecond
        let divisor = Self.greatestCommonDivisor(size, refillNanoseconds)
        capacity = size / divisor
        period = refillNanoseconds / divisor
    }

    /// The configuration this bucket was made from.
    public var configuration: TokenBucketConfiguration {
        TokenBucketConfiguration(size: size, oneTimeBurst: initialOneTimeBurst == 0 ? nil : initialOneTimeBurst,
                                 refillTime: refillTime)
    }

    /// Takes `tokens` if the bucket has them (the one-time burst first). Asking for more
    /// than `size` succeeds once the burst is spent, as an over-consumption.
    public mutating func reduce(_ tokens: UInt64, now: UInt64) -> TokenBucketReduction {
        var tokens = tokens
        if oneTimeBurst > 0 {
            if oneTimeBurst >= tokens {
                oneTimeBurst -= tokens
                // Refill starts when the burst is spent (the budget is still full).
                lastUpdate = max(lastUpdate, now)
                return .success
            }
            tokens -= oneTimeBurst
            oneTimeBurst = 0
        }
        replenish(now: now)
        if tokens > size {
            return .overConsumption(nanoseconds: owe(tokens, now: now))
        }
        if tokens > budget { return .failure }
        budget -= tokens
        return .success
    }

    /// Takes `tokens` whether or not the bucket has them (for work already done, such as
    /// a frame already received): what is missing is owed. Returns the nanoseconds until
    /// the bucket is out of debt (0 if it had enough).
    public mutating func charge(_ tokens: UInt64, now: UInt64) -> UInt64 {
        var tokens = tokens
        if oneTimeBurst > 0 {
            let fromBurst = min(oneTimeBurst, tokens)
            oneTimeBurst -= fromBurst
            tokens -= fromBurst
            if oneTimeBurst > 0 { lastUpdate = max(lastUpdate, now) }
        }
        guard tokens > 0 else { return 0 }
        replenish(now: now)
        if tokens <= budget {
            budget -= tokens
            return 0
        }
        return owe(tokens, now: now)
    }

    /// Gives back `tokens` taken for work that did not happen: to the one-time burst while
    /// it lasts (up to its initial value), else to the budget (up to `size`).
    public mutating func forceReplenish(_ tokens: UInt64) {
        if oneTimeBurst > 0 {
            let (sum, overflow) = oneTimeBurst.addingReportingOverflow(tokens)
            oneTimeBurst = overflow ? initialOneTimeBurst : min(sum, initialOneTimeBurst)
            return
        }
        let (sum, overflow) = budget.addingReportingOverflow(tokens)
        budget = overflow ? size : min(sum, size)
    }

    /// Nanoseconds from `now` until ``reduce(_:now:)`` of `tokens` succeeds: 0 if it would
    /// now (over-consumption included).
    public func waitTime(for tokens: UInt64, now: UInt64) -> UInt64 {
        guard tokens > oneTimeBurst else { return 0 }
        let remainder = tokens - oneTimeBurst
        guard remainder <= size else { return 0 }
        var refilled = self
        refilled.replenish(now: now)
        guard remainder > refilled.budget else { return 0 }
        let ready = Self.adding(refilled.lastUpdate, refilled.time(for: remainder - refilled.budget))
        return ready > now ? ready - now : 1
    }

    /// Adds the tokens accrued since `lastUpdate` (Firecracker's `auto_replenish`): all of
    /// them after a whole refill time, else whole tokens, keeping the time of the partial one.
    mutating func replenish(now: UInt64) {
        guard now > lastUpdate else { return }
        let elapsed = now - lastUpdate
        if elapsed / Self.nanosecondsPerMillisecond >= refillTime {
            budget = size
            lastUpdate = now
            return
        }
        // elapsed < refill time in nanoseconds, so tokens < size.
        let tokens = UInt64(UInt128(elapsed) * UInt128(capacity) / UInt128(period))
        guard tokens > 0 else { return }
        lastUpdate += time(for: tokens)
        budget = min(budget + tokens, size)
    }

    /// Empties the budget and owes the rest of `tokens` (refill starts later by the time
    /// it takes to refill them). Returns the nanoseconds from `now` until the debt is paid.
    private mutating func owe(_ tokens: UInt64, now: UInt64) -> UInt64 {
        let debt = tokens - budget
        budget = 0
        lastUpdate = Self.adding(lastUpdate, time(for: debt))
        return lastUpdate > now ? lastUpdate - now : 0
    }

    /// Nanoseconds for `tokens` to accrue, rounded up (saturating).
    private func time(for tokens: UInt64) -> UInt64 {
        let product = UInt128(tokens) * UInt128(period)
        let quotient = (product + UInt128(capacity) - 1) / UInt128(capacity)
        return UInt64(clamping: quotient)
    }

    private static func adding(_ a: UInt64, _ b: UInt64) -> UInt64 {
        let (sum, overflow) = a.addingReportingOverflow(b)
        return overflow ? .max : sum
    }

    private static func greatestCommonDivisor(_ a: UInt64, _ b: UInt64) -> UInt64 {
        var (x, y) = (a, b)
        while y != 0 { (x, y) = (y, x % y) }
        return x
    }
}
