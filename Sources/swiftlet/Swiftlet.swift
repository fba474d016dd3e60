import ArgumentParser
import Glibc

/// The `swiftlet` command: a thin layer over the `Machine` library.
struct Swiftlet: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "swiftlet",
        abstract: "A minimal virtual machine monitor over Linux KVM.",
        discussion: """
            Swiftlet creates a virtual machine with /dev/kvm, loads a guest into its \
            memory and runs it. The guest's serial port (COM1) is your terminal.

            Run 'swiftlet run' with no arguments to boot the built-in hello guest.
            """,
        subcommands: [RunCommand.self, ImageCommand.self],
        defaultSubcommand: RunCommand.self
    )
}

@main
enum Main {
    static func main() {
        do {
            let arguments = ImageCommand.Resize.movingNegativeSize(Array(CommandLine.arguments.dropFirst()))
            var command = try Swiftlet.parseAsRoot(arguments)
            try command.run()
        } catch {
            let code = Swiftlet.exitCode(for: error)
            if code == .validationFailure {
                // A usage error: one line naming the problem, status 2 like other Unix tools.
                let message = Swiftlet.message(for: error)
                FileHandleOutput.standardError("swiftlet: \(message)\n(see 'swiftlet --help')")
                exit(2)
            }
            Swiftlet.exit(withError: error)
        }
    }
}

/// Writes to standard error with write(2), retrying on EINTR (stderr as a Glibc global
/// is not concurrency-safe in Swift 6).
enum FileHandleOutput {
    /// Writes `line` to standard error, adding a newline unless it has one or
    /// `endLine` is false (a progress bar redrawn in place).
    static func standardError(_ line: String, endLine: Bool = true) {
        var text = line.hasSuffix("\n") || !endLine ? line : line + "\n"
        text.withUTF8 { bytes in
            var offset = 0
            while offset < bytes.count {
                let written = write(STDERR_FILENO, bytes.baseAddress! + offset, bytes.count - offset)
                if written < 0 && errno == EINTR { continue }
                guard written > 0 else { return }
                offset += written
            }
        }
    }
}

/// A runtime failure already reported on stderr: exit with status 1.
struct ReportedFailure: Error {}

extension Swiftlet {
    /// Prints `swiftlet: <message>` on stderr and returns the error that exits with 1.
    static func fail(_ message: String) -> ExitCode {
        FileHandleOutput.standardError("swiftlet: \(message)")
        return ExitCode(1)
    }
}
