import Foundation
import SwiftletKit
import Synchronization
import Testing

// Snapshot and restore with the devices in the middle of something: a virtio-blk guest in
// the middle of its disk job, the UART with typed bytes the guest has not read yet, a
// guest that takes timer and serial interrupts. The snapshot is taken through the library;
// the restore is built from the snapshot directory only (configuration, RAM, vCPUs and
// devices all come from the files): in a new process (`swiftlet run --restore`) for the
// disk jobs, in a new VM object in this process where the test types on the console.

private let guestDirectory = URL(fileURLWithPath: #filePath)
    .deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
    .appendingPathComponent("guests/build")

private func guest(_ name: String) -> String { guestDirectory.appendingPathComponent(name).path }

/// A VM run on its own thread.
private final class RunningVM: Sendable {
    let vm: VM
    private let result = Mutex<(done: Bool, value: VMResult?)>((false, nil))

    convenience init(_ configuration: VMConfiguration) throws {
        self.init(try VM(configuration))
    }

    init(_ vm: VM) {
        self.vm = vm
        Thread { [self] in
            let value = try? vm.run()
            result.withLock { $0 = (true, value) }
        }.start()
    }

    /// Waits for the VM to end (up to `seconds`); nil if it did not.
    func finish(within seconds: Double = 60) -> VMResult? {
        let deadline = Date().addingTimeInterval(seconds)
        while Date() < deadline {
            if let outcome = result.withLock({ $0.done ? $0.value : nil }) { return outcome }
            if result.withLock({ $0.done }) { return nil }
            usleep(10_000)
        }
        return nil
    }

    /// Stops the VM and waits for its thread.
    func stop() {
        vm.stop()
        _ = finish(within: 30)
    }
}

/// A console file read while the VM writes it.
private final class ConsoleFile: Sendable {
    let path = FileManager.default.temporaryDirectory.appendingPathComponent("console-\(UUID().uuidString)").path
    var text: String { (try? String(contentsOfFile: path, encoding: .utf8)) ?? "" }

    func wait(for needle: String, seconds: Double = 60) -> Bool {
        let deadline = Date().addingTimeInterval(seconds)
        while Date() < deadline {
            if text.contains(needle) { return true }
            usleep(5_000)
        }
        return false
    }

    deinit { try? FileManager.default.removeItem(atPath: path) }
}

private func scratchPath(_ name: String) -> String {
    FileManager.default.temporaryDirectory.appendingPathComponent("\(name)-\(UUID().uuidString)").path
}

/// zlib's CRC-32 of a file, from Python's zlib (a second implementation, not ours).
private func hostCRC32(_ path: String) throws -> String {
    let process = Process()
    process.executableURL = URL(fileURLWithPath: "/usr/bin/python3")
    process.arguments = ["-c", "import sys, zlib; print('%08x' % zlib.crc32(open(sys.argv[1], 'rb').read()))", path]
    let pipe = Pipe()
    process.standardOutput = pipe
    try process.run()
    let output = pipe.fileHandleForReading.readDataToEndOfFile()
    process.waitUntilExit()
    return String(decoding: output, as: UTF8.self).trimmingCharacters(in: .whitespacesAndNewlines)
}

/// Sector `s` of the `write SEED` job's pattern (guests/README.md, "The write pattern").
private func patternSector(seed: UInt32, sector: UInt32) -> [UInt8] {
    var x = seed ^ (sector &* 0x9E37_79B9)
    if x == 0 { x = 0x9E37_79B9 }
    var bytes: [UInt8] = []
    for _ in 0..<128 {
        x ^= x << 13
        x ^= x >> 17
        x ^= x << 5
        withUnsafeBytes(of: x.littleEndian) { bytes.append(contentsOf: $0) }
    }
    return bytes
}

@Suite("Snapshot and restore with devices in use", .serialized,
       .enabled(if: FileManager.default.isReadableFile(atPath: "/dev/kvm"), "needs /dev/kvm"))
struct DeviceSnapshotTests {
    enum Job: String, CaseIterable, Sendable {
        case crc
        case write
    }

    static let diskSize = 128 << 20

    static let seed: UInt32 = 0x5EED_1234

    /// Boots guests/build/virtio-blk.elf on `disk`, pauses it after it started its job (the
    /// line announcing the queue is out, the result line is not), snapshots it to
    /// `directory` and stops it. Returns the console up to the pause.
    private func snapshotMidJob(_ job: Job, disk: String, transport: VMConfiguration.VirtioTransport,
                                directory: String) throws -> String {
        let console = ConsoleFile()
        let commandLine = job == .crc ? "crc" : "write \(Self.seed)"
        var configuration = VMConfiguration(boot: .kernel(.file(guest("virtio-blk.elf")), commandLine: commandLine))
        configuration.memorySize = 64 << 20
        configuration.console = .file(console.path)
        configuration.disks = [VMConfiguration.Disk(path: disk)]
        configuration.virtioTransport = transport
        configuration.timeout = .seconds(120)
        let running = try RunningVM(configuration)
        defer { running.stop() }
        try #require(console.wait(for: "requests of up to"), "the guest did not start its job: \(console.text)")
        usleep(150_000)
        try running.vm.pause()
        let atPause = console.text
        try running.vm.snapshot(to: directory)
        return atPause
    }

    /// Runs the job on `disk` to its end, without a snapshot; returns the console.
    private func runToEnd(_ job: Job, disk: String, transport: VMConfiguration.VirtioTransport) throws -> String {
        let console = ConsoleFile()
        let commandLine = job == .crc ? "crc" : "write \(Self.seed)"
        var configuration = VMConfiguration(boot: .kernel(.file(guest("virtio-blk.elf")), commandLine: commandLine))
        configuration.memorySize = 64 << 20
        configuration.console = .file(console.path)
        configuration.disks = [VMConfiguration.Disk(path: disk)]
        configuration.virtioTransport = transport
        configuration.timeout = .seconds(120)
        let result = try RunningVM(configuration).finish(within: 150)
        #expect(result?.exit == .guestExit(value: 0), "\(console.text)")
        return console.text
    }

    @Test("virtio-blk: a guest snapshotted in the middle of its disk job finishes it in a new VM, every request once",
          arguments: [VMConfiguration.VirtioTransport.mmio, .pci], Job.allCases)
    func diskJobContinues(transport: VMConfiguration.VirtioTransport, job: Job) throws {
        let disk = scratchPath("disk") + ".raw"
        let directory = scratchPath("snapshot")
        defer {
            try? FileManager.default.removeItem(atPath: disk)
            try? FileManager.default.removeItem(atPath: directory)
        }
        switch job {
        case .crc:
            // Random contents: a request lost, repeated or answered with the wrong sectors
            // changes the CRC.
            let random = try FileHandle(forReadingFrom: URL(fileURLWithPath: "/dev/urandom"))
            try random.read(upToCount: Self.diskSize)!.write(to: URL(fileURLWithPath: disk))
            try random.close()
        case .write:
            // Not zeros: a sector the restored guest skipped keeps 0xA5.
            try Data(repeating: 0xA5, count: Self.diskSize).write(to: URL(fileURLWithPath: disk))
        }
        let before = try snapshotMidJob(job, disk: disk, transport: transport, directory: directory)
        // The first VM is gone: its board closed the image and let go of its lock (the
        // restoring process opens it for writing).
        let resultLine = job == .crc ? "disk: " : "written: "
        try #require(!before.contains(resultLine), "the job ended before the pause; the test needs a bigger disk:\n\(before)")
        if job == .write {
            let image = try Data(contentsOf: URL(fileURLWithPath: disk))
            let firstWritten = Data(patternSector(seed: Self.seed, sector: 0))
            let lastUntouched = image.suffix(512).allSatisfy { $0 == 0xA5 }
            #expect(image.prefix(512) == firstWritten && lastUntouched, "at the pause the disk was written in part")
        }

        // The restore is a new process: `swiftlet run --restore`.
        let restored = try SnapshotTests().runBinary(["run", "--restore", directory, "--timeout", "120"])
        let after = restored.stdout
        guard restored.status == 1 else {
            Issue.record("the restored guest did not finish its job: status \(restored.status), \(restored.stderr)\nbefore:\n\(before)\nafter:\n\(after)")
            return
        }
        #expect(!after.contains("error"), "\(after)")
        let sectors = Self.diskSize / 512
        switch job {
        case .crc:
            #expect(after.contains("disk: \(sectors) sectors, crc32 \(try hostCRC32(disk))"), "\(after)")
        case .write:
            #expect(after.contains("written: \(sectors) sectors"), "\(after)")
            // Byte-exact: the image is the one the same job writes without a snapshot, whose
            // first and last sectors are checked against the documented pattern.
            let reference = scratchPath("reference") + ".raw"
            defer { try? FileManager.default.removeItem(atPath: reference) }
            try Data(repeating: 0xA5, count: Self.diskSize).write(to: URL(fileURLWithPath: reference))
            let referenceConsole = try runToEnd(job, disk: reference, transport: transport)
            #expect(referenceConsole.contains("written: \(sectors) sectors"), "\(referenceConsole)")
            let expected = try Data(contentsOf: URL(fileURLWithPath: reference))
            #expect(expected.prefix(512) == Data(patternSector(seed: Self.seed, sector: 0)))
            #expect(expected.suffix(512) == Data(patternSector(seed: Self.seed, sector: UInt32(sectors - 1))))
            let image = try Data(contentsOf: URL(fileURLWithPath: disk))
            #expect(image.count == expected.count)
            if image != expected {
                let first = (0..<sectors).first { image[($0 * 512)..<($0 * 512 + 512)] != expected[($0 * 512)..<($0 * 512 + 512)] }
                Issue.record("the restored guest's image differs from the reference from sector \(first ?? -1)")
            }
        }
        // The requests the guest made after the restore ended its job: the statistics line
        // counts them all, none answered twice (the guest checks every used id).
        #expect(after.contains("notifications sent"), "\(after)")
    }

    @Test("echo (the UART polled): bytes typed while paused are in the snapshot and read once by the restored guest")
    func echoContinues() throws {
        let directory = scratchPath("snapshot")
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let first = ConsoleFile()
        var configuration = VMConfiguration(boot: .flat(.file(guest("echo.bin"))))
        configuration.memorySize = 16 << 20
        configuration.console = .file(first.path)
        do {
            let running = try RunningVM(configuration)
            defer { running.stop() }
            try #require(first.wait(for: "'.' ends"))
            running.vm.typeOnConsole(Array("abc".utf8))
            #expect(first.wait(for: "ABC"))
            try running.vm.pause()
            // Into the UART's FIFO while the guest is parked: only the snapshot has them.
            #expect(running.vm.typeOnConsole(Array("def".utf8)) == 3)
            try running.vm.snapshot(to: directory)
        }
        #expect(!first.text.contains("DEF"))

        let second = ConsoleFile()
        var restore = VMConfiguration(boot: .snapshot(directory: directory))
        restore.console = .file(second.path)
        restore.timeout = .seconds(60)
        let restored = try RunningVM(restore)
        #expect(second.wait(for: "DEF", seconds: 30), "\(second.text)")
        restored.vm.typeOnConsole(Array("gh.".utf8))
        let result = restored.finish(within: 60)
        #expect(result?.exit == .guestExit(value: 0), "\(String(describing: result?.exit))")
        let text = first.text + second.text
        #expect(text.contains("ABCDEFGH.") || text.replacingOccurrences(of: "\n", with: "").contains("ABCDEFGH."), "\(text)")
        #expect(second.text.components(separatedBy: "DEF").count == 2, "DEF echoed once: \(second.text)")
        #expect(second.text.contains("echo: done"))
    }

    @Test("interrupts (PIT, IOAPIC, local APIC, the UART's receive interrupt): a byte typed while paused interrupts the restored guest once")
    func interruptsContinue() throws {
        let directory = scratchPath("snapshot")
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let first = ConsoleFile()
        var configuration = VMConfiguration(boot: .flat(.file(guest("interrupts.bin"))))
        configuration.memorySize = 16 << 20
        configuration.console = .file(first.path)
        do {
            let running = try RunningVM(configuration)
            defer { running.stop() }
            try #require(first.wait(for: "Type text ending in '.'"), "\(first.text)")
            running.vm.typeOnConsole(Array("ab".utf8))
            #expect(first.wait(for: "[serial] ab"), "\(first.text)")
            try running.vm.pause()
            #expect(running.vm.typeOnConsole(Array("cd.".utf8)) == 3)
            try running.vm.snapshot(to: directory)
        }
        #expect(!first.text.contains("cd."))

        let second = ConsoleFile()
        var restore = VMConfiguration(boot: .snapshot(directory: directory))
        restore.console = .file(second.path)
        restore.timeout = .seconds(60)
        let restored = try RunningVM(restore)
        let result = restored.finish(within: 60)
        let text = second.text
        #expect(result?.exit == .guestExit(value: 0), "\(String(describing: result?.exit)): \(text)")
        #expect(text.contains("[serial] cd."), "\(text)")
        #expect(text.contains("5 bytes received"), "every byte once, none lost: \(text)")
        // The guest ends 50 ticks after the '.': the PIT goes on ticking in the new VM.
        let ticks = text.split(separator: "\n").last { $0.contains("timer interrupts") }
            .flatMap { Int($0.split(separator: " ")[1]) } ?? 0
        #expect(ticks >= 50, "\(text)")
    }
}

/// glibc's setns(2) (declared only with _GNU_SOURCE, so not in the Glibc module): moves the
/// calling thread into a namespace.
@_silgen_name("setns")
private func enterNamespace(_ descriptor: Int32, _ type: Int32) -> Int32

/// Runs `command` (a path and its arguments) and returns its status and output.
private func runTool(_ command: [String]) throws -> (status: Int32, output: String) {
    let process = Process()
    process.executableURL = URL(fileURLWithPath: command[0])
    process.arguments = Array(command.dropFirst())
    let pipe = Pipe()
    process.standardOutput = pipe
    process.standardError = pipe
    try process.run()
    let output = pipe.fileHandleForReading.readDataToEndOfFile()
    process.waitUntilExit()
    return (process.terminationStatus, String(decoding: output, as: UTF8.self))
}

private let ipTool = ["/usr/sbin/ip", "/sbin/ip", "/usr/bin/ip", "/bin/ip"].first { FileManager.default.isExecutableFile(atPath: $0) }
private let pingTool = ["/usr/bin/ping", "/bin/ping"].first { FileManager.default.isExecutableFile(atPath: $0) }
private let canMakeNamespaces = geteuid() == 0 && ipTool != nil && pingTool != nil
    && FileManager.default.fileExists(atPath: "/dev/net/tun") && FileManager.default.isReadableFile(atPath: "/dev/kvm")

@Suite("Snapshot and restore with a network interface", .serialized,
       .enabled(if: canMakeNamespaces, "needs root, ip, ping, /dev/net/tun and /dev/kvm"))
struct NetworkSnapshotTests {
    enum Built: Sendable {
        case built(VM)
        case failed(String)
    }

    @Test("virtio-net: a guest answering pings is paused and snapshotted (its TAP and MAC recorded), answers again once resumed; a restore while the TAP is in use is refused with the TAP's reason; once the VM is gone, a new process restores it on the same TAP and it answers")
    func networkInterface() throws {
        let ip = try #require(ipTool), ping = try #require(pingTool)
        let tag = UUID().uuidString.replacingOccurrences(of: "-", with: "").prefix(8).lowercased()
        let namespace = "swiftlet-snap-\(tag)", tap = "sws\(tag)"
        let directory = scratchPath("snapshot")
        try #require(try runTool([ip, "netns", "add", namespace]).status == 0)
        defer {
            _ = try? runTool([ip, "netns", "exec", namespace, ip, "link", "delete", tap])
            _ = try? runTool([ip, "netns", "delete", namespace])
            try? FileManager.default.removeItem(atPath: directory)
        }
        for command in [["link", "set", "lo", "up"], ["tuntap", "add", "dev", tap, "mode", "tap"],
                        ["address", "add", "192.0.2.1/24", "dev", tap], ["link", "set", tap, "up"]] {
            let result = try runTool([ip, "netns", "exec", namespace, ip] + command)
            try #require(result.status == 0, "ip \(command): \(result.output)")
        }
        func pingGuest() throws -> Bool {
            try runTool([ip, "netns", "exec", namespace, ping, "-c", "2", "-i", "0.2", "-W", "5", "192.0.2.2"]).status == 0
        }

        let console = ConsoleFile()
        var configuration = VMConfiguration(boot: .kernel(.file(guest("virtio-net.elf")), commandLine: "ip=192.0.2.2"))
        configuration.memorySize = 64 << 20
        configuration.console = .file(console.path)
        configuration.networks = [VMConfiguration.Network(tap: tap)]     // a generated MAC
        configuration.timeout = .seconds(120)
        // The TAP is opened by the thread that builds the VM: build it inside the namespace.
        let made = Mutex<Built?>(nil)
        let bootConfiguration = configuration
        let builder = Thread {
            let handle = open("/var/run/netns/\(namespace)", O_RDONLY | O_CLOEXEC)
            guard handle >= 0, enterNamespace(handle, 0x4000_0000 /* CLONE_NEWNET */) == 0 else {
                made.withLock { $0 = .failed("cannot enter the namespace") }
                return
            }
            close(handle)
            do throws(SwiftletError) {
                let vm = try VM(bootConfiguration)
                made.withLock { $0 = .built(vm) }
            } catch {
                made.withLock { $0 = .failed(error.message) }
            }
        }
        builder.start()
        while made.withLock({ $0 }) == nil { usleep(10_000) }
        do {
        guard case let .built(vm)? = made.withLock({ $0 }) else { Issue.record("\(String(describing: made.withLock { $0 }))"); return }
        made.withLock { $0 = nil }
        let mac = try #require(vm.networkInterfaces.first?.mac)
        let running = RunningVM(vm)
        defer { running.stop() }
        try #require(console.wait(for: "virtio-net: ready"), "\(console.text)")
        #expect(try pingGuest(), "\(console.text)")

        try vm.pause()
        // Paused, the guest answers nothing (the device reads nothing from the TAP).
        #expect(try runTool([ip, "netns", "exec", namespace, ping, "-c", "1", "-W", "1", "192.0.2.2"]).status != 0)
        try vm.snapshot(to: directory)
        let state = String(decoding: try Data(contentsOf: URL(fileURLWithPath: directory + "/state")), as: UTF8.self)
        #expect(state.contains("\"tap\" : \"\(tap)\"") && state.contains("\"mac\" : \"\(mac)\""), "the TAP and the MAC are recorded")

        // This VM still holds the TAP: a restore (which opens the same TAP) is refused.
        var restoreConfiguration = VMConfiguration(boot: .snapshot(directory: directory))
        restoreConfiguration.console = .discard
        let restore = restoreConfiguration
        let refusal = Mutex<String?>(nil)
        let restorer = Thread {
            let handle = open("/var/run/netns/\(namespace)", O_RDONLY | O_CLOEXEC)
            _ = enterNamespace(handle, 0x4000_0000)
            close(handle)
            do throws(SwiftletError) {
                _ = try VM(restore)
                refusal.withLock { $0 = "accepted" }
            } catch {
                refusal.withLock { $0 = error.message }
            }
        }
        restorer.start()
        while refusal.withLock({ $0 }) == nil { usleep(10_000) }
        let message = try #require(refusal.withLock { $0 })
        #expect(message.contains("TAP device '\(tap)' is in use"), "\(message)")

        // Resumed, the device takes up the receive chains it put back and answers again.
        try vm.resume()
        #expect(try pingGuest(), "\(console.text)")
        #expect(!console.text.contains("error"), "\(console.text)")
        }

        // With the first VM gone (its board lets go of the TAP), a new process restores the
        // snapshot inside the namespace, opens the same TAP with the same MAC, and the guest
        // answers there.
        let process = Process()
        process.executableURL = URL(fileURLWithPath: ip)
        process.arguments = ["netns", "exec", namespace, SnapshotTests.binary, "run", "--restore", directory, "--timeout", "30"]
        let output = FileManager.default.temporaryDirectory.appendingPathComponent("restored-\(tag).txt")
        _ = FileManager.default.createFile(atPath: output.path, contents: nil)
        defer { try? FileManager.default.removeItem(at: output) }
        process.standardOutput = try FileHandle(forWritingTo: output)
        process.standardError = try FileHandle(forWritingTo: output)
        process.standardInput = FileHandle.nullDevice
        try process.run()
        var answered = false
        for _ in 0..<5 where !answered && process.isRunning { answered = try pingGuest() }
        if process.isRunning { process.terminate() }
        process.waitUntilExit()
        let restoredOutput = (try? String(contentsOf: output, encoding: .utf8)) ?? ""
        #expect(answered, "the guest restored in a new process answers pings: \(restoredOutput)")
    }
}
