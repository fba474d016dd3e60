import ArgumentParser
import Glibc
import Sandbox

/// `swiftlet jail` (also reached as `jailer`, a symlink to swiftlet, with Firecracker jailer's
/// flags): prepares a jail and runs the exec file in it. See docs/security.md.
struct JailCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "jail",
        abstract: "Run Swiftlet (or --exec-file) in a jail: chroot, namespaces, cgroup, unprivileged user.",
        discussion: """
            The flags are Firecracker jailer's, so tools that jail Firecracker can jail \
            Swiftlet; a symlink named 'jailer' to swiftlet takes them directly.
              The chroot is <chroot-base-dir>/<exec-file name>/<id>/root. It gets the exec \
            file and the shared libraries it needs (read-only bind mounts, in the jail's own \
            mount namespace), the device nodes /dev/kvm, /dev/net/tun (owned by --uid), \
            /dev/null and /dev/urandom; with 'run' after '--', the files Swiftlet's options \
            name (--kernel, --initrd, --flat, --disk, --serial file:) are bound in too and \
            the options rewritten to their paths inside. Disk images are bound writable \
            unless 'readonly': --uid must be allowed to read (and write) them. A qcow2 \
            backing file is not bound: flatten the image or bind it yourself.
              Then: the cgroup <parent>/<id> with the --cgroup limits, resource limits, \
            --netns joined, new mount (and with --new-pid-ns, PID) namespaces, pivot_root \
            into the chroot, uid/gid dropped, every inherited descriptor above 2 closed, and \
            the exec file executed with the arguments after '--'.

            EXAMPLE
              swiftlet jail --id vm1 --exec-file /usr/bin/swiftlet --uid 1000 --gid 1000 \\
                --new-pid-ns --cgroup cpu.max="50000 100000" --cgroup memory.max=512M \\
                -- run --kernel vmlinux --disk root.img
            """
    )

    @Option(name: .customLong("id"), help: "The jail's name: 1 to 64 letters, digits or '-'.")
    var id: String

    @Option(name: .customLong("exec-file"), help: "The program to jail (swiftlet).")
    var execFile: String

    @Option(name: .customLong("uid"), help: "The user the program runs as.")
    var uid: UInt32

    @Option(name: .customLong("gid"), help: "The group the program runs as.")
    var gid: UInt32

    @Option(name: .customLong("chroot-base-dir"), help: "Where jails are made.")
    var chrootBaseDir = "/srv/jailer"

    @Option(name: .customLong("netns"), help: "A network namespace to join (/var/run/netns/NAME).")
    var netns: String?

    @Option(name: .customLong("cgroup"), help: "A cgroup file and value, like cpu.max=\"50000 100000\" or memory.max=512M; repeatable.")
    var cgroup: [String] = []

    @Option(name: .customLong("cgroup-version"), help: "1 or 2 (default 2).")
    var cgroupVersion = 2

    @Option(name: .customLong("parent-cgroup"), help: "The cgroup the jail's is made in (default: the exec file's name).")
    var parentCgroup: String?

    @Flag(name: .customLong("daemonize"), help: "Run in the background: print the jailed process's pid and return.")
    var daemonize = false

    @Flag(name: .customLong("new-pid-ns"), help: "Run in a new PID namespace (the program is its PID 1).")
    var newPIDNamespace = false

    @Option(name: .customLong("resource-limit"), help: "no-file=N or fsize=N; repeatable.")
    var resourceLimit: [String] = []

    @Argument(parsing: .postTerminator, help: "Arguments for the exec file, after '--'.")
    var arguments: [String] = []

    func run() throws {
        var jail = JailConfiguration(id: id, execFile: execFile, uid: uid, gid: gid)
        jail.chrootBase = chrootBaseDir
        jail.networkNamespace = netns
        jail.cgroupVersion = cgroupVersion
        jail.parentCgroup = parentCgroup
        jail.daemonize = daemonize
        jail.newPIDNamespace = newPIDNamespace
        for setting in cgroup {
            let parts = setting.split(separator: "=", maxSplits: 1).map(String.init)
            guard parts.count == 2, !parts[0].isEmpty, !parts[0].contains("/") else {
                throw SwiftletCommand.fail("--cgroup \(setting): expected FILE=VALUE, like memory.max=512M")
            }
            jail.cgroups.append((parts[0], parts[1]))
        }
        for limit in resourceLimit {
            let parts = limit.split(separator: "=", maxSplits: 1).map(String.init)
            guard parts.count == 2, let value = UInt64(parts[1]) else {
                throw SwiftletCommand.fail("--resource-limit \(limit): expected no-file=N or fsize=N")
            }
            jail.resourceLimits.append((parts[0], value))
        }
        if arguments.first == "run" {
            (jail.files, jail.arguments) = JailArguments.bindingFiles(of: arguments)
        } else {
            jail.arguments = arguments
        }
        do {
            try Jail.enter(jail)
        } catch {
            throw SwiftletCommand.fail("jail: \(error)")
        }
    }
}

/// The files a `swiftlet run` command line names, and the same command line with their
/// paths inside the jail.
enum JailArguments {
    static func bindingFiles(of arguments: [String]) -> (files: [JailFile], arguments: [String]) {
        var files: [JailFile] = []
        var rewritten: [String] = []
        func place(_ hostPath: String, writable: Bool = false, create: Bool = false) -> String {
            if let existing = files.first(where: { $0.hostPath == hostPath }) { return existing.jailPath }
            let name = String(hostPath.split(separator: "/").last ?? "file")
            var jailPath = "/" + name
            var suffix = 1
            while files.contains(where: { $0.jailPath == jailPath }) || jailPath == "/dev" {
                suffix += 1
                jailPath = "/\(suffix)-\(name)"
            }
            files.append(JailFile(hostPath: hostPath, jailPath: jailPath, writable: writable, create: create))
            return jailPath
        }
        func rewrite(_ option: String, _ value: String) -> String {
            switch option {
            case "--kernel", "--initrd", "--flat":
                return place(value)
            case "--disk":
                let (path, rest) = splitDisk(value)
                let readOnly = rest.split(separator: ",").contains { $0 == "readonly" || $0 == "readonly=on" }
                return place(path, writable: !readOnly).replacingEvery(",", with: ",,") + rest
            case "--serial" where value.hasPrefix("file:"):
                return "file:" + place(String(value.dropFirst(5)), writable: true, create: true)
            default:
                return value
            }
        }
        let withValues: Set<String> = ["--kernel", "--initrd", "--flat", "--disk", "--serial"]
        var index = 0
        while index < arguments.count {
            let argument = arguments[index]
            if let equals = argument.firstIndex(of: "="), withValues.contains(String(argument[..<equals])) {
                let option = String(argument[..<equals])
                rewritten.append(option + "=" + rewrite(option, String(argument[argument.index(after: equals)...])))
            } else if withValues.contains(argument), index + 1 < arguments.count {
                rewritten.append(argument)
                rewritten.append(rewrite(argument, arguments[index + 1]))
                index += 1
            } else {
                rewritten.append(argument)
            }
            index += 1
        }
        return (files, rewritten)
    }

    /// `PATH[,options]` with ',,' standing for a comma in the path: the path, and the rest
    /// starting at its first single comma.
    static func splitDisk(_ text: String) -> (path: String, rest: String) {
        var path = ""
        var characters = Array(text)[...]
        while let character = characters.first {
            if character == "," {
                if characters.dropFirst().first == "," {
                    path.append(",")
                    characters = characters.dropFirst(2)
                    continue
                }
                return (path, String(characters))
            }
            path.append(character)
            characters = characters.dropFirst()
        }
        return (path, "")
    }
}

extension String {
    func replacingEvery(_ target: String, with replacement: String) -> String {
        split(separator: target, omittingEmptySubsequences: false).joined(separator: replacement)
    }
}
