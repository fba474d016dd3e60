@testable import DiskImage
import Foundation
import Testing

/// `rebase` against `qemu-img rebase`: safe rebases keep the guest's view (checked with
/// `qemu-img compare`), the header names the new backing file as `qemu-img info` reads it, and
/// `qemu-img check` stays clean; unsafe rebases change only the header.
@Suite("Rebase agrees with qemu-img")
struct RebaseTests {
    static let qemu = Comment(rawValue: Support.noQemu)

    /// A raw and a qcow2 image to rebase onto, in `dir`.
    static func makeBackings(in dir: Support.TempDir) throws {
        try Support.run(Support.qemuImgPath!, ["create", "-q", "-f", "raw", "other.raw", "1536k"], cwd: dir.path)
        try Support.run("/usr/bin/qemu-io", ["-f", "raw", "-c", "write -P 0x91 0 256k", "-c", "write -P 0x33 300k 100k",
                                             "other.raw"], cwd: dir.path)
        try Support.run(Support.qemuImgPath!, ["create", "-q", "-f", "qcow2", "-o", "cluster_size=16k", "other.qcow2", "3M"],
                        cwd: dir.path)
        try Support.run("/usr/bin/qemu-io", ["-f", "qcow2", "-c", "write -P 0x91 0 512k", "-c", "write -z 100k 16k",
                                             "-c", "write -P 0x44 2M 64k", "other.qcow2"], cwd: dir.path)
    }

    static let cases: [(image: String, backing: String, format: ImageFormat?)] = [
        ("top.qcow2", "base.raw", .raw), ("top.qcow2", "", nil), ("top.qcow2", "other.raw", .raw),
        ("top.qcow2", "other.qcow2", .qcow2), ("top.qcow2", "mid.qcow2", .qcow2), ("mid.qcow2", "other.qcow2", .qcow2),
        ("ext-l2-overlay.qcow2", "other.qcow2", .qcow2), ("ext-l2-overlay.qcow2", "", nil),
        ("v3-c64k.qcow2", "other.raw", .raw), ("v2-c4k.qcow2", "other.qcow2", .qcow2), ("overlay.qcow2", "other.raw", .raw),
        ("subclusters.qcow2", "other.qcow2", .qcow2), ("many-l2-top.qcow2", "", nil),
    ]

    @Test("a safe rebase keeps what the guest sees; qemu-img reads the new backing file from the header",
          .enabled(if: Support.hasQemuImg, qemu))
    func safe() throws {
        for (image, backing, format) in Self.cases {
            let dir = try Support.TempDir()
            try GeneratedImages.make(in: dir)
            try Self.makeBackings(in: dir)
            let path = dir.file(image)
            let before = try Support.qemuRaw(path, in: dir)
            try DiskImage.rebase(path: path, backing: backing, backingFormat: format, unsafe: false)
            let check = try Support.qemuImg("check", path)
            #expect(check.status == 0, "\(image) onto '\(backing)': \(check.stdout)")
            #expect(try Support.qemuRaw(path, in: dir) == before, "\(image) onto '\(backing)'")
            let info = try Support.qemuImg("info", "--output=json", path).stdout
            if backing.isEmpty {
                #expect(!info.contains("backing-filename"), "\(image): \(info)")
            } else {
                #expect(info.contains("\"backing-filename\": \"\(backing)\""), "\(image): \(info)")
                #expect(info.contains("\"backing-filename-format\": \"\(format!.rawValue)\""), "\(image): \(info)")
            }
        }
    }

    @Test("where qemu-img 7.2 loses data (a version 2 image without backing file rebased onto one), we do not",
          .enabled(if: Support.hasQemuImg, qemu))
    func version2WithoutBacking() throws {
        let dir = try Support.TempDir()
        try GeneratedImages.make(in: dir)
        try Self.makeBackings(in: dir)
        let before = try Support.qemuRaw(dir.file("v2-c4k.qcow2"), in: dir)
        try DiskImage.rebase(path: dir.file("v2-c4k.qcow2"), backing: "other.qcow2", backingFormat: .qcow2, unsafe: false)
        #expect(try Support.qemuRaw(dir.file("v2-c4k.qcow2"), in: dir) == before)
    }

    @Test("unsafe rebase rewrites only the header, keeping the other header extensions",
          .enabled(if: Support.hasQemuImg, qemu))
    func unsafe() throws {
        let dir = try WriteTests.workspace()
        // A renamed backing file.
        try FileManager.default.moveItem(atPath: dir.file("base.raw"), toPath: dir.file("renamed.raw"))
        try DiskImage.rebase(path: dir.file("mid.qcow2"), backing: "renamed.raw", backingFormat: .raw, unsafe: true)
        #expect(try Support.qemuImg("compare", dir.file("mid.qcow2"), Support.fixture("mid.qcow2")).status == 0)
        #expect(try Support.qemuImg("check", dir.file("mid.qcow2")).status == 0)

        // An image with a bitmaps extension and a feature name table gets a backing file and loses it again.
        let bitmaps = dir.file("bitmaps.qcow2")
        let contents = try Support.qemuRaw(bitmaps, in: dir)
        try DiskImage.rebase(path: bitmaps, backing: "renamed.raw", backingFormat: .raw, unsafe: true)
        var info = try Support.qemuImg("info", "--output=json", bitmaps).stdout
        #expect(info.contains("\"backing-filename\": \"renamed.raw\"") && info.contains("backup0"), "\(info)")
        try DiskImage.rebase(path: bitmaps, backing: nil, backingFormat: nil, unsafe: true)
        info = try Support.qemuImg("info", "--output=json", bitmaps).stdout
        #expect(!info.contains("backing-filename") && info.contains("backup0"), "\(info)")
        #expect(try Support.qemuRaw(bitmaps, in: dir) == contents)
        #expect(try Support.qemuImg("check", bitmaps).status == 0)
    }

    @Test("refusals: no format for the new backing file, a loop, a raw image, a name that does not fit")
    func refusals() throws {
        let dir = try WriteTests.workspace()
        let top = dir.file("top.qcow2")
        let before = try Support.readFile(top)
        #expect(throws: ImageEditError.backingFormatRequired("base.raw")) {
            try DiskImage.rebase(path: top, backing: "base.raw", backingFormat: nil, unsafe: false)
        }
        #expect(throws: DiskImageError.backingLoop(path: top)) {
            try DiskImage.rebase(path: top, backing: "top.qcow2", backingFormat: .qcow2, unsafe: false)
        }
        #expect(throws: DiskImageError.backingMissing(path: dir.file("none.raw"), errno: ENOENT)) {
            try DiskImage.rebase(path: top, backing: "none.raw", backingFormat: .raw, unsafe: false)
        }
        #expect(try Support.readFile(top) == before)
        #expect(throws: ImageEditError.notQcow2(operation: "have a backing file")) {
            try DiskImage.rebase(path: dir.file("base.raw"), backing: "x", backingFormat: .raw, unsafe: true)
        }
        // 512-byte clusters leave about 400 bytes for a backing name.
        let long = String(repeating: "d/", count: 300) + "x.raw"
        let c512 = dir.file("c512.qcow2")
        let c512Before = try Support.readFile(c512)
        #expect(throws: ImageEditError.headerFull(long)) {
            try DiskImage.rebase(path: c512, backing: long, backingFormat: .raw, unsafe: true)
        }
        #expect(try Support.readFile(c512) == c512Before)
    }

    @Test("a crash during a safe rebase never changes what the guest sees",
          .enabled(if: Support.hasQemuImg, qemu))
    func crash() throws {
        let dir = try Support.TempDir()
        try GeneratedImages.make(in: dir)
        try Self.makeBackings(in: dir)
        let before = try Support.qemuRaw(dir.file("top.qcow2"), in: dir)
        var budget = 0, completed = false
        while !completed && budget < 300 {
            let path = dir.file("crash-\(budget).qcow2")
            try Support.copy(dir.file("top.qcow2"), to: path)
            do {
                let q = try #require(try DiskImage.open(path: path, readOnly: false) as? QCOW2Image)
                q.file.writeBudget.store(budget, ordering: .relaxed)
                do {
                    try q.rebase(onto: "other.qcow2", format: .qcow2)
                    completed = true
                } catch DiskImageError.io(let op, _, _) where op.contains("simulated crash") {}
            }
            let check = try Support.qemuImg("check", path)
            #expect(check.status == 0 || check.status == 3, "crash after \(budget) writes: \(check.stdout)")
            #expect(try Support.qemuRaw(path, in: dir) == before, "crash after \(budget) writes")
            try? FileManager.default.removeItem(atPath: path)
            budget += 1
        }
        #expect(completed && budget > 5)
    }
}
