import Basics
import EventLoop
import Glibc
import KVM

/// The signals a running machine uses.
///
/// - The kick signal (SIGRTMIN + 1) interrupts a vCPU thread's `KVM_RUN`: its no-op
///   handler is installed process-wide, and only vCPU threads unblock it.
/// - With ``MachineConfiguration/handleTerminationSignals``, SIGINT, SIGTERM, SIGHUP (a
///   closed terminal, a dropped ssh) and SIGQUIT are blocked in every thread and read
///   from a signalfd by the event loop, which turns them into a clean stop: the terminal
///   is restored and the caller learns which signal it was.
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
    /// afterwards, and turns them into a stop when they arrive, through a signalfd the
    /// event loop waits on. Call it before any other thread starts.
    static func watchTermination(on loop: EventLoop, stop: StopController) throws(SystemError) {
        SignalFD.blockInCallingThread(termination)
        let signals = try SignalFD(signals: termination)
        try loop.register(signals.rawValue, for: .readable, owner: signals) { _ in
            if let received = signals.next() { stop.stop(.signal(received)) }
        }
    }
}
