import Foundation
import SwiftletKit
import Synchronization
import Testing

private let guests = URL(fileURLWithPath: #filePath)
    .deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
    .appendingPathComponent("guests/build")

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
        var configuration = VMConfiguration(boot: .flat(.file(guests.appendingPathComponent("counter.bin").path)))
        configuration.memorySize = 16 << 20
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
        var configuration = VMConfiguration(boot: .flat(.file(guests.appendingPathComponent("counter.bin").path)))
        configuration.memorySize = 16 << 20
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
