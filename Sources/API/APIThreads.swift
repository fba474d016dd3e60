import Basics

/// The one place where the API front end starts threads: the HTTP server's event loop
/// ("api") and the thread that runs the VM ("vm-run", which starts the vCPU threads).
/// Every thread gets its name here, and a per-thread set-up (a seccomp filter, say) is to
/// be installed here, at the start of `body`, for all of them.
public enum APIThreads {
    /// The names used, for tests and for filters keyed by thread name.
    public static let serverName = "api"
    public static let runnerName = "vm-run"

    /// Starts `body` on a new named thread.
    @discardableResult
    public static func start(_ name: String, _ body: @escaping @Sendable () -> Void) throws(ThreadStartError) -> NamedThread {
        try NamedThread(name: name) {
            // Per-thread set-up (seccomp) goes here.
            body()
        }
    }
}
