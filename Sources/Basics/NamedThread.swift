import CLinux
#if canImport(Glibc)
import Glibc
#endif

/// Why a thread could not be started.
public struct ThreadStartError: Error, CustomStringConvertible {
    public let name: String
    public let errno: Int32

    public var description: String {
        let reason = errno == EAGAIN
            ? "the process or user has reached its thread limit (ulimit -u, or pids.max of its cgroup)"
            : String(cString: strerror(errno))
        return "cannot start thread '\(name)': \(reason)"
    }
}

/// A dedicated, named POSIX thread for a blocking loop (a vCPU's `KVM_RUN`, an event
/// loop, a disk worker). These never run on the Swift concurrency pool.
///
/// The thread is joinable: its handle stays valid until ``join()``, so it may be sent a
/// signal (``signal(_:)``) at any time before that, even after the body returned. Call
/// ``join()`` exactly once; a thread that is never joined is detached when its owner goes.
public final class NamedThread: @unchecked Sendable {
    // @unchecked Sendable: `handle` is written once in init; `joined` only by the owner's join().

    public let name: String
    private let handle: pthread_t
    private var joined = false

    private final class Body {
        let name: String
        let run: () -> Void
        init(name: String, run: @escaping () -> Void) { self.name = name; self.run = run }
    }

    /// Starts `body` on a new thread called `name` (`top -H` and `ps -L` show at most 15
    /// characters of it).
    public init(name: String, _ body: @escaping @Sendable () -> Void) throws(ThreadStartError) {
        self.name = name
        let context = Unmanaged.passRetained(Body(name: name, run: body)).toOpaque()
        var thread = pthread_t()
        let result = pthread_create(&thread, nil, { argument in
            let body = Unmanaged<Body>.fromOpaque(argument!).takeRetainedValue()
            _ = clinux_set_thread_name(body.name)
            body.run()
            return nil
        }, context)
        guard result == 0 else {
            Unmanaged<Body>.fromOpaque(context).release()
            throw ThreadStartError(name: name, errno: result)
        }
        handle = thread
    }

    deinit {
        if !joined { pthread_detach(handle) }
    }

    /// Sends `signal` to the thread (a kick out of a blocking call). Harmless once the body
    /// has returned, until ``join()``.
    public func signal(_ signal: Int32) {
        guard !joined else { return }
        pthread_kill(handle, signal)
    }

    /// Waits for the body to return.
    public func join() {
        guard !joined else { return }
        joined = true
        pthread_join(handle, nil)
    }
}

/// The process's command line (argv), from the C runtime rather than /proc/self/cmdline:
/// inside a jail, where /proc is not mounted, Swift's `CommandLine.arguments` is empty.
public enum ProcessArguments {
    public static var all: [String] {
        let count = Int(clinux_argc())
        guard count > 0, let argv = clinux_argv() else { return CommandLine.arguments }
        return (0..<count).map { argv[$0].map { String(cString: $0) } ?? "" }
    }
}
