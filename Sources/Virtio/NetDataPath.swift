import DequeModule
import EventLoop
import Memory
import RateLimit
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// What the driver agreed to, as the data path needs it.
struct NetNegotiation: Sendable, Equatable {
    /// VIRTIO_NET_F_MRG_RXBUF: a received frame may fill several chains.
    let mergeable: Bool
    /// VIRTIO_NET_F_GUEST_CSUM: received frames may carry `NEEDS_CSUM` / `DATA_VALID`.
    let guestChecksum: Bool
    /// The largest frame (without the header) the driver may send and may be given.
    let transmitLimit: Int
    let receiveLimit: Int
    let features: UInt64

    init(features: UInt64) {
        self.features = features
        mergeable = features & VirtioNetFeature.mergeableReceiveBuffers != 0
        guestChecksum = features & VirtioNetFeature.guestChecksum != 0
        transmitLimit = features & VirtioNetFeature.hostSegmentation != 0 ? VirtioNetLimits.segmentedFrame : VirtioNetLimits.wireFrame
        receiveLimit = features & VirtioNetFeature.guestSegmentation != 0 ? VirtioNetLimits.segmentedFrame : VirtioNetLimits.wireFrame
    }

    /// Whether a transmit header asks only for offloads the driver negotiated: a partial
    /// checksum needs CSUM; each segmentation type its HOST_ feature (and CSUM, 5.1.3.1);
    /// the ECN bit HOST_ECN.
    func permitsTransmit(flags: UInt8, gsoType: UInt8) -> Bool {
        let checksum = features & VirtioNetFeature.checksum != 0
        if flags & VirtioNetHeader.needsChecksum != 0 && !checksum { return false }
        if gsoType & VirtioNetHeader.gsoECN != 0 && features & VirtioNetFeature.hostECN == 0 { return false }
        let required: UInt64
        switch gsoType & ~VirtioNetHeader.gsoECN {
        case VirtioNetHeader.gsoNone: return gsoType == VirtioNetHeader.gsoNone
        case VirtioNetHeader.gsoTCPv4: required = VirtioNetFeature.hostTSO4
        case VirtioNetHeader.gsoTCPv6: required = VirtioNetFeature.hostTSO6
        case VirtioNetHeader.gsoUDP: required = VirtioNetFeature.hostUFO
        case VirtioNetHeader.gsoUDPL4: required = VirtioNetFeature.hostUSO
        default: return false
        }
        return checksum && features & required != 0
    }
}

/// The counters of one device, shared by its data paths over time.
final class NetCounters: Sendable {
    private let value = Mutex(VirtioNetStatistics())
    var snapshot: VirtioNetStatistics { value.withLock { $0 } }
    func update(_ change: (inout VirtioNetStatistics) -> Void) { value.withLock { change(&$0) } }
}

/// Moves frames between one RX/TX queue pair and the backend (a TAP), on the device's own
/// event loop thread, from DRIVER_OK to the reset. Nothing here runs on a vCPU thread.
///
/// **Transmit.** When the driver notifies the TX queue (an eventfd KVM signals), each
/// available chain is one frame: the 12-byte header (copied and checked) and the frame,
/// written with one `writev` whose other vectors point straight into guest memory. Chains
/// go back to the used ring with length 0, and the driver gets at most one interrupt per
/// round (as its event index asks). A chain the TAP cannot take now (`EAGAIN`) waits, and
/// the queue with it, until the TAP is writable again.
///
/// **Receive.** The device holds receive chains taken from the RX queue (at most the
/// queue's size, so host memory stays bounded) and reads the TAP only while they can hold
/// the largest frame the driver negotiated: one chain without MRG_RXBUF, as many as it
/// takes with it. One `readv` puts a frame straight into them; then `num_buffers` is
/// written in its header and all the chains of the frame are returned with one used-index
/// update, so the driver never sees part of a frame. When the driver has no buffers left,
/// the device stops watching the TAP (frames wait in the TAP's queue, which the kernel
/// bounds) and asks for the RX queue's notification; when it comes, reading resumes.
///
/// **Rate limits.** Each direction has a ``RateLimiter`` (Firecracker's token buckets; ops
/// count frames, bytes count frame bytes without the header). A transmit chain that cannot
/// get its tokens goes back to the available ring and the TX queue waits, notifications
/// off, until the limiter's timer (a timerfd on this loop) fires. Reception needs one op
/// and one byte in hand before it reads a frame (the size is known only once it is read),
/// is then charged the rest of the frame, and stops watching the TAP while the limiter
/// is short: frames wait in the TAP's queue. A limit changed while the device runs is
/// applied on this thread and a waiting direction looks again at once. Nothing is held
/// across a wait, so a pause or a reset finds no half-served chain.
///
/// A hostile driver's frames are dropped and counted (``VirtioNetStatistics``); a ring it
/// broke stops the device until a reset (``VirtioActivation/needsReset``).
final class NetDataPath: Sendable {
    /// A chain going back to the driver, and the bytes written into it.
    typealias UsedEntry = (head: UInt16, writtenLength: UInt32)

    /// Frames read or written in one round before the loop serves other descriptors.
    static let roundLimit = 64
    /// `writev`/`readv` take at most this many vectors (Linux's UIO_MAXIOV).
    static let maximumVectors = 1024

    private let memory: GuestMemory
    private let receiveQueue: Virtqueue?
    private let transmitQueue: Virtqueue?
    private let receiveNotification: EventFD
    private let transmitNotification: EventFD
    private let backend: any NetBackend
    private let negotiation: NetNegotiation
    private let interrupt: any VirtioInterrupt
    private let needsReset: @Sendable (String) -> Void
    private let counters: NetCounters
    private let loop: EventLoop
    private let receiveLimiter: SharedRateLimiter
    private let transmitLimiter: SharedRateLimiter
    /// Fire when the limiters have tokens again.
    private let receiveRefill: TimerFD
    private let transmitRefill: TimerFD

    private struct State {
        /// Receive chains taken from the ring and not yet filled, oldest first.
        var receiveChains = Deque<DescriptorChain>()
        /// Their writable bytes.
        var receiveCapacity: UInt64 = 0
        /// The TAP's registration, and what it is watched for.
        var backendRegistration: EventLoop.Registration?
        var watching: EventLoop.Events = []
        var registrations: [EventLoop.Registration] = []
        /// A transmit chain the TAP refused with EAGAIN: sent again when it is writable.
        var blockedTransmit: DescriptorChain?
        /// The driver broke a ring or the TAP failed: nothing more is done until the reset.
        var halted = false
        /// A direction waits for its rate limiter's timer.
        var receiveLimited = false
        var transmitLimited = false
    }

    private let state = Mutex(State())

    /// The receive queue is index 0, the transmit queue index 1 (5.1.2).
    static let receiveIndex = 0
    static let transmitIndex = 1

    init(activation: VirtioActivation, negotiation: NetNegotiation, backend: any NetBackend, counters: NetCounters,
         limiters: NetRateLimiters, loop: EventLoop) throws(SystemError) {
        receiveLimiter = limiters.receive
        transmitLimiter = limiters.transmit
        receiveRefill = try TimerFD()
        transmitRefill = try TimerFD()
        memory = activation.memory
        receiveQueue = activation.queues[Self.receiveIndex]
        transmitQueue = activation.queues[Self.transmitIndex]
        receiveNotification = activation.notifications[Self.receiveIndex]
        transmitNotification = activation.notifications[Self.transmitIndex]
        interrupt = activation.interrupt
        needsReset = activation.needsReset
        self.negotiation = negotiation
        self.backend = backend
        self.counters = counters
        self.loop = loop
    }

    /// Registers the TAP and both notifications with the loop, and looks at the rings once
    /// (the driver may have filled them before DRIVER_OK).
    func start() throws(SystemError) {
        let registrations = [
            try loop.register(receiveNotification.rawValue, for: .readable, owner: receiveNotification) { [self] _ in
                receiveNotification.drain()
                state.withLock { refillReceiveBuffers(&$0) }
            },
            try loop.register(transmitNotification.rawValue, for: .readable, owner: transmitNotification) { [self] _ in
                transmitNotification.drain()
                // While a frame waits for room in the TAP or for tokens, the queue waits with it.
                state.withLock { if $0.blockedTransmit == nil && !$0.transmitLimited { transmit(&$0) } }
            },
            try loop.register(receiveRefill.rawValue, for: .readable, owner: receiveRefill) { [self] _ in
                receiveRefill.expirations()
                state.withLock { resumeReceive(&$0) }
            },
            try loop.register(transmitRefill.rawValue, for: .readable, owner: transmitRefill) { [self] _ in
                transmitRefill.expirations()
                state.withLock { resumeTransmit(&$0) }
            },
        ]
        let backendRegistration: EventLoop.Registration
        do {
            // Watched for nothing yet: reading starts once there are receive buffers. Errors
            // and hang-ups are reported all the same.
            backendRegistration = try loop.register(backend.descriptor, for: [], owner: backend) { [self] events in
                state.withLock { serveBackend(&$0, events) }
            }
        } catch {
            for registration in registrations { loop.unregister(registration) }
            throw error
        }
        state.withLock {
            $0.registrations = registrations + [backendRegistration]
            $0.backendRegistration = backendRegistration
        }
        loop.schedule { [self] in
            state.withLock { state in
                refillReceiveBuffers(&state)
                transmit(&state)
            }
        }
    }

    /// Forgets the loop's registrations (after the loop stopped), so that nothing keeps
    /// this data path alive.
    func unregisterAll() {
        state.withLock { state in
            for registration in state.registrations { loop.unregister(registration) }
            state.registrations = []
            state.backendRegistration = nil
        }
    }

    // MARK: Rate limits

    /// The limiters changed (from any thread): waiting directions look again, on the loop.
    func rateLimitersChanged() {
        loop.schedule { [self] in
            state.withLock { state in
                if state.receiveLimited { resumeReceive(&state) }
                if state.transmitLimited { resumeTransmit(&state) }
            }
        }
    }

    /// Waits `nanoseconds` for tokens: arms `timer` (if it cannot be armed, the device stops
    /// and asks for a reset rather than never looking again).
    private func waitForTokens(_ state: inout State, _ timer: TimerFD, nanoseconds: UInt64) {
        do {
            try timer.arm(after: .nanoseconds(Int64(clamping: max(1, nanoseconds))))
        } catch {
            halt(&state, "virtio-net: cannot arm a rate limiter's timer: \(error)")
        }
    }

    private func resumeTransmit(_ state: inout State) {
        guard state.transmitLimited else { return }
        state.transmitLimited = false
        transmitRefill.disarm()
        if state.blockedTransmit == nil { transmit(&state) }
    }

    private func resumeReceive(_ state: inout State) {
        guard state.receiveLimited else { return }
        state.receiveLimited = false
        receiveRefill.disarm()
        refillReceiveBuffers(&state)
    }

    // MARK: The TAP

    private func serveBackend(_ state: inout State, _ events: EventLoop.Events) {
        counters.update { $0.backendWakeups += 1 }
        if events.contains(.writable) { transmit(&state) }
        if events.contains(.readable) { receive(&state) }
        if !events.isDisjoint(with: [.error, .hangUp]) && !state.halted {
            let what = events.contains(.error) ? "an error" : "a hang-up"
            halt(&state, "virtio-net: the TAP '\(backend.name)' reported \(what)")
        }
    }

    /// Watches the TAP for `events` (readable: receive; writable: a blocked transmit).
    private func watch(_ state: inout State, _ events: EventLoop.Events) {
        guard events != state.watching, let registration = state.backendRegistration else { return }
        do {
            try loop.modify(registration, for: events)
            state.watching = events
        } catch {
            halt(&state, "virtio-net: cannot watch the TAP '\(backend.name)': \(error)")
        }
    }

    /// Stops everything until the reset, and tells the driver (DEVICE_NEEDS_RESET).
    private func halt(_ state: inout State, _ message: String) {
        guard !state.halted else { return }
        state.halted = true
        for registration in state.registrations { loop.unregister(registration) }
        state.registrations = []
        state.backendRegistration = nil
        needsReset(message)
    }

    // MARK: Transmit

    private enum TransmitOutcome {
        case sent(bytes: Int)
        case malformed, oversized, refused
        case wouldBlock
    }

    /// Sends what the driver made available, up to ``roundLimit`` frames (then comes back
    /// after the loop served the others), and returns the chains. A chain the TAP refused
    /// for now is tried first; if it still cannot go, nothing else does.
    private func transmit(_ state: inout State) {
        guard !state.halted, let queue = transmitQueue else { return }
        var completed: [UsedEntry] = []
        do {
            if let blocked = state.blockedTransmit {
                let outcome = send(blocked)
                if case .wouldBlock = outcome { return }
                state.blockedTransmit = nil
                watch(&state, state.watching.subtracting(.writable))
                count(outcome)
                completed.append((blocked.head, 0))
            }
            try queue.disableNotifications()
            while completed.count < Self.roundLimit {
                guard let chain = try queue.popAvailable() else {
                    // Empty: ask for notifications, then look once more (a chain added
                    // before they were on brings none).
                    if try queue.enableNotifications() { continue }
                    break
                }
                if !transmitLimiter.isUnlimited {
                    let frameBytes = chain.readableLength - min(chain.readableLength, UInt64(VirtioNetHeader.size))
                    if case let .wait(nanoseconds) = transmitLimiter.consume(bytes: frameBytes) {
                        // No tokens: the chain goes back to the ring and the queue waits
                        // for the timer, notifications off.
                        queue.returnLastAvailable()
                        state.transmitLimited = true
                        counters.update { $0.transmitRateLimited += 1 }
                        waitForTokens(&state, transmitRefill, nanoseconds: nanoseconds)
                        break
                    }
                }
                let outcome = send(chain)
                if case .wouldBlock = outcome {
                    // The TAP is full: the chain waits until it is writable.
                    state.blockedTransmit = chain
                    watch(&state, state.watching.union(.writable))
                    break
                }
                count(outcome)
                completed.append((chain.head, 0))
            }
            if completed.count >= Self.roundLimit && state.blockedTransmit == nil && !state.transmitLimited {
                // More may wait: come back once the loop served the TAP and the RX queue.
                transmitNotification.signal()
            }
            guard !completed.isEmpty else { return }
            try queue.pushUsed(completed)
            if try queue.shouldNotifyDriver() { interrupt.signalQueue(Self.transmitIndex) }
        } catch {
            halt(&state, "virtio-net: transmit queue: \(error)")
        }
    }

    /// Counts a frame's fate (before its chain goes back, so that a driver that sees the
    /// chain sees the count).
    private func count(_ outcome: TransmitOutcome) {
        counters.update { statistics in
            switch outcome {
            case let .sent(bytes):
                statistics.transmittedFrames += 1
                statistics.transmittedBytes += UInt64(bytes)
            case .malformed: statistics.transmitMalformed += 1
            case .oversized: statistics.transmitOversized += 1
            case .refused: statistics.transmitBackendErrors += 1
            case .wouldBlock: break
            }
        }
    }

    /// Writes one transmit chain to the TAP: the header (copied once, checked) and the
    /// frame straight from guest memory.
    private func send(_ chain: DescriptorChain) -> TransmitOutcome {
        let run = GuestBufferRun(chain.readable)
        let total = run.length
        let headerSize = UInt64(VirtioNetHeader.size)
        guard total >= headerSize + UInt64(VirtioNetLimits.ethernetHeader) else { return .malformed }
        let frameLength = total - headerSize
        guard frameLength <= UInt64(negotiation.transmitLimit) else { return .oversized }
        var header = [UInt8](repeating: 0, count: VirtioNetHeader.size)
        do {
            try header.withUnsafeMutableBytes { try run.copy(from: 0, into: $0, memory: memory) }
        } catch {
            return .malformed
        }
        let flags = header[VirtioNetHeader.flagsOffset]
        guard negotiation.permitsTransmit(flags: flags, gsoType: header[VirtioNetHeader.gsoTypeOffset]) else { return .malformed }
        let pieces = run.slice(from: headerSize, count: frameLength)
        let expected = Int(total)
        let written: CallResult
        do {
            if pieces.count + 1 <= Self.maximumVectors {
                written = try memory.withBytes(of: pieces.map { (address: $0.address, count: UInt64($0.length)) }) { buffers in
                    header.withUnsafeMutableBytes { headerBytes in
                        withUnsafeTemporaryAllocation(of: iovec.self, capacity: buffers.count + 1) { vectors in
                            vectors[0] = iovec(iov_base: headerBytes.baseAddress, iov_len: headerBytes.count)
                            for (index, buffer) in buffers.enumerated() {
                                vectors[index + 1] = iovec(iov_base: buffer.baseAddress, iov_len: buffer.count)
                            }
                            return retryingInterrupts { writev(backend.descriptor, vectors.baseAddress, Int32(vectors.count)) }
                        }
                    }
                }
            } else {
                // More pieces than one writev takes (a legal but odd framing): gather the
                // frame, at most 64 KiB, and write it in one piece.
                var frame = header
                frame.reserveCapacity(expected)
                for piece in pieces { frame += try memory.read(at: piece.address, count: Int(piece.length)) }
                written = frame.withUnsafeBytes { bytes in
                    retryingInterrupts { write(backend.descriptor, bytes.baseAddress, bytes.count) }
                }
            }
        } catch {
            return .malformed
        }
        if written.value < 0 {
            return written.error == EAGAIN || written.error == EWOULDBLOCK ? .wouldBlock : .refused
        }
        return written.value == expected ? .sent(bytes: Int(frameLength)) : .refused
    }

    // MARK: Receive

    /// Whether the held chains can take the largest frame the driver negotiated: one chain
    /// without MRG_RXBUF; with it, chains adding up to that frame and its header, or every
    /// chain the queue can have (the driver has nothing more to give).
    private func canReceive(_ state: State, queue: Virtqueue) -> Bool {
        guard negotiation.mergeable else { return !state.receiveChains.isEmpty }
        return state.receiveCapacity >= UInt64(negotiation.receiveLimit + VirtioNetHeader.size)
            || state.receiveChains.count >= Int(queue.configuration.size)
    }

    /// Takes receive chains until a frame of the largest size fits. Chains too small for a
    /// header go straight back, empty. Returns whether a frame fits; if not, the driver's
    /// notification is on.
    private func takeReceiveChains(_ state: inout State, queue: Virtqueue, returned: inout [UsedEntry]) throws(VirtioError) -> Bool {
        while !canReceive(state, queue: queue) {
            guard let chain = try queue.popAvailable() else {
                if try queue.enableNotifications() { continue }
                return false
            }
            let capacity = chain.writableLength
            guard capacity >= UInt64(VirtioNetHeader.size) else {
                counters.update { $0.receiveUnusableBuffers += 1 }
                returned.append((chain.head, 0))
                continue
            }
            state.receiveChains.append(chain)
            state.receiveCapacity += capacity
        }
        return true
    }

    /// The RX queue was notified (or the device just started): take the new chains, and
    /// watch the TAP again if they are enough for a frame.
    private func refillReceiveBuffers(_ state: inout State) {
        guard !state.halted, let queue = receiveQueue else { return }
        var returned: [UsedEntry] = []
        do {
            let ready = try takeReceiveChains(&state, queue: queue, returned: &returned)
            if ready && !state.watching.contains(.readable) && !state.receiveLimited {
                try queue.disableNotifications()
                watch(&state, state.watching.union(.readable))
            }
            try finishReceive(queue, returned: returned)
        } catch {
            halt(&state, "virtio-net: receive queue: \(error)")
        }
    }

    /// The TAP is readable: moves frames into the held chains, up to ``roundLimit`` of them
    /// (the loop calls again while the TAP stays readable).
    private func receive(_ state: inout State) {
        guard !state.halted else { return }
        guard let queue = receiveQueue else {
            // No receive queue: nothing can be received; stop watching.
            return watch(&state, state.watching.subtracting(.readable))
        }
        var returned: [UsedEntry] = []
        do {
            var delivered = false
            // Frames read, delivered or dropped: a TAP that keeps sending cannot hold the
            // thread longer than a round.
            for _ in 0..<Self.roundLimit {
                guard try takeReceiveChains(&state, queue: queue, returned: &returned) else {
                    // Out of buffers: leave the frames in the TAP until the driver adds some.
                    counters.update { $0.receivePauses += 1 }
                    watch(&state, state.watching.subtracting(.readable))
                    break
                }
                let limited = !receiveLimiter.isUnlimited
                if limited, case let .wait(nanoseconds) = receiveLimiter.consume(bytes: 1) {
                    // No tokens: leave the frames in the TAP until the timer fires.
                    state.receiveLimited = true
                    counters.update { $0.receiveRateLimited += 1 }
                    watch(&state, state.watching.subtracting(.readable))
                    waitForTokens(&state, receiveRefill, nanoseconds: nanoseconds)
                    break
                }
                guard let entries = try receiveOne(&state, queue: queue) else {
                    if limited { receiveLimiter.giveBack(bytes: 1) }
                    break
                }
                guard !entries.isEmpty else {
                    if limited { receiveLimiter.giveBack(bytes: 1) }
                    continue
                }
                if limited {
                    // The op and one byte were taken before the read; the rest of the
                    // frame now, owed if the buckets are short.
                    let written = entries.reduce(UInt64(0)) { $0 + UInt64($1.writtenLength) }
                    let frameBytes = written - min(written, UInt64(VirtioNetHeader.size))
                    receiveLimiter.charge(operations: 0, bytes: frameBytes - min(frameBytes, 1))
                }
                // The whole frame is in: its chains go back together, behind one index update.
                try queue.pushUsed(entries)
                delivered = true
            }
            try finishReceive(queue, returned: returned, delivered: delivered)
        } catch let error as VirtioError {
            halt(&state, "virtio-net: receive queue: \(error)")
        } catch {
            halt(&state, "virtio-net: \(error)")
        }
    }

    /// Returns the chains put aside as unusable, and interrupts the driver if it wants.
    private func finishReceive(_ queue: Virtqueue, returned: [UsedEntry],
                               delivered: Bool = false) throws(VirtioError) {
        try queue.pushUsed(returned)
        guard delivered || !returned.isEmpty else { return }
        if try queue.shouldNotifyDriver() { interrupt.signalQueue(Self.receiveIndex) }
    }

    private struct BackendFailure: Error, CustomStringConvertible {
        let description: String
    }

    /// Reads one frame into the held chains. Returns the used entries of the chains it
    /// filled; an empty list when the frame was dropped (the chains stay for the next
    /// one); `nil` when the TAP has nothing more now.
    private func receiveOne(_ state: inout State, queue: Virtqueue) throws -> [UsedEntry]? {
        // The vectors: every held chain with MRG_RXBUF, the first one without; at most
        // UIO_MAXIOV of them, and `covered` says how much of each chain they reach. One
        // more, a byte of the device's own, catches a frame longer than the chains: a TAP
        // reports such a frame's whole length anyway, a socket fills that byte.
        let guestVectors = Self.maximumVectors - 1
        var ranges: [(address: GuestAddress, count: UInt64)] = []
        var covered: [UInt64] = []
        for chain in state.receiveChains {
            var reach: UInt64 = 0
            for buffer in chain.writable where buffer.length > 0 {
                guard ranges.count < guestVectors else { break }
                ranges.append((buffer.address, UInt64(buffer.length)))
                reach += UInt64(buffer.length)
            }
            covered.append(reach)
            if !negotiation.mergeable || ranges.count >= guestVectors { break }
        }
        var overflow: UInt8 = 0
        let result = try memory.withBytes(of: ranges) { buffers in
            withUnsafeMutableBytes(of: &overflow) { overflowByte in
                withUnsafeTemporaryAllocation(of: iovec.self, capacity: buffers.count + 1) { vectors in
                    for (index, buffer) in buffers.enumerated() {
                        vectors[index] = iovec(iov_base: buffer.baseAddress, iov_len: buffer.count)
                    }
                    vectors[buffers.count] = iovec(iov_base: overflowByte.baseAddress, iov_len: 1)
                    return retryingInterrupts { readv(backend.descriptor, vectors.baseAddress, Int32(vectors.count)) }
                }
            }
        }
        let length = result.value
        if length < 0 {
            let error = result.error
            if error == EAGAIN || error == EWOULDBLOCK { return nil }
            counters.update { $0.receiveErrors += 1 }
            throw BackendFailure(description: "reading the TAP '\(backend.name)' failed: \(String(cString: strerror(error)))")
        }
        if length == 0 { throw BackendFailure(description: "the TAP '\(backend.name)' was closed") }
        let headerSize = VirtioNetHeader.size
        guard length >= headerSize else {
            counters.update { $0.receiveErrors += 1 }
            return []
        }
        // A frame longer than the chains (it reached the overflow byte), or than the
        // features allow, is dropped unseen: the chains stay for the next one.
        let frameLength = length - headerSize
        guard frameLength <= negotiation.receiveLimit, UInt64(length) <= covered.reduce(0, +) else {
            counters.update { $0.receiveOversized += 1 }
            return []
        }
        var entries: [UsedEntry] = []
        var remaining = UInt64(length)
        for (chain, reach) in zip(state.receiveChains, covered) where remaining > 0 {
            let take = min(reach, remaining)
            entries.append((chain.head, UInt32(take)))
            remaining -= take
        }
        // The header's last field is the device's to write; without GUEST_CSUM the flags
        // must be 0 (5.1.6.4.1).
        let header = GuestBufferRun(state.receiveChains[0].writable)
        let count = UInt16(entries.count)
        try header.write([UInt8(truncatingIfNeeded: count), UInt8(count >> 8)], at: UInt64(VirtioNetHeader.numBuffersOffset),
                         memory: memory)
        if !negotiation.guestChecksum { try header.write([0], at: UInt64(VirtioNetHeader.flagsOffset), memory: memory) }
        for chain in state.receiveChains.prefix(entries.count) { state.receiveCapacity -= chain.writableLength }
        state.receiveChains.removeFirst(entries.count)
        counters.update {
            $0.receivedFrames += 1
            $0.receivedBytes += UInt64(frameLength)
        }
        return entries
    }
}

/// What a system call returned, and its errno when that is negative.
private struct CallResult {
    let value: Int
    let error: Int32
}

/// Runs a system call again while it fails with EINTR; keeps its errno.
private func retryingInterrupts(_ call: () -> Int) -> CallResult {
    while true {
        let result = call()
        if result >= 0 { return CallResult(value: result, error: 0) }
        let error = errno
        if error != EINTR { return CallResult(value: result, error: error) }
    }
}
