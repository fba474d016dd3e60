import EventLoop
import Foundation
import Memory
import Synchronization
import Testing
@testable import Virtio

// The device over a real TAP, driven by the test's driver (no KVM): the host's own network
// stack answers, so the virtio-net header, the offloads set with TUNSETOFFLOAD and the
// segmentation both ways are checked against Linux itself. Each test makes a network
// namespace (`ip netns add`), opens the TAP from a thread inside it, and gives the host
// side 192.0.2.1/24 and the guest 192.0.2.2 (TEST-NET-1: nothing leaves the namespace);
// deleting the namespace at the end removes the TAP.

/// A network namespace holding one TAP, both gone when this goes away.
final class TapNamespace {
    let name: String
    let tap: TapDevice
    /// The TAP's own MAC, the host side's: where the guest sends.
    let hostMAC: [UInt8]
    static let hostAddress: [UInt8] = [192, 0, 2, 1]
    static let guestAddress: [UInt8] = [192, 0, 2, 2]

    /// Whether this process can make namespaces and enter them.
    static let available: Bool = getuid() == 0 && FileManager.default.isExecutableFile(atPath: "/usr/sbin/ip")
        && FileManager.default.isExecutableFile(atPath: "/usr/bin/python3") && setNamespace != nil

    /// CLONE_NEWNET, which Glibc's module leaves out with setns.
    private static let cloneNewNet: Int32 = 0x4000_0000

    /// setns(2): a GNU extension Glibc's module does not export, looked up at run time.
    private typealias SetNamespace = @convention(c) (Int32, Int32) -> Int32
    private static let setNamespace: SetNamespace? = {
        guard let symbol = dlsym(nil, "setns") else { return nil }
        return unsafeBitCast(symbol, to: SetNamespace.self)
    }()

    struct Failure: Error, CustomStringConvertible { let description: String }

    /// Makes the namespace (without IPv6, so that its router solicitations and MLD reports
    /// do not fill the guest's buffers), opens `tap` inside it, and gives it an address
    /// and the guest's MAC as a fixed neighbour.
    init(tap interface: String = "swt0") throws {
        name = "swiftlet-tap-\(UInt32.random(in: 0...UInt32.max))"
        try Self.tool("/usr/sbin/ip", ["netns", "add", name])
        do {
            try Self.tool("/usr/sbin/ip", ["netns", "exec", name, "/usr/sbin/sysctl", "-q", "-w",
                                           "net.ipv6.conf.all.disable_ipv6=1", "net.ipv6.conf.default.disable_ipv6=1"])
            tap = try Self.openInside(name, interface)
            try Self.tool("/usr/sbin/ip", ["-n", name, "address", "add", "192.0.2.1/24", "dev", interface])
            try Self.tool("/usr/sbin/ip", ["-n", name, "neighbour", "add", "192.0.2.2", "lladdr",
                                           Frames.guestMAC.map { String(format: "%02x", $0) }.joined(separator: ":"), "dev", interface])
            let link = try Self.tool("/usr/sbin/ip", ["-n", name, "-o", "link", "show", "dev", interface])
            guard let ether = link.components(separatedBy: "link/ether ").dropFirst().first?.prefix(17),
                  let mac = MACAddress(String(ether)) else { throw Failure(description: "no MAC in: \(link)") }
            hostMAC = mac.bytes
        } catch {
            _ = try? Self.tool("/usr/sbin/ip", ["netns", "delete", name])
            throw error
        }
    }

    deinit {
        _ = try? Self.tool("/usr/sbin/ip", ["netns", "delete", name])
    }

    /// Opens the TAP on a thread of its own that enters the namespace first: the TAP is
    /// created there, and the descriptor works from any thread afterwards.
    private static func openInside(_ namespace: String, _ interface: String) throws -> TapDevice {
        let result = Mutex<Result<TapDevice, any Error>?>(nil)
        let done = DispatchSemaphore(value: 0)
        let thread = Thread {
            defer { done.signal() }
            let target = open("/run/netns/\(namespace)", O_RDONLY | O_CLOEXEC)
            guard target >= 0, setNamespace!(target, cloneNewNet) == 0 else {
                result.withLock { $0 = .failure(Failure(description: "cannot enter namespace \(namespace): errno \(errno)")) }
                if target >= 0 { close(target) }
                return
            }
            close(target)
            do {
                let tap = try TapDevice(name: interface)
                result.withLock { $0 = .success(tap) }
            } catch {
                result.withLock { $0 = .failure(error) }
            }
        }
        thread.start()
        done.wait()
        return try result.withLock { $0! }.get()
    }

    /// Runs a tool; throws with its output when it fails. Returns its standard output.
    @discardableResult
    static func tool(_ path: String, _ arguments: [String]) throws -> String {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: path)
        process.arguments = arguments
        let output = Pipe()
        process.standardOutput = output
        process.standardError = output
        try process.run()
        let data = output.fileHandleForReading.readDataToEndOfFile()
        process.waitUntilExit()
        let text = String(decoding: data, as: UTF8.self)
        guard process.terminationStatus == 0 else {
            throw Failure(description: "\(path) \(arguments.joined(separator: " ")): \(text)")
        }
        return text
    }

    /// Starts `script` with Python inside the namespace; returns the running process and
    /// its output file.
    func python(_ script: String) throws -> (Process, URL) {
        let output = FileManager.default.temporaryDirectory.appendingPathComponent("tap-test-\(UUID().uuidString)")
        _ = FileManager.default.createFile(atPath: output.path, contents: nil)
        let process = Process()
        process.executableURL = URL(fileURLWithPath: "/usr/sbin/ip")
        process.arguments = ["netns", "exec", name, "/usr/bin/timeout", "20", "/usr/bin/python3", "-c", script]
        process.standardOutput = try FileHandle(forWritingTo: output)
        process.standardError = process.standardOutput
        try process.run()
        return (process, output)
    }
}

/// IPv4, ICMP and UDP, enough to talk to the host's stack.
enum Packets {
    /// The Internet checksum's folded one's-complement sum (not inverted) of `bytes` plus `initial`.
    static func sum(_ bytes: [UInt8], initial: UInt32 = 0) -> UInt16 {
        var total = initial
        var index = 0
        while index + 1 < bytes.count {
            total += UInt32(bytes[index]) << 8 | UInt32(bytes[index + 1])
            index += 2
        }
        if index < bytes.count { total += UInt32(bytes[index]) << 8 }
        while total > 0xFFFF { total = (total & 0xFFFF) + (total >> 16) }
        return UInt16(total)
    }

    static func be16(_ value: Int) -> [UInt8] { [UInt8(value >> 8 & 0xFF), UInt8(value & 0xFF)] }

    static func ipv4(protocol number: UInt8, payload: [UInt8], identification: Int = 1) -> [UInt8] {
        var header: [UInt8] = [0x45, 0] + be16(20 + payload.count) + be16(identification) + [0x40, 0, 64, number, 0, 0]
        header += TapNamespace.guestAddress + TapNamespace.hostAddress
        let checksum = ~sum(header)
        header[10] = UInt8(checksum >> 8)
        header[11] = UInt8(checksum & 0xFF)
        return header + payload
    }

    static func ethernet(to destination: [UInt8], _ packet: [UInt8]) -> [UInt8] {
        destination + Frames.guestMAC + [0x08, 0x00] + packet
    }

    static func icmpEcho(identifier: Int, sequence: Int, data: [UInt8]) -> [UInt8] {
        var message: [UInt8] = [8, 0, 0, 0] + be16(identifier) + be16(sequence) + data
        let checksum = ~sum(message)
        message[2] = UInt8(checksum >> 8)
        message[3] = UInt8(checksum & 0xFF)
        return message
    }

    /// A UDP datagram from the guest to the host. With `partial`, the checksum field holds
    /// only the pseudo-header's sum, for the receiver to finish (NEEDS_CSUM).
    static func udp(from source: Int, to destination: Int, data: [UInt8], partial: Bool) -> [UInt8] {
        let length = 8 + data.count
        var datagram = be16(source) + be16(destination) + be16(length) + [0, 0] + data
        let pseudo = TapNamespace.guestAddress + TapNamespace.hostAddress + [0, 17] + be16(length)
        let pseudoSum = UInt32(sum(pseudo))
        let checksum = partial ? sum([], initial: pseudoSum) : ~sum(datagram, initial: pseudoSum)
        datagram[6] = UInt8(checksum >> 8)
        datagram[7] = UInt8(checksum & 0xFF)
        return datagram
    }

    /// The IPv4 packet in an Ethernet frame, if it is one.
    static func ipv4Payload(of frame: [UInt8]) -> (protocol: UInt8, source: [UInt8], payload: [UInt8])? {
        guard frame.count >= 34, frame[12] == 0x08, frame[13] == 0x00 else { return nil }
        let headerLength = Int(frame[14] & 0x0F) * 4
        let total = Int(frame[16]) << 8 | Int(frame[17])
        guard frame.count >= 14 + total, total >= headerLength else { return nil }
        return (frame[23], Array(frame[26..<30]), Array(frame[(14 + headerLength)..<(14 + total)]))
    }
}

extension NetHarness {
    /// The next received frame `accept` takes, skipping others; each frame's chains are
    /// posted again (`size` bytes each).
    func receive(size: Int, within seconds: Double = 10, _ accept: (ReceivedFrame) -> Bool) throws -> ReceivedFrame? {
        let deadline = Date().addingTimeInterval(seconds)
        while Date() < deadline {
            guard let frame = try nextReceivedFrame() else { return nil }
            try postReceiveBuffers(frame.entries.count, size: size)
            if accept(frame) { return frame }
        }
        return nil
    }
}

private let disabled = "needs root, ip, python3 and setns to make a network namespace with a TAP"

@Suite("virtio-net over a real TAP, the host's stack answering", .enabled(if: TapNamespace.available, Comment(rawValue: disabled)))
struct NetTapTests {
    /// The sum of the bytes modulo 65536, as the Python side prints it.
    static func byteSum(_ bytes: some Collection<UInt8>) -> Int {
        bytes.reduce(0) { $0 + Int($1) } % 65536
    }

    @Test("The TAP is created, up, and takes at least checksum and TCP segmentation offloads")
    func tapSetUp() throws {
        let namespace = try TapNamespace()
        #expect(namespace.tap.created)
        #expect(namespace.tap.supportedOffloads.isSuperset(of: [.checksum, .tso4, .tso6, .tsoECN]))
        let link = try TapNamespace.tool("/usr/sbin/ip", ["-n", namespace.name, "-d", "link", "show", "dev", "swt0"])
        #expect(link.contains("vnet_hdr on"), "\(link)")
        #expect(link.contains(",UP"), "\(link)")
    }

    @Test("Ping: the guest's echo request goes out through writev, the host's reply comes back into its buffers",
          arguments: [false, true])
    func ping(mergeable: Bool) throws {
        let namespace = try TapNamespace()
        let features = VirtioFeature.version1 | VirtioFeature.ringEventIndex | VirtioNetFeature.mac
            | (mergeable ? VirtioNetFeature.mergeableReceiveBuffers : 0)
        let harness = try NetHarness(backend: namespace.tap, features: features)
        try harness.postReceiveBuffers(8, size: mergeable ? 512 : 1526)
        for sequence in 1...3 {
            let data = (0..<1000).map { UInt8(truncatingIfNeeded: $0 &+ sequence) }
            let request = Packets.icmpEcho(identifier: 0x5354, sequence: sequence, data: data)
            try harness.transmitFrame(Packets.ethernet(to: namespace.hostMAC, Packets.ipv4(protocol: 1, payload: request)))
            let reply = try harness.receive(size: mergeable ? 512 : 1526) { frame in
                guard let packet = Packets.ipv4Payload(of: frame.frame), packet.protocol == 1 else { return false }
                return packet.payload.count == request.count && packet.payload[0] == 0 && Array(packet.payload[4...]) == Array(request[4...])
            }
            let frame = try #require(reply, "echo reply \(sequence)")
            #expect(frame.numBuffers == UInt16(mergeable ? 3 : 1))
            #expect(Array(frame.frame[0..<6]) == Frames.guestMAC)
        }
        #expect(harness.statistics.dropped == 0)
    }

    @Test("UDP with a partial checksum (CSUM) and a 3000-byte UDP segment (HOST_USO) reach a socket in the namespace whole")
    func transmitOffloads() throws {
        let namespace = try TapNamespace()
        guard namespace.tap.supportedOffloads.contains(.uso) else { return }
        let harness = try NetHarness(backend: namespace.tap)
        let script = """
            import socket
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.bind(("192.0.2.1", 7777))
            print("ready", flush=True)
            s.settimeout(15)
            for _ in range(4):
                data, _ = s.recvfrom(70000)
                print(len(data), sum(data) % 65536, flush=True)
            """
        let (process, output) = try namespace.python(script)
        defer { process.terminate(); try? FileManager.default.removeItem(at: output) }
        #expect(harness.wait { (try? String(contentsOf: output, encoding: .utf8))?.contains("ready") == true })
        // One datagram with its checksum left to the host.
        let small = (0..<500).map { UInt8(truncatingIfNeeded: $0 * 7) }
        let header = Frames.header(flags: VirtioNetHeader.needsChecksum, checksumStart: 34, checksumOffset: 6)
        try harness.transmitFrame(Packets.ethernet(to: namespace.hostMAC,
                                                   Packets.ipv4(protocol: 17, payload: Packets.udp(from: 5000, to: 7777, data: small, partial: true))),
                                  header: header)
        // One 3000-byte segment the host cuts into three datagrams of 1000.
        let large = (0..<3000).map { UInt8(truncatingIfNeeded: $0 * 13) }
        let segment = Frames.header(flags: VirtioNetHeader.needsChecksum, gsoType: VirtioNetHeader.gsoUDPL4, headerLength: 42,
                                    gsoSize: 1000, checksumStart: 34, checksumOffset: 6)
        try harness.transmitFrame(Packets.ethernet(to: namespace.hostMAC,
                                                   Packets.ipv4(protocol: 17, payload: Packets.udp(from: 5000, to: 7777, data: large, partial: true),
                                                                identification: 2)),
                                  header: segment)
        process.waitUntilExit()
        let lines: [String] = try String(contentsOf: output, encoding: .utf8).split(separator: "\n").map(String.init).filter { $0 != "ready" }
        var expected: [String] = ["500 \(Self.byteSum(small))"]
        for start in stride(from: 0, to: 3000, by: 1000) { expected.append("1000 \(Self.byteSum(large[start..<(start + 1000)]))") }
        #expect(lines == expected)
        #expect(harness.statistics.transmittedFrames == 2)
        #expect(harness.statistics.dropped == 0)
    }

    @Test("A UDP segment the host sends (UDP_SEGMENT) reaches the guest as one frame of 3042 bytes when it took GUEST_USO")
    func receiveSegment() throws {
        let namespace = try TapNamespace()
        guard namespace.tap.supportedOffloads.contains(.uso) else { return }
        let harness = try NetHarness(backend: namespace.tap)
        try harness.postReceiveBuffers(40, size: 2048)
        let script = """
            import socket
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.setsockopt(socket.SOL_UDP, 103, 1000)  # UDP_SEGMENT
            s.sendto(bytes(i * 13 % 256 for i in range(3000)), ("192.0.2.2", 9))
            """
        let (process, output) = try namespace.python(script)
        process.waitUntilExit()
        try? FileManager.default.removeItem(at: output)
        let received = try harness.receive(size: 2048) { Packets.ipv4Payload(of: $0.frame)?.protocol == 17 }
        let frame = try #require(received)
        #expect(frame.frame.count == 14 + 20 + 8 + 3000, "one frame, not three")
        #expect(frame.header[1] == VirtioNetHeader.gsoUDPL4)
        #expect(UInt16(frame.header[4]) | UInt16(frame.header[5]) << 8 == 1000, "gso_size")
        let payload: [UInt8] = Array(frame.frame[42...])
        let sent: [UInt8] = (0..<3000).map { UInt8($0 * 13 % 256) }
        #expect(payload == sent)
    }

    @Test("Without MRG_RXBUF, a frame longer than the chain at hand is dropped unseen (the TAP reports its length)")
    func truncatedByTheTAP() throws {
        let namespace = try TapNamespace()
        let harness = try NetHarness(backend: namespace.tap, features: VirtioFeature.version1 | VirtioNetFeature.mac)
        try harness.postReceiveBuffers(1, size: 600)
        let script = """
            import socket
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.sendto(bytes(1000), ("192.0.2.2", 9))
            s.sendto(bytes(100), ("192.0.2.2", 9))
            """
        let (process, output) = try namespace.python(script)
        process.waitUntilExit()
        try? FileManager.default.removeItem(at: output)
        let received = try harness.receive(size: 600) { Packets.ipv4Payload(of: $0.frame)?.protocol == 17 }
        let frame = try #require(received)
        #expect(frame.frame.count == 14 + 20 + 8 + 100)
        #expect(harness.statistics.receiveOversized == 1)
    }
}
