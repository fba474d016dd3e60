import ArgumentParser
import Glibc
import SwiftletKit

/// `swiftlet monitor PATH COMMAND...`: sends one command to the monitor of a running
/// Swiftlet (`swiftlet run --monitor PATH`) and prints its answer.
struct MonitorCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "monitor",
        abstract: "Send a command to a running VM's monitor socket.",
        discussion: """
            Connects to the Unix socket given to 'swiftlet run --monitor PATH', sends \
            the command and prints the one-line answer. Commands: status, stop, cont, \
            snapshot [--diff] DIR, migrate unix:PATH|tcp:HOST:PORT, migrate_set_parameter, quit, help. An answer \
            starting with 'error:' goes to stderr and gives status 2. 'migrate' \
            returns when the migration has ended.

            EXAMPLES
              swiftlet monitor /tmp/vm.sock status
              swiftlet monitor /tmp/vm.sock migrate unix:/tmp/target.sock
            """
    )

    @Argument(help: ArgumentHelp("The monitor's Unix socket.", valueName: "path"))
    var path: String

    @Argument(parsing: .captureForPassthrough, help: ArgumentHelp("The command and its arguments.", valueName: "command"))
    var command: [String] = []

    func validate() throws {
        guard !command.isEmpty else { throw ValidationError("give a command (try 'help')") }
        guard path.utf8.count < 108 else { throw ValidationError("'\(path)' is too long for a Unix socket path") }
    }

    func run() throws {
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { throw SwiftletCommand.fail("socket: \(String(cString: strerror(errno)))") }
        defer { close(fd) }
        var address = sockaddr_un()
        address.sun_family = sa_family_t(AF_UNIX)
        withUnsafeMutableBytes(of: &address.sun_path) { buffer in
            for (index, byte) in path.utf8.enumerated() { buffer[index] = byte }
        }
        let connected = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        guard connected == 0 else {
            throw SwiftletCommand.fail("cannot connect to the monitor at '\(path)': \(String(cString: strerror(errno)))")
        }
        let line = Array((command.joined(separator: " ") + "\n").utf8)
        guard line.withUnsafeBytes({ send(fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }) == line.count else {
            throw SwiftletCommand.fail("cannot send to the monitor at '\(path)': \(String(cString: strerror(errno)))")
        }
        var answer: [UInt8] = []
        var byte: UInt8 = 0
        while true {
            let count = read(fd, &byte, 1)
            if count < 0, errno == EINTR { continue }
            guard count == 1 else { break }
            if byte == UInt8(ascii: "\n") { break }
            answer.append(byte)
        }
        let text = String(decoding: answer, as: UTF8.self)
        guard !text.isEmpty else { throw SwiftletCommand.fail("the monitor at '\(path)' closed the connection without an answer") }
        if text.hasPrefix("error: ") { throw SwiftletCommand.fail(String(text.dropFirst(7))) }
        print(text)
    }
}
