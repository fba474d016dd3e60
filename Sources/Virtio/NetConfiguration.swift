import RateLimit

/// virtio-net feature bits (virtio 1.2, 5.1.3). Swiftlet offers MAC, STATUS, MRG_RXBUF,
/// and the checksum and segmentation offloads its TAP accepts.
public enum VirtioNetFeature {
    /// The device takes frames with a partial checksum (`NEEDS_CSUM`) from the driver.
    public static let checksum: UInt64 = 1 << 0
    /// The driver takes frames with a partial checksum.
    public static let guestChecksum: UInt64 = 1 << 1
    /// The control queue can change the guest offloads (not offered: no control queue).
    public static let controlGuestOffloads: UInt64 = 1 << 2
    /// `mtu` in the configuration space (not offered).
    public static let mtu: UInt64 = 1 << 3
    /// `mac` in the configuration space is the address to use.
    public static let mac: UInt64 = 1 << 5
    /// The driver takes TCP/IPv4, TCP/IPv6 segments, segments with ECN, UDP fragments.
    public static let guestTSO4: UInt64 = 1 << 7
    public static let guestTSO6: UInt64 = 1 << 8
    public static let guestECN: UInt64 = 1 << 9
    public static let guestUFO: UInt64 = 1 << 10
    /// The device takes TCP/IPv4, TCP/IPv6 segments, segments with ECN, UDP fragments.
    public static let hostTSO4: UInt64 = 1 << 11
    public static let hostTSO6: UInt64 = 1 << 12
    public static let hostECN: UInt64 = 1 << 13
    public static let hostUFO: UInt64 = 1 << 14
    /// A received frame may span several receive chains (`num_buffers`).
    public static let mergeableReceiveBuffers: UInt64 = 1 << 15
    /// `status` in the configuration space says whether the link is up.
    public static let status: UInt64 = 1 << 16
    /// A control queue (not offered).
    public static let controlQueue: UInt64 = 1 << 17
    /// Several queue pairs (not offered: one RX and one TX queue).
    public static let multiQueue: UInt64 = 1 << 22
    /// The driver takes UDP/IPv4 and UDP/IPv6 segments (USO).
    public static let guestUSO4: UInt64 = 1 << 54
    public static let guestUSO6: UInt64 = 1 << 55
    /// The device takes UDP segments (USO).
    public static let hostUSO: UInt64 = 1 << 56

    /// The features that mean "the driver takes segments larger than a wire frame".
    static let guestSegmentation = guestTSO4 | guestTSO6 | guestUFO | guestUSO4 | guestUSO6
    /// The features that mean "the driver sends segments larger than a wire frame".
    static let hostSegmentation = hostTSO4 | hostTSO6 | hostUFO | hostUSO

    /// The virtio features that each TAP offload makes possible, both ways: what the TAP may
    /// hand the guest (guest features, set with TUNSETOFFLOAD after negotiation) and, by
    /// the same kernel support, what it takes from the guest (host features).
    static func features(for offloads: TapOffloads) -> UInt64 {
        var features: UInt64 = 0
        guard offloads.contains(.checksum) else { return 0 }
        features |= checksum | guestChecksum
        if offloads.contains(.tso4) { features |= guestTSO4 | hostTSO4 }
        if offloads.contains(.tso6) { features |= guestTSO6 | hostTSO6 }
        if offloads.contains(.tsoECN), offloads.contains(.tso4) || offloads.contains(.tso6) { features |= guestECN | hostECN }
        if offloads.contains(.ufo) { features |= guestUFO | hostUFO }
        if offloads.contains(.uso) { features |= guestUSO4 | guestUSO6 | hostUSO }
        return features
    }

    /// The TAP offloads that let the TAP hand the driver what its negotiated features say
    /// it takes, following the dependencies of 5.1.3.1 (segments need the checksum
    /// offload; ECN needs TSO; Linux's TAP takes USO for both IP versions or neither).
    static func tapOffloads(for negotiated: UInt64) -> TapOffloads {
        guard negotiated & guestChecksum != 0 else { return [] }
        var offloads: TapOffloads = .checksum
        if negotiated & guestTSO4 != 0 { offloads.insert(.tso4) }
        if negotiated & guestTSO6 != 0 { offloads.insert(.tso6) }
        if negotiated & guestECN != 0, negotiated & (guestTSO4 | guestTSO6) != 0 { offloads.insert(.tsoECN) }
        if negotiated & guestUFO != 0 { offloads.insert(.ufo) }
        if negotiated & guestUSO4 != 0, negotiated & guestUSO6 != 0 { offloads.insert(.uso) }
        return offloads
    }
}

/// The header in front of every frame on both queues (virtio 1.2, 5.1.6): 12 bytes with
/// VERSION_1, little-endian. The TAP uses the same layout (`IFF_VNET_HDR`,
/// `TUNSETVNETHDRSZ` 12).
public enum VirtioNetHeader {
    public static let size = 12
    /// Byte offsets.
    static let flagsOffset = 0          // u8
    static let gsoTypeOffset = 1        // u8
    static let numBuffersOffset = 10    // le16, written by the device on receive

    /// `flags`: the checksum from `csum_start` on is left for the receiver.
    public static let needsChecksum: UInt8 = 1
    /// `flags`: the checksum was checked (receive only).
    public static let dataValid: UInt8 = 2
    /// `gso_type` values; ``gsoECN`` may be or-ed into the TCP ones.
    public static let gsoNone: UInt8 = 0
    public static let gsoTCPv4: UInt8 = 1
    public static let gsoUDP: UInt8 = 3
    public static let gsoTCPv6: UInt8 = 4
    public static let gsoUDPL4: UInt8 = 5
    public static let gsoECN: UInt8 = 0x80
}

/// Frame sizes the features allow (without the virtio-net header).
public enum VirtioNetLimits {
    /// An Ethernet frame with a VLAN tag and a 1500-byte payload (Linux's
    /// `ETH_HLEN + VLAN_HLEN + ETH_DATA_LEN`): the largest frame without segmentation.
    public static let wireFrame = 1518
    /// The largest frame with segmentation offloads: 65562 bytes of buffer (virtio 1.2,
    /// 5.1.6.3.1) less the 12-byte header.
    public static let segmentedFrame = 65550
    /// The smallest frame a TAP takes: an Ethernet header.
    public static let ethernetHeader = 14
}

/// A MAC address: six bytes, written `52:54:00:12:34:56`.
public struct MACAddress: Sendable, Hashable, CustomStringConvertible {
    public let bytes: [UInt8]

    /// Parses six pairs of hexadecimal digits separated by colons.
    public init?(_ text: String) {
        let parts = text.split(separator: ":", omittingEmptySubsequences: false)
        guard parts.count == 6 else { return nil }
        var bytes: [UInt8] = []
        for part in parts {
            guard part.count == 2, let byte = UInt8(part, radix: 16) else { return nil }
            bytes.append(byte)
        }
        self.bytes = bytes
    }

    public init?(bytes: [UInt8]) {
        guard bytes.count == 6 else { return nil }
        self.bytes = bytes
    }

    /// A random unicast, locally administered address (bit 1 of the first byte set, bit 0
    /// clear), as a MAC no vendor assigned: no clash with real hardware.
    public static func randomLocallyAdministered<Generator: RandomNumberGenerator>(using generator: inout Generator) -> MACAddress {
        var bytes = (0..<6).map { _ in UInt8.random(in: 0...255, using: &generator) }
        bytes[0] = (bytes[0] & 0xFC) | 0x02
        return MACAddress(bytes: bytes)!
    }

    public static func randomLocallyAdministered() -> MACAddress {
        var generator = SystemRandomNumberGenerator()
        return randomLocallyAdministered(using: &generator)
    }

    /// A group address (bit 0 of the first byte): not usable by one interface.
    public var isMulticast: Bool { bytes[0] & 1 != 0 }
    public var isLocallyAdministered: Bool { bytes[0] & 2 != 0 }
    public var isZero: Bool { bytes.allSatisfy { $0 == 0 } }

    public var description: String {
        bytes.map { byte in
            let digits = String(byte, radix: 16)
            return digits.count == 1 ? "0" + digits : digits
        }.joined(separator: ":")
    }
}

/// How a virtio-net device presents itself: everything `--net` says besides the TAP.
public struct VirtioNetOptions: Sendable, Equatable {
    /// The address in the configuration space (`VIRTIO_NET_F_MAC`).
    public var mac: MACAddress
    /// Which `--net` this is (0 for the first), for messages and the thread's name.
    public var index: Int
    /// The largest size of each queue: a power of two from 16 to 32768.
    public var queueSize: UInt16
    /// Rate limiters of reception (frames handed to the guest) and transmission (frames
    /// the guest sends); `nil`: unlimited. Changed while the device runs with
    /// ``VirtioNet/updateRateLimiters(receive:transmit:)``.
    public var receiveRateLimiter: RateLimiterConfiguration?
    public var transmitRateLimiter: RateLimiterConfiguration?

    public init(mac: MACAddress, index: Int = 0, queueSize: UInt16 = 256,
                receiveRateLimiter: RateLimiterConfiguration? = nil, transmitRateLimiter: RateLimiterConfiguration? = nil) {
        self.receiveRateLimiter = receiveRateLimiter
        self.transmitRateLimiter = transmitRateLimiter
        self.mac = mac
        self.index = index
        self.queueSize = queueSize
    }
}

/// The device configuration space (virtio 1.2, 5.1.4), read-only, little-endian: `mac`,
/// `status` (link up), `max_virtqueue_pairs` (1); the rest (mtu, speed, duplex, RSS) is 0,
/// their features not being offered.
struct NetConfigurationSpace {
    enum Offset {
        static let mac = 0                  // u8[6]
        static let status = 6               // le16
        static let maxVirtqueuePairs = 8    // le16
        static let mtu = 10                 // le16
    }
    /// `struct virtio_net_config` of virtio 1.2, up to `supported_hash_types`.
    static let size = 24
    /// `status`: the link is up.
    static let linkUp: UInt16 = 1

    static func bytes(mac: MACAddress) -> [UInt8] {
        var bytes = [UInt8](repeating: 0, count: size)
        bytes.replaceSubrange(Offset.mac..<(Offset.mac + 6), with: mac.bytes)
        bytes.withUnsafeMutableBytes {
            $0.storeBytes(of: linkUp.littleEndian, toByteOffset: Offset.status, as: UInt16.self)
            $0.storeBytes(of: UInt16(1).littleEndian, toByteOffset: Offset.maxVirtqueuePairs, as: UInt16.self)
        }
        return bytes
    }
}

/// What a virtio-net device has done and refused: counters since it was made. Every frame
/// the device drops is counted here, by reason.
public struct VirtioNetStatistics: Sendable, Equatable {
    /// Frames written to the TAP, and their bytes (without the virtio-net header).
    public var transmittedFrames: UInt64 = 0
    public var transmittedBytes: UInt64 = 0
    /// Frames handed to the guest, and their bytes (without the header).
    public var receivedFrames: UInt64 = 0
    public var receivedBytes: UInt64 = 0
    /// Transmit chains dropped as malformed: shorter than the header, a frame shorter
    /// than an Ethernet header, or an offload (checksum, segmentation type) the driver
    /// did not negotiate.
    public var transmitMalformed: UInt64 = 0
    /// Transmit frames longer than the negotiated features allow.
    public var transmitOversized: UInt64 = 0
    /// Transmit frames the TAP refused (the kernel's own checks, the interface down).
    public var transmitBackendErrors: UInt64 = 0
    /// Received frames dropped because they were longer than the driver's features or
    /// buffers allow.
    public var receiveOversized: UInt64 = 0
    /// Received frames dropped because the TAP gave less than a header, or read errors.
    public var receiveErrors: UInt64 = 0
    /// Receive chains too small for a header, returned empty.
    public var receiveUnusableBuffers: UInt64 = 0
    /// Times reception stopped because the driver had no receive buffers left.
    public var receivePauses: UInt64 = 0
    /// Times the device woke up because the TAP was ready (a busy loop shows here).
    public var backendWakeups: UInt64 = 0
    /// Times reception and transmission stopped to wait for the rate limiter's tokens.
    public var receiveRateLimited: UInt64 = 0
    public var transmitRateLimited: UInt64 = 0

    public init() {}

    /// Every frame dropped, for any reason.
    public var dropped: UInt64 {
        transmitMalformed + transmitOversized + transmitBackendErrors + receiveOversized + receiveErrors
    }

    /// One line for `--trace-exits`.
    public var summary: String {
        "tx \(transmittedFrames) frames (\(transmittedBytes) bytes), rx \(receivedFrames) frames (\(receivedBytes) bytes); "
            + "dropped: tx malformed \(transmitMalformed), tx oversized \(transmitOversized), "
            + "tx refused by the TAP \(transmitBackendErrors), "
            + "rx oversized \(receiveOversized), rx errors \(receiveErrors); rx buffers unusable \(receiveUnusableBuffers), "
            + "rx paused for buffers \(receivePauses) times; rate limited: rx \(receiveRateLimited), tx \(transmitRateLimited) times"
    }
}
