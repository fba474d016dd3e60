@testable import DiskImage
import Foundation
import Synchronization
import Testing

/// Pseudo-random bytes, eight at a time (the tests run unoptimized).
private func pattern(_ count: Int, seed: UInt64) -> [UInt8] {
    var random = SeededRandom(seed: seed)
    var words = [UInt64](repeating: 0, count: (count + 7) / 8)
    for index in words.indices { words[index] = random.next() | 0x0101_0101_0101_0101 }
    return words.withUnsafeBytes { Array($0.prefix(count)) }
}

private func fileSize(_ path: String) -> UInt64 {
    var st = stat()
    guard stat(path, &st) == 0 else { return 0 }
    return UInt64(st.st_size)
}

/// Opens `path` as a writable qcow2 image, as the VMM does.
private func openQCOW2(_ path: String) throws -> QCOW2Image {
    try #require(try DiskImage.open(path: path, format: .qcow2, readOnly: false) as? QCOW2Image)
}

/// Waits up to 10 s for `condition`.
private func eventually(_ condition: () -> Bool) -> Bool {
    let deadline = Date().addingTimeInterval(10)
    while Date() < deadline {
        if condition() { return true }
        usleep(1000)
    }
    return false
}

/// Flags two threads of a test share.
private final class Flags: Sendable {
    let state = Mutex((holding: false, release: false, flushed: false))
    let failures = Atomic<Int>(0)
}

/// qcow2 as a live backend (issue 7, item 8): reads and writes from many threads at once,
/// clusters freed by a discard handed out again once that is safe, and `qemu-img check`
/// clean after all of it.
@Suite("qcow2 as a live backend")
struct LiveQCOW2Tests {
    @Test("Freed clusters are reused: after discard and flush, new writes do not grow the file",
          .enabled(if: Support.hasQemuImg, Comment(rawValue: Support.noQemu)))
    func freedClustersReused() throws {
        let dir = try Support.TempDir()
        let path = dir.file("reuse.qcow2")
        #expect(try Support.qemuImg("create", "-q", "-f", "qcow2", "-o", "cluster_size=65536", path, "64M").status == 0)
        var expected = [UInt8](repeating: 0, count: 64 << 20)
        let first = pattern(4 << 20, seed: 1), second = pattern(4 << 20, seed: 2)
        do {
            let image = try openQCOW2(path)
            try first.withUnsafeBytes { try image.write($0, at: 0) }
            try image.flush()
            let grown = fileSize(path)
            try image.discard(at: 0, length: 4 << 20)
            try image.flush()
            // Elsewhere in the disk (same L2 table): 64 new clusters, which the 64 freed ones serve.
            try second.withUnsafeBytes { try image.write($0, at: 16 << 20) }
            try image.flush()
            #expect(fileSize(path) <= grown, "the file grew from \(grown) to \(fileSize(path)) bytes")
            expected.replaceSubrange((16 << 20)..<(20 << 20), with: second)
            #expect(try Support.readAll(image) == expected)
        }
        let check = try Support.qemuImg("check", path)
        #expect(check.status == 0, "qemu-img check: \(check.stdout)\(check.stderr)")
        #expect(try Support.qemuRaw(path, in: dir) == expected)
    }

    @Test("A read in flight does not hold up other reads or writes; freed clusters wait for it before they are reused",
          .enabled(if: Support.hasQemuImg, Comment(rawValue: Support.noQemu)))
    func readsInParallelAndGracePeriod() throws {
        let dir = try Support.TempDir()
        let path = dir.file("parallel.qcow2")
        #expect(try Support.qemuImg("create", "-q", "-f", "qcow2", "-o", "cluster_size=65536", path, "16M").status == 0)
        let data = pattern(2 << 20, seed: 3)
        let image = try openQCOW2(path)
        try data.withUnsafeBytes { try image.write($0, at: 0) }
        try image.flush()

        // Another thread is in the middle of a read: between its lookup and the end of its
        // I/O it holds `hostIO` shared, as `read` does.
        let flags = Flags()
        let reader = Thread {
            image.hostIO.shared {
                flags.state.withLock { $0.holding = true }
                _ = eventually { flags.state.withLock { $0.release } }
            }
        }
        reader.start()
        #expect(eventually { flags.state.withLock { $0.holding } })

        // Reads and writes go on meanwhile: a read, an in-place write, an allocating write.
        var got = [UInt8](repeating: 0, count: 65536)
        try got.withUnsafeMutableBytes { try image.read(into: $0, at: 65536) }
        #expect(got == Array(data[65536..<131072]))
        try data.withUnsafeBytes { try image.write(UnsafeRawBufferPointer(rebasing: $0[0..<4096]), at: 8192) }
        try data.withUnsafeBytes { try image.write(UnsafeRawBufferPointer(rebasing: $0[0..<65536]), at: 8 << 20) }

        // A flush that frees clusters waits for the read that may still use them.
        try image.discard(at: 0, length: 1 << 20)
        let flusher = Thread {
            try? image.flush()
            flags.state.withLock { $0.flushed = true }
        }
        flusher.start()
        usleep(200_000)
        #expect(!flags.state.withLock { $0.flushed }, "the flush freed clusters while a read could still be using them")
        #expect(image.metadata.shared { !$0.pendingFrees.isEmpty })
        flags.state.withLock { $0.release = true }
        #expect(eventually { flags.state.withLock { $0.flushed } })
        #expect(image.metadata.shared { $0.pendingFrees.isEmpty })
    }

    @Test("Reads and writes from 8 threads at once: every read sees what the model says; qemu-img check is clean",
          .enabled(if: Support.hasQemuImg, Comment(rawValue: Support.noQemu)))
    func manyThreads() throws {
        let dir = try Support.TempDir()
        let path = dir.file("threads.qcow2")
        let cluster = 4096, clusters = 512
        #expect(try Support.qemuImg("create", "-q", "-f", "qcow2", "-o", "cluster_size=\(cluster)", path,
                                    "\(cluster * clusters)").status == 0)
        let stable = pattern(256 * cluster, seed: 4)
        let flags = Flags()
        do {
        let image = try openQCOW2(path)
        // Clusters 0..<256 are written first and then only read; 256..<512 are written by
        // their own thread (each thread owns every 4th of them), discarded and written again.
        try stable.withUnsafeBytes { try image.write($0, at: 0) }
        let threads = (0..<8).map { number in
            Thread {
                var random = SeededRandom(seed: UInt64(100 + number))
                var buffer = [UInt8](repeating: 0, count: cluster)
                for step in 0..<300 {
                    if number < 4 {
                        let index = Int(random.next() % 256)
                        do {
                            try buffer.withUnsafeMutableBytes { try image.read(into: $0, at: UInt64(index * cluster)) }
                            if buffer[...] != stable[(index * cluster)..<((index + 1) * cluster)] { flags.failures.add(1, ordering: .relaxed) }
                        } catch { flags.failures.add(1, ordering: .relaxed) }
                    } else {
                        let index = 256 + (number - 4) + 4 * Int(random.next() % 64)
                        let bytes = [UInt8](repeating: UInt8(truncatingIfNeeded: step | 1), count: cluster)
                        do {
                            try bytes.withUnsafeBytes { try image.write($0, at: UInt64(index * cluster)) }
                            try buffer.withUnsafeMutableBytes { try image.read(into: $0, at: UInt64(index * cluster)) }
                            if buffer != bytes { flags.failures.add(1, ordering: .relaxed) }
                            if step % 16 == 0 { try image.discard(at: UInt64(index * cluster), length: UInt64(cluster)) }
                            if step % 50 == 0 { try image.flush() }
                        } catch { flags.failures.add(1, ordering: .relaxed) }
                    }
                }
            }
        }
        for thread in threads { thread.start() }
        #expect(eventually { threads.allSatisfy { $0.isFinished } })
        try image.flush()
        }
        #expect(flags.failures.load(ordering: .relaxed) == 0)
        let check = try Support.qemuImg("check", path)
        #expect(check.status == 0, "qemu-img check: \(check.stdout)\(check.stderr)")
        #expect(Array(try Support.qemuRaw(path, in: dir)[0..<stable.count]) == stable)
    }
}
