import Foundation
import Testing

/// Bad input gets one clear line on stderr and Swiftlet's failure status (2, even, so no
/// guest exit value can be mistaken for it), never a trap.
@Suite("Command-line errors")
struct CommandLineTests {
    @Test("A missing flat binary: status 2, one line naming the file")
    func missingFile() throws {
        let result = try Swiftlet.run(["run", "--flat", "/nonexistent/guest.bin"])
        #expect(result.status == 2)
        #expect(result.stderr == "swiftlet: cannot open flat binary '/nonexistent/guest.bin': No such file or directory\n")
    }

    @Test("A directory or an empty file is not a guest")
    func notAGuest() throws {
        let directory = try Swiftlet.run(["run", "--flat", "/tmp"])
        #expect(directory.status == 2)
        #expect(directory.stderr == "swiftlet: cannot open flat binary '/tmp': it is a directory, not a regular file\n")
        let empty = FileManager.default.temporaryDirectory.appendingPathComponent("empty-\(UUID().uuidString).bin")
        try Data().write(to: empty)
        defer { try? FileManager.default.removeItem(at: empty) }
        let result = try Swiftlet.run(["run", "--flat", empty.path])
        #expect(result.status == 2)
        #expect(result.stderr == "swiftlet: the flat binary is empty\n")
    }

    @Test("A memory size that cannot be parsed is a usage error (status 2)", arguments: ["64X", "lots", "1.5G", "-1"])
    func badMemorySize(size: String) throws {
        let result = try Swiftlet.run(["run", "--memory", size])
        #expect(result.status == 2)
        #expect(result.stderr.hasPrefix("swiftlet: "))
        #expect(result.stderr.contains("--memory"))
        #expect(result.stderr.split(separator: "\n").count <= 2)
    }

    @Test("A memory size that does not fit: status 2")
    func memoryTooLarge() throws {
        let result = try Swiftlet.run(["run", "--memory", "2T"])
        #expect(result.status == 2)
        #expect(result.stderr == "swiftlet: invalid guest memory size 2199023255552 bytes: larger than the maximum of 1T\n")
        let unaligned = try Swiftlet.run(["run", "--memory", "1001K"])
        #expect(unaligned.status == 2)
        #expect(unaligned.stderr.contains("must be a multiple of 4 KiB"))
    }

    @Test("No KVM device: status 2 and what to do about it")
    func kvmMissing() throws {
        let result = try Swiftlet.run(["run", "--kvm-device", "/nonexistent/kvm"])
        #expect(result.status == 2)
        #expect(result.stderr.hasPrefix("swiftlet: /nonexistent/kvm does not exist: this machine has no KVM"))
        #expect(result.stderr.split(separator: "\n").count == 1)
    }

    @Test("A device or file that is not KVM fails cleanly, naming it")
    func notKVM() throws {
        let result = try Swiftlet.run(["run", "--kvm-device", "/dev/null"])
        #expect(result.status == 2)
        #expect(result.stderr == "swiftlet: /dev/null is not a KVM device (KVM_GET_API_VERSION is not supported by it)\n")
        let file = try Swiftlet.run(["run", "--kvm-device", Swiftlet.guest("idle")])
        #expect(file.status == 2)
        #expect(file.stderr.contains("is not a KVM device"))
    }

    @Test("/dev/tty with no controlling terminal: no device answers, not 'does not exist'")
    func ttyWithoutTerminal() throws {
        // setsid gives the child no controlling terminal, whatever the test runner has.
        let result = try Swiftlet.run(["run", "--kvm-device", "/dev/tty"], newSession: true)
        #expect(result.status == 2)
        #expect(result.stderr == "swiftlet: cannot open /dev/tty: no device answers behind it (No such device or address)\n")
    }

    @Test("No permission on /dev/kvm: status 2 and a hint", .enabled(if: getuid() == 0, "needs root to drop to another user"))
    func kvmPermission() throws {
        let result = try Swiftlet.run(["run"], user: "nobody")
        #expect(result.status == 2)
        #expect(result.stderr == "swiftlet: permission denied opening /dev/kvm: add your user to the 'kvm' group or run as root\n")
    }

    @Test("Usage errors are one line with status 2", arguments: [
        ["run", "--cpus", "0"], ["run", "--timeout", "-3"], ["run", "--serial", "tcp:1234"], ["run", "--no-such-flag"],
    ])
    func usageErrors(arguments: [String]) throws {
        let result = try Swiftlet.run(arguments)
        #expect(result.status == 2)
        #expect(result.stderr.hasPrefix("swiftlet: "))
    }

    @Test("--help explains the loading convention and the exit statuses")
    func help() throws {
        let result = try Swiftlet.run(["run", "--help"])
        #expect(result.status == 0)
        #expect(result.stdout.contains("0x7C00"))
        #expect(result.stdout.contains("EXIT STATUS"))
        #expect(result.stdout.contains("Ctrl-A then x"))
        // Each reset and power-off path with its register and value. (The help text is
        // wrapped to the terminal width: compare with the line breaks taken out.)
        let text = result.stdout.split(whereSeparator: \.isWhitespace).joined(separator: " ")
        #expect(text.contains("SLP_TYP 0 (0x2000) written to PM1a_CNT at port 0x604"))
        #expect(text.contains("0xFE to the keyboard controller (port 0x64)"))
        #expect(text.contains("reset control register (port 0xCF9, which the FADT's RESET_REG names with value 0x06)"))
        #expect(text.contains("bit 0 of port 0x92"))
        #expect(text.contains("a triple fault with --triple-fault reset"))
    }
}
