import Foundation
import Testing

// `--net tap=NAME[,mac=...]` with real TAP devices. Each test makes its own network
// namespace and runs Swiftlet inside it (`ip netns exec`), so every TAP lives and dies
// there; deleting the namespace at the end of the test, whatever happened, removes them.
// Nothing here needs a guest network driver: these tests check the host side (the TAP
// is created, up, removed; an existing one is used and left alone; the errors).

/// A network namespace for one test, deleted (with the TAPs in it) when the value goes.
final class NetworkNamespace {
    let name: String

    /// Whether namespaces can be made here (root, and `ip` with netns support).
    static let available: Bool = {
        guard getuid() == 0, FileManager.default.isExecutableFile(atPath: "/usr/sbin/ip"),
              let probe = try? NetworkNamespace() else { return false }
        _ = probe
        return true
    }()

    init() throws {
        name = "swiftlet-test-\(UInt32.random(in: 0...UInt32.max))"
        let result = try runHostTool("/usr/sbin/ip", ["netns", "add", name], timeout: 30)
        guard result.status == 0 else { throw NamespaceError(message: "ip netns add \(name): \(result.stderr)") }
    }

    deinit {
        _ = try? runHostTool("/usr/sbin/ip", ["netns", "delete", name], timeout: 30)
    }

    struct NamespaceError: Error { let message: String }

    /// `ip -n NAME arguments...`
    @discardableResult
    func ip(_ arguments: String...) throws -> HostToolResult {
        try runHostTool("/usr/sbin/ip", ["-n", name] + arguments, timeout: 30)
    }

    /// The interface's line from `ip -o link show`, or nil when it does not exist.
    func link(_ interface: String) -> String? {
        guard let result = try? ip("-o", "link", "show", "dev", interface), result.status == 0 else { return nil }
        return result.stdout
    }

    func isUp(_ interface: String) -> Bool {
        guard let line = link(interface), let flags = line.split(separator: "<").dropFirst().first?.split(separator: ">").first else {
            return false
        }
        return flags.split(separator: ",").contains("UP")
    }

    /// Waits up to `seconds` for `condition`.
    func wait(seconds: Double, _ condition: () -> Bool) -> Bool {
        let deadline = Date().addingTimeInterval(seconds)
        while Date() < deadline {
            if condition() { return true }
            usleep(50_000)
        }
        return condition()
    }
}

/// The MAC of `swiftlet: netN: TAP, MAC xx:...` lines on stderr, by interface.
private func printedMACs(_ stderr: String) -> [String: String] {
    var macs: [String: String] = [:]
    for line in stderr.split(separator: "\n") where line.hasPrefix("swiftlet: net") && line.contains(", MAC ") {
        let name = line.dropFirst("swiftlet: ".count).prefix { $0 != ":" }
        macs[String(name)] = String(line.split(separator: " ").last!)
    }
    return macs
}

private let noNamespaces = "network namespaces cannot be made here (ip netns add needs root)"

@Suite("--net with TAP devices in a network namespace", .enabled(if: NetworkNamespace.available, Comment(rawValue: noNamespaces)))
struct NetworkTests {
    static let idle = Swiftlet.guest("idle")

    @Test("A missing TAP is created and up while the guest runs, its generated MAC printed, and gone afterwards")
    func createdTAP() throws {
        let namespace = try NetworkNamespace()
        var upWhileRunning = false
        let result = try Swiftlet.run(["run", "--flat", Self.idle, "--net", "tap=swt0", "--timeout", "3"], namespace: namespace.name) { _, _ in
            upWhileRunning = namespace.wait(seconds: 3) { namespace.isUp("swt0") }
        }
        #expect(result.status == 124, "\(result.stderr)")
        #expect(upWhileRunning, "the TAP was created and brought up")
        let mac = try #require(printedMACs(result.stderr)["net0"], "stderr: \(result.stderr)")
        #expect(result.stderr.contains("swiftlet: net0: swt0, MAC \(mac)\n"))
        let first = try #require(UInt8(mac.prefix(2), radix: 16))
        #expect(mac.split(separator: ":").count == 6)
        #expect(first & 2 == 2, "locally administered")
        #expect(first & 1 == 0, "unicast")
        #expect(namespace.link("swt0") == nil, "Swiftlet's TAP is removed when it exits")
    }

    @Test("Two interfaces: net0 and net1 on their own TAPs, mac= used as given, a different MAC generated each run")
    func twoInterfaces() throws {
        let namespace = try NetworkNamespace()
        let arguments = ["run", "--flat", Self.idle, "--net", "tap=swt0", "--net", "tap=swt1,mac=52:54:00:12:34:56", "--timeout", "1"]
        let first = try Swiftlet.run(arguments, namespace: namespace.name)
        let second = try Swiftlet.run(arguments, namespace: namespace.name)
        #expect(first.status == 124 && second.status == 124, "\(first.stderr) \(second.stderr)")
        #expect(printedMACs(first.stderr)["net1"] == "52:54:00:12:34:56")
        #expect(printedMACs(first.stderr)["net0"] != nil)
        #expect(printedMACs(first.stderr)["net0"] != printedMACs(second.stderr)["net0"])
        #expect(namespace.link("swt0") == nil && namespace.link("swt1") == nil)
    }

    @Test("Both transports: with virtio-mmio the interfaces take the slots after the disks")
    func mmioTransport() throws {
        let namespace = try NetworkNamespace()
        let result = try Swiftlet.run(["run", "--flat", Self.idle, "--virtio-transport", "mmio", "--net", "tap=swt0", "--timeout", "1",
                                       "--trace-exits"], namespace: namespace.name)
        #expect(result.status == 124, "\(result.stderr)")
        #expect(result.stderr.contains("virtio-net net0 (TAP swt0): tx 0 frames"), "--trace-exits reports the interface")
    }

    @Test("An existing TAP is opened and left as it is: still there, still down, after Swiftlet exits")
    func existingTAP() throws {
        let namespace = try NetworkNamespace()
        try #require(try namespace.ip("tuntap", "add", "dev", "swt0", "mode", "tap").status == 0)
        var attached = false
        let result = try Swiftlet.run(["run", "--flat", Self.idle, "--net", "tap=swt0", "--timeout", "2"], namespace: namespace.name) { _, _ in
            // A TAP with a reader has its carrier: "state UNKNOWN" or "LOWER_UP" once attached.
            attached = namespace.wait(seconds: 2) { namespace.link("swt0")?.contains("NO-CARRIER") == false }
        }
        #expect(result.status == 124, "\(result.stderr)")
        #expect(attached, "Swiftlet attached to the TAP")
        #expect(namespace.link("swt0") != nil, "the TAP is still there")
        #expect(!namespace.isUp("swt0"), "Swiftlet did not change its state")
    }

    @Test("A name that is an interface but not a TAP is refused with one line")
    func notATAP() throws {
        let namespace = try NetworkNamespace()
        let result = try Swiftlet.run(["run", "--flat", Self.idle, "--net", "tap=lo", "--timeout", "1"], namespace: namespace.name)
        #expect(result.status == 2)
        #expect(result.stderr == "swiftlet: net0: 'lo' exists but is not a TAP device (a TUN device, or another kind of interface)\n")
    }

    @Test("A TAP another Swiftlet is using is refused with one line")
    func tapInUse() throws {
        let namespace = try NetworkNamespace()
        var second: Swiftlet.Result?
        let first = try Swiftlet.run(["run", "--flat", Self.idle, "--net", "tap=swt0", "--timeout", "4"], namespace: namespace.name) { _, _ in
            guard namespace.wait(seconds: 4, { namespace.isUp("swt0") }) else { return }
            second = try? Swiftlet.run(["run", "--flat", Self.idle, "--net", "tap=swt0", "--timeout", "1"], namespace: namespace.name)
        }
        #expect(first.status == 124)
        let refused = try #require(second)
        #expect(refused.status == 2)
        #expect(refused.stderr == "swiftlet: net0: TAP device 'swt0' is in use by another program (a TAP has one reader at a time)\n")
    }
}

/// Runs Swiftlet as `nobody` in `namespace`, with a KVM device node of its own and, when
/// `openTun`, a /dev/net/tun any user may open (bind-mounted in a private mount namespace;
/// this host's own is root's alone).
private func runAsNobody(_ arguments: String, namespace: NetworkNamespace, openTun: Bool) throws -> Swiftlet.Result {
    let folder = FileManager.default.temporaryDirectory.appendingPathComponent("net-nodes-\(UUID().uuidString)")
    try FileManager.default.createDirectory(at: folder, withIntermediateDirectories: true)
    defer { try? FileManager.default.removeItem(at: folder) }
    chmod(folder.path, 0o755)
    func node(_ name: String, like device: String, mode: mode_t) throws -> String {
        var info = stat()
        try #require(stat(device, &info) == 0)
        let path = folder.appendingPathComponent(name).path
        try #require(mknod(path, S_IFCHR | mode, info.st_rdev) == 0, "mknod: \(String(cString: strerror(errno)))")
        chmod(path, mode)
        return path
    }
    let kvm = try node("kvm", like: "/dev/kvm", mode: 0o666)
    let drop = "/usr/bin/setpriv --reuid=nobody --regid=nogroup --clear-groups \"$SWIFTLET\" run --kvm-device \(kvm) \(arguments)"
    let inside: String
    if openTun {
        let tun = try node("tun", like: "/dev/net/tun", mode: 0o666)
        inside = "/usr/bin/unshare --mount --propagation private /bin/sh -c 'mount --bind \(tun) /dev/net/tun && exec \(drop)'"
    } else {
        inside = drop
    }
    return try Swiftlet.runShell("exec /usr/sbin/ip netns exec \(namespace.name) \(inside)")
}

@Suite("--net without privileges", .enabled(if: NetworkNamespace.available, Comment(rawValue: noNamespaces)))
struct NetworkPermissionTests {
    static let idle = Swiftlet.guest("idle")

    @Test("No access to /dev/net/tun: one line saying so")
    func noTunAccess() throws {
        let namespace = try NetworkNamespace()
        var info = stat()
        try #require(stat("/dev/net/tun", &info) == 0)
        try #require(info.st_mode & 0o006 != 0o006, "this host's /dev/net/tun is open to all users; nothing to check")
        let result = try runAsNobody("--flat \(Self.idle) --net tap=swt0 --timeout 1", namespace: namespace, openTun: false)
        #expect(result.status == 2)
        #expect(result.stderr == "swiftlet: net0: cannot open /dev/net/tun: Permission denied "
                + "(TAP devices need read and write access to it, usually mode 0666)\n")
    }

    @Test("A missing TAP, and no right to create one: one line with the command that makes it")
    func cannotCreate() throws {
        let namespace = try NetworkNamespace()
        let result = try runAsNobody("--flat \(Self.idle) --net tap=swt0 --timeout 1", namespace: namespace, openTun: true)
        #expect(result.status == 2)
        #expect(result.stderr == "swiftlet: net0: TAP device 'swt0' does not exist and creating it needs root or CAP_NET_ADMIN; "
                + "create it first: ip tuntap add dev swt0 mode tap user nobody && ip link set swt0 up\n")
        #expect(namespace.link("swt0") == nil)
    }

    @Test("A TAP made for the user (ip tuntap add ... user nobody) works without privileges; one owned by root is refused")
    func userTAP() throws {
        let namespace = try NetworkNamespace()
        try #require(try namespace.ip("tuntap", "add", "dev", "swt0", "mode", "tap", "user", "nobody").status == 0)
        // A TAP with no owner may be attached by anyone who can open /dev/net/tun; this one is root's.
        try #require(try namespace.ip("tuntap", "add", "dev", "swt1", "mode", "tap", "user", "root").status == 0)
        let ours = try runAsNobody("--flat \(Self.idle) --net tap=swt0 --timeout 1", namespace: namespace, openTun: true)
        #expect(ours.status == 124, "\(ours.stderr)")
        #expect(printedMACs(ours.stderr)["net0"] != nil)
        let roots = try runAsNobody("--flat \(Self.idle) --net tap=swt1 --timeout 1", namespace: namespace, openTun: true)
        #expect(roots.status == 2)
        #expect(roots.stderr == "swiftlet: net0: TAP device 'swt1' exists but this user may not attach to it; make it for this user: "
                + "ip tuntap del dev swt1 mode tap && ip tuntap add dev swt1 mode tap user nobody && ip link set swt1 up\n")
    }
}

@Suite("--net syntax")
struct NetworkSyntaxTests {
    @Test("A malformed --net is a usage error: status 2, at most two lines", arguments: [
        "tap=", "swt0", "tap=a/b", "tap=a:b", "tap=has space", "tap=sixteen-chars-xx", "mac=02:00:00:00:00:01",
        "tap=swt0,mac=01:00:5e:00:00:01", "tap=swt0,mac=00:00:00:00:00:00", "tap=swt0,mac=02:00:00:00:00", "tap=swt0,mac=zz:00:00:00:00:01",
        "tap=swt0,speed=10", "tap=swt0,tap=swt1", "tap=swt0,",
    ])
    func malformed(value: String) throws {
        let result = try Swiftlet.run(["run", "--net", value])
        #expect(result.status == 2)
        #expect(result.stderr.hasPrefix("swiftlet: "), "\(result.stderr)")
        #expect(result.stderr.contains("--net"))
        #expect(result.stderr.split(separator: "\n").count <= 2)
    }

    @Test("--help has a NETWORK section")
    func help() throws {
        let result = try Swiftlet.run(["run", "--help"])
        #expect(result.stdout.contains("NETWORK"))
        #expect(result.stdout.contains("--net tap=NAME[,mac=XX:XX:XX:XX:XX:XX]"))
        #expect(result.stdout.contains("ip tuntap add dev NAME mode tap"))
    }
}

@Suite("--net cleanup", .enabled(if: NetworkNamespace.available, Comment(rawValue: noNamespaces)))
struct NetworkCleanupTests {
    @Test("Killed outright (SIGKILL), Swiftlet still leaves no TAP behind: the kernel removes it with the descriptor")
    func killed() throws {
        let namespace = try NetworkNamespace()
        var wasUp = false
        let result = try Swiftlet.run(["run", "--flat", Swiftlet.guest("idle"), "--net", "tap=swt0", "--timeout", "20"],
                                      namespace: namespace.name) { process, _ in
            wasUp = namespace.wait(seconds: 5) { namespace.isUp("swt0") }
            // `ip netns exec` execs Swiftlet: the process is Swiftlet itself.
            kill(process.processIdentifier, SIGKILL)
        }
        #expect(wasUp)
        #expect(result.signal == SIGKILL)
        #expect(namespace.wait(seconds: 5) { namespace.link("swt0") == nil })
    }
}
