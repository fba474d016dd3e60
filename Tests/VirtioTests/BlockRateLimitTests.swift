import DiskImage
import Foundation
import RateLimit
import Testing
import Virtio

/// How long `body` takes, in seconds.
private func seconds(_ body: () throws -> Void) rethrows -> Double {
    let start = Date()
    try body()
    return Date().timeIntervalSince(start)
}

/// The CPU time (user + system, in clock ticks) of this process's threads named `name`.
private func cpuTicks(ofThreadsNamed name: String) -> Int {
    let tasks = (try? FileManager.default.contentsOfDirectory(atPath: "/proc/self/task")) ?? []
    var total = 0
    for task in tasks {
        guard let comm = try? String(contentsOfFile: "/proc/self/task/\(task)/comm", encoding: .utf8),
              comm.trimmingCharacters(in: .whitespacesAndNewlines) == name,
              let stat = try? String(contentsOfFile: "/proc/self/task/\(task)/stat", encoding: .utf8),
              let close = stat.lastIndex(of: ")") else { continue }
        // After the name: state is field 3; utime and stime are fields 14 and 15.
        let fields = stat[stat.index(after: close)...].split(separator: " ")
        total += (Int(fields[11]) ?? 0) + (Int(fields[12]) ?? 0)
    }
    return total
}

@Suite("virtio-blk: rate limits", .serialized)
struct BlockRateLimitTests {
    static func harness(_ limiter: RateLimiterConfiguration, diskIndex: Int) throws -> (BlockHarness, ImageFolder) {
        let folder = try ImageFolder()
        let path = try folder.raw("disk.raw", size: 1 << 20)
        let disk = try DiskImage.open(path: path, format: .raw, readOnly: false)
        let options = VirtioBlockOptions(diskIndex: diskIndex, queueSize: 128, rateLimiter: limiter)
        return (try BlockHarness(disk: disk, options: options), folder)
    }

    @Test("A request without tokens goes back to the ring and is served when the timer fires, with no spinning")
    func waitsInTheRing() throws {
        // One request per 500 ms.
        let (harness, _) = try Self.harness(RateLimiterConfiguration(ops: TokenBucketConfiguration(size: 1, refillTime: 500)),
                                            diskIndex: 40)
        let ticksBefore = cpuTicks(ofThreadsNamed: "blk40q0")
        let requests = try (0..<3).map { try harness.read(sector: UInt64($0), count: 512) }
        var statuses: [UInt8] = []
        let elapsed = try seconds {
            #expect(try harness.waitForUsed(1))
            usleep(50_000)
            // The second request is back in the available ring, not taken and held.
            #expect(try harness.drivers[0].usedIndex == 1)
            #expect(harness.queues[0].indices.nextAvailable == 1)
            statuses = try harness.complete(requests)
        }
        #expect(statuses == [VirtioBlockStatus.ok, VirtioBlockStatus.ok, VirtioBlockStatus.ok])
        // Two waits of 500 ms.
        #expect(elapsed >= 0.99 && elapsed < 4, "\(elapsed) s")
        // The dispatcher slept through them (a clock tick is 10 ms: a spinning one would
        // have used about 100).
        #expect(cpuTicks(ofThreadsNamed: "blk40q0") - ticksBefore < 10)
    }

    @Test("A pause while a request waits for tokens returns at once; the request waits in the ring until resume")
    func pauseWhileThrottled() throws {
        let (harness, _) = try Self.harness(RateLimiterConfiguration(ops: TokenBucketConfiguration(size: 1, refillTime: 800)),
                                            diskIndex: 41)
        let requests = try (0..<2).map { try harness.read(sector: UInt64($0), count: 512) }
        #expect(try harness.waitForUsed(1))
        let pause = seconds { harness.device.pause() }
        #expect(pause < 0.2, "pause took \(pause) s")
        #expect(harness.queues[0].indices.nextAvailable == 1)
        // The timer fires during the pause: nothing is taken.
        usleep(1_000_000)
        #expect(try harness.drivers[0].usedIndex == 1)
        #expect(harness.queues[0].indices.nextAvailable == 1)
        harness.device.resume()
        #expect(try harness.complete(requests) == [VirtioBlockStatus.ok, VirtioBlockStatus.ok])
    }

    @Test("An update while a request waits applies at once; a bucket left out stays")
    func updateWhileThrottled() throws {
        // One request per minute, and a generous bandwidth bucket.
        let bandwidth = TokenBucketConfiguration(size: 1 << 30, refillTime: 1000)
        let (harness, _) = try Self.harness(RateLimiterConfiguration(bandwidth: bandwidth,
                                                                     ops: TokenBucketConfiguration(size: 1, refillTime: 60_000)),
                                            diskIndex: 42)
        let requests = try (0..<2).map { try harness.read(sector: UInt64($0), count: 512) }
        #expect(try harness.waitForUsed(1))
        usleep(200_000)
        #expect(try harness.drivers[0].usedIndex == 1)
        var statuses: [UInt8] = []
        let elapsed = try seconds {
            harness.device.updateRateLimiter(RateLimiterConfiguration(ops: TokenBucketConfiguration(size: 0, refillTime: 0)))
            statuses = try harness.complete(requests)
        }
        #expect(statuses == [VirtioBlockStatus.ok, VirtioBlockStatus.ok])
        #expect(elapsed < 1, "\(elapsed) s")
        #expect(harness.device.rateLimiterConfiguration == RateLimiterConfiguration(bandwidth: bandwidth))
    }

    @Test("Bytes are counted for reads and writes, not for flushes")
    func bandwidthCountsData() throws {
        // 8 KiB per 200 ms (no refill in between that matters: each wait is ~100 ms+).
        let (harness, _) = try Self.harness(RateLimiterConfiguration(bandwidth: TokenBucketConfiguration(size: 8192, refillTime: 200)),
                                            diskIndex: 43)
        var requests = try (0..<2).map { try harness.read(sector: UInt64($0 * 8), count: 4096) }
        // A flush takes no bytes: it does not wait behind the empty bucket forever.
        requests.append(try harness.submit(type: VirtioBlockRequestType.flush))
        requests.append(try harness.write(sector: 64, [UInt8](repeating: 7, count: 4096)))
        var statuses: [UInt8] = []
        let elapsed = try seconds { statuses = try harness.complete(requests) }
        #expect(statuses == Array(repeating: VirtioBlockStatus.ok, count: 4))
        // 8 KiB at once (the full bucket), the flush at once, the 4 KiB write after 100 ms.
        #expect(elapsed >= 0.09 && elapsed < 2, "\(elapsed) s")
    }
}
