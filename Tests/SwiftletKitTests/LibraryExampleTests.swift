// An example of a test suite that boots tiny guests through the SwiftletKit library, the
// way another package would: it imports only SwiftletKit (no @testable, no internals),
// builds a configuration, runs the VM in process and checks the exit and the console.
// Another package gets the same with
//     .package(path: "../swiftlet")   and   .product(name: "SwiftletKit", package: "swiftlet")
import Foundation
import SwiftletKit
import Testing

/// The teaching guests `make guests` assembles, found from this file's path.
private let guestsDirectory = URL(fileURLWithPath: #filePath)
    .deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
    .appendingPathComponent("guests/build")

private func guest(_ name: String) -> String { guestsDirectory.appendingPathComponent(name).path }

private let haveKVM = FileManager.default.isReadableFile(atPath: "/dev/kvm")
    && FileManager.default.fileExists(atPath: guest("multiboot.elf"))

@Suite("SwiftletKit, used as a library", .enabled(if: haveKVM, "needs /dev/kvm and `make guests`"))
struct LibraryExampleTests {
    @Test("A Multiboot kernel runs in process; the exit value and the console come back")
    func multibootGuest() throws {
        var configuration = VMConfiguration(boot: .kernel(.file(guest("multiboot.elf")), commandLine: "from a test"))
        configuration.memorySize = 64 << 20
        configuration.timeout = .seconds(30)
        let result = try VM(configuration).run()
        #expect(result.exit == .guestExit(value: 0))
        #expect(result.exit.exitStatus == 1)
        #expect(result.consoleText.contains("multiboot: started in 32-bit protected mode"))
        #expect(result.consoleText.contains("from a test"))
    }

    @Test("A flat guest given as bytes; the exit table is returned when asked for")
    func flatGuestFromBytes() throws {
        let bytes = try [UInt8](Data(contentsOf: URL(fileURLWithPath: guest("hello-real.bin"))))
        var configuration = VMConfiguration(boot: .flat(.bytes(bytes, name: "hello")))
        configuration.memorySize = 16 << 20
        configuration.traceExits = true
        configuration.timeout = .seconds(30)
        let result = try VM(configuration).run()
        #expect(result.exit == .guestExit(value: 0))
        #expect(result.consoleText.hasPrefix("Hello from real mode!"))
        let table = try #require(result.exitTable)
        #expect(table.contains("port out 0x03f8 serial (COM1)"))
    }

    @Test("showMemory: the memory slots before the run, and the pages the guest wrote after it")
    func showMemory() throws {
        var configuration = VMConfiguration(boot: .flat(.file(guest("memory-slots.bin"))))
        configuration.memorySize = 16 << 20
        configuration.showMemory = true
        configuration.timeout = .seconds(30)
        let vm = try VM(configuration)
        #expect(vm.memorySlotTable.contains("slot 0: 0x0000000000000000-0x0000000000ffffff (16M)"))
        let result = try vm.run()
        #expect(result.exit == .guestExit(value: 0))
        let report = try #require(result.memoryReport)
        #expect(report.contains("RAM added at run time, KVM_MEM_LOG_DIRTY_PAGES: 4 pages written"))
    }

    @Test("Several VMs run at once in one process, each with its own console")
    func concurrentVMs() async throws {
        let results = try await withThrowingTaskGroup(of: (Int, VMResult).self) { group in
            for index in 0..<3 {
                group.addTask {
                    var configuration = VMConfiguration(boot: .kernel(.file(guest("multiboot.elf")), commandLine: "vm-\(index)"))
                    configuration.memorySize = 32 << 20
                    configuration.timeout = .seconds(60)
                    return (index, try VM(configuration).run())
                }
            }
            var collected: [Int: VMResult] = [:]
            for try await (index, result) in group { collected[index] = result }
            return collected
        }
        for index in 0..<3 {
            let result = try #require(results[index])
            #expect(result.exit == .guestExit(value: 0))
            #expect(result.consoleText.contains("vm-\(index)"))
            for other in 0..<3 where other != index { #expect(!result.consoleText.contains("vm-\(other)")) }
        }
    }

    @Test("A guest that runs too long ends with .timeout, and stop() ends a VM from outside")
    func timeoutAndStop() throws {
        var configuration = VMConfiguration(boot: .flat(.file(guest("idle.bin"))))
        configuration.memorySize = 16 << 20
        configuration.timeout = .milliseconds(300)
        #expect(try VM(configuration).run().exit == .timeout)

        configuration.timeout = nil
        let vm = try VM(configuration)
        Thread.detachNewThread { Thread.sleep(forTimeInterval: 0.3); vm.stop() }
        #expect(try vm.run().exit == .userQuit)
    }

    @Test("A guest that powers off or resets through the ACPI tables ends with .powerOff or .reset, naming the path")
    func powerOffAndReset() throws {
        var configuration = VMConfiguration(boot: .kernel(.file(guest("acpi.elf")), commandLine: "poweroff"))
        configuration.memorySize = 32 << 20
        configuration.timeout = .seconds(60)
        let off = try VM(configuration).run()
        guard case let .powerOff(how) = off.exit else { Issue.record("\(off.exit)"); return }
        #expect(how.contains("S5") && how.contains("0x604"))
        #expect(off.exit.exitStatus == 0)

        configuration.boot = .kernel(.file(guest("acpi.elf")), commandLine: "reset")
        let reset = try VM(configuration).run()
        guard case let .reset(what) = reset.exit else { Issue.record("\(reset.exit)"); return }
        #expect(what.contains("0xCF9"))
        #expect(reset.exit.exitStatus == 6)
    }

    @Test("Bad input is a SwiftletError with one line, not a trap")
    func badInput() {
        #expect(throws: SwiftletError.self) { try VM(VMConfiguration(boot: .kernel(.file("/nonexistent/kernel")))) }
        var tooMany = VMConfiguration(boot: .flat(.file(guest("idle.bin"))))
        tooMany.cpus = 1000
        do {
            _ = try VM(tooMany)
            Issue.record("1000 vCPUs were accepted")
        } catch {
            #expect(!error.message.contains("\n"))
            #expect(error.message.contains("1000"))
        }
    }
}
