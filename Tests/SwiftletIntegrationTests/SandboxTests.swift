import Foundation
import Sandbox
import Testing

/// The sandbox on the real binary: every thread of a running VM is confined by the filter of
/// its kind, a forbidden call from a device thread ends the VM with its one-line message, and
/// the jailer runs a guest as an unprivileged user that sees only its chroot.
@Suite(.serialized) struct SandboxIntegrationTests {
    static let virtioBlkGuest = Swiftlet.packageRoot.appendingPathComponent("guests/build/virtio-blk.elf").path

    /// A raw disk image of `megabytes` in a fresh directory.
    static func scratchDisk(megabytes: Int = 4) throws -> (directory: URL, image: String) {
        let directory = FileManager.default.temporaryDirectory.appendingPathComponent("sandbox-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
        let image = directory.appendingPathComponent("disk.raw").path
        #expect(FileManager.default.createFile(atPath: image, contents: Data(count: megabytes << 20)))
        return (directory, image)
    }

    @Test func aForbiddenCallFromADiskWorkerStopsTheVMWithOneLine() throws {
        let (directory, image) = try Self.scratchDisk()
        defer { try? FileManager.default.removeItem(at: directory) }
        let command = "\"$SWIFTLET\" run --kernel \(Self.virtioBlkGuest) --disk \(image) --cmdline crc --timeout 120"
        // Without the hook, the guest reads the disk.
        let normal = try Swiftlet.runShell(command)
        #expect(normal.stdout.contains("disk: 8192 sectors"), "\(normal.stdout)\n\(normal.stderr)")
        #expect(normal.status == 1)

        let broken = try Swiftlet.runShell("SWIFTLET_SANDBOX_TEST_FORBIDDEN_CALL=blk0q0w0 " + command)
        #expect(broken.status == Sandbox.violationExitStatus, "\(broken.stderr)")
        #expect(broken.stderr.contains("swiftlet: seccomp: thread 'blk0q0w0' (blk-worker) made a forbidden system call: "
                                       + "ioctl (16) request 0xae01; the VM is stopped (exit status 8)"), "\(broken.stderr)")
        #expect(!broken.stdout.contains("disk: 8192 sectors"))
    }

    @Test func aForbiddenCallFromAVCPUThreadStopsTheVM() throws {
        let result = try Swiftlet.runShell("SWIFTLET_SANDBOX_TEST_FORBIDDEN_CALL=vcpu0 \"$SWIFTLET\" run")
        #expect(result.status == Sandbox.violationExitStatus)
        #expect(result.stderr.contains("thread 'vcpu0' (vcpu) made a forbidden system call: ioctl (16) request 0xae01"))
        #expect(!result.stdout.contains("Hello from real mode"))
    }

    @Test func seccompOffSaysSoLoudlyAndInstallsNothing() throws {
        let result = try Swiftlet.runShell("SWIFTLET_SANDBOX_TEST_FORBIDDEN_CALL=vcpu0 \"$SWIFTLET\" run --seccomp off")
        #expect(result.status == 1)
        #expect(result.stdout.contains("Hello from real mode"))
        #expect(result.stderr.contains("swiftlet: WARNING: --seccomp off: the VM's threads run WITHOUT seccomp filters"))
    }

    /// The kind each thread name belongs to (NamedThread names; the main thread keeps the
    /// program's name).
    static func kind(ofThread name: String) -> ThreadKind? {
        func matches(_ pattern: String) -> Bool { name.wholeMatch(of: try! Regex(pattern)) != nil }
        if name == "swiftlet" { return .control }
        if matches("vcpu[0-9]+") { return .vcpu }
        if name == "events" { return .eventLoop }
        if matches("blk[0-9]+q[0-9]+") { return .blockDispatcher }
        if matches("blk[0-9]+q[0-9]+w[0-9]+") { return .blockWorker }
        if matches("net[0-9]+") { return .netLoop }
        return nil
    }

    static func status(of task: String) -> [String: String] {
        guard let text = try? String(contentsOfFile: task + "/status", encoding: .utf8) else { return [:] }
        var fields: [String: String] = [:]
        for line in text.split(separator: "\n") {
            let parts = line.split(separator: ":", maxSplits: 1)
            if parts.count == 2 { fields[String(parts[0])] = parts[1].trimmingCharacters(in: .whitespaces) }
        }
        return fields
    }

    @Test func everyThreadRunsUnderExactlyTheFilterOfItsKind() throws {
        let (directory, image) = try Self.scratchDisk()
        defer { try? FileManager.default.removeItem(at: directory) }
        var checked: [String: ThreadKind] = [:]
        var problems: [String] = []
        let result = try Swiftlet.run(["run", "--flat", Swiftlet.guest("idle"), "--cpus", "2", "--disk", image + ",queues=2",
                                       "--timeout", "60"]) { process, _ in
            defer { process.terminate() }
            let pid = process.processIdentifier
            let tasks = "/proc/\(pid)/task"
            // Wait until every thread exists and is confined (the main thread is last).
            let deadline = Date().addingTimeInterval(30)
            var names: [String: String] = [:]
            while Date() < deadline {
                let ids = (try? FileManager.default.contentsOfDirectory(atPath: tasks)) ?? []
                names = [:]
                for id in ids { names[id] = Self.status(of: "\(tasks)/\(id)")["Name"] }
                let confined = ids.allSatisfy { Self.status(of: "\(tasks)/\($0)")["Seccomp"] == "2" }
                if confined, names.values.contains("vcpu1"), names.values.contains("blk0q1w3") { break }
                usleep(50_000)
            }
            for (id, name) in names.sorted(by: { $0.key < $1.key }) {
                // KVM's own worker (kvm-nx-lpage-recovery) is a kernel thread attached to the
                // process; it runs no user code.
                if name.hasPrefix("kvm-nx-lpage") { continue }
                guard let kind = Self.kind(ofThread: name) else { problems.append("thread \(id) '\(name)' has no kind"); continue }
                let fields = Self.status(of: "\(tasks)/\(id)")
                if fields["Seccomp"] != "2" { problems.append("\(name): Seccomp \(fields["Seccomp"] ?? "?")") }
                if fields["NoNewPrivs"] != "1" { problems.append("\(name): NoNewPrivs \(fields["NoNewPrivs"] ?? "?")") }
                if let count = fields["Seccomp_filters"], count != "1" { problems.append("\(name): \(count) filters") }
                let expected = try? kind.filter(processID: pid).compile()
                guard let installed = Sandbox.installedFilter(thread: Int32(id)!) else {
                    problems.append("\(name): cannot read its filter"); continue
                }
                if installed != expected { problems.append("\(name): its filter is not the \(kind.rawValue) filter") }
                checked[name] = kind
            }
        }
        #expect(problems.isEmpty, "\(problems)")
        #expect(result.signal == SIGTERM, "\(result.stderr)")
        // Two vCPUs, the event loop, the main thread, and per queue a dispatcher and 4 workers.
        #expect(checked.count == 2 + 1 + 1 + 2 * 5, "\(checked)")
        #expect(Set(checked.values) == [.control, .vcpu, .eventLoop, .blockDispatcher, .blockWorker])
    }
}

/// `swiftlet jail` and `jailer`: a real jail (root only), with the Swiftlet binary and the
/// bundled hello guest, and programs that show what the jailed user sees.
@Suite(.serialized) struct JailerTests {
    static let base = FileManager.default.temporaryDirectory.appendingPathComponent("jails-\(getpid())").path

    static func jail(_ id: String, exec: String, extra: [String] = [], _ arguments: [String], via jailer: Bool = false) throws -> Swiftlet.Result {
        let flags = ["--id", id, "--exec-file", exec, "--uid", "65534", "--gid", "65534", "--chroot-base-dir", base] + extra
        if jailer {
            let link = base + "/jailer"
            try? FileManager.default.createDirectory(atPath: base, withIntermediateDirectories: true)
            try? FileManager.default.createSymbolicLink(atPath: link, withDestinationPath: Swiftlet.binary.path)
            let quoted = (flags + ["--"] + arguments).map { "'\($0)'" }.joined(separator: " ")
            return try Swiftlet.runShell("'\(link)' \(quoted)")
        }
        return try Swiftlet.run(["jail"] + flags + ["--"] + arguments)
    }

    /// Removes the jail's directory and its (now empty) cgroups.
    static func cleanUp(_ id: String, exec: String) {
        let name = exec.split(separator: "/").last!
        try? FileManager.default.removeItem(atPath: "\(base)/\(name)/\(id)")
        for hierarchy in ["/sys/fs/cgroup", "/sys/fs/cgroup/unified", "/sys/fs/cgroup/memory", "/sys/fs/cgroup/cpu"] {
            rmdir("\(hierarchy)/\(name)/\(id)")
        }
    }

    @Test(.enabled(if: geteuid() == 0)) func aJailedGuestReadsItsDiskAndPrints() throws {
        let id = "blk-\(getpid())"
        let (directory, image) = try SandboxIntegrationTests.scratchDisk()
        defer { Self.cleanUp(id, exec: Swiftlet.binary.path); try? FileManager.default.removeItem(at: directory) }
        // The jailed user may read the image (it is bound in, not copied).
        chown(image, 65534, 65534)
        let result = try Self.jail(id, exec: Swiftlet.binary.path, extra: ["--new-pid-ns"],
                                   ["run", "--kernel", SandboxIntegrationTests.virtioBlkGuest, "--disk", image + ",readonly",
                                    "--cmdline", "crc", "--timeout", "120"])
        // Not the built-in hello guest (what Swiftlet runs when its arguments are lost).
        #expect(result.stdout.contains("disk: 8192 sectors, crc32 "), "\(result.stdout)\n\(result.stderr)")
        #expect(result.status == 1, "\(result.stderr)")
        // The chroot holds the binary, its libraries, the guest, the disk and the device nodes.
        let root = "\(Self.base)/swiftlet/\(id)/root"
        let top = Set((try? FileManager.default.contentsOfDirectory(atPath: root)) ?? [])
        #expect(top.isSuperset(of: ["swiftlet", "virtio-blk.elf", "disk.raw", "dev"]), "\(top)")
        #expect(top.isDisjoint(with: ["etc", "home", "root", "proc", "tmp", "work"]), "\(top)")
    }

    @Test(.enabled(if: geteuid() == 0)) func theJailedUserIsUnprivilegedAndSeesOnlyTheChroot() throws {
        let id = "look-\(getpid())"
        defer { Self.cleanUp(id, exec: "/usr/bin/id"); Self.cleanUp(id + "-ls", exec: "/bin/ls"); Self.cleanUp(id + "-cat", exec: "/bin/cat") }
        let who = try Self.jail(id, exec: "/usr/bin/id", ["-u"], via: true)
        #expect(who.stdout.trimmingCharacters(in: .whitespacesAndNewlines) == "65534", "\(who.stdout) \(who.stderr)")
        let listing = try Self.jail(id + "-ls", exec: "/bin/ls", ["-a", "/"], via: true)
        let names = Set(listing.stdout.split(separator: "\n").map(String.init))
        #expect(names.contains("ls") && names.contains("dev"), "\(listing.stdout) \(listing.stderr)")
        #expect(names.isDisjoint(with: ["etc", "home", "root", "proc", "tmp", "work", "old_root"]), "\(names)")
        // The host's files are not there to read, whatever the path.
        let cat = try Self.jail(id + "-cat", exec: "/bin/cat", ["/etc/shadow", "/proc/1/environ"], via: true)
        #expect(cat.status != 0)
        #expect(cat.stdout.isEmpty)
    }

    @Test(.enabled(if: geteuid() == 0)) func aJailWithCgroupLimitsAndAnExistingIDIsRefused() throws {
        let id = "limits-\(getpid())"
        defer { Self.cleanUp(id, exec: Swiftlet.binary.path) }
        // This host binds cpu and memory to cgroup v1 (its v2 hierarchy has no controllers).
        let v2HasMemory = ((try? String(contentsOfFile: "/sys/fs/cgroup/unified/cgroup.controllers", encoding: .utf8))
            ?? (try? String(contentsOfFile: "/sys/fs/cgroup/cgroup.controllers", encoding: .utf8)) ?? "").contains("memory")
        let limits = v2HasMemory
            ? ["--cgroup", "memory.max=1073741824", "--cgroup", "cpu.max=50000 100000"]
            : ["--cgroup-version", "1", "--cgroup", "memory.limit_in_bytes=1073741824", "--cgroup", "cpu.cfs_quota_us=50000"]
        let result = try Self.jail(id, exec: Swiftlet.binary.path, extra: ["--new-pid-ns"] + limits,
                                   ["run", "--flat", Swiftlet.guest("long-mode")])
        #expect(result.stdout.contains("long mode"), "\(result.stdout)\n\(result.stderr)")
        #expect(result.status == 1, "\(result.stderr)")
        // The limit is in the jail's cgroup, which the jailed process joined.
        let limitFile = v2HasMemory
            ? ["/sys/fs/cgroup/unified", "/sys/fs/cgroup"].map { "\($0)/swiftlet/\(id)/memory.max" }
            : ["/sys/fs/cgroup/memory/swiftlet/\(id)/memory.limit_in_bytes"]
        let limit = limitFile.compactMap { try? String(contentsOfFile: $0, encoding: .utf8) }.first
        #expect(limit?.trimmingCharacters(in: .whitespacesAndNewlines) == "1073741824")
        let again = try Self.jail(id, exec: Swiftlet.binary.path, ["run"])
        #expect(again.status == 2)
        #expect(again.stderr.contains("a jail with this --id exists"), "\(again.stderr)")
    }
}
