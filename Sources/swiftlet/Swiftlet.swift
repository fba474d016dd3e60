import ArgumentParser
import Basics
import Glibc
import SwiftletKit

/// The `swiftlet` command: a thin layer over the SwiftletKit library.
struct SwiftletCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "swiftlet",
        abstract: "A minimal virtual machine monitor over Linux KVM.",
        discussion: """
            Swiftlet creates a virtual machine with /dev/kvm, loads a guest into its \
            memory and runs it. The guest's serial port (COM1) is your terminal.

            Run 'swiftlet run' with no arguments to boot the built-in hello guest.
            """,
        version: "swiftlet \(swiftletVersion)",
        subcommands: [RunCommand.self, ImageCommand.self, CPUCommand.self, MonitorCommand.self, JailCommand.self],
        defaultSubcommand: RunCommand.self
    )
}

@main
enum Main {
    static func main() {
        StandardDescriptors.keepOccupied()
        // Started through a symlink named `firecracker`: Firecracker's command line.
        if let name = CommandLine.arguments.first?.split(separator: "/").last, name == "firecracker" {
            APIFrontEnd.runAsFirecracker(Array(CommandLine.arguments.dropFirst()))
        }
        do {
            // Not CommandLine.arguments: that reads /proc/self/cmdline, which a jail lacks.
            let commandLine = ProcessArguments.all
            var arguments = ImageCommand.Resize.movingNegativeSize(Array(commandLine.dropFirst()))
            // Called as `jailer` (a symlink): Firecracker jailer's command line.
            if commandLine.first?.split(separator: "/").last == "jailer" { arguments.insert("jail", at: 0) }
            var command = try SwiftletCommand.parseAsRoot(arguments)
            try command.run()
        } catch {
            let code = SwiftletCommand.exitCode(for: error)
            if code == .validationFailure {
                // A usage error: one line naming the problem, and the status Swiftlet uses
                // for its own failures (even, so no guest exit value can produce it).
                let message = SwiftletCommand.message(for: error)
                FileHandleOutput.standardError("swiftlet: \(message)\n(see 'swiftlet --help')")
                exit(VMExit.failureStatus)
            }
            SwiftletCommand.exit(withError: error)
        }
    }
}

/// File descriptors 0, 1 and 2 must be open before Swiftlet opens anything: if the
/// caller closed one (`2>&-`), the next file Swiftlet opens (a `--serial file:` log, a
/// disk image) would get that number, and Swiftlet's own messages would land in it.
enum StandardDescriptors {
    static func keepOccupied() {
        for fd in Int32(0)...2 where fcntl(fd, F_GETFD) < 0 && errno == EBADF {
            let null = open("/dev/null", fd == 0 ? O_RDONLY : O_WRONLY)
            if null >= 0 && null != fd {
                dup2(null, fd)
                close(null)
            }
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

extension SwiftletCommand {
    /// Prints `swiftlet: <message>` on stderr and returns the error that exits with
    /// Swiftlet's failure status (2).
    static func fail(_ message: String) -> ExitCode {
        FileHandleOutput.standardError("swiftlet: \(message)")
        return ExitCode(VMExit.failureStatus)
    }
}
