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
        let status: Int32
        let stdout: String
        let stderr: String
    }

    /// Runs `swiftlet` with `arguments`; standard input is /dev/null unless `input` is given.
    /// `whileRunning` gets the process once it started (to send it signals).
    static func run(_ arguments: [String], input: Data? = nil, user: String? = nil,
                    whileRunning: ((Process, URL) -> Void)? = nil) throws -> Result {
        let scratch = FileManager.default.temporaryDirectory.appendingPathComponent("swiftlet-test-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: scratch, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: scratch) }
        let outURL = scratch.appendingPathComponent("stdout")
        let errURL = scratch.appendingPathComponent("stderr")
        _ = FileManager.default.createFile(atPath: outURL.path, contents: nil)
        _ = FileManager.default.createFile(atPath: errURL.path, contents: nil)

        let process = Process()
        if let user {
            // Drop root for the permission test: setpriv comes with util-linux.
            process.executableURL = URL(fileURLWithPath: "/usr/bin/setpriv")
            process.arguments = ["--reuid=\(user)", "--regid=nogroup", "--clear-groups", binary.path] + arguments
        } else {
            process.executableURL = binary
            process.arguments = arguments
        }
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
                      stderr: (try? String(contentsOf: errURL, encoding: .utf8)) ?? "")
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
