import Glibc
import KVM

/// Starts dedicated, named POSIX threads for blocking loops (a vCPU's `KVM_RUN`, the
/// console's `read`). They never run on the Swift concurrency pool.
enum NamedThread {
    private final class Body {
        let name: String
        let run: @Sendable () -> Void
        init(name: String, run: @escaping @Sendable () -> Void) { self.name = name; self.run = run }
    }

    /// Spawns a detached thread called `name` (shown by `top -H` and `ps -L`; at most
    /// 15 characters are kept) and returns its handle for `pthread_kill`.
    @discardableResult
    static func spawn(name: String, _ run: @escaping @Sendable () -> Void) -> pthread_t {
        let body = Unmanaged.passRetained(Body(name: name, run: run)).toOpaque()
        var thread = pthread_t()
        let result = pthread_create(&thread, nil, { argument in
            let body = Unmanaged<Body>.fromOpaque(argument!).takeRetainedValue()
            _ = ckvm_set_thread_name(String(body.name.prefix(15)))
            body.run()
            return nil
        }, body)
        precondition(result == 0, "pthread_create failed: \(result)") // out of threads: not a user error
        pthread_detach(thread)
        return thread
    }
}

/// Nanoseconds on CLOCK_MONOTONIC, the clock Python's `time.monotonic_ns()` reads too.
@inline(__always)
func monotonicNanoseconds() -> UInt64 {
    var now = timespec()
    clock_gettime(CLOCK_MONOTONIC, &now)
    return UInt64(now.tv_sec) * 1_000_000_000 + UInt64(now.tv_nsec)
}
