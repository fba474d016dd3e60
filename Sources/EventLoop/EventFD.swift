import CLinux
#if canImport(Glibc)
import Glibc
#endif

/// A kernel event counter (`eventfd(2)`): writing adds to it, reading returns the count
/// and resets it, and it is readable (for epoll) while the count is non-zero.
///
/// It is the cheapest way to say "something happened" across threads and to the kernel:
/// KVM signals one when a guest writes a device's notify register (`KVM_IOEVENTFD`), and
/// injects an interrupt when one is written (`KVM_IRQFD`).
public final class EventFD: Sendable {
    public let descriptor: OwnedFileDescriptor
    public var rawValue: Int32 { descriptor.rawValue }

    /// - Parameters:
    ///   - initialValue: the starting count.
    ///   - semaphore: each read returns 1 and decrements, instead of returning the whole count.
    ///   - nonBlocking: a read of a zero count returns at once instead of waiting.
    public init(initialValue: UInt32 = 0, semaphore: Bool = false, nonBlocking: Bool = true) throws(SystemError) {
        var flags = Int32(EFD_CLOEXEC)
        if semaphore { flags |= Int32(EFD_SEMAPHORE) }
        if nonBlocking { flags |= Int32(EFD_NONBLOCK) }
        let fd = eventfd(initialValue, flags)
        guard fd >= 0 else { throw SystemError("eventfd", errno: errno) }
        descriptor = OwnedFileDescriptor(owning: fd)
    }

    /// Adds `count` to the counter, waking whoever waits for it.
    public func signal(_ count: UInt64 = 1) {
        var value = count
        while write(rawValue, &value, 8) < 0 && errno == EINTR {}
    }

    /// Reads and resets the counter; 0 when it was zero (non-blocking) or on error.
    @discardableResult
    public func drain() -> UInt64 {
        readValue(rawValue, as: UInt64.self) ?? 0
    }
}
