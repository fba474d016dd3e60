@testable import DiskImage
import Foundation
import Testing

/// `resize` against `qemu-img resize`: the same sizes accepted and refused, the same guest
/// contents and allocation afterwards, images `qemu-img check` finds clean, and a crash at any
/// write leaving a consistent image.
@Suite("Resize agrees with qemu-img")
struct ResizeTests {
    static let qemu = Comment(rawValue: Support.noQemu)

    /// qemu-img's size syntax as the tests write it: "1M", "+1M", "-50".
    static func target(_ text: String) -> ResizeTarget {
        func bytes(_ s: Substring) -> UInt64 {
            let units: [Character: UInt64] = ["K": 1 << 10, "M": 1 << 20, "G": 1 << 30]
            if let last = s.last, let unit = units[last] { return UInt64(s.dropLast())! * unit }
            return UInt64(s)!
        }
        if text.hasPrefix("+") { return .grow(by: bytes(text.dropFirst())) }
        if text.hasPrefix("-") { return .shrink(by: bytes(text.dropFirst())) }
        return .absolute(bytes(Substring(text)))
    }

    static let cases: [(image: String, size: String, shrink: Bool)] = [
        ("v3-c64k.qcow2", "+1M", false), ("v3-c64k.qcow2", "1M", true), ("v3-c64k.qcow2", "100K", true),
        ("v3-c64k.qcow2", "10G", false), ("v3-c64k.qcow2", "+0", false), ("c512.qcow2", "+3M", false),
        ("c512.qcow2", "300K", true), ("v2-c4k.qcow2", "+5M", false), ("v2-c4k.qcow2", "512K", true),
        ("snapshots.qcow2", "+1M", false), ("snapshots.qcow2", "4K", true), ("top.qcow2", "+1M", false),
        ("top.qcow2", "600K", true), ("mid.qcow2", "+3M", false), ("overlay.qcow2", "1M", true),
        ("overlay.qcow2", "+8M", false), ("ext-l2.qcow2", "+1M", false), ("ext-l2.qcow2", "40K", true),
        ("ext-l2-overlay.qcow2", "+1M", false), ("subclusters.qcow2", "100K", true),
        ("subclusters.qcow2", "+5000K", false), ("many-l2.qcow2", "3M", true), ("many-l2.qcow2", "+2G", false),
        ("many-l2-top.qcow2", "2M", true), ("compressed.qcow2", "1M", true), ("comp-zstd-c16k.qcow2", "100K", true),
        ("refcount1.qcow2", "300K", true), ("refcount64.qcow2", "+2M", false), ("lazy.qcow2", "+1M", false),
        ("unaligned-overlay.qcow2", "2M", false), ("base.raw", "+1M", false), ("base.raw", "-100K", true),
        ("odd.raw", "+24", false), ("odd.raw", "-50", true), ("sparse.raw", "1M", true),
    ]

    @Test("resize leaves what qemu-img resize leaves: size, contents, allocation; qemu-img check is clean",
          .enabled(if: Support.hasQemuImg, qemu))
    func matchesQemu() throws {
        let dir = try Support.TempDir()
        try GeneratedImages.make(in: dir)
        // An overlay whose size ends inside a cluster, over a larger backing file.
        try Support.run(Support.qemuImgPath!, ["create", "-q", "-f", "qcow2", "-b", "b4.raw", "-F", "raw",
                                               "unaligned-overlay.qcow2", "1000448"], cwd: dir.path)
        for (i, (image, size, shrink)) in Self.cases.enumerated() {
            let ext = image.hasSuffix(".raw") ? "raw" : "qcow2"
            let theirs = "theirs-\(i)-\(image)", ours = "ours-\(i)-\(image)"
            try Support.copy(dir.file(image), to: dir.file(theirs))
            try Support.copy(dir.file(image), to: dir.file(ours))
            let q = try Support.run(Support.qemuImgPath!, ["resize", "-f", ext] + (shrink ? ["--shrink"] : [])
                                    + [theirs, "--", size], cwd: dir.path)
            #expect(q.status == 0, "qemu-img resize \(image) \(size): \(q.stderr)")
            let newSize = try DiskImage.resize(path: dir.file(ours), to: Self.target(size), allowShrink: shrink)
            // qemu-img shows a raw file's size rounded up to whole sectors.
            let shown = ext == "raw" ? (newSize + 511) / 512 * 512 : newSize
            let info = try Support.run(Support.qemuImgPath!, ["info", "--output=json", ours], cwd: dir.path)
            #expect(info.stdout.contains("\"virtual-size\": \(shown),"), "\(image) \(size)")
            let qinfo = try Support.run(Support.qemuImgPath!, ["info", "--output=json", theirs], cwd: dir.path)
            #expect(qinfo.stdout.contains("\"virtual-size\": \(shown),"), "\(image) \(size): \(qinfo.stdout)")
            if ext == "raw" { #expect(try Support.readFile(dir.file(ours)).count == Int(newSize)) }
            if ext == "qcow2" {
                let check = try Support.run(Support.qemuImgPath!, ["check", ours], cwd: dir.path)
                #expect(check.status == 0, "\(image) \(size): \(check.stdout)\(check.stderr)")
            }
            let cmp = try Support.run(Support.qemuImgPath!, ["compare", theirs, ours], cwd: dir.path)
            #expect(cmp.status == 0, "\(image) \(size): \(cmp.stdout)")
            // Zero clusters, unallocated ranges and data in the same places (host offsets may differ).
            let noOffsets = #", "offset": [0-9]+"#
            let a = try GeneratedImages.qemuMap(theirs, cwd: dir.path).replacingOccurrences(of: noOffsets, with: "", options: .regularExpression)
            let b = try GeneratedImages.qemuMap(ours, cwd: dir.path).replacingOccurrences(of: noOffsets, with: "", options: .regularExpression)
            #expect(a == b, "\(image) \(size)")
        }
    }

    @Test("what qemu-img refuses is refused, and the image is left untouched",
          .enabled(if: Support.hasQemuImg, qemu))
    func refusals() throws {
        let dir = try Support.TempDir()
        try GeneratedImages.make(in: dir)
        try Support.qemuImg("snapshot", "-c", "s", dir.file("v2-c4k.qcow2"))
        try Support.run(Support.qemuImgPath!, ["create", "-q", "-f", "qcow2", "-o", "compat=0.10", "-b", "b4.raw", "-F", "raw",
                                               "v2-overlay.qcow2", "1M"], cwd: dir.path)
        let cases: [(String, ResizeTarget, Bool, ImageEditError)] = [
            ("v3-c64k.qcow2", .shrink(by: 1 << 20), false, ImageEditError.shrinkNeedsFlag(current: 4 << 20, requested: 3 << 20)),
            ("v3-c64k.qcow2", .grow(by: 1000), false, ImageEditError.sizeNotSectorMultiple((4 << 20) + 1000)),
            ("v3-c64k.qcow2", .absolute(0), true, ImageEditError.sizeNotPositive),
            ("v3-c64k.qcow2", .shrink(by: 4 << 20), true, ImageEditError.sizeNotPositive),
            ("v2-c4k.qcow2", .grow(by: 1 << 20), false, ImageEditError.resizeV2WithSnapshots),
            ("bitmaps.qcow2", .grow(by: 1 << 20), false, ImageEditError.resizeWithBitmaps),
            ("v2-overlay.qcow2", .grow(by: 1 << 20), false, ImageEditError.growV2OverLargerBacking(backingSize: 4 << 20)),
        ]
        for (image, target, shrink, expected) in cases {
            let before = try Support.readFile(dir.file(image))
            do {
                try DiskImage.resize(path: dir.file(image), to: target, allowShrink: shrink)
                Issue.record("\(image) \(target): accepted")
            } catch let e as ImageEditError {
                #expect(e == expected, "\(image) \(target)")
            }
            #expect(try Support.readFile(dir.file(image)) == before, "\(image) was changed")
        }
    }

    /// Resizes a copy of `image` with the writes stopped after 0, 1, 2, ... of them, until one
    /// run completes; after each, `qemu-img check` must find at worst leaks, and the guest must
    /// see the old contents at the old or the new size.
    func crashEverywhere(_ image: String, to newSize: UInt64, in dir: Support.TempDir) throws -> Int {
        let original = try Support.qemuRaw(dir.file(image), in: dir)
        var budget = 0, completed = false
        while !completed && budget < 300 {
            let path = dir.file("crash-\(budget)-\(image)")
            try Support.copy(dir.file(image), to: path)
            do {
                let q = try #require(try DiskImage.open(path: path, readOnly: false) as? QCOW2Image)
                q.file.writeBudget.store(budget, ordering: .relaxed)
                do {
                    try q.resize(to: newSize)
                    completed = true
                } catch DiskImageError.io(let op, _, _) where op.contains("simulated crash") {}
            }
            let check = try Support.qemuImg("check", path)
            #expect(check.status == 0 || check.status == 3, "\(image), crash after \(budget) writes: \(check.stdout)")
            let now = try Support.qemuRaw(path, in: dir)
            let common = min(now.count, original.count)
            #expect(now.count == original.count || now.count == Int(newSize), "\(image), crash after \(budget) writes")
            #expect(now[..<common] == original[..<common], "\(image), crash after \(budget) writes")
            if now.count > original.count {
                #expect(now[original.count...].allSatisfy { $0 == 0 }, "\(image), crash after \(budget) writes")
            }
            try? FileManager.default.removeItem(atPath: path)
            budget += 1
        }
        #expect(completed)
        return budget
    }

    @Test("a crash while growing (new L1 table, zero clusters over the backing file) leaves at worst leaks",
          .enabled(if: Support.hasQemuImg, qemu))
    func crashWhileGrowing() throws {
        let dir = try Support.TempDir()
        try GeneratedImages.make(in: dir)
        try Support.run(Support.qemuImgPath!, ["create", "-q", "-f", "qcow2", "-o", "cluster_size=4k", "-b", "b4.raw",
                                               "-F", "raw", "small.qcow2", "1000448"], cwd: dir.path)
        try Support.run("/usr/bin/qemu-io", ["-f", "qcow2", "-c", "write -P 0x42 990000 4k", "small.qcow2"], cwd: dir.path)
        let writes = try crashEverywhere("small.qcow2", to: 9 << 20, in: dir)
        #expect(writes > 5)
    }

    @Test("a crash while shrinking (shared L2 tables, dropped L1 entries) leaves at worst leaks",
          .enabled(if: Support.hasQemuImg, qemu), arguments: [("snapshots.qcow2", UInt64(4096)), ("many-l2.qcow2", UInt64(3 << 20))])
    func crashWhileShrinking(_ image: String, _ size: UInt64) throws {
        let dir = try Support.TempDir()
        try GeneratedImages.make(in: dir)
        #expect(try crashEverywhere(image, to: size, in: dir) > 3)
    }
}
