import CSandbox
#if canImport(Glibc)
import Glibc
#endif

/// Why a jail could not be made: one line for `swiftlet: ...`.
public struct JailError: Error, CustomStringConvertible {
    public let description: String
    init(_ description: String) { self.description = description }
}

/// A file the jailed program needs: bound (bind mount, in the jail's own mount namespace)
/// from `hostPath` to `jailPath` inside the chroot, read-only unless `writable`.
public struct JailFile: Sendable, Equatable {
    public var hostPath: String
    public var jailPath: String
    public var writable: Bool
    /// Create an empty host file first when there is none (a `--serial file:` log).
    public var create: Bool

    public init(hostPath: String, jailPath: String, writable: Bool = false, create: Bool = false) {
        self.hostPath = hostPath
        self.jailPath = jailPath
        self.writable = writable
        self.create = create
    }
}

/// What `swiftlet jail` (and `jailer`, with Firecracker jailer's flags) sets up before it
/// executes the VMM.
public struct JailConfiguration: Sendable {
    /// The jail's name: 1 to 64 letters, digits and '-'.
    public var id: String
    public var execFile: String
    public var uid: UInt32
    public var gid: UInt32
    public var chrootBase = "/srv/jailer"
    /// A network namespace to join (`/var/run/netns/NAME`).
    public var networkNamespace: String?
    /// cgroup files and values (`cpu.max=50000 100000`, `memory.max=512M`).
    public var cgroups: [(file: String, value: String)] = []
    public var cgroupVersion = 2
    /// The cgroup the jail's cgroup is made in (default: the exec file's name).
    public var parentCgroup: String?
    public var daemonize = false
    public var newPIDNamespace = false
    /// `no-file=N`, `fsize=N` (Firecracker's names).
    public var resourceLimits: [(name: String, value: UInt64)] = []
    /// The files to bind into the chroot besides the exec file and its libraries.
    public var files: [JailFile] = []
    /// The arguments after `--`, for the exec file.
    public var arguments: [String] = []

    public init(id: String, execFile: String, uid: UInt32, gid: UInt32) {
        self.id = id
        self.execFile = execFile
        self.uid = uid
        self.gid = gid
    }

    /// `<chroot-base>/<exec-file name>/<id>/root`, as Firecracker's jailer lays it out.
    public var chrootDirectory: String { "\(chrootBase)/\(execName)/\(id)/root" }
    public var execName: String { String(execFile.split(separator: "/").last ?? "") }
}

/// The jailer: builds the chroot (the exec file, its shared libraries, the VM's files, the
/// device nodes), moves into a cgroup, new mount (and PID) namespaces, optionally a network
/// namespace, pivots into the chroot, drops to the unprivileged uid/gid, closes inherited
/// descriptors and executes the VMM. Needs root.
public enum Jail {
    /// Device nodes the VMM may need: KVM, TAP, and the two every program expects.
    static let devices: [(path: String, major: UInt32, minor: UInt32, mode: UInt32, owned: Bool)] = [
        ("/dev/kvm", 10, 232, 0o600, true), ("/dev/net/tun", 10, 200, 0o600, true),
        ("/dev/null", 1, 3, 0o666, false), ("/dev/urandom", 1, 9, 0o444, false),
    ]

    /// Does everything, then executes the exec file; returns only by throwing. With a new
    /// PID namespace (or `daemonize`) the jailer forks: the parent waits for the jailed
    /// process and ends with its status (or, daemonized, prints its pid and ends at once).
    public static func enter(_ configuration: JailConfiguration) throws(JailError) -> Never {
        let c = configuration
        guard (1...64).contains(c.id.count), c.id.allSatisfy({ $0.isASCII && ($0.isLetter || $0.isNumber || $0 == "-") }) else {
            throw JailError("--id must be 1 to 64 letters, digits or '-': '\(c.id)'")
        }
        guard geteuid() == 0 else { throw JailError("the jailer must run as root (it mounts, makes device nodes and changes user)") }
        var status = stat()
        guard stat(c.execFile, &status) == 0, status.st_mode & S_IFMT == S_IFREG else {
            throw JailError("--exec-file \(c.execFile): not a regular file")
        }
        guard c.cgroupVersion == 1 || c.cgroupVersion == 2 else { throw JailError("--cgroup-version must be 1 or 2") }
        let root = c.chrootDirectory
        try makeDirectories(root)
        try checkEmpty(root)

        // Everything the jailed program may open, known before it is inside.
        var files = c.files
        files.append(JailFile(hostPath: c.execFile, jailPath: "/" + c.execName))
        for library in try sharedLibraries(of: c.execFile) where !files.contains(where: { $0.jailPath == library }) {
            files.append(JailFile(hostPath: library, jailPath: library))
        }
        let networkFD: Int32?
        if let netns = c.networkNamespace {
            let fd = open(netns, O_RDONLY | O_CLOEXEC)
            guard fd >= 0 else { throw JailError("--netns \(netns): \(errorText(errno))") }
            networkFD = fd
        } else {
            networkFD = nil
        }

        try Cgroups.join(c)
        try setResourceLimits(c.resourceLimits)
        if let networkFD {
            let result = csandbox_join_network_namespace(networkFD)
            guard result == 0 else { throw JailError("cannot join network namespace \(c.networkNamespace!): \(errorText(result))") }
            close(networkFD)
        }
        var result = csandbox_unshare_mounts(c.newPIDNamespace ? 1 : 0)
        guard result == 0 else { throw JailError("cannot make new namespaces: \(errorText(result))") }
        result = csandbox_bind(root, root, 1)
        guard result == 0 else { throw JailError("cannot bind \(root) on itself: \(errorText(result))") }
        for file in files { try bind(file, into: root, owner: (c.uid, c.gid)) }
        for device in devices where access(device.path, F_OK) == 0 {
            try makeDirectories(root + parent(of: device.path))
            let (uid, gid) = device.owned ? (c.uid, c.gid) : (0, 0)
            let made = csandbox_make_char_device(root + device.path, device.major, device.minor, device.mode, uid, gid)
            guard made == 0 else { throw JailError("cannot make \(device.path) in the jail: \(errorText(made))") }
        }

        if c.newPIDNamespace || c.daemonize {
            let child = fork()
            guard child >= 0 else { throw JailError("fork: \(errorText(errno))") }
            if child > 0 { waitAndEnd(child, daemonize: c.daemonize) }
        }
        result = csandbox_pivot_into(root)
        guard result == 0 else { throw JailError("cannot pivot into \(root): \(errorText(result))") }
        if c.daemonize {
            setsid()
            let null = open("/dev/null", O_RDWR)
            if null >= 0 { for fd in Int32(0)...2 { dup2(null, fd) }; if null > 2 { close(null) } }
        }
        result = csandbox_drop_to(c.uid, c.gid)
        guard result == 0 else { throw JailError("cannot change to uid \(c.uid), gid \(c.gid): \(errorText(result))") }
        csandbox_close_from(3)
        let argv = ["/" + c.execName] + c.arguments
        var cArguments = argv.map { strdup($0) } + [nil]
        execv("/" + c.execName, &cArguments)
        throw JailError("cannot execute \(c.execFile) in the jail: \(errorText(errno))")
    }

    /// The parent of a jailed process: ends with the child's status, or by its signal's
    /// number + 128; daemonized, prints the child's pid and ends at once.
    private static func waitAndEnd(_ child: pid_t, daemonize: Bool) -> Never {
        if daemonize {
            print(child)
            exit(0)
        }
        var status: Int32 = 0
        while waitpid(child, &status, 0) < 0 && errno == EINTR {}
        let code = status & 0x7f == 0 ? (status >> 8) & 0xff : 128 + (status & 0x7f)
        exit(code)
    }

    /// The shared libraries (and loader) `file` needs, from `ldd`, plus libdeflate when the
    /// system has it (Swiftlet loads it with dlopen for compressed qcow2 clusters).
    static func sharedLibraries(of file: String) throws(JailError) -> [String] {
        guard let pipe = popen("/usr/bin/ldd '\(file.split(separator: "'", omittingEmptySubsequences: false).joined(separator: "'\\''"))' 2>/dev/null", "r") else {
            throw JailError("cannot run ldd on \(file)")
        }
        var libraries: [String] = []
        var line = [CChar](repeating: 0, count: 4096)
        while fgets(&line, Int32(line.count), pipe) != nil {
            let text = String(decoding: line.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
            for word in text.split(whereSeparator: { $0 == " " || $0 == "\t" || $0 == "\n" }) where word.hasPrefix("/") {
                libraries.append(String(word))
            }
        }
        pclose(pipe)
        for candidate in ["/usr/lib/x86_64-linux-gnu/libdeflate.so.0", "/lib/x86_64-linux-gnu/libdeflate.so.0"]
        where access(candidate, R_OK) == 0 {
            libraries.append(candidate)
            break
        }
        return libraries
    }

    private static func bind(_ file: JailFile, into root: String, owner: (UInt32, UInt32)) throws(JailError) {
        if file.create, access(file.hostPath, F_OK) != 0 {
            let fd = open(file.hostPath, O_WRONLY | O_CREAT | O_CLOEXEC, 0o644)
            guard fd >= 0 else { throw JailError("cannot create \(file.hostPath): \(errorText(errno))") }
            fchown(fd, owner.0, owner.1)
            close(fd)
        }
        var status = stat()
        guard stat(file.hostPath, &status) == 0 else { throw JailError("\(file.hostPath): \(errorText(errno))") }
        let target = root + file.jailPath
        try makeDirectories(root + parent(of: file.jailPath))
        if status.st_mode & S_IFMT == S_IFDIR {
            guard mkdir(target, 0o755) == 0 || errno == EEXIST else { throw JailError("\(target): \(errorText(errno))") }
        } else {
            let fd = open(target, O_WRONLY | O_CREAT | O_CLOEXEC, 0o600)
            guard fd >= 0 else { throw JailError("\(target): \(errorText(errno))") }
            close(fd)
        }
        let result = csandbox_bind(file.hostPath, target, file.writable ? 1 : 0)
        guard result == 0 else { throw JailError("cannot bind \(file.hostPath) into the jail: \(errorText(result))") }
    }

    static func parent(of path: String) -> String {
        guard let slash = path.lastIndex(of: "/") else { return "" }
        return String(path[..<slash])
    }

    static func makeDirectories(_ path: String) throws(JailError) {
        var partial = ""
        for component in path.split(separator: "/") {
            partial += "/" + component
            if mkdir(partial, 0o755) != 0 && errno != EEXIST { throw JailError("cannot make \(partial): \(errorText(errno))") }
        }
    }

    private static func checkEmpty(_ directory: String) throws(JailError) {
        guard let handle = opendir(directory) else { throw JailError("\(directory): \(errorText(errno))") }
        defer { closedir(handle) }
        while let entry = readdir(handle) {
            let name = withUnsafeBytes(of: entry.pointee.d_name) { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) }
            if name != "." && name != ".." {
                throw JailError("the jail \(directory) is not empty: a jail with this --id exists (remove it first)")
            }
        }
    }

    private static func setResourceLimits(_ limits: [(name: String, value: UInt64)]) throws(JailError) {
        for limit in limits {
            let resource: Int32
            switch limit.name {
            case "no-file": resource = Int32(RLIMIT_NOFILE.rawValue)
            case "fsize": resource = Int32(RLIMIT_FSIZE.rawValue)
            default: throw JailError("--resource-limit \(limit.name): only no-file and fsize are known")
            }
            var value = rlimit(rlim_cur: rlim_t(limit.value), rlim_max: rlim_t(limit.value))
            guard setrlimit(__rlimit_resource_t(UInt32(resource)), &value) == 0 else {
                throw JailError("--resource-limit \(limit.name)=\(limit.value): \(errorText(errno))")
            }
        }
    }

    static func errorText(_ number: Int32) -> String { String(cString: strerror(number)) }
}

/// The jail's cgroup: made under the parent cgroup in the cgroup v2 hierarchy (or, with
/// version 1, in each controller's hierarchy), given the limits, and joined by the jailer,
/// whose children inherit it.
enum Cgroups {
    static func join(_ c: JailConfiguration) throws(JailError) {
        let parent = c.parentCgroup ?? c.execName
        if c.cgroupVersion == 2 {
            guard let mount = mountPoint(fileSystem: "cgroup2") else {
                throw JailError("no cgroup v2 hierarchy is mounted (--cgroup-version 1 uses v1's)")
            }
            let available = (try? readFile(mount + "/cgroup.controllers")) ?? ""
            let wanted = Set(c.cgroups.map { controller(of: $0.file) })
            for name in wanted where !available.split(separator: " ").contains(Substring(name)) {
                throw JailError("the cgroup v2 hierarchy at \(mount) offers no '\(name)' controller here "
                    + "(controllers: \(available.isEmpty ? "none" : available)); it may be bound to cgroup v1: try --cgroup-version 1")
            }
            let directory = "\(mount)/\(parent)/\(c.id)"
            try Jail.makeDirectories(directory)
            if !wanted.isEmpty {
                let enable = wanted.sorted().map { "+" + $0 }.joined(separator: " ")
                try write(enable, to: "\(mount)/cgroup.subtree_control")
                try write(enable, to: "\(mount)/\(parent)/cgroup.subtree_control")
            }
            for setting in c.cgroups { try write(setting.value, to: "\(directory)/\(setting.file)") }
            try write("\(getpid())", to: "\(directory)/cgroup.procs")
        } else {
            var joined = Set<String>()
            for setting in c.cgroups {
                let name = controller(of: setting.file)
                guard let mount = mountPoint(fileSystem: "cgroup", option: name) else {
                    throw JailError("no cgroup v1 hierarchy with the '\(name)' controller is mounted")
                }
                let directory = "\(mount)/\(parent)/\(c.id)"
                try Jail.makeDirectories(directory)
                try write(setting.value, to: "\(directory)/\(setting.file)")
                if joined.insert(directory).inserted { try write("\(getpid())", to: "\(directory)/cgroup.procs") }
            }
        }
    }

    /// `cpu.max` -> `cpu`.
    static func controller(of file: String) -> String { String(file.split(separator: ".").first ?? "") }

    /// Where a file system of that type (with that mount option, for v1 controllers) is
    /// mounted, from /proc/self/mountinfo.
    static func mountPoint(fileSystem: String, option: String? = nil) -> String? {
        guard let text = try? readFile("/proc/self/mountinfo") else { return nil }
        for line in text.split(separator: "\n") {
            let halves = line.split(separator: " - ", omittingEmptySubsequences: false)
            guard halves.count == 2 else { continue }
            let left = halves[0].split(separator: " "), right = halves[1].split(separator: " ")
            guard left.count >= 5, right.count >= 3, right[0] == fileSystem else { continue }
            if let option, !right[2].split(separator: ",").contains(Substring(option)) { continue }
            return String(left[4])
        }
        return nil
    }

    static func readFile(_ path: String) throws(JailError) -> String {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { throw JailError("\(path): \(Jail.errorText(errno))") }
        defer { close(fd) }
        var bytes: [UInt8] = []
        var buffer = [UInt8](repeating: 0, count: 65536)
        while true {
            let count = read(fd, &buffer, buffer.count)
            guard count > 0 else { break }
            bytes += buffer.prefix(count)
        }
        return String(decoding: bytes, as: UTF8.self).trimmingCharacters(in: "\n")
    }

    static func write(_ value: String, to path: String) throws(JailError) {
        let fd = open(path, O_WRONLY | O_CLOEXEC)
        guard fd >= 0 else { throw JailError("cannot open \(path): \(Jail.errorText(errno))") }
        defer { close(fd) }
        let written = value.withCString { Glibc.write(fd, $0, strlen($0)) }
        guard written >= 0 else { throw JailError("cannot write '\(value)' to \(path): \(Jail.errorText(errno))") }
    }
}

extension String {
    func trimmingCharacters(in character: Character) -> String {
        var text = Substring(self)
        while text.last == character { text = text.dropLast() }
        return String(text)
    }
}
