#if canImport(Glibc)
import Glibc
#endif

/// A failed system call: which one, and the `errno` it set.
public struct SystemError: Error, Equatable, CustomStringConvertible {
    public let operation: String
    public let errno: Int32

    public init(_ operation: String, errno: Int32) {
        self.operation = operation
        self.errno = errno
    }

    public var description: String { "\(operation) failed: \(String(cString: strerror(errno)))" }
}

/// Owns one file descriptor and closes it in `deinit`: an eventfd, a timerfd, a
/// signalfd, an epoll instance, or any descriptor handed over with ``init(owning:)``.
public final class OwnedFileDescriptor: Sendable {
    public let rawValue: Int32

    /// Takes ownership of `rawValue`: it is closed when this object goes away.
    public init(owning rawValue: Int32) { self.rawValue = rawValue }

    deinit { close(rawValue) }
}

/// `read(2)` of exactly one `T`, retried on EINTR. `nil` when nothing is there
/// (`EAGAIN` on a non-blocking descriptor) or on any other error.
func readValue<T>(_ fd: Int32, as: T.Type) -> T? {
    let size = MemoryLayout<T>.size
    let buffer = UnsafeMutableRawPointer.allocate(byteCount: size, alignment: MemoryLayout<T>.alignment)
    defer { buffer.deallocate() }
    while true {
        let count = read(fd, buffer, size)
        if count == size { return buffer.loadUnaligned(as: T.self) }
        if count < 0 && errno == EINTR { continue }
        return nil
    }
}
