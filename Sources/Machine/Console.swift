import Devices
import Glibc
import Synchronization

/// Writes serial output to a file descriptor (stdout, or a file from `--serial file:PATH`).
public final class FileDescriptorSink: ByteSink {
    private let fd: Int32
    private let ownsDescriptor: Bool

    /// Standard output.
    public static let standardOutput = FileDescriptorSink(fd: STDOUT_FILENO, owns: false)

    init(fd: Int32, owns: Bool) {
        self.fd = fd
        self.ownsDescriptor = owns
    }

    /// Creates (or truncates) `path` for writing.
    public convenience init(path: String) throws(MachineError) {
        let fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644)
        guard fd >= 0 else { throw .cannotOpen(path: path, purpose: "serial output", errno: errno) }
        self.init(fd: fd, owns: true)
    }

    deinit { if ownsDescriptor { close(fd) } }

    public func write(_ bytes: UnsafeRawBufferPointer) {
        var offset = 0
        while offset < bytes.count {
            let written = Glibc.write(fd, bytes.baseAddress! + offset, bytes.count - offset)
            if written < 0 {
                if errno == EINTR { continue }
                return // the reader went away (closed pipe): drop output, keep the VM running
            }
            offset += written
        }
    }
}

/// Owns the host terminal while a VM runs: puts an interactive stdin into raw mode (so
/// keys reach the guest one by one, Ctrl-C included), reads it on a dedicated thread
/// into the UART, and restores the terminal on every exit path.
///
/// Escape sequences, like QEMU's: `Ctrl-A x` quits, `Ctrl-A Ctrl-A` sends a literal
/// Ctrl-A, `Ctrl-A h` prints help.
public final class Console: Sendable {
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

    /// Starts forwarding standard input to the guest.
    func start() {
        if isatty(STDIN_FILENO) == 1 { Self.enterRawMode() }
        NamedThread.spawn(name: "console-input") { [self] in readLoop() }
    }

    private func readLoop() {
        var buffer = [UInt8](repeating: 0, count: 256)
        var escapePending = false
        while !stop.isStopping {
            let count = buffer.withUnsafeMutableBytes { read(STDIN_FILENO, $0.baseAddress, $0.count) }
            if count < 0 && errno == EINTR { continue }
            guard count > 0 else { return } // EOF or error: the guest just gets no more input
            var forward: [UInt8] = []
            forward.reserveCapacity(count)
            for byte in buffer[0..<count] {
                if escapePending {
                    escapePending = false
                    switch byte {
                    case UInt8(ascii: "x"), UInt8(ascii: "X"):
                        stop.stop(.userQuit)
                        return
                    case UInt8(ascii: "h"), UInt8(ascii: "H"), UInt8(ascii: "?"):
                        printHelp()
                    case Self.escape:
                        forward.append(Self.escape)
                    default:
                        forward.append(Self.escape)
                        forward.append(byte)
                    }
                } else if byte == Self.escape {
                    escapePending = true
                } else {
                    forward.append(byte)
                }
            }
            if !forward.isEmpty { serial.receive(forward) }
        }
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
    public static func restoreTerminal() {
        guard var settings = savedTerminal.withLock({ saved -> termios? in
            defer { saved = nil }
            return saved
        }) else { return }
        tcsetattr(STDIN_FILENO, TCSANOW, &settings)
    }
}
