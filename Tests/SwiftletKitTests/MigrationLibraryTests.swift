import Foundation
import SwiftletKit
import Synchronization
import Testing

private let guests = URL(fileURLWithPath: #filePath)
    .deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
    .appendingPathComponent("guests/build")

/// Runs `vm` on a thread; the result comes back through `wait()`.
final class Running: Sendable {
    private let result = Mutex<VMResult?>(nil)
    private let done = Mutex(false)

    init(_ vm: VM) {
        Thread { [self] in
            let value = try? vm.run()
            result.withLock { $0 = value }
            done.withLock { $0 = true }
        }.start()
    }

    func wait(seconds: Double = 30) -> VMResult? {
        let deadline = Date().addingTimeInterval(seconds)
        while !done.withLock({ $0 }) && Date() < deadline { usleep(10_000) }
        return result.withLock { $0 }
    }
}

/// The dirtier guest's "round R sum S" lines, checked: 2048 pages, page i holds
/// R*i + R*(R+1)/2 after round R.
private func checkDirtier(_ text: String, sourceLocation: SourceLocation = #_sourceLocation) -> Int {
    let n = 2048
    var expected = 1
    // Complete lines only: the last piece has no newline yet (or is empty).
    for line in text.split(separator: "\n", omittingEmptySubsequences: false).dropLast() where line.hasPrefix("round ") {
        let words = line.split(separator: " ")
        let sum = expected * n * (n - 1) / 2 + n * expected * (expected + 1) / 2
        #expect(line == "round \(expected) sum \(sum)", "after round \(expected - 1): \(line) \(words.count)", sourceLocation: sourceLocation)
        if line != "round \(expected) sum \(sum)" { break }
        expected += 1
    }
    return expected - 1
}

@Suite("Live migration (library)", .serialized, .enabled(if: FileManager.default.isReadableFile(atPath: "/dev/kvm"), "needs /dev/kvm"))
struct MigrationLibraryTests {
    func configuration(_ boot: VMConfiguration.Boot, console: LiveConsole) -> VMConfiguration {
        var configuration = VMConfiguration(boot: boot)
        configuration.memorySize = 32 << 20
        configuration.console = .file(console.path)
        return configuration
    }

    /// Starts a target at `address` on a thread; returns it once its VM has arrived.
    func startTarget(_ address: String, console: LiveConsole, memory: UInt64 = 32 << 20,
                     listening: DispatchSemaphore) -> () -> Result<VM, SwiftletError>? {
        let box = Mutex<Result<VM, SwiftletError>?>(nil)
        var target = configuration(.incoming(address: address), console: console)
        target.memorySize = memory
        target.onMigrationEvent = { line in if line.hasPrefix("waiting") { listening.signal() } }
        let finished = DispatchSemaphore(value: 0)
        Thread { [target] in
            do throws(SwiftletError) {
                let vm = try VM(target)
                box.withLock { $0 = .success(vm) }
            } catch {
                box.withLock { $0 = .failure(error) }
            }
            finished.signal()
        }.start()
        return {
            _ = finished.wait(timeout: .now() + 60)
            return box.withLock { $0 }
        }
    }

    @Test("A guest writing memory migrates over TCP on loopback and continues with the right checksum")
    func migrateOverTCP() throws {
        let port = Int.random(in: 20_000..<60_000)
        let address = "tcp:127.0.0.1:\(port)"
        let sourceConsole = LiveConsole(), targetConsole = LiveConsole()
        let listening = DispatchSemaphore(value: 0)
        let arrived = startTarget(address, console: targetConsole, listening: listening)
        #expect(listening.wait(timeout: .now() + 30) == .success)

        let source = try VM(configuration(.flat(.file(guests.appendingPathComponent("dirtier.bin").path)), console: sourceConsole))
        let sourceRun = Running(source)
        let deadline = Date().addingTimeInterval(30)
        while !sourceConsole.text.contains("round 20 ") && Date() < deadline { usleep(10_000) }
        let summary = try source.migrate(to: address)
        #expect(summary.destination == address)
        #expect(summary.rounds >= 1 && summary.pagesSent >= 2048, "\(summary)")
        #expect(summary.downtimeNanoseconds <= summary.totalNanoseconds)
        #expect(sourceRun.wait()?.exit == .migrated(to: address))
        #expect(source.state == .stopped)

        let target = try #require(try arrived()?.get())
        let targetRun = Running(target)
        let lastOnSource = checkDirtier(sourceConsole.text)
        let more = Date().addingTimeInterval(30)
        while !targetConsole.text.contains("round \(lastOnSource + 21) ") && Date() < more { usleep(10_000) }
        target.stop()
        _ = targetRun.wait()
        #expect(checkDirtier(sourceConsole.text + targetConsole.text) >= lastOnSource + 20)
    }

    @Test("A refused migration leaves the source running; a migration to nowhere fails at once")
    func refusedAndUnreachable() throws {
        let port = Int.random(in: 20_000..<60_000)
        let address = "tcp:127.0.0.1:\(port)"
        let sourceConsole = LiveConsole(), targetConsole = LiveConsole()
        let listening = DispatchSemaphore(value: 0)
        let arrived = startTarget(address, console: targetConsole, memory: 64 << 20, listening: listening)
        #expect(listening.wait(timeout: .now() + 30) == .success)
        let source = try VM(configuration(.flat(.file(guests.appendingPathComponent("dirtier.bin").path)), console: sourceConsole))
        #expect(throws: SwiftletError.self) { try source.migrate(to: address) }  // not running yet
        let sourceRun = Running(source)
        let deadline = Date().addingTimeInterval(30)
        while !sourceConsole.text.contains("round 5 ") && Date() < deadline { usleep(10_000) }
        do {
            try source.migrate(to: address)
            Issue.record("the migration to a 64 MiB target succeeded")
        } catch {
            #expect(error.message.contains("the target refused the VM"), "\(error.message)")
        }
        guard case let .failure(targetError)? = arrived() else { Issue.record("the target accepted"); return }
        #expect(targetError.message.hasPrefix("migration: refused the incoming VM"))
        #expect(source.state == .running)
        do {
            try source.migrate(to: "unix:/tmp/swiftlet-no-such-target-\(port).sock")
            Issue.record("a migration to nowhere succeeded")
        } catch {
            #expect(error.message.contains("cannot connect to unix:"), "\(error.message)")
        }
        #expect(throws: SwiftletError.self) { try source.migrate(to: "udp:1.2.3.4:5") }
        let now = checkDirtier(sourceConsole.text)
        let more = Date().addingTimeInterval(30)
        while !sourceConsole.text.contains("round \(now + 11) ") && Date() < more { usleep(10_000) }
        source.stop()
        _ = sourceRun.wait()
        #expect(checkDirtier(sourceConsole.text) >= now + 10)
    }
}
