import Foundation
import Glibc
import Testing

/// What a hostile-input campaign found: files that would block, lost output, closed
/// standard descriptors. Each case ends quickly with one clear line.
@Suite("Special files and lost output")
struct HardeningTests {
    /// A FIFO nobody writes to: `open` for reading would block until a writer comes.
    static func makeFIFO() throws -> URL {
        let path = FileManager.default.temporaryDirectory.appendingPathComponent("fifo-\(UUID().uuidString)")
        guard mkfifo(path.path, 0o600) == 0 else { throw CocoaError(.fileWriteUnknown) }
        return path
    }

    @Test("A FIFO is refused at once as a kernel, an initrd, a flat binary or the serial log", arguments: [
        "--kernel", "--initrd", "--flat", "--serial",
    ])
    func fifoIsRefused(option: String) throws {
        let fifo = try Self.makeFIFO()
        defer { try? FileManager.default.removeItem(at: fifo) }
        var arguments = ["run"]
        switch option {
        case "--initrd":
            arguments += ["--kernel", Swiftlet.packageRoot.appendingPathComponent("guests/build/multiboot.elf").path, "--initrd", fifo.path]
        case "--serial":
            arguments += ["--serial", "file:\(fifo.path)"]
        default:
            arguments += [option, fifo.path]
        }
        let result = try Swiftlet.run(arguments, killAfter: 20)
        #expect(result.signal == nil, "swiftlet blocked on the FIFO and was killed")
        #expect(result.status == 2)
        #expect(result.stderr.hasPrefix("swiftlet: cannot open "))
        #expect(result.stderr.contains(fifo.path))
        #expect(result.stderr.contains("FIFO"))
        #expect(result.stderr.split(separator: "\n").count == 1)
    }

    @Test("With stderr closed, Swiftlet's messages do not end up in the serial log")
    func closedStandardError() throws {
        let log = FileManager.default.temporaryDirectory.appendingPathComponent("serial-\(UUID().uuidString)")
        defer { try? FileManager.default.removeItem(at: log) }
        let idle = Swiftlet.guest("idle")
        let result = try Swiftlet.runShell("exec \"$SWIFTLET\" run --flat \(idle) --timeout 1 --trace-exits --serial file:\(log.path) 2>&-")
        #expect(result.status == 124)
        let text = try String(contentsOf: log, encoding: .utf8)
        #expect(text.hasSuffix("idle\n"), "the serial log holds: \(text)")
        #expect(!text.contains("swiftlet:") && !text.contains("VM exits"), "Swiftlet's messages went into the serial log: \(text)")
    }

    @Test("A console that cannot be written is reported once, not silently dropped")
    func consoleToFullDevice() throws {
        let file = try Swiftlet.run(["run", "--serial", "file:/dev/full"])
        #expect(file.status == 1)
        #expect(file.stderr == "swiftlet: console output to '/dev/full' failed (No space left on device); the guest's further output is dropped\n")

        let stdout = try Swiftlet.runShell("exec \"$SWIFTLET\" run >/dev/full")
        #expect(stdout.status == 1)
        #expect(stdout.stderr == "swiftlet: console output to standard output failed (No space left on device); the guest's further output is dropped\n")
    }
}

/// The host copy of a kernel and initrd is dropped once they are in guest RAM.
@Suite("Host memory while a guest runs")
struct HostMemoryTests {
    /// VmRSS of `pid` in KiB.
    static func residentKiB(_ pid: Int32) -> Int? {
        guard let status = try? String(contentsOfFile: "/proc/\(pid)/status", encoding: .utf8) else { return nil }
        let line = status.split(separator: "\n").first { $0.hasPrefix("VmRSS:") }
        return line.flatMap { Int($0.split(separator: " ", omittingEmptySubsequences: true)[1]) }
    }

    @Test("A 64 MiB initrd costs its copy in guest RAM, not a second one on the host")
    func initrdNotRetained() throws {
        // Random bytes, so no page of it is shared or zero.
        let initrd = FileManager.default.temporaryDirectory.appendingPathComponent("initrd-\(UUID().uuidString)")
        let random = try #require(FileHandle(forReadingAtPath: "/dev/urandom"))
        try random.readData(ofLength: 64 << 20).write(to: initrd)
        defer { try? FileManager.default.removeItem(at: initrd) }
        let kernel = Swiftlet.packageRoot.appendingPathComponent("guests/build/multiboot.elf").path
        var resident: Int?
        let result = try Swiftlet.run(["run", "--kernel", kernel, "--initrd", initrd.path, "--cmdline", "stay",
                                       "--memory", "256M", "--timeout", "60"]) { process, output in
            if Swiftlet.waitFor("multiboot: staying", in: output) {
                resident = Self.residentKiB(process.processIdentifier)
                kill(process.processIdentifier, SIGTERM)
            }
        }
        #expect(result.signal == SIGTERM)
        let kib = try #require(resident)
        // Guest RAM holds the 64 MiB; Swiftlet itself is ~10 MiB. A retained host copy of
        // the initrd would add another 64 MiB.
        #expect(kib < 100 * 1024, "VmRSS \(kib) KiB")
        #expect(kib > 64 * 1024, "the initrd should be in guest RAM: VmRSS \(kib) KiB")
    }
}

/// Running out of threads is a clear error before the guest runs, not a trap.
@Suite("Thread limits")
struct ThreadLimitTests {
    @Test("64 vCPUs under a 20-thread limit: one line naming the thread, status 2, no guest output",
          .enabled(if: getuid() == 0, "needs root to make a KVM device node for an unprivileged user"))
    func threadLimit() throws {
        // RLIMIT_NPROC does not bind root: run as nobody, with a KVM device node of its own
        // (the same character device as /dev/kvm, 10:232) in a private folder.
        let folder = FileManager.default.temporaryDirectory.appendingPathComponent("kvm-node-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: folder, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: folder) }
        let node = folder.appendingPathComponent("kvm").path
        var info = stat()
        try #require(stat("/dev/kvm", &info) == 0)
        try #require(mknod(node, S_IFCHR | 0o600, info.st_rdev) == 0, "mknod: \(String(cString: strerror(errno)))")
        try #require(chown(node, 65534, 65534) == 0)
        chmod(folder.path, 0o755)
        let result = try Swiftlet.runShell("exec /usr/bin/prlimit --nproc=20 /usr/bin/setpriv --reuid=nobody --regid=nogroup --clear-groups \"$SWIFTLET\" run --kvm-device \(node) --cpus 64")
        #expect(result.status == 2)
        #expect(result.stderr.hasPrefix("swiftlet: cannot start thread 'vcpu"))
        #expect(result.stderr.contains("thread limit"))
        #expect(result.stderr.split(separator: "\n").count == 1)
        #expect(result.stdout.isEmpty, "the guest ran: \(result.stdout)")
    }
}
