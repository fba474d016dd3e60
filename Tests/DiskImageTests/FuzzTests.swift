@testable import DiskImage
import Foundation
import Testing

/// A seeded mutation fuzzer with a fixed budget: valid images get random bytes, interesting
/// 64-bit values and truncations, then are opened, read, checked and written. The only allowed
/// outcomes are success or a `DiskImageError` with a one-line message; a crash, a hang or an
/// unbounded allocation fails the run. The seed is fixed, so any failure reproduces.
@Suite("Mutation fuzzing")
struct FuzzTests {
    static let seeds = ["c512.qcow2", "v2-c4k.qcow2", "comp-zlib-c16k.qcow2", "comp-zstd-c16k.qcow2", "ext-l2.qcow2",
                        "ext-l2-overlay.qcow2", "snapshots.qcow2", "refcount1.qcow2", "refcount64.qcow2", "top.qcow2",
                        "bitmaps.qcow2"]
    /// Inputs per seed image; `SWIFTLET_FUZZ_ITERATIONS` raises it for longer local runs.
    static let iterations = Int(ProcessInfo.processInfo.environment["SWIFTLET_FUZZ_ITERATIONS"] ?? "") ?? 60

    static func interesting(_ size: UInt64, _ rng: inout SeededRandom) -> UInt64 {
        let values: [UInt64] = [0, 1, 0x200, 0x1000, 0x10000, size, size &+ 512, size &- 512, UInt64(Int64.max),
                                UInt64.max, 1 << 63, 1 << 62, 1 << 62 | 0x1000, 0x8000_0000_0000_0000 | size,
                                0xffff_ffff, 0x7fff_ffff]
        return values[Int.random(in: 0..<values.count, using: &rng)]
    }

    static func mutate(_ bytes: inout [UInt8], _ rng: inout SeededRandom) {
        for _ in 0..<Int.random(in: 1...6, using: &rng) {
            switch Int.random(in: 0..<100, using: &rng) {
            case 0..<40:  // Header bytes.
                bytes[Int.random(in: 0..<min(512, bytes.count), using: &rng)] = UInt8.random(in: 0...255, using: &rng)
            case 40..<70:  // Anywhere.
                bytes[Int.random(in: 0..<bytes.count, using: &rng)] ^= UInt8(1 << Int.random(in: 0..<8, using: &rng))
            case 70..<95:  // A big-endian word: header fields, table entries.
                let at = Int.random(in: 0..<(bytes.count / 8), using: &rng) * 8
                let v = interesting(UInt64(bytes.count), &rng)
                for i in 0..<8 { bytes[at + i] = UInt8(truncatingIfNeeded: v >> (8 * (7 - i))) }
            default:  // Truncate.
                bytes.removeLast(Int.random(in: 0..<(bytes.count / 2), using: &rng))
            }
            if bytes.isEmpty { bytes = [0] }
        }
    }

    /// Opens read-only and reads, checks and describes the image (closed again before it is written).
    static func read(_ path: String, _ rng: inout SeededRandom) throws {
        let dev = try DiskImage.open(path: path)
        let size = dev.virtualSize
        var buf = [UInt8](repeating: 0, count: 65536)
        if size <= 16 << 20 {
            var off: UInt64 = 0
            while off < size {
                let n = Int(min(UInt64(buf.count), size - off))
                try buf.withUnsafeMutableBytes { try dev.read(into: UnsafeMutableRawBufferPointer(rebasing: $0[0..<n]), at: off) }
                off += UInt64(n)
            }
        } else {
            for _ in 0..<32 {
                let off = UInt64.random(in: 0...(size - 65536), using: &rng)
                try buf.withUnsafeMutableBytes { try dev.read(into: $0, at: off) }
            }
        }
        if let q = dev as? QCOW2Image {
            _ = try q.check()
            _ = try DiskImage.info(path: path)
        }
    }

    /// Opens, reads (all of a small disk, samples of a large one), checks and writes; returns the error, if any.
    static func exercise(_ path: String, _ rng: inout SeededRandom) -> Error? {
        do {
            try read(path, &rng)
            let rw = try Support.open(path, readOnly: false)
            for i in 0..<4 where rw.virtualSize > 0 {
                let len = Int(min(rw.virtualSize, UInt64.random(in: 1...10000, using: &rng)))
                let off = UInt64.random(in: 0...(rw.virtualSize - UInt64(len)), using: &rng)
                let data = [UInt8](repeating: UInt8(i + 1), count: len)
                try data.withUnsafeBytes { try rw.write($0, at: off) }
            }
            try rw.flush()
            return nil
        } catch {
            return error
        }
    }

    @Test("mutated images never crash, hang or escape the error type", arguments: seeds)
    func fuzz(_ seedName: String) throws {
        let dir = try Support.TempDir()
        for name in try FileManager.default.contentsOfDirectory(atPath: Support.fixtures) where name != seedName {
            try Support.copy(Support.fixture(name), to: dir.file(name))
        }
        let original = try Support.readFile(Support.fixture(seedName))
        var rng = SeededRandom(seed: UInt64(seedName.utf8.count) &* 0x5bd1_e995)
        var refused = 0
        let path = dir.file(seedName)
        for _ in 0..<Self.iterations {
            var bytes = original
            Self.mutate(&bytes, &rng)
            try? FileManager.default.removeItem(atPath: path)
            try Data(bytes).write(to: URL(fileURLWithPath: path))
            if let error = Self.exercise(path, &rng) {
                refused += 1
                let e = try #require(error as? DiskImageError, "not a DiskImageError: \(error)")
                #expect(!e.description.contains("\n"))
                if case .imageInUse = e { Issue.record("the read-only open was still holding its lock: \(e)") }
            }
        }
        // The mutations are strong enough that many inputs are refused.
        #expect(refused > Self.iterations / 10)
    }

    @Test("the hand-built image survives mutation too")
    func fuzzTestImage() throws {
        let dir = try Support.TempDir()
        let path = dir.file("t.qcow2")
        var rng = SeededRandom(seed: 42)
        for _ in 0..<(Self.iterations * 3) {
            var img = TestImage()
            Self.mutate(&img.bytes, &rng)
            try? FileManager.default.removeItem(atPath: path)
            try img.write(to: path)
            if let error = Self.exercise(path, &rng) {
                #expect(error is DiskImageError, "\(error)")
            }
        }
    }
}
