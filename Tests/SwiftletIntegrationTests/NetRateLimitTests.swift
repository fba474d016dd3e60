import Foundation
import Testing

// virtio-net rate limits measured with the virtio-net teaching guest in a network
// namespace (see VirtioNetGuestTests.swift): a burst of UDP datagrams to its echo port,
// with a bandwidth limit on what the guest sends (tx_bps) or receives (rx_bps). Every
// datagram comes back, late: the limiter delays frames, it does not drop them.

/// Sends `count` datagrams of `size` bytes to the guest's echo port at once, collects the
/// echoes, and prints JSON: how many came back, and the seconds from the first send to
/// the last echo.
private let udpBurstClient = #"""
import json, os, socket, sys, time
guest = (sys.argv[1], 7)
count, size = int(sys.argv[2]), int(sys.argv[3])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, 33, 1 << 22)  # SO_RCVBUFFORCE (root)
s.bind(("0.0.0.0", 0))
# Warm up ARP, then let the buckets refill.
s.settimeout(5.0)
s.sendto(b"warm-up", guest)
s.recvfrom(65536)
time.sleep(1.5)
burst = [i.to_bytes(4, "big") + os.urandom(size - 4) for i in range(count)]
start = time.monotonic()
for datagram in burst:
    s.sendto(datagram, guest)
echoed, last = set(), start
s.settimeout(8.0)
try:
    while len(echoed) < count:
        reply, source = s.recvfrom(65536)
        index = int.from_bytes(reply[:4], "big")
        if source == guest and index < count and reply == burst[index]:
            echoed.add(index)
            last = time.monotonic()
except socket.timeout:
    pass
print(json.dumps({"echoed": len(echoed), "seconds": last - start}))
"""#

struct NetBurstReport: Decodable {
    let echoed: Int
    let seconds: Double
}

@Suite("virtio-net rate limits with the teaching guest", .serialized,
       .enabled(if: VirtioNetGuest.canMakeNamespaces, VirtioNetGuest.skipReason),
       .enabled(if: FileManager.default.isWritableFile(atPath: "/dev/kvm"), "needs /dev/kvm"))
struct NetRateLimitTests {
    /// 100 datagrams of 1000 bytes: 1042-byte frames (UDP 8, IP 20, Ethernet 14), 104 200
    /// bytes. At 32 KiB/s with a 32 KiB bucket that starts full, the last one is sent after
    /// (104 200 - 32 768) / 32 768 = 2.18 s. A received frame is charged once it is in
    /// (its size is known only then), so the last one arrives one frame sooner: 2.148 s.
    static let count = 100
    static let size = 1000
    static let frame = size + 42

    static func expected(_ direction: String) -> Double {
        let waitedFor = count * frame - 32768 - (direction == "rx" ? frame : 0)
        return Double(waitedFor) / 32768
    }

    static func burst(_ options: [String]) throws -> NetBurstReport {
        let namespace = try NetGuestNamespace()
        defer { namespace.remove() }
        var guestOptions = NetGuestOptions()
        guestOptions.swiftletNetOptions = options
        let guest = try NetGuestVMM.swiftlet.start(in: namespace, transport: .pci, options: guestOptions)
        defer { guest.stop() }
        let result = try namespace.run(inside: [VirtioNetGuest.python!, "-c", udpBurstClient, VirtioNetGuest.guestAddress,
                                                "\(count)", "\(size)"], timeout: 60)
        try #require(result.status == 0, "UDP client: \(result.stdout)\(result.stderr)\nguest: \(guest.output)")
        return try JSONDecoder().decode(NetBurstReport.self, from: Data(result.stdout.utf8))
    }

    @Test("tx_bps=32K / rx_bps=32K: the guest's echoes leave, or the datagrams reach it, at 32 KiB/s",
          arguments: ["tx", "rx"])
    func bandwidth(direction: String) throws {
        let unlimited = try Self.burst([])
        let limited = try Self.burst(["\(direction)_bps=32K"])
        let expected = Self.expected(direction)
        print("\(direction)_bps=32K: \(Self.count) echoes of \(Self.size) bytes in \(limited.seconds) s "
              + "(expected \(expected) s; unlimited \(unlimited.seconds) s)")
        #expect(unlimited.echoed == Self.count)
        #expect(limited.echoed == Self.count, "frames were dropped instead of delayed")
        #expect(limited.seconds >= expected * 0.98, "\(limited.seconds) s")
        #expect(limited.seconds <= expected * 1.2 + unlimited.seconds + 0.3, "\(limited.seconds) s")
    }

    @Test("A bad rate-limit option is refused with one line")
    func badOption() throws {
        for option in ["tap=x,tx_bps=fast", "tap=x,rx_pps=0", "tap=x,tx_bps_burst=4K", "tap=x,tx_bps=1K,tx_bps=2K"] {
            let result = try Swiftlet.run(["run", "--net", option])
            #expect(result.status != 0, "\(option)")
            #expect(result.stderr.contains("--net"), "\(option): \(result.stderr)")
        }
        for option in ["d.img,bps=x", "d.img,iops=0", "d.img,iops_max=5", "d.img,bps=1,bps_max=0"] {
            let result = try Swiftlet.run(["run", "--disk", option])
            #expect(result.status != 0, "\(option)")
            #expect(result.stderr.contains("--disk"), "\(option): \(result.stderr)")
        }
    }
}

@Suite("Rate-limit options of --disk", .enabled(if: FileManager.default.isWritableFile(atPath: "/dev/kvm"), "needs /dev/kvm"))
struct DiskRateLimitOptionTests {
    @Test("--disk PATH,bps=1M,bps_max=256K: the guest reads 2 MiB in 1.75 s or a little more")
    func bandwidthOption() throws {
        let directory = FileManager.default.temporaryDirectory.appendingPathComponent("bps-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: directory) }
        let image = directory.appendingPathComponent("disk.raw").path
        try Data(repeating: 0x5A, count: 2 << 20).write(to: URL(fileURLWithPath: image))
        let start = Date()
        let result = try Swiftlet.run(["run", "--kernel", VirtioBlockGuest.kernel, "--memory", "64M", "--virtio-transport", "mmio",
                                       "--disk", "\(image),readonly,bps=1M,bps_max=256K", "--cmdline", "crc"])
        let elapsed = Date().timeIntervalSince(start)
        print("--disk bps=1M,bps_max=256K: 2 MiB read, the whole run took \(elapsed) s (the limit alone 1.75 s)")
        #expect(result.status == 1, "\(result.stdout)\(result.stderr)")
        #expect(result.stdout.contains("disk: 4096 sectors"), "\(result.stdout)")
        #expect(elapsed >= 1.75)
        #expect(elapsed <= 1.75 * 1.2 + 5)
    }
}
