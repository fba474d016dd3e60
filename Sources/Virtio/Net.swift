// virtio-net: a network interface for the guest backed by a Linux TAP device (virtio 1.2,
// section 5.1), independent of the transport that presents it. The data path is in user
// space (there is no /dev/vhost-net here): `NetDataPath` moves the frames.
//
// Queues: one receive queue (0) and one transmit queue (1); no control queue, no
// multi-queue.
//
// Features offered: VERSION_1, RING_INDIRECT_DESC, RING_EVENT_IDX, MAC, STATUS, MRG_RXBUF,
// and the offloads the TAP accepts (TUNSETOFFLOAD is tried when the TAP is opened):
// CSUM/GUEST_CSUM with TUN_F_CSUM, HOST_/GUEST_TSO4, TSO6, ECN and UFO with the TUN_F_
// bit of that name, HOST_USO and GUEST_USO4/6 with TUN_F_USO4|USO6. At DRIVER_OK the TAP
// is told the GUEST_ offloads the driver accepted, so that it hands the guest nothing else;
// the HOST_ ones bound what the device takes from the guest.
//
// Configuration space (5.1.4, read-only): mac, status (LINK_UP), max_virtqueue_pairs (1).
//
// Rate limits: one limiter per direction (`VirtioNetOptions.receiveRateLimiter` and
// `transmitRateLimiter`, changed with `updateRateLimiters`); see `NetDataPath`.
//
// What a hostile or broken driver gets (each case has a test in NetHostileTests):
// - a transmit chain shorter than the 12-byte header plus an Ethernet header, a header
//   asking for a checksum or segmentation offload that was not negotiated: the frame is
//   dropped and counted (transmitMalformed), the chain returned; the next frame goes.
// - a transmit frame longer than the features allow (1518 bytes without a HOST_
//   segmentation offload, 65550 with one; also a descriptor that claims a length the
//   frame does not have): dropped, counted (transmitOversized).
// - a frame the TAP refuses (the kernel's own checks of the header): dropped, counted
//   (transmitBackendErrors).
// - receive chains too small for a header: returned empty, counted. A frame longer than
//   the receive buffers or the features allow: dropped unseen, counted (receiveOversized).
// - a ring the driver broke (Virtqueue's checks: buffers outside RAM, loops, indices...):
//   the device asks for a reset (DEVICE_NEEDS_RESET) and stops until it gets one.
// - notifications with nothing to do: one wake-up each (eventfds coalesce them), no
//   spinning; a driver that keeps the transmit queue full is served in rounds of 64
//   frames, so reception goes on.

import Basics
import EventLoop
import Memory
import RateLimit
import Synchronization

/// A virtio-net device over a TAP (any ``NetBackend``). See the comment at the top of this
/// file for the features and what a hostile driver gets, and ``NetDataPath`` for how
/// frames move.
///
/// Owns its backend (the TAP's descriptor) and, while the driver has the device active,
/// an event loop thread (`netN`) that serves both queues and the TAP.
public final class VirtioNet: VirtioDevice {
    public let deviceType: VirtioDeviceType = .network
    public let offeredFeatures: UInt64
    public let queueMaximumSizes: [UInt16]
    public let backend: any NetBackend
    public let options: VirtioNetOptions
    private let configurationBytes: [UInt8]
    private let counters = NetCounters()
    private let running = Mutex(Running())

    /// What the device is doing: the activation it serves (from DRIVER_OK to the reset),
    /// the session serving it (none while paused), and whether the machine is paused.
    private struct Running {
        var activation: VirtioActivation?
        var negotiation: NetNegotiation?
        var session: NetSession?
        var paused = false
    }
    private let threadStarter: ThreadStarter
    /// The rate limiters of reception and transmission; they outlive activations.
    private let limiters: NetRateLimiters

    /// The name of a session's event loop thread.
    public static func threadName(options: VirtioNetOptions) -> String { "net\(options.index)" }

    /// The size of the configuration space.
    public static let configurationSize = NetConfigurationSpace.size

    /// The event loop thread of a session (named ``threadName(options:)``) comes from
    /// `threads`: on demand, or from a reserve started with the VM when threads are confined.
    public init(backend: any NetBackend, options: VirtioNetOptions, threads: ThreadStarter = .onDemand) throws(VirtioError) {
        let size = options.queueSize
        guard size >= 16, size <= Virtqueue.largestSize, size & (size - 1) == 0 else {
            throw VirtioError("virtio-net: queue size \(size) is not a power of two from 16 to \(Virtqueue.largestSize)")
        }
        guard !options.mac.isMulticast, !options.mac.isZero else {
            throw VirtioError("virtio-net: \(options.mac) is not a unicast MAC address")
        }
        self.backend = backend
        self.options = options
        self.threadStarter = threads
        limiters = NetRateLimiters(receive: SharedRateLimiter(options.receiveRateLimiter),
                                   transmit: SharedRateLimiter(options.transmitRateLimiter))
        queueMaximumSizes = [size, size]
        offeredFeatures = VirtioFeature.version1 | VirtioFeature.ringIndirectDescriptors | VirtioFeature.ringEventIndex
            | VirtioNetFeature.mac | VirtioNetFeature.status | VirtioNetFeature.mergeableReceiveBuffers
            | VirtioNetFeature.features(for: backend.supportedOffloads)
        configurationBytes = NetConfigurationSpace.bytes(mac: options.mac)
    }

    deinit {
        reset()
    }

    /// What the device has moved and dropped so far.
    public var statistics: VirtioNetStatistics { counters.snapshot }

    public func readConfiguration(offset: UInt64, into data: UnsafeMutableRawBufferPointer) {
        for index in 0..<data.count {
            let (position, overflow) = offset.addingReportingOverflow(UInt64(index))
            data[index] = !overflow && position < UInt64(configurationBytes.count) ? configurationBytes[Int(position)] : 0
        }
    }

    /// The configuration space is read-only (the MAC is set through the control queue,
    /// which is not offered): writes are ignored.
    public func writeConfiguration(offset: UInt64, from data: UnsafeRawBufferPointer) {}

    /// Starts serving the queues, or, while the machine is paused (a restore activates the
    /// device before the machine resumes), keeps the activation for ``resume()``. The TAP
    /// is told the offloads the driver accepted either way.
    public func activate(_ activation: VirtioActivation) throws(VirtioError) {
        try running.withLock { (running) throws(VirtioError) in
            guard running.activation == nil else { throw VirtioError("virtio-net: activated again without a reset") }
            guard activation.queues.count == 2, activation.notifications.count == 2 else {
                throw VirtioError("virtio-net: activated with \(activation.queues.count) queues and "
                                  + "\(activation.notifications.count) notifiers for its 2 queues")
            }
            let negotiation = NetNegotiation(features: activation.features & offeredFeatures)
            let offloads = VirtioNetFeature.tapOffloads(for: negotiation.features)
            do {
                try backend.setOffloads(offloads)
            } catch {
                throw VirtioError("virtio-net: \(error)")
            }
            if !running.paused {
                running.session = try NetSession(activation: activation, negotiation: negotiation, backend: backend,
                                                 counters: counters, limiters: limiters, name: Self.threadName(options: options),
                                                 threads: threadStarter)
            }
            running.activation = activation
            running.negotiation = negotiation
        }
    }

    public func reset() {
        running.withLock { running in
            running.session?.stop()
            running.session = nil
            running.activation = nil
            running.negotiation = nil
        }
    }

    /// The machine pauses: the data path stops (no frame is read from the TAP or taken
    /// from a queue any more; frames the host sends meanwhile wait in the TAP's queue) and
    /// puts back the chains it held, so nothing is half-done. Returns once the device's
    /// thread has stopped.
    public func pause() {
        running.withLock { running in
            running.paused = true
            guard let session = running.session else { return }
            session.stop()
            session.putBackHeldChains()
            running.session = nil
        }
    }

    /// The machine resumes: a new data path takes up the queues where the old one left
    /// them (and looks at both rings at once: the driver may have notified meanwhile, or,
    /// after a restore, in the process the snapshot was taken from).
    public func resume() {
        running.withLock { running in
            running.paused = false
            guard running.session == nil, let activation = running.activation, let negotiation = running.negotiation else { return }
            do throws(VirtioError) {
                running.session = try NetSession(activation: activation, negotiation: negotiation, backend: backend,
                                                 counters: counters, limiters: limiters, name: Self.threadName(options: options),
                                                 threads: threadStarter)
            } catch {
                activation.needsReset(error.message)
            }
        }
    }

    /// What a snapshot records of a virtio-net device: what the driver read from its
    /// configuration space (the MAC and the link status) and the queue size, checked on
    /// restore so that the guest does not continue with another interface under its feet.
    /// The features the driver accepted (and so the offloads the TAP is told) are the
    /// transport's; the queues' places are the transport's too. The data path keeps no
    /// state of its own across a pause: ``pause()`` puts back the chains it held.
    public struct SavedState: Codable, Sendable, Equatable {
        /// "52:54:00:12:34:56".
        public var mac: String
        /// The status field (VIRTIO_NET_S_LINK_UP).
        public var status: UInt16
        public var queueSize: UInt16
    }

    public func saveDeviceState() -> VirtioDeviceState {
        .network(state: SavedState(mac: options.mac.description, status: NetConfigurationSpace.linkUp, queueSize: options.queueSize))
    }

    /// Refuses a state saved from another kind of device, or from an interface with another
    /// MAC, link status or queue size.
    public func restoreDeviceState(_ state: VirtioDeviceState) throws(VirtioError) {
        guard case let .network(saved) = state else { throw VirtioError("a saved \(state.kind) state does not fit a virtio-net device") }
        var differences: [String] = []
        if MACAddress(saved.mac) != options.mac { differences.append("the MAC \(saved.mac), this interface's is \(options.mac)") }
        if saved.status != NetConfigurationSpace.linkUp { differences.append("the link status \(saved.status), this interface's is \(NetConfigurationSpace.linkUp)") }
        if saved.queueSize != options.queueSize { differences.append("queues of \(saved.queueSize), this interface's are \(options.queueSize)") }
        guard differences.isEmpty else {
            throw VirtioError("the snapshot's network interface had \(differences.joined(separator: "; "))")
        }
    }

    /// The rate limiters' buckets now.
    public var rateLimiterConfigurations: (receive: RateLimiterConfiguration, transmit: RateLimiterConfiguration) {
        (limiters.receive.configuration, limiters.transmit.configuration)
    }

    /// Changes the rate limiters while the device runs (from any thread), with
    /// Firecracker's rules (``RateLimiter/update(_:)``); `nil` leaves a limiter as it is.
    /// A direction waiting for tokens looks again at once.
    public func updateRateLimiters(receive: RateLimiterConfiguration?, transmit: RateLimiterConfiguration?) {
        if let receive { limiters.receive.update(receive) }
        if let transmit { limiters.transmit.update(transmit) }
        running.withLock { $0.session }?.rateLimitersChanged()
    }
}

/// A device's two rate limiters.
struct NetRateLimiters: Sendable {
    let receive: SharedRateLimiter
    let transmit: SharedRateLimiter
}

/// One activation: the event loop, its thread and the data path, from DRIVER_OK to the reset.
final class NetSession: Sendable {
    private let loop: EventLoop
    private let dataPath: NetDataPath
    private let thread: any JoinableThread

    init(activation: VirtioActivation, negotiation: NetNegotiation, backend: any NetBackend, counters: NetCounters,
         limiters: NetRateLimiters, name: String, threads: ThreadStarter) throws(VirtioError) {
        do {
            loop = try EventLoop()
        } catch {
            throw VirtioError("virtio-net: cannot make an event loop: \(error)")
        }
        do {
            dataPath = try NetDataPath(activation: activation, negotiation: negotiation, backend: backend, counters: counters,
                                       limiters: limiters, loop: loop)
        } catch {
            throw VirtioError("virtio-net: cannot make the rate limiters' timers: \(error)")
        }
        do {
            try dataPath.start()
        } catch {
            throw VirtioError("virtio-net: cannot watch its descriptors: \(error)")
        }
        do {
            thread = try threads.start(name: name) { [loop] in loop.run() }
        } catch {
            dataPath.unregisterAll()
            throw VirtioError("virtio-net: \(error)")
        }
    }

    /// Makes the data path look at its rate limiters again (on the loop's thread).
    func rateLimitersChanged() {
        dataPath.rateLimitersChanged()
    }

    /// Stops the loop and waits for its thread: when this returns, no frame is moving.
    func stop() {
        loop.stop()
        thread.join()
        dataPath.unregisterAll()
    }

    /// After ``stop()``: puts back the chains the data path held.
    func putBackHeldChains() {
        dataPath.putBackHeldChains()
    }
}
