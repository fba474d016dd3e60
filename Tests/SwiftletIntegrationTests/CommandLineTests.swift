import Foundation
import Testing

/// Bad input gets one clear line on stderr and a non-zero status, never a trap.
@Suite("Command-line errors")
struct CommandLineTests {
    @Test("A missing flat binary: status 1, one line naming the file")
    func missingFile() throws {
        let result = try Swiftlet.run(["run", "--flat", "/nonexistent/guest.bin"])
        #expect(result.status == 1)
        #expect(result.stderr == "swiftlet: cannot read flat binary '/nonexistent/guest.bin': No such file or directory\n")
    }

    @Test("A directory or an empty file is not a guest")
    func notAGuest() throws {
        let directory = try Swiftlet.run(["run", "--flat", "/tmp"])
        #expect(directory.status == 1)
        #expect(directory.stderr == "swiftlet: flat binary '/tmp' is not a regular file\n")
        let empty = FileManager.default.temporaryDirectory.appendingPathComponent("empty-\(UUID().uuidString).bin")
        try Data().write(to: empty)
        defer { try? FileManager.default.removeItem(at: empty) }
        let result = try Swiftlet.run(["run", "--flat", empty.path])
        #expect(result.status == 1)
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

    @Test("A memory size that does not fit: status 1")
    func memoryTooLarge() throws {
        let result = try Swiftlet.run(["run", "--memory", "2T"])
        #expect(result.status == 1)
        #expect(result.stderr == "swiftlet: invalid guest memory size 2199023255552 bytes: larger than the maximum of 1T\n")
        let unaligned = try Swiftlet.run(["run", "--memory", "1001K"])
        #expect(unaligned.status == 1)
        #expect(unaligned.stderr.contains("must be a multiple of 4 KiB"))
    }

    @Test("No KVM device: status 1 and what to do about it")
    func kvmMissing() throws {
        let result = try Swiftlet.run(["run", "--kvm-device", "/nonexistent/kvm"])
        #expect(result.status == 1)
        #expect(result.stderr.hasPrefix("swiftlet: /nonexistent/kvm does not exist: this machine has no KVM"))
        #expect(result.stderr.split(separator: "\n").count == 1)
    }

    @Test("A device that is not KVM fails cleanly")
    func notKVM() throws {
        let result = try Swiftlet.run(["run", "--kvm-device", "/dev/null"])
        #expect(result.status == 1)
        #expect(result.stderr.hasPrefix("swiftlet: KVM_GET_API_VERSION failed"))
    }

    @Test("No permission on /dev/kvm: status 1 and a hint", .enabled(if: getuid() == 0, "needs root to drop to another user"))
    func kvmPermission() throws {
        let result = try Swiftlet.run(["run"], user: "nobody")
        #expect(result.status == 1)
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
    }
}
