import DiskImage
import Foundation
import Testing

/// Bytes a file occupies on disk.
private func allocated(_ path: String) -> UInt64 {
    var st = stat()
    guard stat(path, &st) == 0 else { return 0 }
    return UInt64(st.st_blocks) * 512
}

/// Pseudo-random bytes, eight at a time (the tests run unoptimized).
private func pattern(_ count: Int) -> [UInt8] {
    var random = SeededRandom(seed: 7)
    var words = [UInt64](repeating: 0, count: (count + 7) / 8)
    for index in words.indices { words[index] = random.next() | 0x0101_0101_0101_0101 }
    return words.withUnsafeBytes { Array($0.prefix(count)) }
}

@Suite("Discard and write-zeroes on disk images")
struct DiscardTests {
    @Test("Raw: discard punches a hole, write-zeroes zeroes in place or punches with deallocate")
    func raw() throws {
        let dir = try Support.TempDir()
        let path = dir.file("disk.raw")
        var expected = pattern(4 << 20)
        try Data(expected).write(to: URL(fileURLWithPath: path))
        let disk = try DiskImage.open(path: path, format: .raw, readOnly: false)
        #expect(disk.canDeallocate)
        var st = stat()
        #expect(stat(path, &st) == 0)
        #expect(disk.discardGranularity == UInt64(st.st_blksize))
        let full = allocated(path)

        try disk.discard(at: 1 << 20, length: 1 << 20)
        #expect(allocated(path) <= full - (1 << 20))
        expected.replaceSubrange((1 << 20)..<(2 << 20), with: repeatElement(0, count: 1 << 20))

        let afterDiscard = allocated(path)
        try disk.writeZeroes(at: 0, length: 4096 + 512, deallocate: false)
        #expect(allocated(path) == afterDiscard, "ZERO_RANGE keeps the blocks")
        expected.replaceSubrange(0..<(4096 + 512), with: repeatElement(0, count: 4096 + 512))

        try disk.writeZeroes(at: 3 << 20, length: 1 << 20, deallocate: true)
        #expect(allocated(path) <= afterDiscard - (1 << 20))
        expected.replaceSubrange((3 << 20)..<(4 << 20), with: repeatElement(0, count: 1 << 20))

        try disk.discard(at: 4 << 20, length: 0)
        #expect(try Support.readAll(disk) == expected)
        #expect(try Support.readFile(path) == expected)
    }

    @Test("Read-only images and ranges past the end are refused, and nothing changes")
    func refusals() throws {
        let dir = try Support.TempDir()
        let path = dir.file("disk.raw")
        let bytes = pattern(1 << 20)
        try Data(bytes).write(to: URL(fileURLWithPath: path))
        do {
            let readOnly = try DiskImage.open(path: path, format: .raw, readOnly: true)
            #expect(!readOnly.canDeallocate)
            #expect(throws: DiskImageError.self) { try readOnly.discard(at: 0, length: 4096) }
            #expect(throws: DiskImageError.self) { try readOnly.writeZeroes(at: 0, length: 4096, deallocate: false) }
        }
        let writable = try DiskImage.open(path: path, format: .raw, readOnly: false)
        #expect(throws: DiskImageError.self) { try writable.discard(at: (1 << 20) - 512, length: 1024) }
        #expect(throws: DiskImageError.self) { try writable.writeZeroes(at: UInt64.max - 10, length: 20, deallocate: true) }
        #expect(throws: DiskImageError.self) { try writable.writeZeroes(at: 1 << 20, length: 512, deallocate: false) }
        #expect(try Support.readFile(path) == bytes)

        try Support.qemuImg("create", "-q", "-f", "qcow2", dir.file("disk.qcow2"), "1M")
        let qcow2 = try DiskImage.open(path: dir.file("disk.qcow2"), format: .qcow2, readOnly: true)
        #expect(throws: DiskImageError.self) { try qcow2.writeZeroes(at: 0, length: 512, deallocate: false) }
        #expect(throws: DiskImageError.self) { try qcow2.discard(at: 0, length: 512) }
    }

    @Test("qcow2 (the defaults): write-zeroes writes zeros where data is, allocates nothing where none is; discard of whole clusters deallocates them (zero clusters over a backing file)",
          .enabled(if: Support.hasQemuImg, Comment(rawValue: Support.noQemu)))
    func qcow2() throws {
        let dir = try Support.TempDir()
        let base = dir.file("base.raw")
        var expected = pattern(2 << 20)
        try Data(expected).write(to: URL(fileURLWithPath: base))
        let path = dir.file("overlay.qcow2")
        #expect(try Support.qemuImg("create", "-q", "-f", "qcow2", "-b", base, "-F", "raw", path).status == 0)
        let plain = dir.file("plain.qcow2")
        #expect(try Support.qemuImg("create", "-q", "-f", "qcow2", plain, "2M").status == 0)
        do {
            let disk = try DiskImage.open(path: path, format: .qcow2, readOnly: false)
            #expect(disk.canDeallocate)
            #expect(disk.discardGranularity == 65536)
            // Over backing data: zeros must be written, across a 1 MiB piece boundary.
            try disk.writeZeroes(at: (1 << 20) - 4096, length: 12288, deallocate: true)
            expected.replaceSubrange(((1 << 20) - 4096)..<((1 << 20) + 8192), with: repeatElement(0, count: 12288))
            // A whole cluster: it becomes a zero cluster (the backing file must not show through).
            try disk.discard(at: 0, length: 65536)
            expected.replaceSubrange(0..<65536, with: repeatElement(0, count: 65536))
            try disk.flush()
            #expect(try Support.readAll(disk) == expected)

            let empty = try DiskImage.open(path: plain, format: .qcow2, readOnly: false)
            try empty.writeZeroes(at: 0, length: 2 << 20, deallocate: false)
            try empty.flush()
            #expect(try Support.readAll(empty) == [UInt8](repeating: 0, count: 2 << 20))
        }
        #expect(try Support.qemuImg("check", path).status == 0)
        #expect(try Support.qemuImg("check", plain).status == 0)
        #expect(try Support.qemuRaw(path, in: dir) == expected)
        let map = try Support.qemuImg("map", "--output=json", plain)
        #expect(!map.stdout.contains("\"data\": true"), "write-zeroes over an empty image allocated data: \(map.stdout)")
    }
}
