import CLinux
#if canImport(Glibc)
import Glibc
#endif

/// Signals delivered as a readable descriptor (`signalfd(2)`) instead of to a handler.
/// The signals must be blocked in every thread (``blockInCallingThread(_:)`` before any
/// thread starts), or the kernel delivers them the usual way.
public final class SignalFD: Sendable {
    public let descriptor: OwnedFileDescriptor
    public var rawValue: Int32 { descriptor.rawValue }
    public let signals: [Int32]

    public init(signals: [Int32]) throws(SystemError) {
        var set = Self.set(of: signals)
        let fd = signalfd(-1, &set, Int32(SFD_CLOEXEC | SFD_NONBLOCK))
        guard fd >= 0 else { throw SystemError("signalfd", errno: errno) }
        descriptor = OwnedFileDescriptor(owning: fd)
        self.signals = signals
    }

    /// Blocks `signals` in the calling thread and in every thread it starts from now on.
    public static func blockInCallingThread(_ signals: [Int32]) {
        var set = Self.set(of: signals)
        pthread_sigmask(SIG_BLOCK, &set, nil)
    }

    /// The next pending signal's number, or `nil` when none is pending.
    public func next() -> Int32? {
        guard let info = readValue(rawValue, as: signalfd_siginfo.self) else { return nil }
        return Int32(bitPattern: info.ssi_signo)
    }

    static func set(of signals: [Int32]) -> sigset_t {
        var set = sigset_t()
        sigemptyset(&set)
        for signal in signals { sigaddset(&set, signal) }
        return set
    }
}
