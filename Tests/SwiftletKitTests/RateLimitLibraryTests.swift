import Foundation
import RateLimit
import SwiftletKit
import Synchronization
import Testing

private let guests = URL(fileURLWithPath: #filePath)
    .deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
    .appendingPathComponent("guests/build")

/// The virtio-blk teaching guest's `crc` job over a raw image, run in process, with the
/// times at which the guest started reading (its "N sectors" line) and stopped.
private struct CRCRun {
    let crcLine: String
    /// Seconds from the guest's first read (as seen on its console, a few milliseconds
    /// late) to its exit.
    let readingSeconds: Double
    /// Seconds from the start of `run()` to its end: boot included, never less than the
    /// reading really took.
    let totalSeconds: Double
}

/// A raw image of `size` pseudo-random bytes in a scratch directory.
private final class ScratchDisk {
    let directory = FileManager.default.temporaryDirectory.appendingPathComponent("ratelimit-\(UUID().uuidString)")
    let path: String

    init(size: Int) throws {
        try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
        path = directory.appendingPathComponent("disk.raw").path
        var state: UInt64 = 0x9E37_79B9_7F4A_7C15
        var bytes = [UInt8](repeating: 0, count: size)
        for index in stride(from: 0, to: size, by: 8) {
            state ^= state << 13; state ^= state >> 7; state ^= state << 17
            withUnsafeBytes(of: state.littleEndian) { word in
                for offset in 0..<min(8, size - index) { bytes[index + offset] = word[offset] }
            }
        }
        try Data(bytes).write(to: URL(fileURLWithPath: path))
    }

    deinit { try? FileManager.default.removeItem(at: directory) }
}

/// Boots the guest's `crc` job on `disk` with `limiter`; once the guest starts reading,
/// `whileReading` runs (on this thread) with the VM.
private func runCRC(disk: ScratchDisk, limiter: RateLimiterConfiguration?,
                    whileReading: (VM) throws -> Void = { _ in }) throws -> CRCRun {
    let console = FileManager.default.temporaryDirectory.appendingPathComponent("console-\(UUID().uuidString)").path
    defer { try? FileManager.default.removeItem(atPath: console) }
    var configuration = VMConfiguration(boot: .kernel(.file(guests.appendingPathComponent("virtio-blk.elf").path), commandLine: "crc"))
    configuration.memorySize = 64 << 20
    configuration.virtioTransport = .mmio
    var drive = VMConfiguration.Disk(path: disk.path, readOnly: true)
    drive.rateLimiter = limiter
    configuration.disks = [drive]
    configuration.console = .file(console)
    configuration.timeout = .seconds(120)
    let vm = try VM(configuration)
    let outcome = Mutex<Result<VMResult, SwiftletError>?>(nil)
    let finished = Mutex<Date?>(nil)
    let launched = Date()
    let thread = Thread {
        let result = Result { () throws(SwiftletError) in try vm.run() }
        finished.withLock { $0 = Date() }
        outcome.withLock { $0 = result }
    }
    thread.start()
    // The guest prints its geometry line ("... 8 requests of up to N bytes ... in flight")
    // just before its first read.
    var started: Date?
    while started == nil && outcome.withLock({ $0 }) == nil {
        let text = (try? String(contentsOfFile: console, encoding: .utf8)) ?? ""
        if text.contains("in flight") { started = Date() } else { usleep(2_000) }
    }
    if started != nil { try whileReading(vm) }
    while outcome.withLock({ $0 }) == nil { usleep(10_000) }
    let text = (try? String(contentsOfFile: console, encoding: .utf8)) ?? ""
    let result = try outcome.withLock { $0 }!.get()
    try #require(result.exit == .guestExit(value: 0), "the guest failed: \(result.exit)\n\(text)")
    let crcLine = try #require(text.split(separator: "\n").last { $0.hasPrefix("disk: ") }.map(String.init), "no crc line:\n\(text)")
    let begin = try #require(started)
    let end = try #require(finished.withLock { $0 })
    return CRCRun(crcLine: crcLine, readingSeconds: end.timeIntervalSince(begin), totalSeconds: end.timeIntervalSince(launched))
}

@Suite("Rate limits on a real disk", .serialized,
       .enabled(if: FileManager.default.isReadableFile(atPath: "/dev/kvm"), "needs /dev/kvm"))
struct RateLimitLibraryTests {
    static let diskSize = 4 << 20

    @Test("A 1 MiB/s bandwidth limit: the guest reads 4 MiB in the time the limit allows")
    func bandwidthMeasured() throws {
        let disk = try ScratchDisk(size: Self.diskSize)
        let baseline = try runCRC(disk: disk, limiter: nil)
        // 1 MiB/s as a 256 KiB bucket refilled in 250 ms: the first 256 KiB go at once
        // (the bucket starts full), the other 3840 KiB at 1 MiB/s: 3.75 s.
        let bucket = TokenBucketConfiguration(size: 256 << 10, refillTime: 250)
        let limited = try runCRC(disk: disk, limiter: RateLimiterConfiguration(bandwidth: bucket))
        #expect(limited.crcLine == baseline.crcLine)
        let expected = Double(Self.diskSize - (256 << 10)) / Double(1 << 20)
        let rate = Double(Self.diskSize - (256 << 10)) / limited.readingSeconds / Double(1 << 20)
        print("rate limit 1 MiB/s: read 4 MiB in \(limited.readingSeconds) s (\(rate) MiB/s after the first bucket); "
              + "unlimited: \(baseline.readingSeconds) s; expected \(expected) s; whole runs \(limited.totalSeconds) s "
              + "and \(baseline.totalSeconds) s unlimited")
        // A limiter never lets more through than it allows: never faster than expected
        // (the whole run, boot included, so that a late look at the console cannot
        // shorten it).
        #expect(limited.totalSeconds >= expected, "\(limited.totalSeconds) s")
        // Slower only by what the guest itself takes, within a tolerance.
        #expect(limited.totalSeconds <= expected * 1.15 + baseline.totalSeconds + 0.5, "\(limited.totalSeconds) s")
    }

    @Test("An ops limit: 64 requests at 20 per second")
    func opsMeasured() throws {
        let disk = try ScratchDisk(size: Self.diskSize)
        // The guest reads 4 MiB in 64 requests of 64 KiB: 4 go from the full bucket, the
        // other 60 at 20 per second: 3 s.
        let limited = try runCRC(disk: disk, limiter: RateLimiterConfiguration(ops: TokenBucketConfiguration(size: 4, refillTime: 200)))
        print("rate limit 20 ops/s: 64 requests in \(limited.readingSeconds) s; expected 3 s; whole run \(limited.totalSeconds) s")
        #expect(limited.totalSeconds >= 3.0)
        #expect(limited.readingSeconds <= 3.0 * 1.15 + 1.0)
    }

    @Test("A limit changed while the guest reads takes effect at once")
    func updateWhileRunning() throws {
        let disk = try ScratchDisk(size: Self.diskSize)
        // 256 KiB/s (64 KiB refilled in 250 ms): 4 MiB would take 15.75 s.
        let slow = RateLimiterConfiguration(bandwidth: TokenBucketConfiguration(size: 64 << 10, refillTime: 250))
        // After 1 s (about 320 KiB read), 2 MiB/s (512 KiB in 250 ms, starting full): the other
        // ~3.2 MiB take about 1.3 s more.
        let fast = RateLimiterConfiguration(bandwidth: TokenBucketConfiguration(size: 512 << 10, refillTime: 250))
        let observed = Mutex<[RateLimiterConfiguration]>([])
        let run = try runCRC(disk: disk, limiter: slow) { vm in
            usleep(1_000_000)
            try vm.updateRateLimiter(disk: 0, fast)
            observed.withLock { $0 = vm.diskRateLimiters }
            #expect(throws: SwiftletError.self) { try vm.updateRateLimiter(disk: 1, fast) }
        }
        print("rate limit 256 KiB/s, raised to 2 MiB/s after 1 s: read 4 MiB in \(run.readingSeconds) s (15.75 s unchanged)")
        #expect(observed.withLock { $0 } == [fast])
        #expect(run.readingSeconds >= 2.0 && run.readingSeconds <= 6.0, "\(run.readingSeconds) s")
    }

    @Test("A limit removed while a request waits for tokens releases it; pause and resume while throttled")
    func removeAndPauseWhileThrottled() throws {
        let disk = try ScratchDisk(size: Self.diskSize)
        // 64 KiB/s: one request per second.
        let crawl = RateLimiterConfiguration(bandwidth: TokenBucketConfiguration(size: 64 << 10, refillTime: 1000))
        let run = try runCRC(disk: disk, limiter: crawl) { vm in
            usleep(300_000)
            // The dispatcher is waiting for its timer: a pause must not wait for it.
            let pauseStart = Date()
            try vm.pause()
            #expect(Date().timeIntervalSince(pauseStart) < 0.5)
            usleep(200_000)
            try vm.resume()
            usleep(300_000)
            try vm.updateRateLimiter(disk: 0, RateLimiterConfiguration(bandwidth: TokenBucketConfiguration(size: 0, refillTime: 0)))
            #expect(vm.diskRateLimiters == [RateLimiterConfiguration()])
        }
        print("rate limit 64 KiB/s, removed after 0.8 s: read 4 MiB in \(run.readingSeconds) s (64 s unchanged)")
        #expect(run.readingSeconds < 10.0, "\(run.readingSeconds) s")
    }

    @Test("A snapshot records each disk's limiter as it is (updates included); the restored VM has it")
    func snapshotKeepsLimiter() throws {
        let disk = try ScratchDisk(size: 1 << 20)
        let directory = disk.directory.appendingPathComponent("snapshot").path
        var configuration = VMConfiguration(boot: .flat(.file(guests.appendingPathComponent("counter.bin").path)))
        configuration.memorySize = 32 << 20
        configuration.console = .discard
        // Read-only, so that the first VM's lock on the image does not keep out the second.
        var drive = VMConfiguration.Disk(path: disk.path, readOnly: true)
        drive.rateLimiter = RateLimiterConfiguration(ops: TokenBucketConfiguration(size: 100, refillTime: 1000))
        configuration.disks = [drive]
        let vm = try VM(configuration)
        let finished = Mutex(false)
        Thread {
            _ = try? vm.run()
            finished.withLock { $0 = true }
        }.start()
        while vm.state != .running { usleep(10_000) }
        let bandwidth = TokenBucketConfiguration(size: 1 << 20, oneTimeBurst: 4 << 20, refillTime: 500)
        try vm.updateRateLimiter(disk: 0, RateLimiterConfiguration(bandwidth: bandwidth))
        let expected = RateLimiterConfiguration(bandwidth: bandwidth, ops: TokenBucketConfiguration(size: 100, refillTime: 1000))
        #expect(vm.diskRateLimiters == [expected])
        try vm.pause()
        _ = try vm.snapshot(to: directory)
        vm.stop()
        while !finished.withLock({ $0 }) { usleep(10_000) }

        var restore = VMConfiguration(boot: .snapshot(directory: directory))
        restore.console = .discard
        let restored = try VM(restore)
        #expect(restored.diskRateLimiters == [expected])
    }
}
