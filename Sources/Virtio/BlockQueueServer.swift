import Basics
import EventLoop
import RateLimit
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// What the queues of one activation share: the request handler, the way to the driver
/// (interrupts, DEVICE_NEEDS_RESET) and the flags that stop them.
final class BlockSessionControl: Sendable {
    let handler: BlockRequestHandler
    let interrupt: any VirtioInterrupt
    /// The device's rate limiter, shared by its queues.
    let rateLimiter: SharedRateLimiter
    private let needsReset: @Sendable (String) -> Void
    /// Readable once a reset began: every dispatcher polls it.
    let stopEvent: EventFD
    /// A reset began: threads finish the request in hand and return, answering nothing more.
    let resetting = Atomic<Bool>(false)
    /// Nothing more is taken from or returned to any queue: a reset began, or the device
    /// needs one.
    let halted = Atomic<Bool>(false)
    /// The machine is paused: dispatchers take no new chains (requests in flight finish).
    let paused = Atomic<Bool>(false)

    init(handler: BlockRequestHandler, interrupt: any VirtioInterrupt, rateLimiter: SharedRateLimiter,
         needsReset: @escaping @Sendable (String) -> Void) throws(VirtioError) {
        self.handler = handler
        self.interrupt = interrupt
        self.rateLimiter = rateLimiter
        self.needsReset = needsReset
        do { stopEvent = try EventFD() } catch { throw VirtioError("virtio-blk: cannot create an eventfd: \(error)") }
    }

    /// The driver broke a queue or sent a request the device cannot answer: stop using
    /// the queues and ask for a reset (once; not while a reset is already under way).
    func fail(_ message: String) {
        guard !halted.exchange(true, ordering: .sequentiallyConsistent) else { return }
        needsReset(message)
    }

    /// Begins a reset: wakes every dispatcher and makes every thread return.
    func beginReset() {
        resetting.store(true, ordering: .sequentiallyConsistent)
        halted.store(true, ordering: .sequentiallyConsistent)
        stopEvent.signal()
    }
}

/// Serves one virtqueue with one dispatcher thread and a pool of worker threads.
///
/// The dispatcher waits for the driver's notifications (the queue's EventFD), takes every
/// available chain and hands it to the pool; it never does I/O itself, so notifications
/// are re-enabled at once and a driver with many requests outstanding keeps every worker
/// busy. Each worker runs one request at a time on the disk, writes its status, returns
/// it in the used ring and interrupts the driver if it asked for it, then takes the next
/// queued chain or sleeps at its own doorbell; the dispatcher rings one idle worker per
/// chain it queues, never more.
///
/// At most `size` requests of the queue are in flight: a legitimate driver cannot have
/// more (each holds a descriptor), and a hostile one that makes the same head available
/// again and again only stalls its own queue, never grows the device's memory.
final class BlockQueueServer: Sendable {
    let index: Int
    let queue: Virtqueue
    private let notification: EventFD
    private let control: BlockSessionControl
    /// One doorbell per worker (blocking): an idle worker sleeps in its read until the
    /// dispatcher rings it. Ringing only idle workers, one per chain, wakes no worker for
    /// nothing (one eventfd that all of them read would wake all of them at every write).
    private let doorbells: [EventFD]
    /// Signalled by a worker when the dispatcher waits for room (`throttled`).
    private let room: EventFD
    /// Fires when the rate limiter has the tokens the next request needs.
    private let refill: TimerFD
    private let handOff = Mutex(HandOff())
    /// Chains taken from the queue and not yet returned.
    private let inFlight = Atomic<Int>(0)
    private let throttled = Atomic<Bool>(false)
    private let limit: Int
    let workerCount: Int

    init(index: Int, queue: Virtqueue, notification: EventFD, control: BlockSessionControl,
         workers: Int) throws(VirtioError) {
        self.index = index
        self.queue = queue
        self.notification = notification
        self.control = control
        self.workerCount = workers
        limit = Int(queue.configuration.size)
        do {
            doorbells = try (0..<workers).map { _ throws(SystemError) in try EventFD(nonBlocking: false) }
            room = try EventFD()
            refill = try TimerFD()
        } catch {
            throw VirtioError("virtio-blk: cannot create an eventfd or a timerfd: \(error)")
        }
    }

    /// Requests taken from the queue and not yet answered.
    var requestsInFlight: Int { inFlight.load(ordering: .sequentiallyConsistent) }

    /// Makes the dispatcher look at the queue again (after a pause).
    func nudge() { notification.signal() }

    /// Makes every worker return (after a ``BlockSessionControl/beginReset()``).
    func wakeWorkers() {
        for doorbell in doorbells { doorbell.signal() }
    }

    // MARK: Dispatcher

    /// Why the dispatcher stopped taking chains, and so what it waits for.
    enum Stall: Equatable {
        /// The queue is empty (notifications are on), or the machine is paused.
        case empty
        /// `limit` requests are in flight: wait for a worker to finish one.
        case full
        /// The rate limiter has no tokens for the next request, which is back in the
        /// available ring: wait for the refill timer.
        case rateLimited
    }

    /// The dispatcher thread's body: returns at a reset, when the queue breaks, or when
    /// its notification descriptor fails.
    func dispatch() {
        while !control.halted.load(ordering: .sequentiallyConsistent) {
            let stall: Stall
            do {
                stall = try takeAvailable()
            } catch {
                control.fail("virtio-blk: queue \(index): \(error)")
                return
            }
            let woken: Bool
            switch stall {
            case .empty: woken = wait(on: notification.rawValue) { notification.drain() }
            case .full: woken = wait(on: room.rawValue) { room.drain() }
            case .rateLimited: woken = wait(on: refill.rawValue) { refill.expirations() }
            }
            guard woken else { return }
        }
    }

    /// Takes chains until the queue is empty (and notifications are enabled again), the
    /// in-flight limit is reached, or the rate limiter says wait.
    private func takeAvailable() throws(VirtioError) -> Stall {
        try queue.disableNotifications()
        while true {
            var taken: [DescriptorChain] = []
            // Hands what was taken to the workers, ringing an idle one per chain.
            defer { handToWorkers(taken) }
            while inFlight.load(ordering: .sequentiallyConsistent) < limit {
                // A chain counts as in flight from before the pause flag is read until it is
                // answered, also while this thread answers it: pause() sets the flag, then
                // waits for the count to drop to zero, so either it sees this chain or this
                // thread sees the flag (both sequentially consistent).
                inFlight.add(1, ordering: .sequentiallyConsistent)
                let chain: DescriptorChain?
                do {
                    guard !control.halted.load(ordering: .sequentiallyConsistent),
                          !control.paused.load(ordering: .sequentiallyConsistent) else {
                        inFlight.subtract(1, ordering: .sequentiallyConsistent)
                        return .empty
                    }
                    chain = try queue.popAvailable()
                } catch {
                    inFlight.subtract(1, ordering: .sequentiallyConsistent)
                    throw error
                }
                guard let chain else {
                    inFlight.subtract(1, ordering: .sequentiallyConsistent)
                    // Empty: ask for notifications, then look once more for a chain that
                    // arrived before they were on (no notification comes for it).
                    guard try queue.enableNotifications() else { return .empty }
                    continue
                }
                guard admit(chain) else {
                    // No tokens: the chain goes back to the ring, where it waits (nothing
                    // is held, so a pause or a snapshot finds nothing half-taken), and the
                    // queue waits with it, notifications off.
                    queue.returnLastAvailable()
                    inFlight.subtract(1, ordering: .sequentiallyConsistent)
                    return .rateLimited
                }
                // A small read the page cache holds costs less to copy here than to hand
                // off (a worker's wake-up): it is answered at once.
                if let outcome = control.handler.serveIfCached(chain) {
                    complete(chain, outcome)
                    inFlight.subtract(1, ordering: .sequentiallyConsistent)
                    continue
                }
                taken.append(chain)
            }
            // Full: wait for a worker to finish, unless one finished meanwhile.
            throttled.store(true, ordering: .sequentiallyConsistent)
            if inFlight.load(ordering: .sequentiallyConsistent) >= limit { return .full }
            throttled.store(false, ordering: .sequentiallyConsistent)
        }
    }

    /// Takes one op and the request's bytes from the rate limiter. When it says wait, arms
    /// the refill timer for that long and returns false.
    private func admit(_ chain: DescriptorChain) -> Bool {
        let limiter = control.rateLimiter
        if limiter.isUnlimited { return true }
        let generation = limiter.generation
        guard case let .wait(nanoseconds) = limiter.consume(bytes: control.handler.transferLength(of: chain)) else { return true }
        armRefill(after: nanoseconds)
        // An update between the consume and the arming may have been missed by its own
        // wake-up (this arming replaced it): look again at once.
        if limiter.generation != generation { armRefill(after: 0) }
        return false
    }

    /// The rate limiter changed: a dispatcher waiting for tokens looks again now. (A
    /// dispatcher not waiting finds the timer fired later and takes one extra look.)
    func rateLimiterChanged() { armRefill(after: 0) }

    private func armRefill(after nanoseconds: UInt64) {
        do {
            try refill.arm(after: .nanoseconds(Int64(clamping: nanoseconds)))
        } catch {
            control.fail("virtio-blk: queue \(index): cannot arm the rate limiter's timer: \(error)")
        }
    }

    /// Sleeps until `descriptor` is readable (then calls `consume`) or a reset begins.
    /// Returns false when the dispatcher must stop.
    private func wait(on descriptor: Int32, consume: () -> Void) -> Bool {
        var fds = [pollfd(fd: descriptor, events: Int16(POLLIN), revents: 0),
                   pollfd(fd: control.stopEvent.rawValue, events: Int16(POLLIN), revents: 0)]
        while true {
            let count = poll(&fds, nfds_t(fds.count), -1)
            if count < 0 && errno == EINTR { continue }
            guard count > 0 else {
                control.fail("virtio-blk: queue \(index): poll failed (errno \(errno))")
                return false
            }
            break
        }
        if fds[1].revents != 0 { return false }
        let events = fds[0].revents
        if events & Int16(POLLIN) != 0 {
            consume()
            return true
        }
        // POLLERR, POLLHUP or POLLNVAL: the descriptor is unusable; polling it again would spin.
        control.fail("virtio-blk: queue \(index): a descriptor it waits on failed (poll events 0x\(String(events, radix: 16)))")
        return false
    }

    // MARK: Workers

    /// Chains waiting for a worker, and the workers asleep at their doorbells.
    private struct HandOff {
        var chains: [DescriptorChain] = []
        var idle: [Int] = []
    }

    /// Queues `chains` and rings as many idle workers as there are chains (or idle
    /// workers). A busy worker takes the rest when it finishes its request.
    private func handToWorkers(_ chains: [DescriptorChain]) {
        guard !chains.isEmpty else { return }
        let woken = handOff.withLock { state in
            state.chains.append(contentsOf: chains)
            let count = min(chains.count, state.idle.count)
            defer { state.idle.removeLast(count) }
            return state.idle.suffix(count)
        }
        for worker in woken { doorbells[worker].signal() }
    }

    /// A worker thread's body: returns at a reset.
    func runWorker(_ worker: Int) {
        let cancelled = { [control] in control.resetting.load(ordering: .sequentiallyConsistent) }
        while !control.resetting.load(ordering: .sequentiallyConsistent) {
            // The next chain, or else: asleep until rung. The worker says it is idle under
            // the same lock under which the dispatcher queues chains, so a chain is never
            // queued unseen while every worker sleeps.
            let next = handOff.withLock { state -> DescriptorChain? in
                if !state.chains.isEmpty { return state.chains.removeFirst() }
                state.idle.append(worker)
                return nil
            }
            guard let chain = next else {
                doorbells[worker].drain()
                continue
            }
            if !control.halted.load(ordering: .sequentiallyConsistent) {
                let outcome = control.handler.serve(chain, cancelled: cancelled)
                complete(chain, outcome)
            }
            inFlight.subtract(1, ordering: .sequentiallyConsistent)
            if throttled.exchange(false, ordering: .sequentiallyConsistent) { room.signal() }
        }
    }

    /// Answers the driver: status byte, used ring, interrupt (one eventfd write in the end).
    private func complete(_ chain: DescriptorChain, _ outcome: BlockOutcome) {
        switch outcome {
        case let .unanswerable(message):
            control.fail(message)
        case let .answer(status, statusAddress, written):
            // A reset that began during the I/O means the driver has forgotten the queue.
            guard !control.halted.load(ordering: .sequentiallyConsistent) else { return }
            do {
                try control.handler.memory.store(status, at: statusAddress)
                try queue.pushUsed(chain.head, writtenLength: written)
                if try queue.shouldNotifyDriver() { control.interrupt.signalQueue(index) }
            } catch let error as VirtioError {
                control.fail("virtio-blk: queue \(index): \(error)")
            } catch {
                control.fail("virtio-blk: queue \(index): the status byte at 0x\(String(statusAddress, radix: 16)) cannot be written: \(error)")
            }
        }
    }
}

