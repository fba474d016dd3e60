import Basics
import RateLimit

/// Rate-limit options of `--disk` and `--net`, turned into Firecracker's token buckets.
///
/// For a rate `R` per second (`bps=` in bytes, with K/M/G binary suffixes; `iops=`/`pps=`
/// in operations or frames): a bucket of `max` tokens (default `R`, one second's worth)
/// refilled in `max * 1000 / R` milliseconds, and a one-time `burst` (Firecracker's
/// `one_time_burst`) spent before the bucket.
struct RateLimitOptions {
    struct Bucket {
        var rate: UInt64?
        var maximum: UInt64?
        var burst: UInt64?
    }

    var bandwidth = Bucket()
    var ops = Bucket()

    struct Invalid: Error {}

    /// Reads `key=value` if `key` is one of this limiter's (`prefix` + `bps`, `bps_max`,
    /// `bps_burst`, and the same with `opsName`). Returns false for another key; throws
    /// for a value that is not a number or a key given twice.
    mutating func accept(key: String, value: String, prefix: String = "", opsName: String) throws -> Bool {
        guard key.hasPrefix(prefix) else { return false }
        let name = key.dropFirst(prefix.count)
        let isBytes: Bool
        let field: WritableKeyPath<Bucket, UInt64?>
        switch name {
        case "bps": (isBytes, field) = (true, \.rate)
        case "bps_max": (isBytes, field) = (true, \.maximum)
        case "bps_burst": (isBytes, field) = (true, \.burst)
        case Substring(opsName): (isBytes, field) = (false, \.rate)
        case Substring(opsName + "_max"): (isBytes, field) = (false, \.maximum)
        case Substring(opsName + "_burst"): (isBytes, field) = (false, \.burst)
        default: return false
        }
        let number: UInt64
        if isBytes {
            guard let bytes = try? ByteSize.parse(value, defaultUnit: .bytes) else { throw Invalid() }
            number = bytes
        } else {
            guard let count = UInt64(value) else { throw Invalid() }
            number = count
        }
        let path: WritableKeyPath<RateLimitOptions, Bucket> = isBytes ? \.bandwidth : \.ops
        guard self[keyPath: path][keyPath: field] == nil else { throw Invalid() }
        self[keyPath: path][keyPath: field] = number
        return true
    }

    /// The limiter, or `nil` when no option was given. Throws when `_max` or `_burst`
    /// comes without its rate, for a rate of 0, or a refill time that is not at least 1 ms.
    func configuration() throws -> RateLimiterConfiguration? {
        let bandwidth = try Self.bucket(self.bandwidth)
        let ops = try Self.bucket(self.ops)
        guard bandwidth != nil || ops != nil else { return nil }
        return RateLimiterConfiguration(bandwidth: bandwidth, ops: ops)
    }

    private static func bucket(_ bucket: Bucket) throws -> TokenBucketConfiguration? {
        guard let rate = bucket.rate else {
            guard bucket.maximum == nil, bucket.burst == nil else { throw Invalid() }
            return nil
        }
        guard rate > 0 else { throw Invalid() }
        guard let maximum = bucket.maximum else {
            return TokenBucketConfiguration(size: rate, oneTimeBurst: bucket.burst, refillTime: 1000)
        }
        let (product, overflow) = maximum.multipliedReportingOverflow(by: 1000)
        guard maximum > 0, !overflow, product / rate >= 1 else { throw Invalid() }
        return TokenBucketConfiguration(size: maximum, oneTimeBurst: bucket.burst, refillTime: product / rate)
    }
}
