import Foundation
import Testing

/// The console on a real terminal: Swiftlet switches it to raw mode and puts it back on
/// every way out. A pseudo-terminal stands in for the user's terminal; Python's `pty`
/// and `termios` modules drive it (python3 is on every machine this project runs on).
@Suite("Interactive console")
struct TerminalTests {
    /// Runs the idle guest on a pseudo-terminal, ends it the way `ending` says, and
    /// prints "status=N raw=True restored=True".
    static let script = #"""
    import os, pty, signal, subprocess, sys, termios, time
    binary, guest, ending = sys.argv[1:4]
    master, slave = pty.openpty()
    before = termios.tcgetattr(slave)
    p = subprocess.Popen([binary, "run", "--flat", guest, "--timeout", "3" if ending == "timeout" else "60"],
                         stdin=slave, stdout=slave, stderr=slave, close_fds=True)
    seen = b""
    deadline = time.time() + 30
    while b"idle" not in seen and time.time() < deadline:
        seen += os.read(master, 4096)
    raw = not (termios.tcgetattr(slave)[3] & termios.ICANON)
    if ending == "escape":
        os.write(master, b"\x01x")
    elif ending == "sigterm":
        p.send_signal(signal.SIGTERM)
    elif ending == "sighup":
        p.send_signal(signal.SIGHUP)
    elif ending == "sigquit":
        p.send_signal(signal.SIGQUIT)
    p.wait(timeout=30)
    print(f"status={p.returncode} raw={raw} restored={termios.tcgetattr(slave) == before}")
    """#

    /// A signal's "status" is Python's -N: Swiftlet ends by the signal itself.
    @Test("Raw mode while running; the terminal is restored after each way out", arguments: [
        ("escape", 0), ("sigterm", -15), ("sighup", -1), ("sigquit", -3), ("timeout", 124),
    ])
    func rawModeRestored(ending: String, status: Int) throws {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: "/usr/bin/env")
        process.arguments = ["python3", "-c", Self.script, Swiftlet.binary.path, Swiftlet.guest("idle"), ending]
        let output = Pipe()
        process.standardOutput = output
        try process.run()
        let text = String(decoding: output.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
        process.waitUntilExit()
        #expect(text.trimmingCharacters(in: .whitespacesAndNewlines) == "status=\(status) raw=True restored=True")
    }
}
