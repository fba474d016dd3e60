import Basics
import CLinux
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// One epoll instance and the thread that waits on it: devices and the machine register
/// file descriptors with a handler, and the loop calls the handler on its thread when the
/// descriptor is ready. Nothing else in Swiftlet blocks a thread of its own, apart from
/// vCPU threads and device I/O workers.
///
/// Registration and ``stop()`` are safe from any thread. Handlers run one at a time, on
/// the loop's thread, and must not block; a handler may register and unregister
/// descriptors, its own included. The loop does not own registered descriptors: the
/// registration keeps the object that owns each one alive until it is unregistered.
public final class EventLoop: Sendable {
    /// What a descriptor is waited for, and what was reported.
    public struct Events: OptionSet, Sendable, Hashable {
        public let rawValue: UInt32
        public init(rawValue: UInt32) { self.rawValue = rawValue }
        public static let readable = Events(rawValue: CLINUX_EPOLLIN)
        public static let writable = Events(rawValue: CLINUX_EPOLLOUT)
        /// Always reported, never asked for.
        public static let error = Events(rawValue: CLINUX_EPOLLERR)
        /// Always reported, never asked for: the other end closed.
        public static let hangUp = Events(rawValue: CLINUX_EPOLLHUP)
    }

    public typealias Handler = @Sendable (Events) -> Void

    /// A registered descriptor, to change or remove it later.
    public struct Registration: Hashable, Sendable {
        let token: UInt64
        let fd: Int32
    }

    private struct Entry {
        let handler: Handler
        let owner: (any AnyObject & Sendable)?
    }

    private struct State {
        var entries: [UInt64: Entry] = [:]
        var nextToken: UInt64 = 1
        var deferred: [@Sendable () -> Void] = []
        var stopping = false
    }

    private let epoll: OwnedFileDescriptor
    private let wakeup: EventFD
    private let state = Mutex(State())
    private static let wakeupToken: UInt64 = 0

    public init() throws(SystemError) {
        let fd = clinux_epoll_create()
        guard fd >= 0 else { throw SystemError("epoll_create1", errno: errno) }
        epoll = OwnedFileDescriptor(owning: fd)
        wakeup = try EventFD()
        guard clinux_epoll_add(fd, wakeup.rawValue, CLINUX_EPOLLIN, Self.wakeupToken) == 0 else {
            throw SystemError("epoll_ctl", errno: errno)
        }
    }

    /// Calls `handler` on the loop's thread whenever `fd` is ready for `events` (level
    /// triggered: again and again until the condition is consumed). `owner`, if given, is
    /// kept alive while the registration exists (the object that closes `fd`).
    ///
    /// Fails with `EPERM` for descriptors epoll cannot wait on, such as regular files.
    @discardableResult
    public func register(_ fd: Int32, for events: Events, owner: (any AnyObject & Sendable)? = nil,
                         handler: @escaping Handler) throws(SystemError) -> Registration {
        let token = state.withLock { state -> UInt64 in
            let token = state.nextToken
            state.nextToken += 1
            state.entries[token] = Entry(handler: handler, owner: owner)
            return token
        }
        guard clinux_epoll_add(epoll.rawValue, fd, events.rawValue, token) == 0 else {
            let err = errno
            _ = state.withLock { $0.entries.removeValue(forKey: token) }
            throw SystemError("epoll_ctl(ADD)", errno: err)
        }
        return Registration(token: token, fd: fd)
    }

    /// Changes what `registration` waits for (an empty set pauses it).
    public func modify(_ registration: Registration, for events: Events) throws(SystemError) {
        guard clinux_epoll_modify(epoll.rawValue, registration.fd, events.rawValue, registration.token) == 0 else {
            throw SystemError("epoll_ctl(MOD)", errno: errno)
        }
    }

    /// Stops watching; the handler is not called again, even for a report already taken.
    public func unregister(_ registration: Registration) {
        _ = clinux_epoll_delete(epoll.rawValue, registration.fd)
        _ = state.withLock { $0.entries.removeValue(forKey: registration.token) }
    }

    /// Runs `work` on the loop's thread soon (from any thread).
    public func schedule(_ work: @escaping @Sendable () -> Void) {
        state.withLock { $0.deferred.append(work) }
        wakeup.signal()
    }

    /// Makes ``run()`` return after the handlers of the current round (from any thread).
    public func stop() {
        state.withLock { $0.stopping = true }
        wakeup.signal()
    }

    /// Waits for events and calls handlers until ``stop()``. Call it on one thread only.
    public func run() {
        var reports = [clinux_event](repeating: clinux_event(), count: 64)
        while !state.withLock({ $0.stopping }) {
            let count = reports.withUnsafeMutableBufferPointer { clinux_epoll_wait(epoll.rawValue, $0.baseAddress, Int32($0.count), -1) }
            if count < 0 {
                if errno == EINTR { continue }
                return // only EBADF/EFAULT/EINVAL: programming errors; the loop ends
            }
            for report in reports[0..<Int(count)] {
                if report.token == Self.wakeupToken {
                    wakeup.drain()
                    continue
                }
                guard let entry = state.withLock({ $0.entries[report.token] }) else { continue }
                entry.handler(Events(rawValue: report.events))
            }
            for work in state.withLock({ state -> [@Sendable () -> Void] in
                defer { state.deferred.removeAll() }
                return state.deferred
            }) {
                work()
            }
        }
    }

    /// Runs the loop on a new thread called `name`; join it after ``stop()``.
    public func start(name: String) throws(ThreadStartError) -> NamedThread {
        try NamedThread(name: name) { [self] in run() }
    }
}
