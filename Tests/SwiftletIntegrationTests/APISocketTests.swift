import Foundation
import Glibc
import Synchronization
import Testing

/// A minimal HTTP/1.1 client over a Unix socket: what a Firecracker SDK does.
enum UnixHTTP {
    struct Answer {
        let status: Int
        let body: String
    }

    /// Connects to `socket`, or returns -1.
    static func connect(_ socket: String) -> Int32 {
        let fd = Glibc.socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { return -1 }
        var address = sockaddr_un()
        address.sun_family = sa_family_t(AF_UNIX)
        withUnsafeMutableBytes(of: &address.sun_path) { raw in
            let bytes = Array(socket.utf8.prefix(raw.count - 1))
            raw.copyBytes(from: bytes + [0])
        }
        let result = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { Glibc.connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        guard result == 0 else { close(fd); return -1 }
        var timeout = timeval(tv_sec: 30, tv_usec: 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
        return fd
    }

    static func send(_ fd: Int32, _ bytes: [UInt8]) {
        var offset = 0
        while offset < bytes.count {
            let n = bytes[offset...].withUnsafeBytes { write(fd, $0.baseAddress, $0.count) }
            guard n > 0 else { return }
            offset += n
        }
    }

    /// Sends one request with `Connection: close` and reads the whole answer.
    static func request(_ socket: String, _ method: String, _ path: String, _ body: String? = nil) -> Answer {
        let fd = connect(socket)
        guard fd >= 0 else { return Answer(status: -1, body: "connect failed: \(String(cString: strerror(errno)))") }
        defer { close(fd) }
        var text = "\(method) \(path) HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nAccept: application/json\r\n"
        if let body { text += "Content-Type: application/json\r\nContent-Length: \(body.utf8.count)\r\n\r\n\(body)" } else { text += "\r\n" }
        send(fd, Array(text.utf8))
        var answer: [UInt8] = []
        var buffer = [UInt8](repeating: 0, count: 4096)
        while true {
            let n = read(fd, &buffer, buffer.count)
            guard n > 0 else { break }
            answer += buffer[..<n]
        }
        let string = String(decoding: answer, as: UTF8.self)
        let status = string.split(separator: " ", maxSplits: 2).dropFirst().first.flatMap { Int($0) } ?? -1
        let body = string.range(of: "\r\n\r\n").map { String(string[$0.upperBound...]) } ?? ""
        return Answer(status: status, body: body)
    }
}

/// A `swiftlet` process serving the API, stopped and cleaned up at the end.
final class APIProcess {
    let directory: URL
    let socket: String
    let console: String
    let process = Process()
    let stderrPath: String

    init(arguments: [String] = [], executable: URL = Swiftlet.binary, name: String = "swiftlet") throws {
        directory = FileManager.default.temporaryDirectory.appendingPathComponent("api-test-\(UUID().uuidString.prefix(8))")
        try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
        socket = directory.appendingPathComponent("api.sock").path
        console = directory.appendingPathComponent("console").path
        stderrPath = directory.appendingPathComponent("stderr").path
        _ = FileManager.default.createFile(atPath: stderrPath, contents: nil)
        process.executableURL = executable
        process.arguments = name == "firecracker" ? ["--api-sock", socket] + arguments
            : ["run", "--api-sock", socket, "--serial", "file:\(console)"] + arguments
        process.standardInput = FileHandle(forReadingAtPath: "/dev/null")
        process.standardOutput = FileHandle(forWritingAtPath: "/dev/null")
        process.standardError = try FileHandle(forWritingTo: URL(fileURLWithPath: stderrPath))
        try process.run()
        let deadline = Date().addingTimeInterval(20)
        while !FileManager.default.fileExists(atPath: socket) && process.isRunning && Date() < deadline { usleep(10_000) }
    }

    func call(_ method: String, _ path: String, _ body: String? = nil) -> UnixHTTP.Answer {
        UnixHTTP.request(socket, method, path, body)
    }

    var stderr: String { (try? String(contentsOfFile: stderrPath, encoding: .utf8)) ?? "" }

    /// The counter guest's (count, sum) pairs so far, complete lines only.
    var counts: [(Int, Int)] {
        let text = (try? String(contentsOfFile: console, encoding: .utf8)) ?? ""
        return text.split(separator: "\n", omittingEmptySubsequences: false).dropLast().compactMap { line in
            let words = line.split(separator: " ")
            guard words.count == 4, words[0] == "count", let n = Int(words[1]), let s = Int(words[3]) else { return nil }
            return (n, s)
        }
    }

    func wait(forCountAbove n: Int, seconds: Double = 60) -> Bool {
        let deadline = Date().addingTimeInterval(seconds)
        while Date() < deadline { if (counts.last?.0 ?? 0) > n { return true }; usleep(10_000) }
        return false
    }

    /// Waits for the process to end (SIGKILL after `seconds`) and returns its status.
    @discardableResult
    func waitForExit(seconds: Double = 30) -> (status: Int32, reason: Process.TerminationReason) {
        let deadline = Date().addingTimeInterval(seconds)
        while process.isRunning && Date() < deadline { usleep(10_000) }
        if process.isRunning { kill(process.processIdentifier, SIGKILL) }
        process.waitUntilExit()
        return (process.terminationStatus, process.terminationReason)
    }

    deinit {
        if process.isRunning { kill(process.processIdentifier, SIGKILL); process.waitUntilExit() }
        try? FileManager.default.removeItem(at: directory)
    }
}

/// Checks a counter guest's output: consecutive counts with the right running sums.
func expectConsecutive(_ counts: [(Int, Int)], sourceLocation: SourceLocation = #_sourceLocation) {
    for (index, (n, sum)) in counts.enumerated() {
        #expect(sum == n * (n + 1) / 2, "count \(n) sum \(sum)", sourceLocation: sourceLocation)
        if index > 0 { #expect(n == counts[index - 1].0 + 1, "count \(counts[index - 1].0) then \(n)", sourceLocation: sourceLocation) }
    }
}

@Suite("Firecracker's API on a Unix socket (real binary, real KVM)", .serialized,
       .enabled(if: FileManager.default.isReadableFile(atPath: "/dev/kvm"), "needs /dev/kvm"))
struct APISocketTests {
    @Test("Configure, start, pause, snapshot, resume, stop; then load the snapshot into a new process")
    func lifecycle() throws {
        let vm = try APIProcess()
        let metrics = vm.directory.appendingPathComponent("metrics").path
        let log = vm.directory.appendingPathComponent("log").path
        #expect(vm.call("GET", "/").body.contains("\"state\":\"Not started\""))
        #expect(vm.call("PUT", "/logger", #"{"log_path": "\#(log)", "level": "Info"}"#).status == 204)
        #expect(vm.call("PUT", "/metrics", #"{"metrics_path": "\#(metrics)"}"#).status == 204)
        #expect(vm.call("PUT", "/machine-config", #"{"vcpu_count": 1, "mem_size_mib": 16, "track_dirty_pages": true}"#).status == 204)
        #expect(vm.call("PUT", "/boot-source", #"{"kernel_image_path": "\#(Swiftlet.guest("counter"))"}"#).status == 204)
        let disk = vm.directory.appendingPathComponent("data.img").path
        #expect(FileManager.default.createFile(atPath: disk, contents: Data(count: 1 << 20)))
        #expect(vm.call("PUT", "/drives/data", #"{"drive_id": "data", "path_on_host": "\#(disk)", "is_root_device": false, "rate_limiter": {"ops": {"size": 100, "refill_time": 1000}}}"#).status == 204)
        let start = vm.call("PUT", "/actions", #"{"action_type": "InstanceStart"}"#)
        #expect(start.status == 204, "\(start.body) \(vm.stderr)")
        #expect(vm.wait(forCountAbove: 3))
        // A running drive's rate limiter changes; an unknown drive is refused.
        let patched = vm.call("PATCH", "/drives/data", #"{"drive_id": "data", "rate_limiter": {"bandwidth": {"size": 1048576, "refill_time": 100}}}"#)
        #expect(patched.status == 204, "\(patched.body)")
        #expect(vm.call("GET", "/vm/config").body.contains("\"size\":1048576"))
        #expect(vm.call("PATCH", "/drives/nothing", #"{"drive_id": "nothing", "rate_limiter": {}}"#).status == 400)
        #expect(vm.call("GET", "/").body.contains("\"state\":\"Running\""))
        // Pre-boot only calls are refused now, with Firecracker's message.
        let late = vm.call("PUT", "/machine-config", #"{"vcpu_count": 2, "mem_size_mib": 16}"#)
        #expect(late.status == 400 && late.body.contains("not supported after starting the microVM"))
        // A snapshot needs a paused VM.
        let statePath = vm.directory.appendingPathComponent("vm.state").path
        let memoryPath = vm.directory.appendingPathComponent("vm.mem").path
        let snapshotBody = #"{"snapshot_path": "\#(statePath)", "mem_file_path": "\#(memoryPath)", "snapshot_type": "Full"}"#
        #expect(vm.call("PUT", "/snapshot/create", snapshotBody).status == 400)

        #expect(vm.call("PATCH", "/vm", #"{"state": "Paused"}"#).status == 204)
        #expect(vm.call("GET", "/").body.contains("\"state\":\"Paused\""))
        let atPause = vm.counts.last?.0 ?? 0
        usleep(300_000)
        #expect((vm.counts.last?.0 ?? 0) == atPause)
        let created = vm.call("PUT", "/snapshot/create", snapshotBody)
        #expect(created.status == 204, "\(created.body)")
        #expect(FileManager.default.fileExists(atPath: statePath) && FileManager.default.fileExists(atPath: memoryPath))
        #expect(vm.call("PATCH", "/vm", #"{"state": "Resumed"}"#).status == 204)
        #expect(vm.wait(forCountAbove: atPause + 2))
        expectConsecutive(vm.counts)
        // A diff snapshot (track_dirty_pages) holds only the pages written since the first.
        #expect(vm.call("PATCH", "/vm", #"{"state": "Paused"}"#).status == 204)
        let diffState = vm.directory.appendingPathComponent("diff.state").path
        let diffMemory = vm.directory.appendingPathComponent("diff.mem").path
        let diff = vm.call("PUT", "/snapshot/create", #"{"snapshot_path": "\#(diffState)", "mem_file_path": "\#(diffMemory)", "snapshot_type": "Diff"}"#)
        #expect(diff.status == 204, "\(diff.body)")
        var full = stat(), partial = stat()
        #expect(stat(memoryPath, &full) == 0 && stat(diffMemory, &partial) == 0)
        #expect(partial.st_blocks < full.st_blocks, "diff \(partial.st_blocks) blocks, full \(full.st_blocks)")
        #expect(vm.call("PATCH", "/vm", #"{"state": "Resumed"}"#).status == 204)
        #expect(vm.call("PUT", "/actions", #"{"action_type": "FlushMetrics"}"#).status == 204)
        let config = vm.call("GET", "/vm/config")
        #expect(config.status == 200 && config.body.contains("\"mem_size_mib\":16") && config.body.contains("counter.bin"))

        // Stop: SIGTERM stops the VM cleanly and the process ends by that signal.
        kill(vm.process.processIdentifier, SIGTERM)
        let (status, reason) = vm.waitForExit()
        #expect(reason == .uncaughtSignal && status == SIGTERM)
        #expect(!FileManager.default.fileExists(atPath: vm.socket))
        let metricsText = (try? String(contentsOfFile: metrics, encoding: .utf8)) ?? ""
        #expect(metricsText.contains("\"instance_start_count\"") || metricsText.contains("actions_count"))
        #expect(((try? String(contentsOfFile: log, encoding: .utf8)) ?? "").contains("/actions"))

        // A new process loads the snapshot and continues counting from where it was.
        let restored = try APIProcess()
        let early = restored.call("PATCH", "/vm", #"{"state": "Resumed"}"#)
        #expect(early.status == 400)
        let load = restored.call("PUT", "/snapshot/load", #"{"snapshot_path": "\#(statePath)", "mem_file_path": "\#(memoryPath)", "resume_vm": true}"#)
        #expect(load.status == 204, "\(load.body) \(restored.stderr)")
        #expect(restored.wait(forCountAbove: atPause + 2))
        let continued = restored.counts
        #expect((continued.first?.0 ?? 0) >= atPause && (continued.first?.0 ?? 0) <= atPause + 2, "first count after restore: \(continued.first?.0 ?? -1), paused at \(atPause)")
        expectConsecutive(continued)
        #expect(restored.call("PUT", "/boot-source", #"{"kernel_image_path": "/tmp/x"}"#).status == 400)
        kill(restored.process.processIdentifier, SIGTERM)
        restored.waitForExit()
    }

    @Test("Bad input over the socket: malformed HTTP, oversized body, mid-request disconnects, many clients at once")
    func badInput() throws {
        let vm = try APIProcess()
        // Malformed HTTP: a 400 with a fault message.
        let fd = UnixHTTP.connect(vm.socket)
        UnixHTTP.send(fd, Array("NOT HTTP AT ALL\r\n\r\n".utf8))
        var buffer = [UInt8](repeating: 0, count: 1024)
        let n = read(fd, &buffer, buffer.count)
        close(fd)
        let answer = String(decoding: buffer[..<max(n, 0)], as: UTF8.self)
        #expect(answer.hasPrefix("HTTP/1.1 400") && answer.contains("fault_message"))
        // Oversized body.
        let big = vm.call("PUT", "/machine-config", String(repeating: " ", count: 60_000) + "{}")
        #expect(big.status == 400 && big.body.contains("larger than the limit"))
        // Clients that vanish mid-request.
        for _ in 0..<20 {
            let fd = UnixHTTP.connect(vm.socket)
            UnixHTTP.send(fd, Array("PUT /machine-config HTTP/1.1\r\nContent-Length: 500\r\n\r\n{\"vcpu".utf8))
            close(fd)
        }
        // Many clients at once, each with a valid and an invalid request.
        let results = Mutex<[Int]>([])
        let socket = vm.socket
        DispatchQueue.concurrentPerform(iterations: 32) { index in
            let good = UnixHTTP.request(socket, "GET", "/machine-config")
            let bad = UnixHTTP.request(socket, "PUT", "/machine-config", #"{"vcpu_count": \#(index + 100), "mem_size_mib": 16}"#)
            results.withLock { $0 += [good.status, bad.status] }
        }
        let statuses = results.withLock { $0 }
        #expect(statuses.count == 64 && statuses.filter { $0 == 200 }.count == 32 && statuses.filter { $0 == 400 }.count == 32)
        // Paths Swiftlet may not open, and a kernel that is not a file.
        #expect(vm.call("PUT", "/boot-source", #"{"kernel_image_path": "/proc/self/mem"}"#).status == 400)
        #expect(vm.call("PUT", "/boot-source", #"{"kernel_image_path": "/nonexistent"}"#).status == 204)
        let start = vm.call("PUT", "/actions", #"{"action_type": "InstanceStart"}"#)
        #expect(start.status == 400 && start.body.contains("kernel"))
        // Still serving after all of it.
        #expect(vm.call("GET", "/").status == 200)
        #expect(vm.process.isRunning)
    }

    @Test("Run as 'firecracker': --config-file --no-api boots without any API call")
    func firecrackerConfigFile() throws {
        let directory = FileManager.default.temporaryDirectory.appendingPathComponent("fc-\(UUID().uuidString.prefix(8))")
        try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: directory) }
        let link = directory.appendingPathComponent("firecracker")
        try FileManager.default.createSymbolicLink(at: link, withDestinationURL: Swiftlet.binary)
        let config = directory.appendingPathComponent("vm.json")
        try Data("""
            {"boot-source": {"kernel_image_path": "\(Swiftlet.guest("hello-real"))"},
             "machine-config": {"vcpu_count": 1, "mem_size_mib": 16},
             "drives": [], "network-interfaces": []}
            """.utf8).write(to: config)
        let output = directory.appendingPathComponent("out").path
        _ = FileManager.default.createFile(atPath: output, contents: nil)
        let process = Process()
        process.executableURL = link
        process.arguments = ["--no-api", "--config-file", config.path, "--id", "fc-test", "--level", "Info", "--no-seccomp"]
        process.standardOutput = try FileHandle(forWritingTo: URL(fileURLWithPath: output))
        process.standardError = FileHandle(forWritingAtPath: "/dev/null")
        process.standardInput = FileHandle(forReadingAtPath: "/dev/null")
        try process.run()
        process.waitUntilExit()
        #expect(process.terminationStatus == 1)   // the guest wrote 0 to the exit port
        #expect(((try? String(contentsOfFile: output, encoding: .utf8)) ?? "").contains("Hello from real mode!"))

        // An unknown flag is one clear line and status 2.
        let bad = Process()
        let errors = Pipe()
        bad.executableURL = link
        bad.arguments = ["--frobnicate"]
        bad.standardError = errors
        bad.standardOutput = FileHandle(forWritingAtPath: "/dev/null")
        try bad.run()
        bad.waitUntilExit()
        let message = String(decoding: errors.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
        #expect(bad.terminationStatus == 2 && message.hasPrefix("swiftlet: Found argument '--frobnicate'"))
    }

    @Test("swiftlet run --config-file boots from Firecracker's JSON; a bad file is one line and status 2")
    func runConfigFile() throws {
        let directory = FileManager.default.temporaryDirectory.appendingPathComponent("cfg-\(UUID().uuidString.prefix(8))")
        try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: directory) }
        let config = directory.appendingPathComponent("vm.json")
        try Data(#"{"boot-source": {"kernel_image_path": "\#(Swiftlet.guest("hello-real"))"}, "machine-config": {"vcpu_count": 1, "mem_size_mib": 8}}"#.utf8).write(to: config)
        let result = try Swiftlet.run(["run", "--config-file", config.path])
        #expect(result.status == 1 && result.stdout.contains("Hello from real mode!"))
        try Data(#"{"machine-config": {"vcpu_count": 1, "mem_size_mib": 8, "turbo": true}}"#.utf8).write(to: config)
        let bad = try Swiftlet.run(["run", "--config-file", config.path])
        #expect(bad.status == 2 && bad.stderr.contains("unknown field `turbo`"))
        #expect(bad.stderr.split(separator: "\n").count == 1)
    }
}
