import Basics
import Devices
import EventLoop
import Glibc
import Synchronization

/// Writes serial output to a file descriptor (stdout, or a file from `--serial file:PATH`).
///
/// Output is never lost silently: the first failed write (a full disk, `/dev/full`, a
/// reader that went away) is reported once through `onFailure` and kept in ``failure``;
/// later output is dropped so the guest does not stall on a console nobody reads.
public final class FileDescriptorSink: ByteSink {
    private let fd: Int32
    private let ownsDescriptor: Bool
    private let name: String
    private let state = Mutex<(failure: String?, reporter: (@Sendable (String) -> Void)?)>((nil, nil))

    /// Standard output.
    public static var standardOutput: FileDescriptorSink { FileDescriptorSink(fd: STDOUT_FILENO, owns: false, name: "standard output") }

    init(fd: Int32, owns: Bool, name: String) {
        self.fd = fd
        self.ownsDescriptor = owns
        self.name = name
    }

    /// Creates (or truncates) `path` for writing. A regular file or a character device
    /// (`/dev/null`, a terminal) is accepted; a FIFO, a socket or a directory is refused
    /// at once instead of blocking.
    public convenience init(path: String) throws(MachineError) {
        let fd: Int32
        do {
            fd = try HostFile.open(path, purpose: "serial output", flags: O_WRONLY | O_CREAT | O_TRUNC,
                                   accepting: [.regular, .characterDevice])
        } catch { throw MachineError(error) }
        self.init(fd: fd, owns: true, name: "'\(path)'")
    }

    deinit { if ownsDescriptor { close(fd) } }

    /// Called once, with a one-line message, when a write first fails.
    public func onFailure(_ report: @escaping @Sendable (String) -> Void) {
        state.withLock { $0.reporter = report }
    }

    /// Why output stopped, if a write failed.
    public var failure: String? { state.withLock { $0.failure } }

    public func write(_ bytes: UnsafeRawBufferPointer) {
        guard state.withLock({ $0.failure == nil }) else { return }
        var offset = 0
        while offset < bytes.count {
            let written = Glibc.write(fd, bytes.baseAddress! + offset, bytes.count - offset)
            if written < 0 {
                let err = errno
                if err == EINTR { continue }
                fail("console output to \(name) failed (\(String(cString: strerror(err)))); the guest's further output is dropped")
                return
            }
            offset += written
        }
    }

    private func fail(_ message: String) {
        let reporter = state.withLock { state -> (@Sendable (String) -> Void)? in
            guard state.failure == nil else { return nil }
            state.failure = message
            return state.reporter
        }
        reporter?(message)
    }
}

/// A sink that keeps everything written to it: the console of a VM run by a test.
public final class CapturingSink: ByteSink {
    private let buffer = Mutex<[UInt8]>([])

    public init() {}

    public func write(_ bytes: UnsafeRawBufferPointer) {
        buffer.withLock { $0.append(contentsOf: bytes) }
    }

    /// Everything written so far.
    public var bytes: [UInt8] { buffer.withLock { $0 } }
}

/// Owns the host terminal while a VM runs: puts an interactive stdin into raw mode (so
/// keys reach the guest one by one, Ctrl-C included), reads it from the event loop into
/// the UART, and restores the terminal on every exit path.
///
/// Escape sequences, like QEMU's: `Ctrl-A x` quits, `Ctrl-A Ctrl-A` sends a literal
/// Ctrl-A, `Ctrl-A h` prints help.
final class Console: Sendable {
    /// Where a `Ctrl-A` sequence stands between two reads; touched only on the loop thread.
    private final class EscapeState: @unchecked Sendable {
        // @unchecked Sendable: used only by the event loop's thread, one handler at a time.
        var escapePending = false
        var registration: EventLoop.Registration?
    }

    static let escape: UInt8 = 0x01 // Ctrl-A

    /// The terminal settings to put back, saved before raw mode (nil when stdin is no TTY).
    private static let savedTerminal = Mutex<termios?>(nil)

    private let serial: Serial16550
    private let stop: StopController
    private let output: any ByteSink

    init(serial: Serial16550, stop: StopController, output: any ByteSink) {
        self.serial = serial
        self.stop = stop
        self.output = output
    }

    /// Forwards standard input to the guest from the event loop: a terminal, a pipe or
    /// a socket is watched for input; a regular file or `/dev/null`, which epoll cannot
    /// watch and which never blocks, is read to its end at once.
    func attach(to loop: EventLoop) throws(SystemError) {
        if isatty(STDIN_FILENO) == 1 { Self.enterRawMode() }
        let state = EscapeState()
        do {
            // The registration is set before the loop's thread starts, so the handler sees it.
            state.registration = try loop.register(STDIN_FILENO, for: .readable, owner: state) { [self] _ in
                if !readAvailable(state), let registration = state.registration { loop.unregister(registration) }
            }
        } catch let error where error.errno == EPERM {
            loop.schedule { [self] in while readAvailable(state) {} }
        }
    }

    /// Reads what standard input has (one `read`) and passes it on; `false` at the end of
    /// input, on an error, or after `Ctrl-A x`.
    private func readAvailable(_ state: EscapeState) -> Bool {
        var buffer = [UInt8](repeating: 0, count: 4096)
        var count: Int
        repeat {
            count = buffer.withUnsafeMutableBytes { read(STDIN_FILENO, $0.baseAddress, $0.count) }
        } while count < 0 && errno == EINTR
        guard count > 0 else { return false } // EOF or error: the guest just gets no more input
        var forward: [UInt8] = []
        forward.reserveCapacity(count)
        for byte in buffer[0..<count] {
            if state.escapePending {
                state.escapePending = false
                switch byte {
                case UInt8(ascii: "x"), UInt8(ascii: "X"):
                    if !forward.isEmpty { serial.receive(forward) }
                    stop.stop(.userQuit)
                    return false
                case UInt8(ascii: "h"), UInt8(ascii: "H"), UInt8(ascii: "?"):
                    printHelp()
                case Self.escape:
                    forward.append(Self.escape)
                default:
                    forward.append(Self.escape)
                    forward.append(byte)
                }
            } else if byte == Self.escape {
                state.escapePending = true
            } else {
                forward.append(byte)
            }
        }
        if !forward.isEmpty { serial.receive(forward) }
        return true
    }

    private func printHelp() {
        let help = "\r\nC-a x    exit Swiftlet\r\nC-a h    print this help\r\nC-a C-a  send C-a to the guest\r\n"
        Array(help.utf8).withUnsafeBytes { output.write($0) }
    }

    private static func enterRawMode() {
        var settings = termios()
        guard tcgetattr(STDIN_FILENO, &settings) == 0 else { return }
        savedTerminal.withLock { $0 = settings }
        atexit { Console.restoreTerminal() }
        var raw = settings
        cfmakeraw(&raw)
        // Keep output post-processing, so a guest's bare "\n" still starts a new line.
        raw.c_oflag |= tcflag_t(OPOST | ONLCR)
        tcsetattr(STDIN_FILENO, TCSANOW, &raw)
    }

    /// Puts the terminal back as it was. Safe to call more than once, from any thread.
    static func restoreTerminal() {
        guard var settings = savedTerminal.withLock({ saved -> termios? in
            defer { saved = nil }
            return saved
        }) else { return }
        tcsetattr(STDIN_FILENO, TCSANOW, &settings)
    }
}
