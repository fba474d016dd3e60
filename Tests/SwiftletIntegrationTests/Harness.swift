import Foundation
import Testing

/// Runs the real `swiftlet` binary built next to this test bundle, on real /dev/kvm.
enum Swiftlet {
    /// The package root, found from this file's path.
    static let packageRoot = URL(fileURLWithPath: #filePath)
        .deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()

    /// `swiftlet` lives in the same build directory as the test runner.
    static let binary: URL = {
        let runner = URL(fileURLWithPath: (try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/exe")) ?? CommandLine.arguments[0])
        var directory = runner.deletingLastPathComponent()
        // The runner may sit inside a .xctest bundle directory on some layouts.
        while !FileManager.default.isExecutableFile(atPath: directory.appendingPathComponent("swiftlet").path),
              directory.pathComponents.count > 2 {
            directory.deleteLastPathComponent()
        }
        return directory.appendingPathComponent("swiftlet")
    }()

    /// A teaching guest assembled by `make guests`.
    static func guest(_ name: String) -> String {
        packageRoot.appendingPathComponent("guests/build/\(name).bin").path
    }

    struct Result {
        /// The exit status, or the signal number when the process ended by a signal.
        let status: Int32
        let stdout: String
        let stderr: String
        /// The signal that ended the process, if it ended by one.
        var signal: Int32? = nil
    }

    /// Runs `swiftlet` with `arguments`; standard input is /dev/null unless `input` is given.
    /// `whileRunning` gets the process once it started (to send it signals).
    /// `newSession` starts it with no controlling terminal (setsid); `addressSpaceLimit`
    /// caps its virtual memory (prlimit --as).
    /// `killAfter` kills it (SIGKILL) after that many seconds, for a test that must not
    /// hang when what it checks is that Swiftlet does not block.
    /// `namespace` runs it in that network namespace (`ip netns exec`).
    static func run(_ arguments: [String], input: Data? = nil, user: String? = nil, namespace: String? = nil, newSession: Bool = false,
                    addressSpaceLimit: UInt64? = nil, killAfter: Int? = nil,
                    whileRunning: ((Process, URL) -> Void)? = nil) throws -> Result {
        let scratch = FileManager.default.temporaryDirectory.appendingPathComponent("swiftlet-test-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: scratch, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: scratch) }
        let outURL = scratch.appendingPathComponent("stdout")
        let errURL = scratch.appendingPathComponent("stderr")
        _ = FileManager.default.createFile(atPath: outURL.path, contents: nil)
        _ = FileManager.default.createFile(atPath: errURL.path, contents: nil)

        let process = Process()
        // Wrappers from util-linux, innermost last.
        var command = [binary.path] + arguments
        if let user {
            // Drop root for the permission test.
            command = ["/usr/bin/setpriv", "--reuid=\(user)", "--regid=nogroup", "--clear-groups"] + command
        }
        if let namespace { command = ["/usr/sbin/ip", "netns", "exec", namespace] + command }
        if let addressSpaceLimit { command = ["/usr/bin/prlimit", "--as=\(addressSpaceLimit)"] + command }
        if newSession { command = ["/usr/bin/setsid", "--wait"] + command }
        if let killAfter { command = ["/usr/bin/timeout", "-s", "KILL", "\(killAfter)"] + command }
        process.executableURL = URL(fileURLWithPath: command[0])
        process.arguments = Array(command.dropFirst())
        process.standardOutput = try FileHandle(forWritingTo: outURL)
        process.standardError = try FileHandle(forWritingTo: errURL)
        let inputPipe = Pipe()
        if input != nil {
            process.standardInput = inputPipe
        } else {
            process.standardInput = FileHandle(forReadingAtPath: "/dev/null")
        }
        try process.run()
        if let input {
            inputPipe.fileHandleForWriting.write(input)
            try? inputPipe.fileHandleForWriting.close()
        }
        whileRunning?(process, outURL)
        process.waitUntilExit()
        return Result(status: process.terminationStatus,
                      stdout: (try? String(contentsOf: outURL, encoding: .utf8)) ?? "",
                      stderr: (try? String(contentsOf: errURL, encoding: .utf8)) ?? "",
                      signal: process.terminationReason == .uncaughtSignal ? process.terminationStatus : nil)
    }

    /// Runs `script` with /bin/sh, `$SWIFTLET` naming the binary (for redirections such
    /// as `2>&-` or `>/dev/full`). Returns its status and what it printed.
    static func runShell(_ script: String) throws -> Result {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: "/bin/sh")
        process.arguments = ["-c", script]
        process.environment = ["SWIFTLET": binary.path, "PATH": "/usr/bin:/bin"]
        let out = Pipe(), err = Pipe()
        process.standardOutput = out
        process.standardError = err
        process.standardInput = FileHandle(forReadingAtPath: "/dev/null")
        try process.run()
        let stdout = out.fileHandleForReading.readDataToEndOfFile()
        let stderr = err.fileHandleForReading.readDataToEndOfFile()
        process.waitUntilExit()
        return Result(status: process.terminationStatus, stdout: String(decoding: stdout, as: UTF8.self),
                      stderr: String(decoding: stderr, as: UTF8.self))
    }

    /// Waits until `file` contains `text` (the guest reached a point), up to `seconds`.
    static func waitFor(_ text: String, in file: URL, seconds: Double = 30) -> Bool {
        let deadline = Date().addingTimeInterval(seconds)
        while Date() < deadline {
            if let content = try? String(contentsOf: file, encoding: .utf8), content.contains(text) { return true }
            usleep(20_000)
        }
        return false
    }
}
