import Basics
import Glibc
import KVM

/// The signals a running machine uses.
///
/// - The kick signal (SIGRTMIN + 1) interrupts a vCPU thread's `KVM_RUN`: its no-op
///   handler is installed process-wide, and only vCPU threads unblock it.
/// - With ``MachineConfiguration/handleTerminationSignals``, SIGINT, SIGTERM, SIGHUP (a
///   closed terminal, a dropped ssh) and SIGQUIT are blocked in every thread and taken
///   synchronously by one thread (`sigwait`), which turns them into a clean stop: the
///   terminal is restored and the caller learns which signal it was.
enum Signals {
    static let kick = ckvm_kick_signal()
    static let termination: [Int32] = [SIGINT, SIGTERM, SIGHUP, SIGQUIT]

    /// Installs the kick signal's handler (idempotent).
    static func installKickHandler() {
        _ = ckvm_install_kick_handler(kick)
    }

    /// Called on a vCPU thread before its loop.
    static func unblockKick() {
        var set = sigset_t()
        sigemptyset(&set)
        sigaddset(&set, kick)
        pthread_sigmask(SIG_UNBLOCK, &set, nil)
    }

    /// Blocks the termination signals in the calling thread and in every thread it starts
    /// afterwards. `swiftlet` calls it first thing in `main`, before any thread exists.
    static func blockTermination() {
        var set = terminationSet()
        pthread_sigmask(SIG_BLOCK, &set, nil)
    }

    /// Starts the thread that turns a termination signal into a stop.
    static func forwardTermination(to stop: StopController) throws(ThreadStartError) {
        _ = try NamedThread(name: "signals") {
            var set = terminationSet()
            var received: Int32 = 0
            while sigwait(&set, &received) != 0 {}
            stop.stop(.signal(received))
        }
    }

    private static func terminationSet() -> sigset_t {
        var set = sigset_t()
        sigemptyset(&set)
        for signal in termination { sigaddset(&set, signal) }
        return set
    }
}
