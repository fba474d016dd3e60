import Basics
import Memory

/// Every reason a kernel, initrd or command line can be refused, or a boot image cannot be
/// laid out in guest memory. Each case prints as one line that names the problem and what
/// the file or the option would have to be instead; the machine prints it and exits with a
/// non-zero status before any vCPU runs.
public enum BootError: Error, Equatable, CustomStringConvertible {
    /// The file is empty.
    case emptyKernel
    /// The content matches no format Swiftlet boots.
    case notAKernel(reason: String)
    /// A header or table claims more bytes than the file has.
    case truncated(what: String, needed: UInt64, available: UInt64)
    /// A header field holds a value the protocol forbids.
    case invalidHeader(String)
    /// A bzImage older than boot protocol 2.06.
    case unsupportedBootProtocol(version: UInt16)
    /// A bzImage without XLF_KERNEL_64: it has no 64-bit entry point.
    case no64BitEntry
    /// An ELF file Swiftlet cannot boot (wrong machine, no loadable segment, ...).
    case unsupportedELF(String)
    /// A loadable piece of the kernel lies (partly) outside guest RAM.
    case segmentOutsideMemory(what: String, address: UInt64, size: UInt64)
    /// The kernel image does not fit in guest RAM at the address it must be loaded.
    case kernelTooLarge(needed: UInt64, available: UInt64)
    /// The initrd does not fit between the kernel and the highest address it may use.
    case initrdTooLarge(size: UInt64, available: UInt64, limit: UInt64)
    /// The command line is longer than the kernel accepts.
    case cmdlineTooLong(length: Int, maximum: UInt64)
    /// The command line contains a NUL byte.
    case cmdlineContainsNUL
    /// Too many vCPUs for the firmware tables (MP table and MADT use 8-bit APIC IDs).
    case tooManyCPUs(Int, maximum: Int)
    /// The compressed payload of a bzImage cannot be decompressed on the host.
    case decompressionFailed(format: String, reason: String)
    /// Guest RAM is too small for the fixed boot structures.
    case memoryTooSmall(needed: UInt64, available: UInt64)
    /// The platform devices handed to the firmware tables cannot be announced as given
    /// (overlapping ranges, a GSI used twice, ...): a fault in the machine's layout.
    case invalidPlatform(String)

    public var description: String {
        switch self {
        case .emptyKernel:
            return "the kernel file is empty"
        case let .notAKernel(reason):
            return "not a kernel Swiftlet can boot: \(reason) (expected a bzImage, an ELF vmlinux with a PVH note or 64-bit entry, or a Multiboot v1 kernel)"
        case let .truncated(what, needed, available):
            return "truncated kernel: \(what) needs \(needed) bytes but the file has \(available)"
        case let .invalidHeader(reason):
            return "invalid kernel header: \(reason)"
        case let .unsupportedBootProtocol(version):
            return "bzImage uses Linux boot protocol \(version >> 8).\(String(format2: version & 0xFF)); Swiftlet needs 2.06 or later"
        case .no64BitEntry:
            return "bzImage has no 64-bit entry point (XLF_KERNEL_64 is not set in xloadflags)"
        case let .unsupportedELF(reason):
            return "unsupported ELF kernel: \(reason)"
        case let .segmentOutsideMemory(what, address, size):
            return "\(what) at guest address \(Hex.prefixed(address)), \(size) bytes, lies outside guest RAM"
        case let .kernelTooLarge(needed, available):
            return "the kernel needs \(needed) bytes of guest RAM at its load address but only \(available) are there; give the VM more memory"
        case let .initrdTooLarge(size, available, limit):
            return "the initrd (\(size) bytes) does not fit: \(available) bytes are free between the kernel and \(Hex.prefixed(limit)), the highest address the kernel allows for it"
        case let .cmdlineTooLong(length, maximum):
            return "the command line is \(length) bytes long; this kernel accepts at most \(maximum)"
        case .cmdlineContainsNUL:
            return "the command line contains a NUL byte"
        case let .tooManyCPUs(count, maximum):
            return "\(count) vCPUs requested; the firmware tables support at most \(maximum)"
        case let .decompressionFailed(format, reason):
            return "cannot decompress the \(format) kernel payload on the host: \(reason)"
        case let .memoryTooSmall(needed, available):
            return "guest RAM (\(available) bytes) is too small to boot a kernel; at least \(needed) bytes are needed"
        case let .invalidPlatform(reason):
            return "the firmware tables cannot announce the machine's devices: \(reason)"
        }
    }
}

extension String {
    /// Two decimal digits, for protocol minor versions ("2.06").
    init(format2 value: UInt16) {
        self = value < 10 ? "0\(value)" : "\(value)"
    }
}

extension BootError {
    /// Maps a guest-memory error raised while writing `what` to the boot error naming it.
    static func memory(_ error: GuestMemoryError, _ what: String) -> BootError {
        switch error {
        case let .outOfRange(address, length):
            return .segmentOutsideMemory(what: what, address: address, size: length)
        default:
            return .invalidHeader("\(what): \(error)")
        }
    }
}
