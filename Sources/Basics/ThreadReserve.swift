import Dispatch
import Synchronization

/// A thread a caller can wait for.
public protocol JoinableThread: Sendable {
    /// Waits for the body to return. Call it once.
    func join()
}

extension NamedThread: JoinableThread {}

/// How a device starts the threads of a session (a virtio device's, from DRIVER_OK to the
/// reset): on demand, or from threads started before the guest ran.
///
/// A confined thread may not start threads (its seccomp filter refuses `clone`), and a
/// device is activated from a vCPU thread; so with the sandbox on, a device's threads are
/// started with the VM, wait in a ``ThreadReserve``, and each session borrows them.
public struct ThreadStarter: Sendable {
    private let starter: @Sendable (String, @escaping @Sendable () -> Void) throws(ThreadStartError) -> any JoinableThread

    public init(_ starter: @escaping @Sendable (String, @escaping @Sendable () -> Void) throws(ThreadStartError) -> any JoinableThread) {
        self.starter = starter
    }

    /// Runs `body` on the thread called `name`.
    public func start(name: String, _ body: @escaping @Sendable () -> Void) throws(ThreadStartError) -> any JoinableThread {
        try starter(name, body)
    }

    /// A new ``NamedThread`` for each body.
    public static let onDemand = ThreadStarter { (name, body) throws(ThreadStartError) in try NamedThread(name: name, body) }

    /// The reserve's thread of that name; a name the reserve does not have is refused.
    public static func reserved(_ reserve: ThreadReserve) -> ThreadStarter {
        ThreadStarter { (name, body) throws(ThreadStartError) in try reserve.run(name: name, body) }
    }
}

/// Named threads started ahead of time. Each runs `prepare` once (its confinement), then
/// runs the bodies it is given one after another, each until it returns. When the reserve
/// goes, its threads end and are joined.
public final class ThreadReserve: Sendable {
    private let slots: [String: Slot]
    private let threads: [NamedThread]

    /// One thread's mailbox: the body to run next, or the order to end.
    private final class Slot: Sendable {
        let pending = Mutex<(body: (@Sendable () -> Void)?, busy: Bool, ending: Bool)>((nil, false, false))
        let ready = DispatchSemaphore(value: 0)
        let done = DispatchSemaphore(value: 0)

        func serve(prepare: @Sendable () -> Void) {
            prepare()
            while true {
                ready.wait()
                let (body, ending) = pending.withLock { state in
                    let body = state.body
                    state.body = nil
                    return (body, state.ending)
                }
                if let body {
                    body()
                    done.signal()
                } else if ending {
                    return
                }
            }
        }
    }

    /// A body running on a reserved thread; ``join()`` waits for it to return.
    private final class Run: JoinableThread {
        let slot: Slot
        let joined = Atomic<Bool>(false)
        init(slot: Slot) { self.slot = slot }
        func join() {
            guard !joined.exchange(true, ordering: .sequentiallyConsistent) else { return }
            slot.done.wait()
            slot.pending.withLock { $0.busy = false }
        }
    }

    /// Starts one thread per name; each calls `prepare` with its name first.
    public init(names: [String], prepare: @escaping @Sendable (String) -> Void) throws(ThreadStartError) {
        var slots: [String: Slot] = [:]
        var threads: [NamedThread] = []
        for name in names {
            let slot = Slot()
            do {
                threads.append(try NamedThread(name: name) { slot.serve { prepare(name) } })
            } catch {
                Self.end(Array(slots.values), threads)
                throw error
            }
            slots[name] = slot
        }
        self.slots = slots
        self.threads = threads
    }

    deinit { Self.end(Array(slots.values), threads) }

    private static func end(_ slots: [Slot], _ threads: [NamedThread]) {
        for slot in slots {
            slot.pending.withLock { $0.ending = true }
            slot.ready.signal()
        }
        for thread in threads { thread.join() }
    }

    /// Runs `body` on the thread `name`. Refused (EBUSY) while that thread's last body has
    /// not been joined, and (ENOENT) for a name the reserve lacks.
    public func run(name: String, _ body: @escaping @Sendable () -> Void) throws(ThreadStartError) -> any JoinableThread {
        guard let slot = slots[name] else { throw ThreadStartError(name: name, errno: 2 /* ENOENT */) }
        let accepted = slot.pending.withLock { state in
            guard !state.busy, !state.ending else { return false }
            state.busy = true
            state.body = body
            return true
        }
        guard accepted else { throw ThreadStartError(name: name, errno: 16 /* EBUSY */) }
        slot.ready.signal()
        return Run(slot: slot)
    }
}
