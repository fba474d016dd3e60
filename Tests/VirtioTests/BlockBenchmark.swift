import DiskImage
import EventLoop
import Foundation
import Memory
import Synchronization
import Testing
import Virtio

/// A measurement, not a test: how much several requests in flight gain from the worker
/// pool. Off unless SWIFTLET_BLOCK_BENCH is set; run it optimized:
///
///     SWIFTLET_BLOCK_BENCH=1 swift test -c release --filter BlockBenchmark
///
/// It reads 4 KiB blocks at random offsets of a 512 MiB raw file through the device with
/// 1, 4 and 8 workers, the driver submitting batches of 32 requests and sleeping on its
/// interrupt eventfd until each batch is done, and, as the baseline, with as many
/// dedicated host threads calling `pread` on the same offsets. Each run starts with the
/// file dropped from the page cache (`posix_fadvise(DONTNEED)`), so the reads reach the
/// disk; then the same with the file cached, where the cost is the queue, the threads and
/// the copy. It prints IOPS (median of three runs) and the ratio to the baseline.
@Suite("virtio-blk: worker pool measurement", .enabled(if: ProcessInfo.processInfo.environment["SWIFTLET_BLOCK_BENCH"] != nil))
struct BlockBenchmark {
    static let fileSize = 512 << 20
    static let blockSize = 4096
    static let depth = 32
    static let requests = 8192

    @Test("4 KiB random reads, 32 in flight: device with 1/4/8 workers against host pread threads")
    func randomReads() throws {
        let folder = try ImageFolder()
        let path = folder.file("bench.raw")
        try makeFile(path)
        var random = SystemRandomNumberGenerator()
        let offsets = (0..<Self.requests).map { _ in UInt64(Int.random(in: 0..<(Self.fileSize / Self.blockSize), using: &random) * Self.blockSize) }

        for cached in [false, true] {
            print("\(cached ? "cached" : "cold cache"): \(Self.requests) random \(Self.blockSize)-byte reads, \(Self.depth) in flight")
            for workers in [1, 4, 8] {
                // The median of three runs each: this host is shared and noisy.
                let host = try (0..<3).map { _ in try hostReads(path, offsets: offsets, threads: workers, cached: cached) }.sorted()[1]
                let device = try (0..<3).map { _ in try deviceReads(path, offsets: offsets, workers: workers, cached: cached) }.sorted()[1]
                print(String(format: "  %d workers: device %8.0f IOPS, host %d threads %8.0f IOPS, ratio %.2f",
                             workers, device, workers, host, device / host))
            }
        }
    }

    private func makeFile(_ path: String) throws {
        #expect(FileManager.default.createFile(atPath: path, contents: nil))
        let handle = try FileHandle(forWritingTo: URL(fileURLWithPath: path))
        let chunk = Data(ImageFolder.pattern(1 << 20))
        for _ in 0..<(Self.fileSize >> 20) { handle.write(chunk) }
        try handle.synchronize()
        try handle.close()
    }

    /// Drops the file from the page cache (or reads it all in, when `cached`).
    private func prepareCache(_ path: String, cached: Bool) {
        let fd = open(path, O_RDONLY)
        defer { close(fd) }
        if cached {
            var buffer = [UInt8](repeating: 0, count: 1 << 20)
            while read(fd, &buffer, buffer.count) > 0 {}
        } else {
            _ = posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED)
        }
    }

    private func now() -> Double {
        var time = timespec()
        clock_gettime(CLOCK_MONOTONIC, &time)
        return Double(time.tv_sec) + Double(time.tv_nsec) / 1e9
    }

    /// IOPS of `threads` dedicated host threads reading the offsets between them with
    /// `pread`, each going on to its next offset at once: `threads` reads in flight all the time.
    private func hostReads(_ path: String, offsets: [UInt64], threads: Int, cached: Bool) throws -> Double {
        prepareCache(path, cached: cached)
        let fd = open(path, O_RDONLY)
        defer { close(fd) }
        let done = DispatchSemaphore(value: 0)
        let start = now()
        for thread in 0..<threads {
            Thread {
                let buffer = UnsafeMutableRawPointer.allocate(byteCount: Self.blockSize, alignment: 4096)
                defer { buffer.deallocate() }
                for index in stride(from: thread, to: offsets.count, by: threads) {
                    _ = pread(fd, buffer, Self.blockSize, off_t(offsets[index]))
                }
                done.signal()
            }.start()
        }
        for _ in 0..<threads { done.wait() }
        return Double(offsets.count) / (now() - start)
    }

    /// IOPS of the device serving the same batches, the driver sleeping on its interrupt
    /// eventfd (as a guest's vCPU halts until KVM's irqfd injects the interrupt) until
    /// each batch is done.
    private func deviceReads(_ path: String, offsets: [UInt64], workers: Int, cached: Bool) throws -> Double {
        prepareCache(path, cached: cached)
        let disk = try DiskImage.open(path: path, format: .raw, readOnly: true)
        let probe = try VirtioBlock(disk: disk)
        let interrupt = try EventFDInterrupt()
        let harness = try BlockHarness(disk: disk, options: VirtioBlockOptions(workersPerQueue: workers), queueSize: 128,
                                       features: probe.offeredFeatures, activate: false)
        try harness.device.activate(VirtioActivation(memory: harness.memory, features: harness.features, queues: harness.queues,
                                                     notifications: harness.notifiers, interrupt: interrupt, needsReset: { _ in }))
        // One header, data buffer and status per slot, reused batch after batch.
        let slots = try (0..<Self.depth).map { _ in
            (header: try harness.allocate(16), data: try harness.allocate(Self.blockSize), status: try harness.allocate(1))
        }
        var used: UInt16 = 0
        let start = now()
        for batch in stride(from: 0, to: offsets.count, by: Self.depth) {
            let count = min(Self.depth, offsets.count - batch)
            // Interrupt once the whole batch is done (used_event, as Linux's virtqueue_enable_cb_delayed).
            try harness.drivers[0].setUsedEvent(used &+ UInt16(count) &- 1)
            for slot in 0..<count {
                let (header, data, status) = slots[slot]
                let sector = offsets[batch + slot] / 512
                try harness.memory.write(BlockHarness.header(type: VirtioBlockRequestType.read, sector: sector), at: header)
                try harness.submitChain([(header, 16, false), (data, UInt32(Self.blockSize), true), (status, 1, true)],
                                        notify: slot == count - 1)
            }
            used &+= UInt16(count)
            while try harness.drivers[0].usedIndex != used { interrupt.event.drain() }
        }
        let elapsed = now() - start
        for slot in slots { #expect(try harness.memory.load(UInt8.self, at: slot.status) == VirtioBlockStatus.ok) }
        return Double(offsets.count) / elapsed
    }
}

/// An interrupt that is one eventfd write, like KVM_IRQFD; the benchmark's driver blocks on it.
private final class EventFDInterrupt: VirtioInterrupt {
    let event: EventFD
    init() throws { event = try EventFD(nonBlocking: false) }
    func signalQueue(_ index: Int) { event.signal() }
    func signalConfigurationChange() {}
}
