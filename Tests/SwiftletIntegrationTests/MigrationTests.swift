import Foundation
import Testing

/// A `swiftlet` process left running while the test talks to it.
final class Background {
    let process = Process()
    let scratch: URL
    let errURL: URL

    init(_ arguments: [String]) throws {
        scratch = FileManager.default.temporaryDirectory.appendingPathComponent("swiftlet-bg-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: scratch, withIntermediateDirectories: true)
        errURL = scratch.appendingPathComponent("stderr")
        _ = FileManager.default.createFile(atPath: errURL.path, contents: nil)
        process.executableURL = Swiftlet.binary
        process.arguments = arguments
        process.standardOutput = FileHandle(forWritingAtPath: "/dev/null")
        process.standardError = try FileHandle(forWritingTo: errURL)
        process.standardInput = FileHandle(forReadingAtPath: "/dev/null")
        try process.run()
    }

    deinit {
        if process.isRunning { kill(process.processIdentifier, SIGKILL); process.waitUntilExit() }
        try? FileManager.default.removeItem(at: scratch)
    }

    var stderr: String { (try? String(contentsOf: errURL, encoding: .utf8)) ?? "" }

    func waitForError(_ text: String, seconds: Double = 30) -> Bool { Swiftlet.waitFor(text, in: errURL, seconds: seconds) }

    /// The exit status once the process ended (the signal number if a signal ended it), or
    /// `nil` if it is still running after `seconds`.
    func exitStatus(within seconds: Double = 30) -> Int32? {
        let deadline = Date().addingTimeInterval(seconds)
        while process.isRunning && Date() < deadline { usleep(20_000) }
        return process.isRunning ? nil : process.terminationStatus
    }

    func signal(_ number: Int32) { kill(process.processIdentifier, number) }
}

/// The dirtier guest's console: "round R sum S" lines, each checked against the formula.
enum DirtierOutput {
    /// Pages the default dirtier writes each round (8 MiB).
    static let pages = 2048

    static func expectedSum(round r: Int, pages n: Int = pages) -> Int { r * n * (n - 1) / 2 + n * r * (r + 1) / 2 }

    /// The rounds printed in `text`, complete lines only.
    static func rounds(_ text: String) -> [(round: Int, sum: Int)] {
        text.split(separator: "\n", omittingEmptySubsequences: false).dropLast().compactMap { line in
            let words = line.split(separator: " ")
            guard words.count == 4, words[0] == "round", let r = Int(words[1]), let s = Int(words[3]) else { return nil }
            return (r, s)
        }
    }

    static func lastRound(_ file: URL) -> Int {
        rounds((try? String(contentsOf: file, encoding: .utf8)) ?? "").last?.round ?? 0
    }

    static func waitForRound(above n: Int, in file: URL, seconds: Double = 60) -> Bool {
        let deadline = Date().addingTimeInterval(seconds)
        while Date() < deadline {
            if lastRound(file) > n { return true }
            usleep(20_000)
        }
        return false
    }

    /// Every round once, from 1, in order, with the sum the memory must give; returns the
    /// last round seen.
    @discardableResult
    static func expectUnbroken(_ text: String, sourceLocation: SourceLocation = #_sourceLocation) -> Int {
        var expected = 1
        for (round, sum) in rounds(text) {
            #expect(round == expected && sum == expectedSum(round: round), "after round \(expected - 1): round \(round) sum \(sum)",
                    sourceLocation: sourceLocation)
            if round != expected || sum != expectedSum(round: round) { break }
            expected += 1
        }
        return expected - 1
    }
}

@Suite("Live migration and the monitor (the real binary)", .serialized,
       .enabled(if: FileManager.default.isReadableFile(atPath: "/dev/kvm"), "needs /dev/kvm"))
struct MigrationTests {
    let directory: URL = {
        let url = URL(fileURLWithPath: "/tmp/swiftlet-migration-\(UUID().uuidString.prefix(8))")
        try? FileManager.default.createDirectory(at: url, withIntermediateDirectories: true)
        return url
    }()

    func path(_ name: String) -> String { directory.appendingPathComponent(name).path }
    func url(_ name: String) -> URL { directory.appendingPathComponent(name) }

    func source(memory: String = "32M", extra: [String] = []) throws -> Background {
        try Background(["run", "--flat", Swiftlet.guest("dirtier"), "--memory", memory, "--serial", "file:\(path("source.out"))",
                        "--monitor", path("monitor.sock"), "--timeout", "120"] + extra)
    }

    func target(memory: String = "32M", address: String? = nil, extra: [String] = []) throws -> Background {
        let target = try Background(["run", "--incoming", address ?? "unix:\(path("incoming.sock"))", "--memory", memory,
                                     "--serial", "file:\(path("target.out"))", "--timeout", "120"] + extra)
        #expect(target.waitForError("waiting for a migration on"))
        return target
    }

    func monitor(_ words: String...) throws -> Swiftlet.Result {
        try Swiftlet.run(["monitor", path("monitor.sock")] + words)
    }

    func text(_ name: String) -> String { (try? String(contentsOf: url(name), encoding: .utf8)) ?? "" }

    /// Waits until the source's monitor socket answers.
    func waitForMonitor() {
        let deadline = Date().addingTimeInterval(30)
        while !FileManager.default.fileExists(atPath: path("monitor.sock")) && Date() < deadline { usleep(20_000) }
    }

    @Test("A guest writing memory migrates over a Unix socket and continues on the target with the right checksum")
    func migrateOverUnixSocket() throws {
        defer { try? FileManager.default.removeItem(at: directory) }
        let target = try target()
        let source = try source()
        #expect(DirtierOutput.waitForRound(above: 20, in: url("source.out")))
        waitForMonitor()
        let answer = try monitor("migrate", "unix:\(path("incoming.sock"))")
        #expect(answer.status == 0, "\(answer.stderr)")
        #expect(answer.stdout.contains("migration completed: the VM runs at unix:"))
        #expect(source.exitStatus() == 0)
        #expect(source.stderr.contains("swiftlet: the VM migrated to unix:\(path("incoming.sock")), which runs it now"))
        let lastOnSource = DirtierOutput.lastRound(url("source.out"))
        #expect(DirtierOutput.waitForRound(above: lastOnSource + 20, in: url("target.out")), "the target did not go on: \(target.stderr)")
        target.signal(SIGTERM)
        _ = target.exitStatus()
        let last = DirtierOutput.expectUnbroken(text("source.out") + text("target.out"))
        #expect(last > lastOnSource + 20)
    }

    @Test("A writable disk is handed over: the source flushes it and gives up its lock, the target takes it")
    func diskHandOver() throws {
        defer { try? FileManager.default.removeItem(at: directory) }
        let image = path("disk.qcow2")
        #expect(try Swiftlet.runShell("qemu-img create -q -f qcow2 \(image) 16M").status == 0)
        let target = try target(extra: ["--disk", image])
        let source = try source(extra: ["--disk", image])
        #expect(DirtierOutput.waitForRound(above: 5, in: url("source.out")))
        waitForMonitor()
        // While the source runs, its lock keeps others from writing the image.
        #expect(try Swiftlet.runShell("qemu-img info \(image)").stdout.contains("file format: qcow2") == false)
        let answer = try monitor("migrate", "unix:\(path("incoming.sock"))")
        #expect(answer.status == 0, "\(answer.stderr)")
        #expect(source.exitStatus() == 0)
        let lastOnSource = DirtierOutput.lastRound(url("source.out"))
        #expect(DirtierOutput.waitForRound(above: lastOnSource + 5, in: url("target.out")), "\(target.stderr)")
        // Now the target holds the lock.
        let locked = try Swiftlet.runShell("qemu-img info \(image) 2>&1")
        #expect(locked.status != 0 && locked.stdout.contains("lock"), "\(locked.stdout)")
        target.signal(SIGTERM)
        _ = target.exitStatus()
        #expect(try Swiftlet.runShell("qemu-img check -q \(image)").status == 0)
        DirtierOutput.expectUnbroken(text("source.out") + text("target.out"))
    }

    @Test("A source that sends garbage is refused by the target with one line")
    func garbageSource() throws {
        defer { try? FileManager.default.removeItem(at: directory) }
        let target = try target()
        let script = "python3 -c \"import socket; s = socket.socket(socket.AF_UNIX); s.connect('\(path("incoming.sock"))'); "
            + "s.sendall(b'GET / HTTP/1.0\\\\r\\\\n\\\\r\\\\n'); s.recv(64)\""
        _ = try Swiftlet.runShell(script)
        #expect(target.exitStatus() == 2)
        #expect(target.stderr.hasSuffix("swiftlet: migration: the stream is not a Swiftlet migration (bad frame magic)\n"), "\(target.stderr)")
    }

    /// A hostile source: a correct hello, then a frame of `kind` with `payload` (Python
    /// expressions), checksummed as the protocol wants.
    func hostileSource(kind: Int, payload: String) throws {
        let script = """
            import json, socket, struct, zlib
            def frame(kind, payload):
                return b"SWMG" + bytes([kind, 0, 0, 0]) + struct.pack("<II", len(payload), zlib.crc32(payload)) + payload
            hello = {"protocolVersion": 1, "swiftletVersion": "0.1.0", "cpuFeatures": [], "machine": {
                "memorySize": 32 << 20, "cpuCount": 1, "cpuModel": "host", "virtioTransport": "pci", "disks": [],
                "completeInstructions": True, "tripleFault": "stop", "testDevice": False}}
            s = socket.socket(socket.AF_UNIX)
            s.connect("\(path("incoming.sock"))")
            s.sendall(frame(1, json.dumps(hello).encode()))
            answer = s.recv(16)
            assert answer[4] == 2, answer
            s.sendall(frame(\(kind), \(payload)))
            s.recv(64)
            """
        try script.write(to: url("hostile.py"), atomically: true, encoding: .utf8)
        let result = try Swiftlet.runShell("python3 \(path("hostile.py"))")
        #expect(result.status == 0, "\(result.stderr)")
    }

    @Test("A hostile source: pages outside guest RAM, a bad checksum, a huge frame, a damaged state: one line each, status 2")
    func hostileSources() throws {
        defer { try? FileManager.default.removeItem(at: directory) }
        let cases: [(Int, String, String)] = [
            (4, "struct.pack('<Q', 1 << 40) + bytes(4096)", "the source sent pages outside guest RAM"),
            (4, "struct.pack('<Q', 8191) + bytes(8192)", "the source sent pages outside guest RAM"),
            (4, "struct.pack('<Q', 0) + bytes(100)", "is not a page number and whole pages"),
            (5, "struct.pack('<QQ', 8000, 256)", "the source sent zero pages outside guest RAM"),
            (6, "b'{}'", "the VM's state does not decode"),
            (3, "b''", "unexpected refuse frame while receiving RAM"),
        ]
        for (kind, payload, expected) in cases {
            let target = try target()
            try hostileSource(kind: kind, payload: payload)
            #expect(target.exitStatus() == 2)
            let last = target.stderr.split(separator: "\n").last.map(String.init) ?? ""
            #expect(last.hasPrefix("swiftlet: migration: ") && last.contains(expected), "\(target.stderr)")
            #expect(!FileManager.default.fileExists(atPath: path("target.out")) || text("target.out").isEmpty)
        }
    }

    @Test("A target with a different memory size refuses the VM; the source goes on and the target exits with one line")
    func targetRefuses() throws {
        defer { try? FileManager.default.removeItem(at: directory) }
        let target = try target(memory: "64M")
        let source = try source()
        #expect(DirtierOutput.waitForRound(above: 5, in: url("source.out")))
        waitForMonitor()
        let answer = try monitor("migrate", "unix:\(path("incoming.sock"))")
        #expect(answer.status == 2)
        #expect(answer.stderr.contains("the target refused the VM: the source's VM has 32M of RAM, this target 64M"), "\(answer.stderr)")
        #expect(target.exitStatus() == 2)
        #expect(target.stderr.contains("swiftlet: migration: refused the incoming VM: the source's VM has 32M of RAM"), "\(target.stderr)")
        #expect(try monitor("status").stdout == "VM status: running\n")
        let before = DirtierOutput.lastRound(url("source.out"))
        #expect(DirtierOutput.waitForRound(above: before + 10, in: url("source.out")))
        #expect(try monitor("quit").stdout == "bye\n")
        #expect(source.exitStatus() == 0)
        DirtierOutput.expectUnbroken(text("source.out"))
    }

    @Test("kill -9 of the target in the middle of a migration leaves the source running")
    func targetKilled() throws {
        defer { try? FileManager.default.removeItem(at: directory) }
        let target = try target()
        let source = try source()
        #expect(DirtierOutput.waitForRound(above: 5, in: url("source.out")))
        waitForMonitor()
        // 1 MB/s: the first round of the 8 MiB working set takes seconds.
        #expect(try monitor("migrate_set_parameter", "max-bandwidth", "1000000").status == 0)
        let client = try Background(["monitor", path("monitor.sock"), "migrate", "unix:\(path("incoming.sock"))"])
        #expect(target.waitForError("receiving a VM"))
        usleep(500_000)
        #expect(try monitor("status").stdout == "VM status: running (migrating)\n")
        target.signal(SIGKILL)
        #expect(client.exitStatus() == 2)
        #expect(client.stderr.contains("swiftlet: migration:"), "\(client.stderr)")
        #expect(client.stderr.contains("the VM goes on here"))
        #expect(try monitor("status").stdout == "VM status: running\n")
        let before = DirtierOutput.lastRound(url("source.out"))
        #expect(DirtierOutput.waitForRound(above: before + 10, in: url("source.out")))
        #expect(try monitor("quit").status == 0)
        #expect(source.exitStatus() == 0)
        DirtierOutput.expectUnbroken(text("source.out"))
    }

    @Test("kill -9 of the source in the middle of a migration: the target exits with status 2 and one line")
    func sourceKilled() throws {
        defer { try? FileManager.default.removeItem(at: directory) }
        let target = try target()
        let source = try source()
        #expect(DirtierOutput.waitForRound(above: 5, in: url("source.out")))
        waitForMonitor()
        #expect(try monitor("migrate_set_parameter", "max-bandwidth", "1000000").status == 0)
        let client = try Background(["monitor", path("monitor.sock"), "migrate", "unix:\(path("incoming.sock"))"])
        #expect(target.waitForError("receiving a VM"))
        usleep(500_000)
        source.signal(SIGKILL)
        #expect(target.exitStatus() == 2)
        let lines = target.stderr.split(separator: "\n")
        #expect(lines.last?.hasPrefix("swiftlet: migration: the other side closed the connection") == true, "\(target.stderr)")
        _ = client.exitStatus()
        #expect(text("target.out").isEmpty, "the target ran the guest")
    }

    @Test("The monitor: status, stop, cont, snapshot, a bad command gets one error line, quit")
    func monitorCommands() throws {
        defer { try? FileManager.default.removeItem(at: directory) }
        let source = try source()
        #expect(DirtierOutput.waitForRound(above: 3, in: url("source.out")))
        waitForMonitor()
        #expect(try monitor("status").stdout == "VM status: running\n")
        #expect(try monitor("stop").stdout == "VM status: paused\n")
        let paused = text("source.out")
        usleep(300_000)
        #expect(text("source.out") == paused, "the guest ran while paused")
        #expect(try monitor("info", "status").stdout == "VM status: paused\n")
        let bad = try monitor("frobnicate", "now")
        #expect(bad.status == 2 && bad.stderr == "swiftlet: unknown command 'frobnicate' (try 'help')\n", "\(bad.stderr)")
        let usage = try monitor("snapshot")
        #expect(usage.status == 2 && usage.stderr == "swiftlet: usage: snapshot [--diff] DIR\n")
        #expect(try monitor("migrate", "ftp:x").stderr.contains("is not a migration address"))
        #expect(try monitor("stop").stderr.contains("cannot pause the VM: it is paused"))
        let snapshot = try monitor("snapshot", path("snap"))
        #expect(snapshot.stdout.hasPrefix("snapshot written to \(path("snap"))"), "\(snapshot.stderr)")
        #expect(FileManager.default.fileExists(atPath: path("snap/state")) && FileManager.default.fileExists(atPath: path("snap/memory")))
        // A diff snapshot needs dirty tracking, which this VM does not have: one error line.
        #expect(try monitor("snapshot", "--diff", path("snap-diff")).stderr.hasPrefix("swiftlet: "))
        #expect(try monitor("cont").stdout == "VM status: running\n")
        let before = DirtierOutput.lastRound(url("source.out"))
        #expect(DirtierOutput.waitForRound(above: before + 3, in: url("source.out")))
        // A running VM pauses for a snapshot and goes on.
        #expect(try monitor("snapshot", path("snap2")).status == 0)
        #expect(try monitor("status").stdout == "VM status: running\n")
        #expect(try monitor("help").stdout.hasPrefix("commands: status"))
        #expect(try monitor("quit").stdout == "bye\n")
        #expect(source.exitStatus() == 0)
        DirtierOutput.expectUnbroken(text("source.out"))
        let missing = try Swiftlet.run(["monitor", path("no-such.sock"), "status"])
        #expect(missing.status == 2 && missing.stderr.hasPrefix("swiftlet: cannot connect to the monitor at"))
    }

    @Test("--incoming with a bad address is one line and status 2")
    func badIncomingAddress() throws {
        let result = try Swiftlet.run(["run", "--incoming", "carrier-pigeon:somewhere"])
        #expect(result.status == 2)
        #expect(result.stderr == "swiftlet: 'carrier-pigeon:somewhere' is not a migration address: use unix:PATH or tcp:HOST:PORT\n")
    }
}
