import Basics
import DiskImage
import FoundationEssentials
import Glibc
import Memory
import Snapshot
import Virtio
import X86

/// How a migration decides to stop copying while the guest runs.
public struct MachineMigrationOptions: Sendable, Equatable {
    /// The longest pause the guest should see: pre-copy stops once the pages still dirty
    /// could be sent in this time at the bandwidth measured so far (QEMU's default: 300 ms).
    public var downtimeTarget: Double = 0.3
    /// Pre-copy rounds at most (the first, which sends all of RAM, included): a guest that
    /// dirties memory faster than it can be sent is stopped after these.
    public var maximumRounds = 30
    /// Bytes per second the stream may use at most (QEMU's max-bandwidth); `nil`: as fast
    /// as the connection goes.
    public var maximumBandwidth: Double?

    public init() {}
}

/// What a migration did, for messages and measurements.
public struct MachineMigrationSummary: Sendable, Equatable, CustomStringConvertible {
    /// Where the VM went (`unix:PATH`, `tcp:HOST:PORT`).
    public var destination: String
    /// Pre-copy rounds, the first (all of RAM) included.
    public var rounds: Int
    /// Pages sent with their data, all rounds together; zero pages are sent as a count.
    public var pagesSent: Int
    /// Pages sent while the guest was paused (the last round).
    public var finalPages: Int
    /// Bytes of the stream the source sent.
    public var bytesSent: Int
    /// From the start of the migration to the target's commit.
    public var totalNanoseconds: UInt64
    /// From pausing the guest to committing the target, which resumes it: the pause the
    /// guest sees (plus the target's start of its vCPU threads).
    public var downtimeNanoseconds: UInt64

    public var description: String {
        "\(rounds) round\(rounds == 1 ? "" : "s"), \(pagesSent) pages (\(ByteSize.human(UInt64(bytesSent))) sent), "
            + "\(finalPages) while paused; total \(Self.milliseconds(totalNanoseconds)), downtime \(Self.milliseconds(downtimeNanoseconds))"
    }

    static func milliseconds(_ nanoseconds: UInt64) -> String {
        let value = Double(nanoseconds) / 1e6
        return value < 10 ? "\((value * 10).rounded() / 10) ms" : "\(Int(value.rounded())) ms"
    }
}

extension Machine {
    /// Whether a migration is under way (pause, resume and snapshots wait for its end).
    public var isMigrating: Bool { migration.withLock { $0 } }

    /// The CPU features the guest was given, by /proc/cpuinfo name.
    func guestCPUFeatures() -> [String] {
        let table = CPUIDTable(cpuidTables[0])
        return CPUFeature.all.filter { !$0.isManaged && table.has($0.location) }.map(\.name)
    }

    /// Moves this running machine to a Swiftlet waiting with `--incoming` at `address`:
    /// the target checks the machine, RAM is copied in rounds while the guest runs (each
    /// round sends the pages written during the one before), then the guest is paused,
    /// the last pages and the state of every vCPU and device are sent, and once the target
    /// has restored them it is told to run. This machine then stops with
    /// ``StopReason/migrated(to:)``; `beforeStop` runs first with the summary.
    ///
    /// Any failure (the target refuses, the connection breaks, either side dies) leaves
    /// this machine as it was: dirty tracking off, the guest running again if it was
    /// running. Blocks the calling thread for the whole migration; never call it on a vCPU
    /// thread or the event loop.
    public func migrate(to address: MigrationAddress, options: MachineMigrationOptions = MachineMigrationOptions(),
                        beforeStop: (@Sendable (MachineMigrationSummary) -> Void)? = nil) throws(MachineError) -> MachineMigrationSummary {
        guard board.networkInterfaces.isEmpty else {
            throw .migration("the VM has a network interface: handing a TAP over to the target is not supported yet")
        }
        try migration.withLock { (busy) throws(MachineError) in
            guard !busy else { throw .migration("a migration is already under way") }
            guard state == .running || state == .paused else { throw .invalidTransition(action: "migrate", state: state.rawValue) }
            busy = true
        }
        defer { migration.withLock { $0 = false } }
        let started = MonotonicClock.nanoseconds()
        let channel: MigrationChannel
        do {
            channel = MigrationChannel(fd: try MigrationSocket.connect(address))
            MigrationSocket.setReceiveTimeout(channel.fd, seconds: Self.migrationPeerTimeout)
            let hello = MigrationHello(protocolVersion: MigrationHello.currentProtocol, swiftletVersion: SwiftletVersion.current,
                                       machine: configuration.saved(testDevice: hasTestDevice), cpuFeatures: guestCPUFeatures())
            try channel.send(.hello, bytes: Array(try JSONEncoder().encode(hello)))
            let answer = try channel.receive()
            switch answer.kind {
            case .accept: break
            case .refuse: throw MigrationFailure("the target refused the VM: \(String(decoding: answer.payload, as: UTF8.self))")
            default: throw MigrationFailure("the target answered the hello with a \(answer.kind) frame")
            }
        } catch let error as MigrationFailure {
            throw .migration(error.description)
        } catch {
            throw .migration("\(error)")
        }

        // Tracking the user turned on (for diff snapshots) is shared: the migration's reads
        // of the dirty log take pages a diff would need, so afterwards tracking starts over
        // and the next diff snapshot needs a full one first.
        let wasTracking = isTrackingDirtyPages
        if !wasTracking { try startDirtyTracking() }
        func endTracking() {
            stopDirtyTracking()
            if wasTracking { try? startDirtyTracking() }
        }
        var pausedHere = false
        var handedOver: [ImageFile] = []
        do {
            var sent = PageCounts()
            // Round 1: every page of RAM with data in it (the target's RAM starts as zeros).
            var roundStart = MonotonicClock.nanoseconds()
            try sendPages(.all(pageCount: board.memory.pageCount), over: channel, skipZeroPages: true, bandwidthLimit: options.maximumBandwidth, counts: &sent)
            var bytesPerSecond = Self.rate(bytes: channel.bytesSent, since: roundStart)
            var rounds = 1
            var pending: PageBitmap
            while true {
                pending = try takeDirtyPages()
                let estimate = Double(pending.count) * 4096 / bytesPerSecond
                if estimate <= options.downtimeTarget || rounds >= options.maximumRounds { break }
                roundStart = MonotonicClock.nanoseconds()
                let before = channel.bytesSent
                try sendPages(pending, over: channel, skipZeroPages: false, bandwidthLimit: options.maximumBandwidth, counts: &sent)
                bytesPerSecond = max(Self.rate(bytes: channel.bytesSent - before, since: roundStart), 1)
                rounds += 1
            }
            let pausedAt = MonotonicClock.nanoseconds()
            if state == .running {
                try pause()
                pausedHere = true
            }
            pending.formUnion(try takeDirtyPages())
            let pagesBefore = sent.data + sent.zero
            try sendPages(pending, over: channel, skipZeroPages: false, bandwidthLimit: options.maximumBandwidth, counts: &sent)
            let finalPages = sent.data + sent.zero - pagesBefore
            handedOver = try handOverDisks()
            // RAM is in the stream, not in a file: the manifest names none.
            let manifest = try captureManifest(memory: SavedMemory(file: "", size: board.memory.size, parent: nil, pages: nil))
            try channel.send(.state, bytes: Array(try JSONEncoder().encode(manifest)))
            let answer = try channel.receive()
            switch answer.kind {
            case .ready: break
            case .failure: throw MigrationFailure("the target could not restore the VM: \(String(decoding: answer.payload, as: UTF8.self))")
            default: throw MigrationFailure("the target answered the state with a \(answer.kind) frame")
            }
            try channel.send(.commit, bytes: [])
            let finished = MonotonicClock.nanoseconds()
            endTracking()
            let summary = MachineMigrationSummary(destination: address.description, rounds: rounds, pagesSent: sent.data, finalPages: finalPages,
                                           bytesSent: channel.bytesSent, totalNanoseconds: finished - started,
                                           downtimeNanoseconds: finished - pausedAt)
            beforeStop?(summary)
            stop.stop(.migrated(to: address.description))
            return summary
        } catch {
            endTracking()
            let reclaimed = Self.reclaimDisks(handedOver)
            // Tell the target, if it still listens, so it exits at once instead of timing out.
            let reason = (error as? MigrationFailure)?.description ?? "\(error)"
            try? channel.send(.failure, bytes: Array("the source gave up: \(reason)".utf8))
            if pausedHere { try? resume() }
            throw .migration(reason + reclaimed)
        }
    }

    /// The image files of the disks the guest writes, each flushed (the guest is paused and
    /// the devices quiet: every write it was told is done is in the file), with its lock
    /// given up so that the target can take it. Read-only disks keep their shared lock,
    /// which the target shares.
    private func handOverDisks() throws(MigrationFailure) -> [ImageFile] {
        var released: [ImageFile] = []
        for core in board.virtioTransports {
            guard let block = core.device as? VirtioBlock else { continue }
            let file: ImageFile?
            switch block.disk {
            case let raw as RawImage: file = raw.file
            case let qcow2 as QCOW2Image: file = qcow2.file
            default: file = nil
            }
            guard let file, file.writable else { continue }
            do {
                try block.disk.flush()
                try file.lock(.unlocked)
                released.append(file)
            } catch {
                _ = Self.reclaimDisks(released)
                throw MigrationFailure("handing the disk '\(file.path)' over: \(error)")
            }
        }
        return released
    }

    /// Takes the locks of `files` back after a failed hand-off; "" when all were taken,
    /// else a sentence for the error message.
    static func reclaimDisks(_ files: [ImageFile]) -> String {
        var lost: [String] = []
        for file in files {
            do { try file.lock(.exclusive) } catch { lost.append(file.path) }
        }
        return lost.isEmpty ? "" : " (and the lock on \(lost.joined(separator: ", ")) could not be taken back: another process holds it)"
    }

    /// How long either side waits for the other before giving up.
    static let migrationPeerTimeout = 60

    static func rate(bytes: Int, since start: UInt64) -> Double {
        let seconds = max(Double(MonotonicClock.nanoseconds() - start) / 1e9, 1e-6)
        return max(Double(bytes) / seconds, 1)
    }

    struct PageCounts {
        var data = 0
        var zero = 0
    }

    /// Sends `pages` in frames of at most ``MigrationChannel/pagesPerFrame`` pages: runs of
    /// pages with data as `pages` frames, runs of zero pages as a `zeroPages` count (or not
    /// at all with `skipZeroPages`, when the target's page is known to be zero).
    private func sendPages(_ pages: PageBitmap, over channel: MigrationChannel, skipZeroPages: Bool, bandwidthLimit: Double?,
                           counts: inout PageCounts) throws(MigrationFailure) {
        let memory = board.memory
        let pageSize = Int(GuestMemory.pageSize)
        // The guest may write a page while it is sent: each chunk is copied first, so the
        // checksum and the bytes sent agree (a page written meanwhile is dirty again, and
        // goes in a later round).
        var copy = [UInt8](repeating: 0, count: MigrationChannel.pagesPerFrame * pageSize)
        for run in pages.runs {
            var start = run.lowerBound
            while start < run.upperBound {
                let end = min(run.upperBound, start + MigrationChannel.pagesPerFrame)
                let count = end - start
                var copied = true
                do {
                    try memory.withPages(start..<end) { bytes in
                        // Round 1 skips zero pages: a chunk of them is not even copied (a page
                        // written after this look is dirty, and goes in a later round).
                        if skipZeroPages, (0..<count).allSatisfy({ Self.isZeroPage(bytes, at: $0 * pageSize) }) {
                            copied = false
                            return
                        }
                        copy.withUnsafeMutableBytes { $0.baseAddress!.copyMemory(from: bytes.baseAddress!, byteCount: bytes.count) }
                    }
                } catch {
                    throw MigrationFailure("reading guest RAM: \(error)")
                }
                guard copied else {
                    start = end
                    continue
                }
                let failure = copy.withUnsafeBytes { (bytes) -> MigrationFailure? in
                    var index = 0
                    while index < count {
                        let zero = Self.isZeroPage(bytes, at: index * pageSize)
                        var next = index + 1
                        while next < count, Self.isZeroPage(bytes, at: next * pageSize) == zero { next += 1 }
                        let first = UInt64(start + index)
                        do throws(MigrationFailure) {
                            if !zero {
                                try channel.send(.pages, prefix: [UInt8].littleEndian(first),
                                                 body: UnsafeRawBufferPointer(rebasing: bytes[(index * pageSize)..<(next * pageSize)]))
                                counts.data += next - index
                            } else if !skipZeroPages {
                                try channel.send(.zeroPages, prefix: [UInt8].littleEndian(first) + [UInt8].littleEndian(UInt64(next - index)))
                                counts.zero += next - index
                            }
                        } catch {
                            return error
                        }
                        index = next
                    }
                    return nil
                }
                if let failure { throw failure }
                start = end
                throttle(channel, limit: bandwidthLimit)
            }
        }
    }

    /// Sleeps while the stream is ahead of `limit` bytes per second since it began.
    private func throttle(_ channel: MigrationChannel, limit: Double?) {
        guard let limit, limit > 0 else { return }
        let due = Double(channel.bytesSent) / limit
        let elapsed = Double(MonotonicClock.nanoseconds() - channel.openedAt) / 1e9
        if due > elapsed { usleep(UInt32(min((due - elapsed) * 1e6, 1e6))) }
    }

    /// Whether the page at byte `offset` of `bytes` holds only zeros.
    static func isZeroPage(_ bytes: UnsafeRawBufferPointer, at offset: Int) -> Bool {
        var accumulated: UInt64 = 0
        var position = offset
        let end = offset + Int(GuestMemory.pageSize)
        while position < end {
            accumulated |= bytes.load(fromByteOffset: position, as: UInt64.self)
                | bytes.load(fromByteOffset: position + 8, as: UInt64.self)
                | bytes.load(fromByteOffset: position + 16, as: UInt64.self)
                | bytes.load(fromByteOffset: position + 24, as: UInt64.self)
            if accumulated != 0 { return false }
            position += 32
        }
        return true
    }
}
