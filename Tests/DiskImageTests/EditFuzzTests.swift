@testable import DiskImage
import Foundation
import Testing

/// The mutation fuzzer of `FuzzTests`, aimed at map, compare, resize, snapshot and rebase: on a
/// hostile image each may succeed or refuse with one of our error types, never trap or hang.
@Suite("Mutation fuzzing of the image commands")
struct EditFuzzTests {
    static let seeds = ["c512.qcow2", "v2-c4k.qcow2", "comp-zlib-c16k.qcow2", "ext-l2-overlay.qcow2", "snapshots.qcow2",
                        "refcount2.qcow2", "top.qcow2", "bitmaps.qcow2"]
    static let iterations = max(10, FuzzTests.iterations / 2)

    /// Runs one command; returns the error if it is not one of ours with a one-line message.
    static func attempt(_ what: String, _ body: () throws -> Void) -> String? {
        do {
            try body()
            return nil
        } catch let e as DiskImageError {
            return e.description.contains("\n") ? "\(what): two lines: \(e)" : nil
        } catch let e as ImageEditError {
            return e.description.contains("\n") ? "\(what): two lines: \(e)" : nil
        } catch let e as CompareError {
            return e.description.contains("\n") ? "\(what): two lines: \(e)" : nil
        } catch {
            return "\(what): not our error type: \(error)"
        }
    }

    @Test("mutated images: every command succeeds or refuses cleanly", arguments: seeds)
    func fuzz(_ seedName: String) throws {
        let dir = try Support.TempDir()
        for name in try FileManager.default.contentsOfDirectory(atPath: Support.fixtures) where name != seedName {
            try Support.copy(Support.fixture(name), to: dir.file(name))
        }
        let original = try Support.readFile(Support.fixture(seedName))
        var rng = SeededRandom(seed: UInt64(seedName.utf8.count) &* 0x2545_f491)
        let path = dir.file(seedName)
        var problems: [String] = []
        for i in 0..<Self.iterations {
            var bytes = original
            FuzzTests.mutate(&bytes, &rng)
            func fresh() throws {
                try? FileManager.default.removeItem(atPath: path)
                try Data(bytes).write(to: URL(fileURLWithPath: path))
            }
            try fresh()
            let steps: [(String, () throws -> Void)] = [
                ("map", { _ = try ImageMap.entries(try DiskImage.open(path: path)) }),
                ("compare", {
                    _ = try ImageComparison.compare(try DiskImage.open(path: path), named: "a",
                                                    try DiskImage.open(path: Support.fixture(seedName)), named: "b")
                }),
                ("strict compare", {
                    let dev = try DiskImage.open(path: path)
                    _ = try ImageComparison.compare(dev, named: "a", dev, named: "a", strict: true)
                }),
                ("list", { _ = try DiskImage.snapshots(path: path) }),
                ("create", { try fresh(); try DiskImage.createSnapshot(path: path, name: "fuzz") }),
                ("apply", { try fresh(); try DiskImage.applySnapshot(path: path, name: "1") }),
                ("delete", { try fresh(); try DiskImage.deleteSnapshot(path: path, name: "first") }),
                ("grow", { try fresh(); try DiskImage.resize(path: path, to: .grow(by: 3 << 20), allowShrink: false) }),
                ("shrink", { try fresh(); try DiskImage.resize(path: path, to: .absolute(64 << 10), allowShrink: true) }),
                ("rebase -u", { try fresh(); try DiskImage.rebase(path: path, backing: "base.raw", backingFormat: .raw, unsafe: true) }),
                ("rebase", { try fresh(); try DiskImage.rebase(path: path, backing: "", backingFormat: nil, unsafe: false) }),
            ]
            for (name, body) in steps {
                if let problem = Self.attempt(name, body) { problems.append("input \(i): \(problem)") }
            }
        }
        #expect(problems.isEmpty, "\(problems.prefix(5))")
    }
}
