import Basics
import EventLoop
import Glibc
import Synchronization
import Testing

/// Collects what handlers saw, from the loop thread, for the test thread to check.
final class Recorder: Sendable {
    private let values = Mutex<[String]>([])
    func add(_ value: String) { values.withLock { $0.append(value) } }
    var all: [String] { values.withLock { $0 } }

    /// Waits up to `seconds` for `predicate` to hold.
    func wait(seconds: Double = 5, until predicate: ([String]) -> Bool) -> Bool {
        let deadline = MonotonicClock.nanoseconds() + UInt64(seconds * 1e9)
        while MonotonicClock.nanoseconds() < deadline {
            if predicate(all) { return true }
            usleep(1000)
        }
        return predicate(all)
    }
}

@Suite("Event loop, eventfd, timerfd, signalfd")
struct EventLoopTests {
    @Test("An eventfd counts writes and resets on read")
    func eventFD() throws {
        let event = try EventFD()
        #expect(event.drain() == 0)
        event.signal()
        event.signal(4)
        #expect(event.drain() == 5)
        #expect(event.drain() == 0)
    }

    @Test("A handler runs on the loop thread when its eventfd is signalled, not after it is unregistered")
    func handlers() throws {
        let loop = try EventLoop()
        let thread = try loop.start(name: "test-loop")
        defer { loop.stop(); thread.join() }
        let recorder = Recorder()
        let event = try EventFD()
        let registration = try loop.register(event.rawValue, for: .readable, owner: event) { events in
            recorder.add("ready \(events.contains(.readable)) \(event.drain())")
        }
        event.signal(3)
        #expect(recorder.wait { $0 == ["ready true 3"] })
        loop.unregister(registration)
        event.signal()
        usleep(50_000)
        #expect(recorder.all == ["ready true 3"])
    }

    @Test("A timer fires once after its delay, or repeatedly, and can be disarmed")
    func timer() throws {
        let loop = try EventLoop()
        let thread = try loop.start(name: "test-loop")
        defer { loop.stop(); thread.join() }
        let recorder = Recorder()
        let once = try TimerFD()
        try loop.register(once.rawValue, for: .readable, owner: once) { _ in recorder.add("once \(once.expirations())") }
        let start = MonotonicClock.nanoseconds()
        try once.arm(after: .milliseconds(50))
        #expect(recorder.wait { $0.contains("once 1") })
        #expect(MonotonicClock.nanoseconds() - start >= 50_000_000)

        let repeating = try TimerFD()
        try loop.register(repeating.rawValue, for: .readable, owner: repeating) { _ in
            if repeating.expirations() > 0 { recorder.add("tick") }
        }
        try repeating.arm(after: .milliseconds(5), repeating: .milliseconds(5))
        #expect(recorder.wait { $0.filter { $0 == "tick" }.count >= 3 })
        repeating.disarm()
        usleep(30_000)
        let ticks = recorder.all.filter { $0 == "tick" }.count
        usleep(50_000)
        #expect(recorder.all.filter { $0 == "tick" }.count == ticks)
    }

    @Test("A blocked signal arrives through a signalfd instead of a handler")
    func signals() throws {
        // SIGUSR2 is blocked in this thread only, and raised at this thread (raise()), so
        // the rest of the test process is unaffected.
        SignalFD.blockInCallingThread([SIGUSR2])
        let signals = try SignalFD(signals: [SIGUSR2])
        #expect(signals.next() == nil)
        raise(SIGUSR2)
        #expect(signals.next() == SIGUSR2)
        #expect(signals.next() == nil)
    }

    @Test("Work scheduled from another thread runs on the loop; stop() ends run()")
    func scheduleAndStop() throws {
        let loop = try EventLoop()
        let recorder = Recorder()
        let thread = try loop.start(name: "test-loop")
        loop.schedule { recorder.add("scheduled") }
        #expect(recorder.wait { $0 == ["scheduled"] })
        loop.stop()
        thread.join() // returns: run() ended
    }

    @Test("A regular file cannot be watched: epoll refuses it with EPERM")
    func regularFile() throws {
        let loop = try EventLoop()
        let fd = open("/etc/hostname", O_RDONLY)
        defer { close(fd) }
        #expect(throws: SystemError("epoll_ctl(ADD)", errno: EPERM)) {
            try loop.register(fd, for: .readable) { _ in }
        }
    }
}
