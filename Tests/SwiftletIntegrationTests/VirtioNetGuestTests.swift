import Foundation
import Testing

// The virtio-net teaching guest (guests/virtio-net, built as guests/build/virtio-net.elf) is
// a small polled virtio-net driver that answers ARP and ICMP echo for the address given
// as ip= on its command line, echoes UDP datagrams sent to port 7, and prints its counters
// when asked on UDP port 5555. These tests give it a real network: a network namespace
// made with `ip netns add`, a TAP device inside it with 192.0.2.1/24 (TEST-NET-1, never
// routed; the namespace has no other interface and no route out), and the VMM started
// inside the namespace with `ip netns exec`, so that the TAP it opens is the namespace's.
// From the namespace, ping and a UDP client (python3) talk to the guest at 192.0.2.2.
//
// The same scenarios run under two VMMs:
//   - QEMU (microvm with virtio-net-device, pc with virtio-net-pci, each on a TAP netdev):
//     proof that the driver, and so the test, follows the virtio specification;
//   - Swiftlet (`--net tap=NAME`): those tests switch themselves on once `swiftlet run
//     --help` lists `--net`.
//
// Every test removes its VMM (killed by PID), its TAP and its namespace on every path.

/// Where the guest and the host tools are, and whether a network namespace can be made.
enum VirtioNetGuest {
    static let kernel = Swiftlet.packageRoot.appendingPathComponent("guests/build/virtio-net.elf").path
    static let pvhKernel = Swiftlet.packageRoot.appendingPathComponent("guests/build/virtio-net-pvh.elf").path

    static let guestAddress = "192.0.2.2"
    static let hostAddress = "192.0.2.1"

    static func tool(_ name: String) -> String? {
        ["/usr/sbin", "/sbin", "/usr/bin", "/bin", "/usr/local/bin"].map { "\($0)/\(name)" }
            .first { FileManager.default.isExecutableFile(atPath: $0) }
    }

    static let ip = tool("ip")
    static let ping = tool("ping")
    /// The system's python3 (standard library only), not whatever a user's PATH prefers.
    static let python = ["/usr/bin/python3", "/usr/local/bin/python3"].first { FileManager.default.isExecutableFile(atPath: $0) }
    static let qemu = tool("qemu-system-x86_64")

    /// Why namespaces cannot be made here, or nil when they can: root, the tools, the TUN
    /// driver, and one namespace actually created and removed.
    static let namespaceUnavailable: String? = {
        if geteuid() != 0 { return "needs root to create a network namespace and a TAP device" }
        guard let ip else { return "needs ip (apt-get install iproute2)" }
        if ping == nil { return "needs ping (apt-get install iputils-ping)" }
        if python == nil { return "needs /usr/bin/python3" }
        if !FileManager.default.fileExists(atPath: "/dev/net/tun") { return "needs /dev/net/tun (the tun module)" }
        let probe = "swiftlet-probe-\(getpid())"
        guard let made = try? runHostTool(ip, ["netns", "add", probe], timeout: 30), made.status == 0 else {
            return "`ip netns add` does not work here (no CAP_SYS_ADMIN, or a kernel without network namespaces)"
        }
        _ = try? runHostTool(ip, ["netns", "delete", probe], timeout: 30)
        return nil
    }()

    static var canMakeNamespaces: Bool { namespaceUnavailable == nil }
    static var skipReason: Comment { Comment(rawValue: namespaceUnavailable ?? "") }

    static var qemuAvailable: Bool { qemu != nil && FileManager.default.isWritableFile(atPath: "/dev/kvm") }

    /// Swiftlet's virtio-net has landed when `swiftlet run --help` mentions `--net`.
    static let swiftletHasNet: Bool = {
        guard let help = try? Swiftlet.run(["run", "--help"]) else { return false }
        return help.stdout.contains("--net")
    }()
}

// MARK: - A network namespace with a TAP device

/// A network namespace holding one TAP device with 192.0.2.1/24. `remove()` (also run by
/// deinit) deletes the TAP and the namespace; kill the VMM that opened the TAP first.
final class NetGuestNamespace {
    let name: String
    let tap: String
    private let ip: String
    private var removed = false

    init() throws {
        ip = try #require(VirtioNetGuest.ip)
        let tag = UUID().uuidString.replacingOccurrences(of: "-", with: "").prefix(8).lowercased()
        name = "swiftlet-\(tag)"
        tap = "swt\(tag)"                // 11 characters: interface names stop at 15
        try run(["netns", "add", name])
        do {
            try exec(["ip", "link", "set", "lo", "up"])
            try exec(["ip", "tuntap", "add", "dev", tap, "mode", "tap"])
            try exec(["ip", "address", "add", "\(VirtioNetGuest.hostAddress)/24", "dev", tap])
            try exec(["ip", "link", "set", tap, "up"])
        } catch {
            remove()
            throw error
        }
    }

    deinit { remove() }

    /// Deletes the TAP, then the namespace (which would also take the TAP with it).
    func remove() {
        if removed { return }
        removed = true
        _ = try? runHostTool(ip, ["netns", "exec", name, ip, "link", "delete", tap], timeout: 30)
        _ = try? runHostTool(ip, ["netns", "delete", name], timeout: 30)
    }

    private func run(_ arguments: [String]) throws {
        let result = try runHostTool(ip, arguments, timeout: 30)
        try #require(result.status == 0, "ip \(arguments.joined(separator: " ")): \(result.stderr)")
    }

    /// Runs `command` inside the namespace and requires success.
    @discardableResult
    func exec(_ command: [String], timeout: Int = 60) throws -> HostToolResult {
        var command = command
        if command[0] == "ip" { command[0] = ip }
        let result = try runHostTool(ip, ["netns", "exec", name] + command, timeout: timeout)
        try #require(result.status == 0, "\(command.joined(separator: " ")) in \(name): \(result.stdout)\(result.stderr)")
        return result
    }

    /// Runs `command` inside the namespace, whatever its status.
    func run(inside command: [String], timeout: Int = 60) throws -> HostToolResult {
        try runHostTool(ip, ["netns", "exec", name] + command, timeout: timeout)
    }

    /// The namespace's protocol counters (/proc/net/snmp, which is per network namespace):
    /// "Icmp.InCsumErrors" -> value.
    func kernelCounters() throws -> [String: Int] {
        let lines = try exec(["/bin/cat", "/proc/net/snmp"]).stdout.split(separator: "\n")
        var counters: [String: Int] = [:]
        // Pairs of lines: "Icmp: InMsgs InErrors ...", then "Icmp: 6 0 ...".
        for (names, values) in zip(lines, lines.dropFirst()) {
            let n = names.split(separator: " "), v = values.split(separator: " ")
            guard n.count == v.count, n.count > 1, n[0] == v[0], Int(n[1]) == nil else { continue }
            let proto = n[0].dropLast()
            for (name, value) in zip(n.dropFirst(), v.dropFirst()) { counters["\(proto).\(name)"] = Int(value) }
        }
        return counters
    }

    /// Starts `command` inside the namespace in the background (`ip netns exec` replaces
    /// itself with the command, so the process's PID is the VMM's).
    func start(_ command: [String]) throws -> BackgroundVMM {
        try BackgroundVMM(executable: ip, arguments: ["netns", "exec", name] + command)
    }
}

/// A VMM running in the background, its output collected in files. `stop()` (also run by
/// deinit) kills it by PID with SIGKILL and waits for it.
final class BackgroundVMM {
    private let process = Process()
    private let scratch: URL
    let stdoutURL: URL
    let stderrURL: URL

    init(executable: String, arguments: [String]) throws {
        scratch = FileManager.default.temporaryDirectory.appendingPathComponent("vmm-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: scratch, withIntermediateDirectories: true)
        stdoutURL = scratch.appendingPathComponent("stdout")
        stderrURL = scratch.appendingPathComponent("stderr")
        _ = FileManager.default.createFile(atPath: stdoutURL.path, contents: nil)
        _ = FileManager.default.createFile(atPath: stderrURL.path, contents: nil)
        process.executableURL = URL(fileURLWithPath: executable)
        process.arguments = arguments
        process.standardInput = FileHandle(forReadingAtPath: "/dev/null")
        process.standardOutput = try FileHandle(forWritingTo: stdoutURL)
        process.standardError = try FileHandle(forWritingTo: stderrURL)
        try process.run()
    }

    deinit {
        stop()
        try? FileManager.default.removeItem(at: scratch)
    }

    var stdout: String { (try? String(contentsOf: stdoutURL, encoding: .utf8)) ?? "" }
    var stderr: String { (try? String(contentsOf: stderrURL, encoding: .utf8)) ?? "" }
    var output: String { "stdout:\n\(stdout)\nstderr:\n\(stderr)" }
    var isRunning: Bool { process.isRunning }
    var status: Int32 { process.terminationStatus }

    /// Waits until the guest printed `text`, or the VMM ended, or `seconds` passed.
    func waitFor(_ text: String, seconds: Double = 60) -> Bool {
        let deadline = Date().addingTimeInterval(seconds)
        while Date() < deadline {
            if stdout.contains(text) { return true }
            if !process.isRunning { return stdout.contains(text) }
            usleep(20_000)
        }
        return false
    }

    /// Waits for the VMM to end by itself, up to `seconds`; false if it is still running.
    func waitForExit(seconds: Double) -> Bool {
        let deadline = Date().addingTimeInterval(seconds)
        while process.isRunning && Date() < deadline { usleep(20_000) }
        return !process.isRunning
    }

    func stop() {
        if process.isRunning {
            kill(process.processIdentifier, SIGKILL)
        }
        process.waitUntilExit()
    }
}

// MARK: - Running the guest

/// How the guest is configured (its command line) and how the device is set up.
struct NetGuestOptions: Sendable {
    var mrgRxbuf = true
    var txSplit = false
    /// The MAC the VMM gives the device (QEMU's mac=, Swiftlet's --net ...,mac=).
    var deviceMAC: String? = nil
    /// The MAC the guest is told to use instead (mac= on its command line).
    var guestMAC: String? = nil
    var pvh = false
    /// More `--net` options for Swiftlet (rate limits: `tx_bps=32K`).
    var swiftletNetOptions: [String] = []

    var commandLine: String {
        var words = ["ip=\(VirtioNetGuest.guestAddress)"]
        if !mrgRxbuf { words.append("mrg_rxbuf=off") }
        if txSplit { words.append("tx=split") }
        if let guestMAC { words.append("mac=\(guestMAC)") }
        return words.joined(separator: " ")
    }
}

enum NetGuestVMM: Sendable {
    case qemu
    case swiftlet

    /// Boots the guest inside `namespace` on its TAP and waits until it says it is ready.
    func start(in namespace: NetGuestNamespace, transport: VirtioTransport, options: NetGuestOptions = NetGuestOptions()) throws -> BackgroundVMM {
        let kernel = options.pvh ? VirtioNetGuest.pvhKernel : VirtioNetGuest.kernel
        var command: [String]
        switch self {
        case .qemu:
            var device = transport == .mmio ? "virtio-net-device,netdev=net0" : "virtio-net-pci,netdev=net0,disable-legacy=on"
            if let mac = options.deviceMAC { device += ",mac=\(mac)" }
            var line = options.commandLine
            command = [try #require(VirtioNetGuest.qemu), "-accel", "kvm", "-m", "64M", "-nodefaults", "-no-user-config",
                       "-display", "none", "-serial", "stdio", "-no-reboot",
                       "-device", "isa-debug-exit,iobase=0xf4,iosize=0x04",
                       "-netdev", "tap,id=net0,ifname=\(namespace.tap),script=no,downscript=no", "-device", device,
                       "-kernel", kernel]
            if transport == .mmio {
                // microvm: virtio-mmio version 2; the first device in the last slot. QEMU
                // names it on the command line itself only for a PVH boot.
                command += ["-M", "microvm,acpi=off", "-global", "virtio-mmio.force-legacy=false"]
                if !options.pvh { line += " virtio_mmio.device=512@0xfeb00e00:12" }
            } else {
                command += ["-M", "pc", "-bios", "qboot.rom"]
            }
            command += ["-append", line]
        case .swiftlet:
            var net = "tap=\(namespace.tap)"
            if let mac = options.deviceMAC { net += ",mac=\(mac)" }
            for option in options.swiftletNetOptions { net += ",\(option)" }
            command = [Swiftlet.binary.path, "run", "--kernel", kernel, "--net", net,
                       "--virtio-transport", transport.rawValue, "--memory", "64M", "--timeout", "600",
                       "--cmdline", options.commandLine]
        }
        let vmm = try namespace.start(command)
        guard vmm.waitFor("virtio-net: ready") else {
            let output = vmm.output
            vmm.stop()
            Issue.record("the guest never said it was ready:\n\(output)")
            throw NetGuestError.notReady
        }
        return vmm
    }
}

enum NetGuestError: Error {
    case notReady
}

/// The UDP client: run with the system python3 inside the namespace. It prints one JSON
/// object: single datagrams of each size echoed (or not), a burst larger than the queue
/// (how many came back, and whether any came back changed), datagrams after the burst,
/// and the guest's counters.
let udpEchoClient = #"""
import json, os, socket, sys, time
guest = (sys.argv[1], 7)
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, 33, 1 << 22)  # SO_RCVBUFFORCE (root): room for the whole burst
s.bind(("0.0.0.0", 0))

def exchange(data, timeout=3.0):
    s.settimeout(timeout)
    s.sendto(data, guest)
    try:
        reply, source = s.recvfrom(65536)
    except socket.timeout:
        return "no echo within %.0f s" % timeout
    if source != guest:
        return "echo from %s" % (source,)
    if reply != data:
        return "changed: %d bytes sent, %d came back" % (len(data), len(reply))
    return "ok"

def drain(quiet=1.0):
    s.settimeout(quiet)
    replies = []
    try:
        while True:
            replies.append(s.recvfrom(65536))
    except socket.timeout:
        return replies

result = {}
sizes = [0, 1, 18, 64, 512, 1000, 1400, 1450, 1472]
result["single"] = {str(n): exchange(os.urandom(n)) for n in sizes}

burst = [i.to_bytes(4, "big") + os.urandom(1396) for i in range(int(sys.argv[2]))]
for datagram in burst:
    s.sendto(datagram, guest)
echoed, wrong = set(), 0
for reply, source in drain(2.0):
    index = int.from_bytes(reply[:4], "big") if len(reply) >= 4 else len(burst)
    if source != guest or index >= len(burst) or reply != burst[index] or index in echoed:
        wrong += 1
    else:
        echoed.add(index)
result["burst"] = {"sent": len(burst), "echoed": len(echoed), "wrong": wrong}

result["after"] = [exchange(os.urandom(100 if i % 2 else 1472)) for i in range(20)]

control = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
control.settimeout(3.0)
control.sendto(b"stats", (sys.argv[1], 5555))
try:
    result["stats"] = control.recvfrom(2000)[0].decode()
except socket.timeout:
    result["stats"] = "no answer"
print(json.dumps(result))
"""#

struct UDPEchoReport: Decodable {
    struct Burst: Decodable {
        let sent: Int
        let echoed: Int
        let wrong: Int
    }

    let single: [String: String]
    let burst: Burst
    let after: [String]
    let stats: String
}

/// The guest's counters line ("stats" on its control port, or its last line at exit), as
/// name -> value for the counters that must stay zero.
func guestCounter(_ stats: String, _ name: String) -> Int? {
    guard let match = stats.firstMatch(of: try! Regex("\(name) (\\d+)")) else { return nil }
    return Int(match.output[1].substring ?? "")
}

// MARK: - Scenarios, shared by the QEMU and Swiftlet suites

enum VirtioNetScenario {
    /// `ping -c 20 -i 0.2` gets 20 replies with correct IP and ICMP checksums (counted by
    /// the namespace's kernel), and full-size pings (1472 bytes of data, 1514-byte frames, Don't
    /// Fragment) come back too.
    static func ping(_ vmm: NetGuestVMM, _ transport: VirtioTransport, _ options: NetGuestOptions = NetGuestOptions()) throws {
        let namespace = try NetGuestNamespace()
        defer { namespace.remove() }
        let guest = try vmm.start(in: namespace, transport: transport, options: options)
        defer { guest.stop() }
        let ping = try #require(VirtioNetGuest.ping)
        let result = try namespace.run(inside: [ping, "-c", "20", "-i", "0.2", "-W", "5", VirtioNetGuest.guestAddress])
        #expect(result.status == 0, "ping: \(result.stdout)\(result.stderr)\nguest: \(guest.output)")
        #expect(result.stdout.contains("20 packets transmitted, 20 received"), "ping: \(result.stdout)")
        // As root, ping reads replies on a raw socket, which gets them before the kernel's
        // ICMP layer checks their checksum, and does not check it itself: the namespace's
        // counters say whether the kernel found bad ones.
        let counters = try namespace.kernelCounters()
        for counter in ["Ip.InHdrErrors", "Icmp.InErrors", "Icmp.InCsumErrors"] {
            #expect(counters[counter] == 0, "\(counter) = \(counters[counter].map(String.init) ?? "missing")")
        }
        #expect(counters["Icmp.InEchoReps"] == 20, "Icmp.InEchoReps = \(counters["Icmp.InEchoReps"].map(String.init) ?? "missing")")
        let large = try namespace.run(inside: [ping, "-c", "3", "-i", "0.2", "-W", "5", "-s", "1472", "-M", "do",
                                               VirtioNetGuest.guestAddress])
        #expect(large.stdout.contains("3 packets transmitted, 3 received"), "ping -s 1472: \(large.stdout)\(large.stderr)")
        #expect(large.stdout.contains("1480 bytes from \(VirtioNetGuest.guestAddress)"), "ping -s 1472: \(large.stdout)")
        #expect(try namespace.kernelCounters()["Icmp.InCsumErrors"] == 0)
    }

    /// A UDP client gets its datagrams back unchanged, from 0 to 1472 bytes; a burst of 512
    /// (twice the queue) leaves the guest answering; the guest saw no bad checksum, no
    /// malformed packet and no header out of spec.
    static func udpEcho(_ vmm: NetGuestVMM, _ transport: VirtioTransport, _ options: NetGuestOptions = NetGuestOptions()) throws {
        let namespace = try NetGuestNamespace()
        defer { namespace.remove() }
        let guest = try vmm.start(in: namespace, transport: transport, options: options)
        defer { guest.stop() }
        let result = try namespace.run(inside: [VirtioNetGuest.python!, "-c", udpEchoClient, VirtioNetGuest.guestAddress, "512"],
                                       timeout: 120)
        try #require(result.status == 0, "UDP client: \(result.stdout)\(result.stderr)\nguest: \(guest.output)")
        let report = try JSONDecoder().decode(UDPEchoReport.self, from: Data(result.stdout.utf8))
        for (size, outcome) in report.single.sorted(by: { Int($0.key)! < Int($1.key)! }) {
            #expect(outcome == "ok", "a \(size)-byte datagram: \(outcome)")
        }
        #expect(report.burst.wrong == 0, "\(report.burst.wrong) datagrams of the burst came back changed or twice")
        #expect(report.burst.echoed > 0, "no datagram of a 512-datagram burst came back")
        #expect(report.after.allSatisfy { $0 == "ok" }, "after the burst: \(report.after)\nguest: \(guest.output)")
        for counter in ["checksum", "malformed", "device-header", "oversize"] {
            #expect(guestCounter(report.stats, counter) == 0, "guest counters: \(report.stats)")
        }
        if vmm == .swiftlet && !options.mrgRxbuf {
            // 5.1.6.4.1: without MRG_RXBUF the device MUST set num_buffers to 1 (QEMU 7.2
            // leaves it as it is: the guest counts, not refuses).
            #expect(guestCounter(report.stats, "num_buffers-not-1") == 0, "guest counters: \(report.stats)")
        }
        let counters = try namespace.kernelCounters()
        for counter in ["Ip.InHdrErrors", "Udp.InCsumErrors"] {
            #expect(counters[counter] == 0, "\(counter) = \(counters[counter].map(String.init) ?? "missing")")
        }
        #expect(guest.isRunning, "the VMM ended: \(guest.output)")
    }

    /// The guest announces its address with the MAC the VMM gave the device (VIRTIO_NET_F_MAC),
    /// or the one on its own command line: the namespace's neighbour table learns it
    /// from the ARP reply.
    static func macAddress(_ vmm: NetGuestVMM, _ transport: VirtioTransport, _ options: NetGuestOptions, expect mac: String,
                           origin: String) throws {
        let namespace = try NetGuestNamespace()
        defer { namespace.remove() }
        let guest = try vmm.start(in: namespace, transport: transport, options: options)
        defer { guest.stop() }
        #expect(guest.stdout.contains("virtio-net: mac \(mac) (\(origin))"), "guest: \(guest.output)")
        let ping = try namespace.run(inside: [VirtioNetGuest.ping!, "-c", "1", "-W", "5", VirtioNetGuest.guestAddress])
        #expect(ping.status == 0, "ping: \(ping.stdout)")
        let neighbours = try namespace.exec(["ip", "neigh", "show", VirtioNetGuest.guestAddress])
        #expect(neighbours.stdout.contains("lladdr \(mac)"), "ip neigh: \(neighbours.stdout)")
    }
}

// MARK: - The suites

@Suite("virtio-net guest: the built files")
struct VirtioNetGuestBuildTests {
    @Test("The guest is built with both boot headers")
    func headers() throws {
        let bytes = Array(try Data(contentsOf: URL(fileURLWithPath: VirtioNetGuest.kernel)))
        #expect(bytes.starts(with: [0x7F, 0x45, 0x4C, 0x46, 1])) // ELF32: what Multiboot loaders take
        let magic: [UInt8] = [0x02, 0xB0, 0xAD, 0x1B]                 // 0x1BADB002, little-endian
        let header = (0..<min(8192, bytes.count) - 4).first { $0 % 4 == 0 && Array(bytes[$0..<$0 + 4]) == magic }
        #expect(header != nil, "no Multiboot header in the first 8 KiB")
        let note: [UInt8] = [4, 0, 0, 0, 4, 0, 0, 0, 18, 0, 0, 0] + Array("Xen\0".utf8)
        #expect(bytes.firstRange(of: note) != nil, "no XEN_ELFNOTE_PHYS32_ENTRY note")
        let pvh = Array(try Data(contentsOf: URL(fileURLWithPath: VirtioNetGuest.pvhKernel)))
        #expect(pvh.firstRange(of: magic) == nil, "virtio-net-pvh.elf must not have a Multiboot header")
        #expect(pvh.firstRange(of: note) != nil)
    }

    @Test("scripts/setup's test profile installs iproute2 and iputils-ping")
    func setupInstallsNetworkTools() throws {
        let setup = try String(contentsOf: Swiftlet.packageRoot.appendingPathComponent("scripts/setup"), encoding: .utf8)
        #expect(setup.contains("iproute2"))
        #expect(setup.contains("iputils-ping"))
    }
}

@Suite("virtio-net guest under QEMU", .serialized,
       .enabled(if: VirtioNetGuest.qemuAvailable, "needs qemu-system-x86_64 and /dev/kvm"),
       .enabled(if: VirtioNetGuest.canMakeNamespaces, VirtioNetGuest.skipReason))
struct VirtioNetGuestQEMUTests {
    @Test("ping gets 20 replies", arguments: VirtioTransport.allCases)
    func ping(transport: VirtioTransport) throws { try VirtioNetScenario.ping(.qemu, transport) }

    @Test("UDP echo: 0 to 1472 bytes unchanged, and a burst of 512", arguments: VirtioTransport.allCases)
    func udpEcho(transport: VirtioTransport) throws { try VirtioNetScenario.udpEcho(.qemu, transport) }

    @Test("Without MRG_RXBUF, each frame sent as two descriptors (tx=split)", arguments: VirtioTransport.allCases)
    func withoutMergeableBuffers(transport: VirtioTransport) throws {
        let options = NetGuestOptions(mrgRxbuf: false, txSplit: true)
        try VirtioNetScenario.ping(.qemu, transport, options)
        try VirtioNetScenario.udpEcho(.qemu, transport, options)
    }

    @Test("PVH entry on microvm")
    func pvhEntry() throws {
        try VirtioNetScenario.ping(.qemu, .mmio, NetGuestOptions(pvh: true))
    }

    @Test("The device's MAC (F_MAC), or the guest's own from mac=")
    func macAddresses() throws {
        try VirtioNetScenario.macAddress(.qemu, .pci, NetGuestOptions(deviceMAC: "52:54:00:0a:0b:0c"),
                                         expect: "52:54:00:0a:0b:0c", origin: "from the device")
        try VirtioNetScenario.macAddress(.qemu, .mmio, NetGuestOptions(guestMAC: "02:00:00:00:00:42"),
                                         expect: "02:00:00:00:00:42", origin: "from the command line")
    }

    @Test("No network device: one error line and status 3")
    func noDevice() throws {
        let result = try runHostTool(VirtioNetGuest.qemu!, ["-accel", "kvm", "-M", "microvm,acpi=off", "-m", "64M", "-nodefaults",
                                                          "-no-user-config", "-display", "none", "-serial", "stdio",
                                                          "-device", "isa-debug-exit,iobase=0xf4,iosize=0x04",
                                                          "-kernel", VirtioNetGuest.kernel, "-append", "ip=192.0.2.2"])
        #expect(result.status == 3)
        #expect(result.stdout.contains("virtio-net: error: no virtio network device found"), "guest output: \(result.stdout)")
    }

    @Test("No ip= on the command line: one error line and status 3")
    func noAddress() throws {
        let result = try runHostTool(VirtioNetGuest.qemu!, ["-accel", "kvm", "-M", "microvm,acpi=off", "-m", "64M", "-nodefaults",
                                                          "-no-user-config", "-display", "none", "-serial", "stdio",
                                                          "-device", "isa-debug-exit,iobase=0xf4,iosize=0x04",
                                                          "-kernel", VirtioNetGuest.kernel, "-append", "mac=02:00:00:00:00:01"])
        #expect(result.status == 3)
        #expect(result.stdout.contains("virtio-net: error: the command line needs ip=A.B.C.D"), "guest output: \(result.stdout)")
    }
}

@Suite("virtio-net guest under Swiftlet", .serialized,
       .enabled(if: VirtioNetGuest.swiftletHasNet, "swiftlet run has no --net yet"),
       .enabled(if: VirtioNetGuest.canMakeNamespaces, VirtioNetGuest.skipReason))
struct VirtioNetGuestSwiftletTests {
    @Test("ping gets 20 replies", arguments: VirtioTransport.allCases)
    func ping(transport: VirtioTransport) throws { try VirtioNetScenario.ping(.swiftlet, transport) }

    @Test("UDP echo: 0 to 1472 bytes unchanged, and a burst of 512", arguments: VirtioTransport.allCases)
    func udpEcho(transport: VirtioTransport) throws { try VirtioNetScenario.udpEcho(.swiftlet, transport) }

    @Test("Without MRG_RXBUF (num_buffers must be 1), each frame sent as two descriptors", arguments: VirtioTransport.allCases)
    func withoutMergeableBuffers(transport: VirtioTransport) throws {
        let options = NetGuestOptions(mrgRxbuf: false, txSplit: true)
        try VirtioNetScenario.ping(.swiftlet, transport, options)
        try VirtioNetScenario.udpEcho(.swiftlet, transport, options)
    }

    @Test("PVH entry (on virtio-pci, which needs nothing on the command line)")
    func pvhEntry() throws {
        try VirtioNetScenario.ping(.swiftlet, .pci, NetGuestOptions(pvh: true))
    }

    @Test("The device's MAC from --net tap=NAME,mac=, or the guest's own from mac=")
    func macAddresses() throws {
        try VirtioNetScenario.macAddress(.swiftlet, .pci, NetGuestOptions(deviceMAC: "52:54:00:0a:0b:0c"),
                                         expect: "52:54:00:0a:0b:0c", origin: "from the device")
        try VirtioNetScenario.macAddress(.swiftlet, .mmio, NetGuestOptions(guestMAC: "02:00:00:00:00:42"),
                                         expect: "02:00:00:00:00:42", origin: "from the command line")
    }
}
