import Basics
import Dispatch
import EventLoop
import Glibc
import Synchronization

/// The monitor: a Unix socket on which a person (`socat - UNIX-CONNECT:PATH`) or a program
/// (`swiftlet monitor PATH COMMAND`) controls the running VM, one command per line and one
/// line back for each, as QEMU's human monitor: `status`, `stop`, `cont`, `snapshot [--diff] DIR`,
/// `migrate ADDRESS`, `quit` (``Machine/monitorCommand(_:reply:)``).
///
/// Owns the listening socket and its connections. They are served from the VM's event
/// loop, which only reads lines; commands run on a queue of their own (a pause waits for
/// every vCPU, a migration runs on its own thread), never on a vCPU thread or the loop.
final class MonitorServer: Sendable {
    typealias Execute = @Sendable (_ line: String, _ reply: @escaping @Sendable (String) -> Void) -> Void

    /// The longest command line read; a longer one is answered with an error and dropped.
    static let maximumLine = 4096

    let path: String
    private let listener: OwnedFileDescriptor
    private let loop: EventLoop
    private let execute: Execute
    private let commands = DispatchQueue(label: "swiftlet.monitor")
    private let registrations = Mutex<[Int32: EventLoop.Registration]>([:])

    /// Listens on `path` (a socket left there by an earlier Swiftlet is replaced; any other
    /// file is refused) and serves it on `loop`.
    init(path: String, loop: EventLoop, execute: @escaping Execute) throws(MachineError) {
        self.path = path
        self.loop = loop
        self.execute = execute
        guard !path.isEmpty, path.utf8.count < 108 else { throw .invalidConfiguration("--monitor: '\(path)' is not a Unix socket path (1 to 107 bytes)") }
        var status = stat()
        if lstat(path, &status) == 0 {
            guard status.st_mode & S_IFMT == S_IFSOCK else { throw .invalidConfiguration("--monitor: '\(path)' exists and is not a socket") }
            unlink(path)
        }
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue) | Int32(SOCK_NONBLOCK.rawValue), 0)
        guard fd >= 0 else { throw .invalidConfiguration("--monitor: socket: \(String(cString: strerror(errno)))") }
        listener = OwnedFileDescriptor(owning: fd)
        var address = MigrationSocket.unixAddress(path)
        let bound = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        guard bound == 0, listen(fd, 8) == 0 else {
            throw .invalidConfiguration("--monitor: cannot listen on '\(path)': \(String(cString: strerror(errno)))")
        }
        do {
            let registration = try loop.register(fd, for: .readable, owner: listener) { [self] _ in acceptConnection() }
            registrations.withLock { $0[fd] = registration }
        } catch {
            unlink(path)
            throw .invalidConfiguration("--monitor: \(error)")
        }
    }

    /// Stops serving: the connections are closed and the socket file removed.
    func close() {
        for registration in registrations.withLock({ state in defer { state.removeAll() }; return Array(state.values) }) {
            loop.unregister(registration)
        }
        unlink(path)
    }

    private func acceptConnection() {
        let fd = accept(listener.rawValue, nil, nil)
        guard fd >= 0 else { return }
        _ = fcntl(fd, F_SETFD, FD_CLOEXEC)
        // A client that stops reading cannot hold the command queue for long.
        var limit = timeval(tv_sec: 5, tv_usec: 0)
        setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &limit, socklen_t(MemoryLayout<timeval>.size))
        let connection = MonitorConnection(fd: fd)
        do {
            let registration = try loop.register(fd, for: .readable, owner: connection) { [self] _ in read(connection) }
            registrations.withLock { $0[fd] = registration }
        } catch {
            return
        }
    }

    /// Reads what arrived (the descriptor is readable: one read does not block) and runs
    /// each complete line.
    private func read(_ connection: MonitorConnection) {
        var chunk = [UInt8](repeating: 0, count: 1024)
        let count = chunk.withUnsafeMutableBytes { Glibc.read(connection.fd.rawValue, $0.baseAddress, $0.count) }
        if count < 0, errno == EINTR || errno == EAGAIN { return }
        guard count > 0 else {
            if let registration = registrations.withLock({ $0.removeValue(forKey: connection.fd.rawValue) }) { loop.unregister(registration) }
            return
        }
        for line in connection.take(chunk[0..<count]) {
            guard let line else {
                connection.write("error: a command line is longer than \(Self.maximumLine) bytes")
                continue
            }
            let trimmed = line.trimmingCharacters(in: " \t\r")
            guard !trimmed.isEmpty else { continue }
            commands.async { [execute] in execute(trimmed) { connection.write($0) } }
        }
    }
}

/// One client of the monitor: its socket and the part of a line read so far.
final class MonitorConnection: Sendable {
    let fd: OwnedFileDescriptor
    private let partial = Mutex<[UInt8]>([])

    init(fd: Int32) { self.fd = OwnedFileDescriptor(owning: fd) }

    /// Adds `bytes` and returns the complete lines (`nil` for one that was too long).
    func take(_ bytes: ArraySlice<UInt8>) -> [String?] {
        partial.withLock { buffer in
            var lines: [String?] = []
            for byte in bytes {
                if byte == UInt8(ascii: "\n") {
                    lines.append(buffer.count > MonitorServer.maximumLine ? nil : String(decoding: buffer, as: UTF8.self))
                    buffer.removeAll()
                } else if buffer.count <= MonitorServer.maximumLine {
                    buffer.append(byte)
                }
            }
            return lines
        }
    }

    /// Writes `line` and a newline (a client gone is ignored).
    func write(_ line: String) {
        let bytes = Array((line + "\n").utf8)
        var done = 0
        while done < bytes.count {
            let sent = bytes.withUnsafeBytes { send(fd.rawValue, $0.baseAddress! + done, bytes.count - done, Int32(MSG_NOSIGNAL)) }
            if sent < 0, errno == EINTR { continue }
            guard sent > 0 else { return }
            done += sent
        }
    }
}

extension String {
    /// The string without `characters` at either end.
    func trimmingCharacters(in characters: String) -> String {
        let set = Set(characters)
        var slice = self[...]
        while let first = slice.first, set.contains(first) { slice = slice.dropFirst() }
        while let last = slice.last, set.contains(last) { slice = slice.dropLast() }
        return String(slice)
    }
}

extension Machine {
    /// The monitor's commands, as a QEMU user would type them.
    static let monitorHelp = "commands: status (info status), stop (pause), cont (resume), snapshot [--diff] DIR, "
        + "migrate unix:PATH|tcp:HOST:PORT, migrate_set_parameter downtime-limit|max-bandwidth|max-rounds VALUE, quit (q), help"

    /// Runs one monitor command and answers with one line through `reply` (an error starts
    /// with `error: `). Blocks while the command runs; a migration runs on a thread of its
    /// own, so `status` is answered meanwhile.
    func monitorCommand(_ line: String, reply: @escaping @Sendable (String) -> Void) {
        let words = line.split(whereSeparator: { $0 == " " || $0 == "\t" }).map(String.init)
        guard let command = words.first?.lowercased() else { return }
        let arguments = Array(words.dropFirst())
        func expect(_ count: Int, _ usage: String) -> Bool {
            guard arguments.count == count else {
                reply("error: usage: \(usage)")
                return false
            }
            return true
        }
        func run(_ body: () throws(MachineError) -> String) {
            do { reply(try body()) } catch { reply("error: \(error.description)") }
        }
        switch command {
        case "help", "?":
            reply(Self.monitorHelp)
        case "status", "info":
            guard command == "status" ? expect(0, "status") : expect(1, "info status") else { return }
            if command == "info", arguments[0] != "status" { return reply("error: only 'info status' is known") }
            reply("VM status: \(state.rawValue)" + (isMigrating ? " (migrating)" : ""))
        case "stop", "pause":
            guard expect(0, command) else { return }
            run { () throws(MachineError) in
                guard !isMigrating else { throw .migration("a migration is under way; wait for it to end") }
                try pause()
                return "VM status: paused"
            }
        case "cont", "c", "resume":
            guard expect(0, command) else { return }
            run { () throws(MachineError) in
                guard !isMigrating else { throw .migration("a migration is under way; wait for it to end") }
                try resume()
                return "VM status: running"
            }
        case "snapshot", "savevm":
            let diff = arguments.first == "--diff"
            let rest = diff ? Array(arguments.dropFirst()) : arguments
            guard rest.count == 1 else { return reply("error: usage: snapshot [--diff] DIR") }
            run { () throws(MachineError) in
                guard !isMigrating else { throw .migration("a migration is under way; wait for it to end") }
                // A running VM is paused for the snapshot and goes on afterwards, as QEMU's savevm.
                let wasRunning = state == .running
                if wasRunning { try pause() }
                defer { if wasRunning { try? resume() } }
                let summary = try snapshot(to: rest[0], diff: diff)
                return "snapshot written to \(summary.location): \(summary.pagesWritten) pages of RAM, state \(summary.stateBytes) bytes, "
                    + MachineMigrationSummary.milliseconds(summary.nanoseconds)
            }
        case "migrate":
            guard expect(1, "migrate unix:PATH|tcp:HOST:PORT") else { return }
            let address: MigrationAddress
            do { address = try MigrationAddress(parsing: arguments[0]) } catch { return reply("error: \(error.description)") }
            do {
                _ = try NamedThread(name: "migration") { [self] in
                    do {
                        _ = try migrate(to: address, options: migrationParameters.withLock { $0 }) { summary in reply("migration completed: the VM runs at \(address) now; \(summary)") }
                    } catch {
                        reply("error: \(error); the VM goes on here")
                    }
                }
            } catch {
                reply("error: \(error)")
            }
        case "migrate_set_parameter":
            guard expect(2, "migrate_set_parameter downtime-limit MS|max-bandwidth BYTES_PER_SECOND|max-rounds N") else { return }
            guard let value = Double(arguments[1]), value >= 0, value.isFinite else {
                return reply("error: '\(arguments[1])' is not a number")
            }
            switch arguments[0] {
            case "downtime-limit": migrationParameters.withLock { $0.downtimeTarget = value / 1000 }
            case "max-bandwidth": migrationParameters.withLock { $0.maximumBandwidth = value > 0 ? value : nil }
            case "max-rounds":
                guard value >= 1, value <= 10_000 else { return reply("error: max-rounds is from 1 to 10000") }
                migrationParameters.withLock { $0.maximumRounds = Int(value) }
            default: return reply("error: unknown parameter '\(arguments[0])' (downtime-limit, max-bandwidth, max-rounds)")
            }
            reply("\(arguments[0]) = \(arguments[1])")
        case "quit", "q":
            guard expect(0, command) else { return }
            reply("bye")
            stop.stop(.userQuit)
        default:
            reply("error: unknown command '\(words[0])' (try 'help')")
        }
    }
}
