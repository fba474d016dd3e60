import Foundation
import RateLimit
import Synchronization
import Testing

/// A clock the test moves by hand.
final class FakeClock: RateLimitClock {
    private let now = Atomic<UInt64>(1_000_000_000)
    func nanoseconds() -> UInt64 { now.load(ordering: .relaxed) }
    func advance(milliseconds: UInt64) { now.add(milliseconds * 1_000_000, ordering: .relaxed) }
    func advance(nanoseconds: UInt64) { now.add(nanoseconds, ordering: .relaxed) }
}

private let millisecond: UInt64 = 1_000_000

@Suite("Token bucket")
struct TokenBucketTests {
    @Test("size 0 or refill time 0 limits nothing")
    func unlimited() {
        #expect(TokenBucket(TokenBucketConfiguration(size: 0, refillTime: 100), now: 0) == nil)
        #expect(TokenBucket(TokenBucketConfiguration(size: 100, refillTime: 0), now: 0) == nil)
        // A refill time that does not fit 64-bit nanoseconds: off, as in Firecracker.
        #expect(TokenBucket(TokenBucketConfiguration(size: 1, refillTime: .max / 1000), now: 0) == nil)
        var limiter = RateLimiter(RateLimiterConfiguration(bandwidth: TokenBucketConfiguration(size: 0, refillTime: 10)), clock: FakeClock())
        #expect(limiter.isUnlimited)
        for _ in 0..<1000 { #expect(limiter.consume(bytes: 1 << 30) == .proceed) }
    }

    @Test("starts full and refills at size per refill time, in whole tokens")
    func refill() {
        var bucket = TokenBucket(TokenBucketConfiguration(size: 1000, refillTime: 1000), now: 0)!
        #expect(bucket.reduce(1000, now: 0) == .success)
        #expect(bucket.reduce(1, now: 0) == .failure)
        // 1 token per millisecond: 999 999 ns is not enough for one.
        #expect(bucket.reduce(1, now: millisecond - 1) == .failure)
        #expect(bucket.reduce(1, now: millisecond) == .success)
        // 250 ms later, 250 tokens; not 251.
        #expect(bucket.reduce(251, now: 251 * millisecond) == .failure)
        #expect(bucket.budget == 250)
        #expect(bucket.reduce(250, now: 251 * millisecond) == .success)
        // Never more than size, however long it waits.
        #expect(bucket.reduce(1001, now: 100_000 * millisecond) != .success)
    }

    @Test("an idle full bucket holds its size, no more")
    func idleBucketStaysAtSize() {
        var bucket = TokenBucket(TokenBucketConfiguration(size: 1000, refillTime: 1000), now: 0)!
        // Ten seconds idle, then the whole bucket: nothing more is left (Firecracker, which
        // refills lazily from its last refill, would credit the idle time again here).
        #expect(bucket.reduce(1000, now: 10_000 * millisecond) == .success)
        #expect(bucket.reduce(1, now: 10_000 * millisecond) == .failure)
        #expect(bucket.reduce(500, now: 10_500 * millisecond) == .success)
    }

    @Test("partial tokens are not lost between refills")
    func noDrift() {
        // 3 tokens per 1000 ms: one every 333.33 ms.
        var bucket = TokenBucket(TokenBucketConfiguration(size: 3, refillTime: 1000), now: 0)!
        #expect(bucket.reduce(3, now: 0) == .success)
        var taken = 0
        var now: UInt64 = 0
        for _ in 0..<301 {
            now += 10 * millisecond
            if bucket.reduce(1, now: now) == .success { taken += 1 }
        }
        // 3.01 s: exactly 9 tokens (each refill rounds its time up by less than 1 ns, so
        // that the bucket never gives more than its rate).
        #expect(taken == 9)
    }

    @Test("the one-time burst goes first and does not refill")
    func oneTimeBurst() {
        var bucket = TokenBucket(TokenBucketConfiguration(size: 100, oneTimeBurst: 500, refillTime: 1000), now: 0)!
        #expect(bucket.reduce(400, now: 0) == .success)
        #expect(bucket.oneTimeBurst == 100)
        #expect(bucket.budget == 100)
        // 150: 100 from the burst, 50 from the bucket.
        #expect(bucket.reduce(150, now: 0) == .success)
        #expect(bucket.oneTimeBurst == 0)
        #expect(bucket.budget == 50)
        #expect(bucket.reduce(51, now: 0) == .failure)
        // A long wait refills the bucket, never the burst.
        #expect(bucket.reduce(100, now: 10_000 * millisecond) == .success)
        #expect(bucket.oneTimeBurst == 0)
        #expect(bucket.configuration == TokenBucketConfiguration(size: 100, oneTimeBurst: 500, refillTime: 1000))
    }

    @Test("the wait time is exactly when the tokens are there")
    func waitTime() {
        var bucket = TokenBucket(TokenBucketConfiguration(size: 1 << 20, refillTime: 1000), now: 0)!
        #expect(bucket.reduce(1 << 20, now: 0) == .success)
        let wait = bucket.waitTime(for: 4096, now: 0)
        // 4096 bytes at 1 MiB/s: 3.90625 ms.
        #expect(wait == 3_906_250)
        var early = bucket
        #expect(early.reduce(4096, now: wait - 1) == .failure)
        #expect(bucket.reduce(4096, now: wait) == .success)
        // Asked again after a failure, it says when the rest is there.
        let retry = early.waitTime(for: 4096, now: wait - 1)
        #expect(retry > 0)
        #expect(early.reduce(4096, now: wait - 1 + retry) == .success)
        #expect(bucket.waitTime(for: 0, now: wait) == 0)
    }

    @Test("a request larger than the bucket goes, and the bucket owes the excess")
    func overConsumption() {
        var bucket = TokenBucket(TokenBucketConfiguration(size: 1000, refillTime: 1000), now: 0)!
        // 3000 with 1000 in the bucket: 2000 owed, 2 s.
        #expect(bucket.reduce(3000, now: 0) == .overConsumption(nanoseconds: 2000 * millisecond))
        #expect(bucket.reduce(1, now: 2000 * millisecond) == .failure)
        #expect(bucket.reduce(1, now: 2001 * millisecond) == .success)
    }

    @Test("charge takes what was used and owes the rest")
    func charge() {
        var bucket = TokenBucket(TokenBucketConfiguration(size: 1000, refillTime: 1000), now: 0)!
        #expect(bucket.charge(600, now: 0) == 0)
        #expect(bucket.charge(600, now: 0) == 200 * millisecond)
        #expect(bucket.waitTime(for: 100, now: 0) == 300 * millisecond)
    }

    @Test("force replenish gives back to the burst first, capped")
    func forceReplenish() {
        var bucket = TokenBucket(TokenBucketConfiguration(size: 10, oneTimeBurst: 5, refillTime: 1000), now: 0)!
        #expect(bucket.reduce(3, now: 0) == .success)
        bucket.forceReplenish(100)
        #expect(bucket.oneTimeBurst == 5)
        #expect(bucket.reduce(5, now: 0) == .success)
        #expect(bucket.reduce(4, now: 0) == .success)
        bucket.forceReplenish(.max)
        #expect(bucket.budget == 10)
    }
}

@Suite("Rate limiter")
struct RateLimiterTests {
    static let megabytePerSecond = RateLimiterConfiguration(bandwidth: TokenBucketConfiguration(size: 1 << 20, refillTime: 1000))

    @Test("ops and bytes are taken together or not at all; the limiter blocks until the tokens are there")
    func allOrNothing() {
        let clock = FakeClock()
        var limiter = RateLimiter(RateLimiterConfiguration(bandwidth: TokenBucketConfiguration(size: 1000, refillTime: 1000),
                                                           ops: TokenBucketConfiguration(size: 10, refillTime: 1000)),
                                  clock: clock)
        #expect(limiter.consume(bytes: 900) == .proceed)
        #expect(limiter.ops?.budget == 9)
        // Bytes short: the op is given back.
        #expect(limiter.consume(bytes: 200) == .wait(nanoseconds: 100 * millisecond))
        #expect(limiter.ops?.budget == 9)
        // Blocked: even an I/O without bytes waits, for what is left of the wait.
        clock.advance(milliseconds: 40)
        #expect(limiter.consume(bytes: 0) == .wait(nanoseconds: 60 * millisecond))
        clock.advance(milliseconds: 60)
        #expect(limiter.consume(bytes: 200) == .proceed)
        // Ops short: 8 left, and one more refilled in the 100 ms that passed.
        for _ in 0..<9 { #expect(limiter.consume(bytes: 0) == .proceed) }
        #expect(limiter.consume(bytes: 0) == .wait(nanoseconds: 100 * millisecond))
        #expect(limiter.bandwidth?.budget == 0)
    }

    @Test("a stream of reads at a 1 MiB/s limit takes the time the limit says")
    func measuredRate() {
        let clock = FakeClock()
        var limiter = RateLimiter(Self.megabytePerSecond, clock: clock)
        let start = clock.nanoseconds()
        var moved: UInt64 = 0
        // 8 MiB in 64 KiB requests, each waiting as told.
        while moved < 8 << 20 {
            switch limiter.consume(bytes: 64 << 10) {
            case .proceed: moved += 64 << 10
            case let .wait(nanoseconds): clock.advance(nanoseconds: nanoseconds)
            }
        }
        // The first MiB is the full bucket; 7 more at 1 MiB/s.
        let elapsed = clock.nanoseconds() - start
        #expect(elapsed >= 7_000 * millisecond && elapsed <= 7_001 * millisecond)
    }

    @Test("an update replaces the changed bucket with a full one, keeps the other, and ends a wait")
    func updateWhileThrottled() {
        let clock = FakeClock()
        var limiter = RateLimiter(RateLimiterConfiguration(bandwidth: TokenBucketConfiguration(size: 100, refillTime: 1000),
                                                           ops: TokenBucketConfiguration(size: 5, refillTime: 1000)),
                                  clock: clock)
        #expect(limiter.consume(bytes: 100) == .proceed)
        guard case .wait = limiter.consume(bytes: 50) else { Issue.record("not throttled"); return }
        #expect(limiter.blockedFor != nil)
        limiter.update(RateLimiterConfiguration(bandwidth: TokenBucketConfiguration(size: 1000, oneTimeBurst: 10, refillTime: 500)))
        #expect(limiter.blockedFor == nil)
        #expect(limiter.bandwidth?.budget == 1000)
        #expect(limiter.bandwidth?.oneTimeBurst == 10)
        #expect(limiter.ops?.budget == 4)
        #expect(limiter.consume(bytes: 50) == .proceed)
        #expect(limiter.configuration == RateLimiterConfiguration(
            bandwidth: TokenBucketConfiguration(size: 1000, oneTimeBurst: 10, refillTime: 500),
            ops: TokenBucketConfiguration(size: 5, refillTime: 1000)))
        // Size 0 turns a bucket off; an empty update changes nothing.
        limiter.update(RateLimiterConfiguration(ops: TokenBucketConfiguration(size: 0, refillTime: 0)))
        #expect(limiter.ops == nil)
        limiter.update(RateLimiterConfiguration())
        #expect(limiter.bandwidth != nil)
        limiter.update(RateLimiterConfiguration(bandwidth: TokenBucketConfiguration(size: 10, refillTime: 0)))
        #expect(limiter.isUnlimited)
        #expect(limiter.consume(bytes: .max) == .proceed)
    }

    @Test("charge for work already done blocks until the debt is repaid")
    func chargeBlocks() {
        let clock = FakeClock()
        var limiter = RateLimiter(Self.megabytePerSecond, clock: clock)
        limiter.charge(bytes: 3 << 19) // 1.5 MiB
        #expect(limiter.consume(bytes: 1) == .wait(nanoseconds: 500 * millisecond))
        clock.advance(milliseconds: 500)
        #expect(limiter.consume(bytes: 1) == .wait(nanoseconds: 1_000_000_000 / (1 << 20) + 1))
    }

    @Test("a request larger than the bucket goes and blocks the limiter for the excess")
    func overConsumptionBlocks() {
        let clock = FakeClock()
        var limiter = RateLimiter(RateLimiterConfiguration(bandwidth: TokenBucketConfiguration(size: 1000, refillTime: 1000)), clock: clock)
        #expect(limiter.consume(bytes: 2500) == .proceed)
        #expect(limiter.consume(bytes: 1) == .wait(nanoseconds: 1500 * millisecond))
    }

    @Test("JSON uses Firecracker's field names")
    func json() throws {
        let text = #"{"bandwidth":{"size":1048576,"one_time_burst":2097152,"refill_time":1000},"ops":{"size":100,"refill_time":10}}"#
        let decoded = try JSONDecoder().decode(RateLimiterConfiguration.self, from: Data(text.utf8))
        #expect(decoded == RateLimiterConfiguration(bandwidth: TokenBucketConfiguration(size: 1 << 20, oneTimeBurst: 2 << 20, refillTime: 1000),
                                                    ops: TokenBucketConfiguration(size: 100, refillTime: 10)))
        let encoder = JSONEncoder()
        encoder.outputFormatting = .sortedKeys
        let again = try JSONDecoder().decode(RateLimiterConfiguration.self, from: try encoder.encode(decoded))
        #expect(again == decoded)
        #expect(String(decoding: try encoder.encode(TokenBucketConfiguration(size: 1, oneTimeBurst: 2, refillTime: 3)), as: UTF8.self)
                == #"{"one_time_burst":2,"refill_time":3,"size":1}"#)
    }

    @Test("the shared limiter counts updates")
    func shared() {
        let limiter = SharedRateLimiter(Self.megabytePerSecond, clock: FakeClock())
        #expect(limiter.generation == 0)
        #expect(limiter.consume(bytes: 1 << 20) == .proceed)
        #expect(limiter.consume(bytes: 1) != .proceed)
        limiter.update(RateLimiterConfiguration(bandwidth: TokenBucketConfiguration(size: 0, refillTime: 0)))
        #expect(limiter.generation == 1)
        #expect(limiter.isUnlimited)
        #expect(limiter.consume(bytes: 1) == .proceed)
    }
}
