// virtio-blk: a disk image (DiskImage's raw or qcow2 `BlockDevice`) as a virtio 1.2 block
// device (specification section 5.2), independent of the transport that presents it.
//
// Features offered: VERSION_1, RING_INDIRECT_DESC, RING_EVENT_IDX, SIZE_MAX (1 MiB),
// SEG_MAX (queue size - 2), BLK_SIZE (512), FLUSH, DISCARD, WRITE_ZEROES, RO for a
// read-only disk, MQ with more than one queue. Not offered: GEOMETRY, TOPOLOGY,
// CONFIG_WCE, LIFETIME, SECURE_ERASE, ZONED.
//
// Configuration space (5.2.4, 72 bytes, read-only): capacity in 512-byte sectors (the
// image's size rounded down to whole sectors), size_max, seg_max, blk_size, num_queues,
// max_discard_sectors and max_write_zeroes_sectors (2^22 sectors per segment),
// max_discard_seg and max_write_zeroes_seg (32), discard_sector_alignment (the image's
// deallocation granularity: the file system block for raw files, one sector otherwise),
// write_zeroes_may_unmap (1 for raw files: they punch holes). Writes are ignored.
//
// Requests (the header's `type`; a request is framed any way the driver likes, 2.6.4):
// - IN (0): reads whole sectors from `sector` straight into the device-writable buffers
//   (pread through the image, no intermediate copy).
// - OUT (1): writes the device-readable bytes after the header to `sector` (pwrite from
//   guest memory). Without a negotiated FLUSH, the write is made durable before it
//   completes (write-through, 5.2.6.1).
// - FLUSH (4): makes every completed write durable (fdatasync, or the qcow2 flush that
//   orders its metadata); it completes only after that.
// - GET_ID (8): writes the serial (`serial=TEXT`, default "swiftlet-<n>"), NUL-padded to
//   20 bytes, into at most the first 20 device-writable bytes.
// - DISCARD (11): raw files punch a hole per segment (fallocate PUNCH_HOLE|KEEP_SIZE);
//   qcow2 ignores it for now (a discard is a hint; the contents stay).
// - WRITE_ZEROES (13): with the unmap flag, raw files punch a hole; without it, they
//   zero the range in place (ZERO_RANGE|KEEP_SIZE); qcow2 writes zeros through its
//   normal write path where the range does not already read as zeros.
// - Anything else (GET_LIFETIME, SECURE_ERASE, legacy SCSI, unknown): VIRTIO_BLK_S_UNSUPP.
// The used ring reports the bytes written: the data filled in (IN, GET_ID) plus the status.
//
// What a hostile or broken driver gets (each case has a test in BlockHostileTests):
// - header not device-readable (in a writable descriptor) or shorter than 16 bytes: IOERR.
// - no device-writable byte for the status (a status byte in a read-only descriptor):
//   there is nowhere to answer; the chain is not returned and the device asks for a reset
//   (DEVICE_NEEDS_RESET through `VirtioActivation.needsReset`) and stops using its queues.
// - sector past the end, a range crossing the end, or a length that is not a multiple
//   of 512 (IN, OUT, discard and write-zeroes segments): IOERR, and the disk is untouched.
// - sector * 512 or sector * 512 + length overflowing 64 bits: IOERR.
// - a write, discard or write-zeroes on a read-only disk: IOERR, the disk is untouched.
// - a flush on a read-only disk: OK. Only writes must fail on a read-only device
//   (5.2.6.1); a flush asks that completed writes be durable, and there are none.
// - an unknown request type: UNSUPP.
// - discard or write-zeroes when the feature was not negotiated: UNSUPP. A segment with a
//   reserved flag bit, or a discard with the unmap flag: UNSUPP (5.2.6.1). A segment past
//   the end or over max_*_sectors, more than max_*_seg segments, or a payload that is not
//   a positive multiple of 16 bytes: IOERR. Every segment is checked before any is done.
// - a broken ring (any error Virtqueue throws: loops, indices, addresses...): the device
//   asks for a reset and stops using its queues; requests in flight finish on the disk
//   but are not returned.
// - requests before DRIVER_OK: the device has no queue and no thread before `activate`, so
//   nothing is seen; at activation it looks at the rings once.
// - the same head made available over and over: at most queue-size requests per queue are
//   in flight; the dispatcher then waits for a worker before taking more.
// - notifications with nothing available: one wake-up each, no spinning.
//
// Rate limit (`VirtioBlockOptions.rateLimiter`, changed with `updateRateLimiter`): the
// dispatcher takes one op and a read's or write's data bytes from the device's limiter
// before it hands a chain to a worker; without tokens, the chain goes back to the
// available ring and the dispatcher sleeps on its queue's timerfd until they are there
// (docs/virtio.md, "Rate limits").
//
// Threads: at `activate`, per queue, one dispatcher (waits on the queue's notification
// EventFD and the stop EventFD with poll, takes chains) and `workersPerQueue` workers (each
// runs one request at a time; several requests in flight reach the disk in parallel).
// The dispatcher answers one kind of request itself: a read of at most 16 KiB from a raw
// image whose data the host's page cache holds (preadv2 with RWF_NOWAIT, which never waits
// for the disk); copying it costs less than waking a worker. Anything else, and a read that
// finds any of its data uncached, goes to a worker, which rings only when needed: the
// dispatcher wakes one idle worker per chain it hands over.
// A worker completes a request with the status byte, `pushUsed`, then
// `shouldNotifyDriver` and at most one `signalQueue`. `reset` stops all of them and waits
// until no request is in flight. Nothing runs on the caller's (vCPU) thread except
// configuration reads and starting and stopping the threads.

#if canImport(Glibc)
import Glibc
#endif
import Basics
import DiskImage
import EventLoop
import Memory
import RateLimit
import Synchronization

/// A virtio-blk device over a disk image. See the comment at the top of this file for
/// what each request does and what a hostile driver gets.
///
/// Owns its disk image (the `BlockDevice`) and, while the driver has it active, the
/// worker threads that serve its queues.
public final class VirtioBlock: VirtioDevice {
    public let deviceType: VirtioDeviceType = .block
    public let offeredFeatures: UInt64
    public let queueMaximumSizes: [UInt16]
    public let disk: any BlockDevice
    public let options: VirtioBlockOptions
    private let threadStarter: ThreadStarter
    /// The device ID the guest reads (GET_ID).
    public let serial: String
    /// The guest sees a read-only disk (`VIRTIO_BLK_F_RO`): the image is read-only or the
    /// options say so.
    public let isReadOnly: Bool
    let configurationSpace: BlockConfigurationSpace
    private let configurationBytes: [UInt8]
    private let session = Mutex<BlockSession?>(nil)
    /// The machine is paused: an activation in the meantime (a restore re-activating the
    /// device) starts with its queues paused too.
    private let paused = Atomic<Bool>(false)
    /// The rate limiter of all its queues; it outlives activations (a reset keeps it).
    private let rateLimiter: SharedRateLimiter

    /// The size of the configuration space (`struct virtio_blk_config` of virtio 1.2).
    public static let configurationSize = BlockConfigurationSpace.size

    /// The threads a session of a device with `options` runs: per queue, the dispatcher
    /// `blk<D>q<Q>` and the workers `blk<D>q<Q>w<W>`.
    public static func threadNames(options: VirtioBlockOptions) -> (dispatchers: [String], workers: [String]) {
        let queues = 0..<options.queueCount
        return (queues.map { dispatcherName(options: options, queue: $0) },
                queues.flatMap { queue in (0..<options.workersPerQueue).map { workerName(options: options, queue: queue, worker: $0) } })
    }

    static func dispatcherName(options: VirtioBlockOptions, queue: Int) -> String { "blk\(options.diskIndex)q\(queue)" }
    static func workerName(options: VirtioBlockOptions, queue: Int, worker: Int) -> String {
        dispatcherName(options: options, queue: queue) + "w\(worker)"
    }

    /// The serial of `--disk` number `diskIndex` when it names none.
    public static func defaultSerial(diskIndex: Int) -> String { "swiftlet-\(diskIndex)" }

    /// Checks `options` and describes `disk` to the driver. Throws for options out of range
    /// and for a serial that is not at most 20 printable ASCII characters.
    ///
    /// `threads` starts each session's threads (``threadNames(options:)``): on demand, or
    /// from a reserve started with the VM when the threads are confined.
    public init(disk: any BlockDevice, options: VirtioBlockOptions = VirtioBlockOptions(),
                threads: ThreadStarter = .onDemand) throws(VirtioError) {
        let serial = options.serial ?? Self.defaultSerial(diskIndex: options.diskIndex)
        guard serial.utf8.count <= VirtioBlockLayout.idSize, serial.utf8.allSatisfy({ (0x20...0x7E).contains($0) }) else {
            throw VirtioError("disk serial '\(serial)' must be at most \(VirtioBlockLayout.idSize) printable ASCII characters")
        }
        guard (1...16).contains(options.queueCount) else {
            throw VirtioError("virtio-blk: \(options.queueCount) queues; 1 to 16 are possible")
        }
        let size = options.queueSize
        guard size >= 4, size <= Virtqueue.largestSize, size & (size - 1) == 0 else {
            throw VirtioError("virtio-blk: queue size \(size) is not a power of two from 4 to \(Virtqueue.largestSize)")
        }
        guard (1...64).contains(options.workersPerQueue) else {
            throw VirtioError("virtio-blk: \(options.workersPerQueue) workers per queue; 1 to 64 are possible")
        }
        self.disk = disk
        self.options = options
        self.threadStarter = threads
        self.serial = serial
        rateLimiter = SharedRateLimiter(options.rateLimiter)
        isReadOnly = options.readOnly || disk.isReadOnly
        queueMaximumSizes = Array(repeating: size, count: options.queueCount)

        var features = VirtioFeature.version1 | VirtioFeature.ringIndirectDescriptors | VirtioFeature.ringEventIndex
        features |= VirtioBlockFeature.sizeMaximum | VirtioBlockFeature.segmentMaximum | VirtioBlockFeature.blockSize
        features |= VirtioBlockFeature.flush | VirtioBlockFeature.discard | VirtioBlockFeature.writeZeroes
        if isReadOnly { features |= VirtioBlockFeature.readOnly }
        if options.queueCount > 1 { features |= VirtioBlockFeature.multiQueue }
        offeredFeatures = features

        let sector = VirtioBlockLayout.sectorSize
        var space = BlockConfigurationSpace()
        space.capacity = disk.virtualSize / sector
        space.sizeMax = BlockLimits.segmentSize
        space.segMax = UInt32(size) - 2
        space.blkSize = UInt32(sector)
        space.numQueues = UInt16(options.queueCount)
        space.maxDiscardSectors = BlockLimits.zeroingSectors
        space.maxDiscardSeg = BlockLimits.zeroingSegments
        space.discardSectorAlignment = UInt32(clamping: max(1, disk.discardGranularity / sector))
        space.maxWriteZeroesSectors = BlockLimits.zeroingSectors
        space.maxWriteZeroesSeg = BlockLimits.zeroingSegments
        space.writeZeroesMayUnmap = disk.canDeallocate && !isReadOnly
        configurationSpace = space
        configurationBytes = space.bytes
    }

    deinit {
        reset()
    }

    public func readConfiguration(offset: UInt64, into data: UnsafeMutableRawBufferPointer) {
        for index in 0..<data.count {
            let (position, overflow) = offset.addingReportingOverflow(UInt64(index))
            data[index] = !overflow && position < UInt64(configurationBytes.count) ? configurationBytes[Int(position)] : 0
        }
    }

    /// The configuration space is read-only (CONFIG_WCE is not offered): writes are ignored.
    public func writeConfiguration(offset: UInt64, from data: UnsafeRawBufferPointer) {}

    public func activate(_ activation: VirtioActivation) throws(VirtioError) {
        try session.withLock { (session) throws(VirtioError) in
            guard session == nil else { throw VirtioError("virtio-blk: activated again without a reset") }
            let count = options.queueCount
            guard activation.queues.count == count, activation.notifications.count == count else {
                throw VirtioError("virtio-blk: activated with \(activation.queues.count) queues and "
                                  + "\(activation.notifications.count) notifiers for its \(count) queues")
            }
            let features = activation.features & offeredFeatures
            let handler = BlockRequestHandler(
                memory: activation.memory, disk: disk, readOnly: isReadOnly,
                capacityBytes: configurationSpace.capacity * VirtioBlockLayout.sectorSize,
                identifier: Array(serial.utf8) + Array(repeating: 0, count: VirtioBlockLayout.idSize - serial.utf8.count),
                flushNegotiated: features & VirtioBlockFeature.flush != 0,
                discardNegotiated: features & VirtioBlockFeature.discard != 0,
                writeZeroesNegotiated: features & VirtioBlockFeature.writeZeroes != 0,
                writeZeroesMayUnmap: configurationSpace.writeZeroesMayUnmap)
            let control = try BlockSessionControl(handler: handler, interrupt: activation.interrupt,
                                                  rateLimiter: rateLimiter, needsReset: activation.needsReset)
            control.paused.store(paused.load(ordering: .sequentiallyConsistent), ordering: .sequentiallyConsistent)
            session = try BlockSession(control: control, activation: activation, options: options, threads: threadStarter)
        }
    }

    public func reset() {
        session.withLock { session in
            session?.stop()
            session = nil
        }
    }

    /// Takes no new requests and waits until none is in flight: every request the device
    /// took is answered (status, used ring, interrupt), the others wait in the available
    /// ring, so a saved state has no request half-done.
    public func pause() {
        guard let current = session.withLock({ session in
            paused.store(true, ordering: .sequentiallyConsistent)
            return session
        }) else { return }
        current.control.paused.store(true, ordering: .sequentiallyConsistent)
        while current.servers.contains(where: { $0.requestsInFlight > 0 }) { usleep(200) }
    }

    /// Takes requests again, first those the driver made available meanwhile.
    public func resume() {
        guard let current = session.withLock({ session in
            paused.store(false, ordering: .sequentiallyConsistent)
            return session
        }) else { return }
        current.control.paused.store(false, ordering: .sequentiallyConsistent)
        for server in current.servers { server.nudge() }
    }

    /// What a snapshot records of a virtio-blk device: nothing changes while it runs (its
    /// configuration space is read-only: no CONFIG_WCE, so no writeback flag), so the
    /// state is the disk as the driver knows it, checked on restore so that a snapshot is
    /// not continued with another disk under the driver's feet.
    public struct SavedState: Codable, Sendable, Equatable {
        /// The capacity the driver read, in 512-byte sectors.
        public var capacity: UInt64
        public var readOnly: Bool
        public var serial: String
        public var queueCount: Int
        public var queueSize: UInt16
    }

    public func saveDeviceState() -> VirtioDeviceState {
        .block(state: SavedState(capacity: configurationSpace.capacity, readOnly: isReadOnly, serial: serial,
                                 queueCount: options.queueCount, queueSize: options.queueSize))
    }

    /// Refuses a state saved from another kind of device or from a different disk (size,
    /// read-only, serial, queues): the guest's driver would go on with what it read then.
    public func restoreDeviceState(_ state: VirtioDeviceState) throws(VirtioError) {
        guard case let .block(saved) = state else { throw VirtioError("a saved \(state.kind) state does not fit a virtio-blk device") }
        guard case let .block(current) = saveDeviceState() else { return }
        var differences: [String] = []
        if saved.capacity != current.capacity { differences.append("\(saved.capacity) sectors, this disk has \(current.capacity)") }
        if saved.readOnly != current.readOnly { differences.append(saved.readOnly ? "read-only, this disk is writable" : "writable, this disk is read-only") }
        if saved.serial != current.serial { differences.append("serial '\(saved.serial)', this disk's is '\(current.serial)'") }
        if saved.queueCount != current.queueCount || saved.queueSize != current.queueSize {
            differences.append("\(saved.queueCount) queues of \(saved.queueSize), this disk has \(current.queueCount) of \(current.queueSize)")
        }
        guard differences.isEmpty else {
            throw VirtioError("the snapshot's disk was \(differences.joined(separator: "; "))")
        }
    }

    /// The rate limiter's buckets now.
    public var rateLimiterConfiguration: RateLimiterConfiguration { rateLimiter.configuration }

    /// Changes the rate limiter while the device runs (from any thread), with Firecracker's
    /// rules (``RateLimiter/update(_:)``): a bucket left out stays, one with size or refill
    /// time 0 goes, others start full. A queue waiting for tokens looks again at once.
    public func updateRateLimiter(_ configuration: RateLimiterConfiguration) {
        rateLimiter.update(configuration)
        guard let current = session.withLock({ $0 }) else { return }
        for server in current.servers { server.rateLimiterChanged() }
    }
}

/// One activation: the queue servers and their threads, from DRIVER_OK to the reset.
final class BlockSession: Sendable {
    let control: BlockSessionControl
    let servers: [BlockQueueServer]
    private let threads: [any JoinableThread]

    /// Starts a dispatcher and the workers for every queue the driver enabled.
    init(control: BlockSessionControl, activation: VirtioActivation, options: VirtioBlockOptions,
         threads starter: ThreadStarter) throws(VirtioError) {
        var servers: [BlockQueueServer] = []
        for (index, queue) in activation.queues.enumerated() {
            guard let queue else { continue }
            servers.append(try BlockQueueServer(index: index, queue: queue, notification: activation.notifications[index],
                                                control: control, workers: options.workersPerQueue))
        }
        var threads: [any JoinableThread] = []
        do {
            for server in servers {
                for worker in 0..<server.workerCount {
                    threads.append(try starter.start(name: VirtioBlock.workerName(options: options, queue: server.index, worker: worker)) {
                        server.runWorker(worker)
                    })
                }
                threads.append(try starter.start(name: VirtioBlock.dispatcherName(options: options, queue: server.index)) {
                    server.dispatch()
                })
            }
        } catch {
            Self.stop(control: control, servers: servers, threads: threads)
            throw VirtioError("virtio-blk: \(error)")
        }
        self.control = control
        self.servers = servers
        self.threads = threads
    }

    /// Stops every thread and waits for them: when this returns, no request is in flight.
    func stop() {
        Self.stop(control: control, servers: servers, threads: threads)
    }

    private static func stop(control: BlockSessionControl, servers: [BlockQueueServer], threads: [any JoinableThread]) {
        control.beginReset()
        for server in servers { server.wakeWorkers() }
        for thread in threads { thread.join() }
    }
}
