import Foundation
import SwiftletKit
import Synchronization
import Testing

private let guests = URL(fileURLWithPath: #filePath)
    .deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
    .appendingPathComponent("guests/build")

/// guests/counter.s (counts and prints a running sum at CPL 3) with `memory` bytes of RAM.
private func counterConfiguration(memory: UInt64) -> VMConfiguration {
    var configuration = VMConfiguration(boot: .flat(.file(guests.appendingPathComponent("counter.bin").path)))
    configuration.memorySize = memory
    return configuration
}

/// A console that can be read while the VM runs.
final class LiveConsole: Sendable {
    let path = FileManager.default.temporaryDirectory.appendingPathComponent("console-\(UUID().uuidString)").path
    var text: String { (try? String(contentsOfFile: path, encoding: .utf8)) ?? "" }
    /// The (count, sum) pairs printed so far, complete lines only.
    var counts: [(Int, Int)] {
        text.split(separator: "\n", omittingEmptySubsequences: false).dropLast().compactMap { line in
            let words = line.split(separator: " ")
            guard words.count == 4, words[0] == "count", let n = Int(words[1]), let s = Int(words[3]) else { return nil }
            return (n, s)
        }
    }
    func wait(forCountAbove n: Int, seconds: Double = 30) -> Bool {
        let deadline = Date().addingTimeInterval(seconds)
        while Date() < deadline { if (counts.last?.0 ?? 0) > n { return true }; usleep(10_000) }
        return false
    }
    deinit { try? FileManager.default.removeItem(atPath: path) }
}

/// Checks a counter guest's output: every count once, in order, with the right running sum.
func expectUnbroken(_ counts: [(Int, Int)], sourceLocation: SourceLocation = #_sourceLocation) {
    for (index, (n, sum)) in counts.enumerated() {
        #expect(n == index + 1 && sum == n * (n + 1) / 2, "line \(index): count \(n) sum \(sum)", sourceLocation: sourceLocation)
        if n != index + 1 { return }
    }
}

@Suite("VM lifecycle: pause and resume", .enabled(if: FileManager.default.isReadableFile(atPath: "/dev/kvm"), "needs /dev/kvm"))
struct LifecycleTests {
    @Test("A paused guest makes no progress; resumed, it continues with no gap and no repeat")
    func pauseAndResume() throws {
        let console = LiveConsole()
        var configuration = counterConfiguration(memory: 16 << 20)
        configuration.console = .file(console.path)
        let vm = try VM(configuration)
        #expect(vm.state == .created)
        #expect(throws: SwiftletError.self) { try vm.pause() }
        let result = Mutex<VMResult?>(nil)
        let thread = Thread { result.withLock { $0 = try? vm.run() } }
        thread.start()
        #expect(console.wait(forCountAbove: 5))
        #expect(vm.state == .running)
        #expect(throws: SwiftletError.self) { try vm.resume() }

        try vm.pause()
        #expect(vm.state == .paused)
        #expect(throws: SwiftletError.self) { try vm.pause() }
        let atPause = console.text
        usleep(500_000)
        #expect(console.text == atPause, "the guest printed while paused")
        try vm.resume()
        #expect(console.wait(forCountAbove: (console.counts.last?.0 ?? 0) + 5))
        // Pause and resume a few more times in a row.
        for _ in 0..<5 {
            try vm.pause()
            try vm.resume()
        }
        #expect(console.wait(forCountAbove: (console.counts.last?.0 ?? 0) + 3))
        vm.stop()
        while result.withLock({ $0 }) == nil { usleep(10_000) }
        #expect(vm.state == .stopped)
        #expect(throws: SwiftletError.self) { try vm.resume() }
        expectUnbroken(console.counts)
    }

    @Test("A paused VM can still be stopped")
    func stopWhilePaused() throws {
        let console = LiveConsole()
        var configuration = counterConfiguration(memory: 16 << 20)
        configuration.console = .file(console.path)
        configuration.cpus = 2
        let vm = try VM(configuration)
        let result = Mutex<VMResult?>(nil)
        let thread = Thread { result.withLock { $0 = try? vm.run() } }
        thread.start()
        #expect(console.wait(forCountAbove: 2))
        try vm.pause()
        vm.stop()
        let deadline = Date().addingTimeInterval(10)
        while result.withLock({ $0 }) == nil && Date() < deadline { usleep(10_000) }
        #expect(result.withLock { $0 }?.exit == .userQuit)
    }
}

@Suite("VM lifecycle: snapshot and restore", .enabled(if: FileManager.default.isReadableFile(atPath: "/dev/kvm"), "needs /dev/kvm"))
struct SnapshotTests {
    func temporaryDirectory() -> String {
        FileManager.default.temporaryDirectory.appendingPathComponent("snapshot-\(UUID().uuidString)").path
    }

    /// Runs `vm` on a thread; returns a way to wait for its result.
    func start(_ vm: VM) -> () -> VMResult? {
        let result = Mutex<VMResult?>(nil)
        let done = Mutex(false)
        Thread {
            let value = try? vm.run()
            result.withLock { $0 = value }
            done.withLock { $0 = true }
        }.start()
        return {
            while !done.withLock({ $0 }) { usleep(10_000) }
            return result.withLock { $0 }
        }
    }

    @Test("A counter guest snapshotted at CPL 3 continues in a new VM with no gap and no repeat")
    func counterContinues() throws {
        let directory = temporaryDirectory()
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let first = LiveConsole()
        var configuration = counterConfiguration(memory: 32 << 20)
        configuration.console = .file(first.path)
        let vm = try VM(configuration)
        let finished = start(vm)
        #expect(first.wait(forCountAbove: 10))
        try vm.pause()
        let summary = try vm.snapshot(to: directory)
        #expect(summary.pagesWritten > 0 && summary.pagesWritten < 32 << 8, "zero pages are holes")
        let printed = first.counts
        vm.stop()
        _ = finished()
        let last = try #require(printed.last)

        let second = LiveConsole()
        var restore = VMConfiguration(boot: .snapshot(directory: directory))
        restore.console = .file(second.path)
        let restored = try VM(restore)
        let finishedAgain = start(restored)
        #expect(second.wait(forCountAbove: last.0 + 5))
        restored.stop()
        _ = finishedAgain()
        // The new console starts after the last full line of the old one (a line cut by the
        // pause is finished by the restored guest).
        #expect(checkCounting(first.text + second.text) >= last.0 + 5)
    }

    @Test("A snapshot can be restored twice, and each copy runs on its own")
    func restoreTwice() throws {
        let directory = temporaryDirectory()
        defer { try? FileManager.default.removeItem(atPath: directory) }
        var configuration = counterConfiguration(memory: 16 << 20)
        let console = LiveConsole()
        configuration.console = .file(console.path)
        let vm = try VM(configuration)
        let finished = start(vm)
        #expect(console.wait(forCountAbove: 3))
        try vm.pause()
        try vm.snapshot(to: directory)
        #expect(throws: SwiftletError.self) { try vm.snapshot(to: "/proc/no-such-place/x") }
        vm.stop()
        _ = finished()
        let memoryBefore = try Data(contentsOf: URL(fileURLWithPath: directory + "/memory"))
        for _ in 0..<2 {
            let copy = LiveConsole()
            var restore = VMConfiguration(boot: .snapshot(directory: directory))
            restore.console = .file(copy.path)
            let restored = try VM(restore)
            let done = start(restored)
            #expect(copy.wait(forCountAbove: (console.counts.last?.0 ?? 0) + 3))
            restored.stop()
            _ = done()
        }
        // The memory file is mapped private: the restored guests' writes never reach it.
        #expect(try Data(contentsOf: URL(fileURLWithPath: directory + "/memory")) == memoryBefore)
    }

    /// The counter's lines, checked to run 1, 2, 3, ... with the right sums; returns the
    /// last count checked.
    func checkCounting(_ text: String) -> Int {
        let lines = text.split(separator: "\n").dropLast().filter { $0.hasPrefix("count ") }
        var expected = 1
        var sum = 0
        for line in lines {
            sum += expected
            #expect(line == "count \(expected) sum \(sum)", "after count \(expected - 1)")
            if line != "count \(expected) sum \(sum)" { break }
            expected += 1
        }
        return expected - 1
    }

    @Test("A diff snapshot writes only the pages written since the one before, and restores through its parent")
    func diffSnapshot() throws {
        let full = temporaryDirectory(), diff = temporaryDirectory(), diff2 = temporaryDirectory()
        defer { for path in [full, diff, diff2] { try? FileManager.default.removeItem(atPath: path) } }
        var configuration = counterConfiguration(memory: 64 << 20)
        configuration.trackDirtyPages = true
        let first = LiveConsole()
        configuration.console = .file(first.path)
        let vm = try VM(configuration)
        let finished = start(vm)
        #expect(first.wait(forCountAbove: 3))
        try vm.pause()
        // Before any full snapshot there is nothing to build on.
        #expect(throws: SwiftletError.self) { try vm.snapshot(to: diff, diff: true) }
        let base = try vm.snapshot(to: full)
        #expect(!base.isDiff)
        try vm.resume()
        #expect(first.wait(forCountAbove: (first.counts.last?.0 ?? 0) + 3))
        try vm.pause()
        // A diff over its own parent's files is refused.
        #expect(throws: SwiftletError.self) { try vm.snapshot(to: full, diff: true) }
        let changed = try vm.snapshot(to: diff, diff: true)
        #expect(changed.isDiff)
        #expect(changed.pagesWritten > 0 && changed.pagesWritten < base.pagesWritten,
                "the counter changes a few pages: \(changed.pagesWritten) of \(base.pagesWritten)")
        try vm.resume()
        #expect(first.wait(forCountAbove: (first.counts.last?.0 ?? 0) + 3))
        try vm.pause()
        let chained = try vm.snapshot(to: diff2, diff: true)
        #expect(chained.isDiff && chained.pagesWritten < base.pagesWritten)
        let printed = first.counts
        vm.stop()
        _ = finished()
        let last = try #require(printed.last)
        // The diff's memory file is sparse: a few pages of data, the rest holes.
        var status = stat()
        #expect(stat(diff + "/memory", &status) == 0)
        #expect(Int(status.st_blocks) * 512 <= (changed.pagesWritten + 16) * 4096)

        let second = LiveConsole()
        var restore = VMConfiguration(boot: .snapshot(directory: diff2))
        restore.console = .file(second.path)
        let restored = try VM(restore)
        let finishedAgain = start(restored)
        #expect(second.wait(forCountAbove: last.0 + 5))
        restored.stop()
        _ = finishedAgain()
        #expect(checkCounting(first.text + second.text) >= last.0 + 5)
    }

    /// The `swiftlet` binary next to the test runner.
    static let binary: String = {
        var directory = URL(fileURLWithPath: (try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/exe")) ?? CommandLine.arguments[0])
            .deletingLastPathComponent()
        while !FileManager.default.isExecutableFile(atPath: directory.appendingPathComponent("swiftlet").path),
              directory.pathComponents.count > 2 {
            directory.deleteLastPathComponent()
        }
        return directory.appendingPathComponent("swiftlet").path
    }()

    /// Runs the binary; returns the status, stdout and stderr.
    func runBinary(_ arguments: [String]) throws -> (status: Int32, stdout: String, stderr: String) {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: Self.binary)
        process.arguments = arguments
        let out = Pipe(), err = Pipe()
        process.standardOutput = out
        process.standardError = err
        process.standardInput = FileHandle.nullDevice
        try process.run()
        let stdout = out.fileHandleForReading.readDataToEndOfFile()
        let stderr = err.fileHandleForReading.readDataToEndOfFile()
        process.waitUntilExit()
        return (process.terminationStatus, String(decoding: stdout, as: UTF8.self), String(decoding: stderr, as: UTF8.self))
    }

    @Test("swiftlet run --restore continues a snapshot in a new process, and refuses options that would build another machine")
    func restoreFromTheCommandLine() throws {
        let directory = temporaryDirectory()
        defer { try? FileManager.default.removeItem(atPath: directory) }
        var configuration = counterConfiguration(memory: 16 << 20)
        let console = LiveConsole()
        configuration.console = .file(console.path)
        let vm = try VM(configuration)
        let finished = start(vm)
        #expect(console.wait(forCountAbove: 3))
        try vm.pause()
        try vm.snapshot(to: directory)
        let last = try #require(console.counts.last)
        vm.stop()
        _ = finished()

        let restored = try runBinary(["run", "--restore", directory, "--timeout", "1"])
        #expect(restored.status == 124, "\(restored.stderr)")
        #expect(checkCounting(console.text + restored.stdout) > last.0)
        // The state file alone names its memory file.
        let byStateFile = try runBinary(["run", "--restore", directory + "/state", "--timeout", "0.5"])
        #expect(byStateFile.status == 124, "\(byStateFile.stderr)")

        let conflicting = try runBinary(["run", "--restore", directory, "--memory", "1G"])
        #expect(conflicting.status == 2)
        #expect(conflicting.stderr.contains("--memory cannot be used with --restore"))
        let missing = try runBinary(["run", "--restore", directory + "/nothing-here"])
        #expect(missing.status == 2)
        #expect(missing.stderr.split(separator: "\n").count == 1, "one line: \(missing.stderr)")
    }

    @Test("A diff needs dirty tracking")
    func diffNeedsTracking() throws {
        let full = temporaryDirectory(), diff = temporaryDirectory()
        defer { for path in [full, diff] { try? FileManager.default.removeItem(atPath: path) } }
        var configuration = counterConfiguration(memory: 16 << 20)
        configuration.console = .discard
        let vm = try VM(configuration)
        let finished = start(vm)
        usleep(200_000)
        try vm.pause()
        try vm.snapshot(to: full)
        let error = #expect(throws: SwiftletError.self) { try vm.snapshot(to: diff, diff: true) }
        #expect(error?.message.contains("track dirty pages") == true)
        // Tracking started now: the next full snapshot is a base.
        try vm.startDirtyTracking()
        try vm.snapshot(to: full)
        try vm.resume()
        usleep(100_000)
        try vm.pause()
        #expect(try vm.snapshot(to: diff, diff: true).isDiff)
        vm.stop()
        _ = finished()
    }

    @Test("A snapshot is refused when it is not paused, damaged, truncated, newer or missing")
    func refusals() throws {
        let directory = temporaryDirectory()
        defer { try? FileManager.default.removeItem(atPath: directory) }
        var configuration = counterConfiguration(memory: 16 << 20)
        configuration.console = .discard
        let vm = try VM(configuration)
        #expect(throws: SwiftletError.self) { try vm.snapshot(to: directory) }
        let finished = start(vm)
        usleep(200_000)
        #expect(throws: SwiftletError.self) { try vm.snapshot(to: directory) }
        try vm.pause()
        try vm.snapshot(to: directory)
        vm.stop()
        _ = finished()

        func refusal(_ change: (String) throws -> Void) throws -> String {
            let copy = temporaryDirectory()
            defer { try? FileManager.default.removeItem(atPath: copy) }
            try FileManager.default.copyItem(atPath: directory, toPath: copy)
            try change(copy)
            var restore = VMConfiguration(boot: .snapshot(directory: copy))
            restore.console = .discard
            do {
                _ = try VM(restore)
                return "accepted"
            } catch {
                return error.message
            }
        }
        let state = { (copy: String) in copy + "/state" }
        #expect(try refusal { _ in }  == "accepted")
        #expect(try refusal { try FileManager.default.removeItem(atPath: state($0)) }.contains("cannot open snapshot state file"))
        #expect(try refusal { copy in
            var bytes = try Data(contentsOf: URL(fileURLWithPath: state(copy)))
            bytes[bytes.count - 10] ^= 0x20
            try bytes.write(to: URL(fileURLWithPath: state(copy)))
        }.contains("checksum"))
        #expect(try refusal { copy in
            let bytes = try Data(contentsOf: URL(fileURLWithPath: state(copy)))
            try bytes.prefix(bytes.count / 2).write(to: URL(fileURLWithPath: state(copy)))
        }.contains("truncated"))
        #expect(try refusal { copy in
            var bytes = try Data(contentsOf: URL(fileURLWithPath: state(copy)))
            bytes[18] = UInt8(ascii: "9")
            try bytes.write(to: URL(fileURLWithPath: state(copy)))
        }.contains("format 9, newer than this Swiftlet reads"))
        #expect(try refusal { copy in
            let handle = try FileHandle(forWritingTo: URL(fileURLWithPath: copy + "/memory"))
            try handle.truncate(atOffset: 4096)
            try handle.close()
        }.contains("truncated"))
        #expect(try refusal { copy in
            try FileManager.default.removeItem(atPath: copy + "/memory")
        }.contains("cannot open snapshot memory file"))
    }
}
