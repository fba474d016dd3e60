import CLinux
import EventLoop
#if canImport(Glibc)
import Glibc
#endif

/// Offloads a TAP may hand its reader (`TUNSETOFFLOAD`): frames whose checksum is left
/// partial, and large TCP or UDP segments (GSO) instead of wire-sized frames. Each one
/// corresponds to virtio-net's guest feature of the same kind; a device offers the
/// guest only what the TAP accepts.
public struct TapOffloads: OptionSet, Sendable, Hashable, CustomStringConvertible {
    public let rawValue: UInt32
    public init(rawValue: UInt32) { self.rawValue = rawValue }

    /// `TUN_F_CSUM`: frames with a partial checksum (`VIRTIO_NET_HDR_F_NEEDS_CSUM`).
    public static let checksum = TapOffloads(rawValue: CLINUX_TUN_F_CSUM)
    /// `TUN_F_TSO4`: TCP over IPv4 segments up to 64 KiB (needs ``checksum``).
    public static let tso4 = TapOffloads(rawValue: CLINUX_TUN_F_TSO4)
    /// `TUN_F_TSO6`: TCP over IPv6 segments (needs ``checksum``).
    public static let tso6 = TapOffloads(rawValue: CLINUX_TUN_F_TSO6)
    /// `TUN_F_TSO_ECN`: TSO segments with ECN bits (needs ``tso4`` or ``tso6``).
    public static let tsoECN = TapOffloads(rawValue: CLINUX_TUN_F_TSO_ECN)
    /// `TUN_F_UFO`: UDP fragmentation offload (accepted by Linux, which no longer makes
    /// such frames; needs ``checksum``).
    public static let ufo = TapOffloads(rawValue: CLINUX_TUN_F_UFO)
    /// `TUN_F_USO4 | TUN_F_USO6`: UDP segmentation (Linux 6.2+, which takes both or neither).
    public static let uso = TapOffloads(rawValue: CLINUX_TUN_F_USO4 | CLINUX_TUN_F_USO6)

    /// Everything Swiftlet knows how to pass on.
    public static let all: TapOffloads = [.checksum, .tso4, .tso6, .tsoECN, .ufo, .uso]

    public var description: String {
        let names: [(TapOffloads, String)] = [(.checksum, "csum"), (.tso4, "tso4"), (.tso6, "tso6"), (.tsoECN, "tso-ecn"),
                                             (.ufo, "ufo"), (.uso, "uso")]
        let present = names.filter { contains($0.0) }.map(\.1)
        return present.isEmpty ? "none" : present.joined(separator: ",")
    }

    /// The combinations to try, most capable first, when finding what a kernel accepts:
    /// Linux refuses the whole request (EINVAL) when it does not know one bit.
    static let probeOrder: [TapOffloads] = [
        .all, [.checksum, .tso4, .tso6, .tsoECN, .ufo], [.checksum, .tso4, .tso6, .tsoECN],
        [.checksum, .tso4, .tso6], .checksum, [],
    ]
}

/// Where a virtio-net device sends the guest's frames and gets the frames for the guest:
/// a descriptor that moves one frame per `readv`/`writev`, each preceded by the 12-byte
/// virtio-net header (a TAP with `IFF_VNET_HDR`; in unit tests, one end of a
/// `socketpair(AF_UNIX, SOCK_SEQPACKET)`).
public protocol NetBackend: AnyObject, Sendable {
    /// Non-blocking, readable and writable; owned by the backend.
    var descriptor: Int32 { get }
    /// For messages: the TAP's name.
    var name: String { get }
    /// The offloads ``setOffloads(_:)`` accepts.
    var supportedOffloads: TapOffloads { get }
    /// Says which offloads the reader (the guest) takes from now on.
    func setOffloads(_ offloads: TapOffloads) throws(SystemError)
}

/// Why a TAP could not be opened: one line that says what to do.
public struct TapError: Error, Equatable, CustomStringConvertible, Sendable {
    public let message: String
    /// The errno of the call that failed.
    public let errno: Int32
    public var description: String { message }
}

/// A Linux TAP interface opened for a virtio-net device: owns the `/dev/net/tun`
/// descriptor attached to it (non-blocking, with `IFF_VNET_HDR` and a 12-byte header),
/// and knows which offloads the kernel accepts.
///
/// An existing TAP (made by `ip tuntap add`, persistent) is attached to and left as it is.
/// A missing one is created by `TUNSETIFF` when the process may (root or
/// `CAP_NET_ADMIN`), brought up (`SIOCSIFFLAGS`), and, not being persistent, removed by the
/// kernel when the descriptor closes: when this object goes away or Swiftlet exits.
public final class TapDevice: NetBackend {
    /// The virtio-net header size every frame carries: 12 bytes with VERSION_1 (and with
    /// MRG_RXBUF in legacy devices).
    public static let headerSize: Int32 = 12
    public static let clonePath = "/dev/net/tun"

    public let name: String
    private let owned: OwnedFileDescriptor
    public var descriptor: Int32 { owned.rawValue }
    /// Swiftlet created the interface: it disappears when the descriptor closes.
    public let created: Bool
    public let supportedOffloads: TapOffloads

    /// Opens (or creates) the TAP `name`. The TAP starts with no offload; the device sets
    /// the ones the guest negotiates.
    public init(name: String) throws(TapError) {
        var existed: Int32 = 0
        var step: Int32 = 0
        let fd = clinux_tap_open(name, Self.headerSize, &existed, &step)
        guard fd >= 0 else { throw Self.error(name: name, errno: -fd, step: step, existed: existed != 0) }
        owned = OwnedFileDescriptor(owning: fd)
        self.name = name
        created = existed == 0
        // Find what this kernel takes: TUNSETOFFLOAD refuses a request with a bit it does
        // not know, so the richest combination that succeeds is the answer. Then none,
        // until a guest negotiates.
        supportedOffloads = TapOffloads.probeOrder.first { clinux_tap_set_offload(fd, $0.rawValue) == 0 } ?? []
        let reset = clinux_tap_set_offload(fd, 0)
        guard reset == 0 else {
            throw TapError(message: "TAP device '\(name)': TUNSETOFFLOAD failed: \(String(cString: strerror(-reset)))", errno: -reset)
        }
        if created {
            let result = clinux_interface_up(name)
            guard result == 0 else {
                throw TapError(message: "created TAP device '\(name)' but cannot bring it up: \(String(cString: strerror(-result)))",
                               errno: -result)
            }
        }
    }

    public func setOffloads(_ offloads: TapOffloads) throws(SystemError) {
        let result = clinux_tap_set_offload(descriptor, offloads.rawValue)
        guard result == 0 else { throw SystemError("TUNSETOFFLOAD(\(offloads)) on \(name)", errno: -result) }
    }

    /// What to tell the user when step `step` of opening the TAP failed with `errno`.
    static func error(name: String, errno: Int32, step: Int32, existed: Bool) -> TapError {
        let reason = String(cString: strerror(errno))
        let user = currentUserName()
        let create = "ip tuntap add dev \(name) mode tap user \(user) && ip link set \(name) up"
        let message: String
        switch (UInt32(step), errno) {
        case (CLINUX_TAP_STEP_NAME.rawValue, _):
            message = "'\(name)' is not an interface name (1 to \(IFNAMSIZ - 1) bytes)"
        case (CLINUX_TAP_STEP_OPEN.rawValue, ENOENT), (CLINUX_TAP_STEP_OPEN.rawValue, ENODEV):
            message = "cannot open \(clonePath): \(reason) (the host kernel needs the tun driver: modprobe tun)"
        case (CLINUX_TAP_STEP_OPEN.rawValue, EACCES), (CLINUX_TAP_STEP_OPEN.rawValue, EPERM):
            message = "cannot open \(clonePath): \(reason) (TAP devices need read and write access to it, usually mode 0666)"
        case (CLINUX_TAP_STEP_ATTACH.rawValue, EPERM) where !existed:
            message = "TAP device '\(name)' does not exist and creating it needs root or CAP_NET_ADMIN; create it first: \(create)"
        case (CLINUX_TAP_STEP_ATTACH.rawValue, EPERM):
            message = "TAP device '\(name)' exists but this user may not attach to it; make it for this user: "
                + "ip tuntap del dev \(name) mode tap && \(create)"
        case (CLINUX_TAP_STEP_ATTACH.rawValue, EBUSY):
            message = "TAP device '\(name)' is in use by another program (a TAP has one reader at a time)"
        case (CLINUX_TAP_STEP_ATTACH.rawValue, EINVAL) where existed:
            message = "'\(name)' exists but is not a TAP device (a TUN device, or another kind of interface)"
        case (CLINUX_TAP_STEP_ATTACH.rawValue, _):
            message = "cannot attach to TAP device '\(name)' (TUNSETIFF): \(reason)"
        default:
            message = "TAP device '\(name)': TUNSETVNETHDRSZ failed: \(reason)"
        }
        return TapError(message: message, errno: errno)
    }

    /// The name of the effective user, for the `ip tuntap add ... user NAME` hint.
    static func currentUserName() -> String {
        guard let entry = getpwuid(geteuid()), let name = entry.pointee.pw_name else { return "$USER" }
        return String(cString: name)
    }
}
