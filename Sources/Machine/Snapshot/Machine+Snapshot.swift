import Basics
import FoundationEssentials
import Glibc
import KVM
import Memory
import Snapshot
import X86

/// What ``Machine/snapshot(to:diff:)`` wrote, for messages and measurements.
public struct MachineSnapshotSummary: Sendable, Equatable {
    /// Where it went (a directory, or the state file and the memory file).
    public var location: String
    /// Bytes of the state file.
    public var stateBytes: Int
    /// Pages of RAM written to the memory file (the rest are holes: zeros, or in a diff,
    /// the parent's).
    public var pagesWritten: Int
    /// Whether it is a diff over an earlier snapshot.
    public var isDiff: Bool
    /// Nanoseconds from the start of the snapshot to its files being on disk.
    public var nanoseconds: UInt64
}

extension Machine {
    /// Writes the paused machine to `directory` (made if missing): `directory/state` and
    /// `directory/memory`. See ``snapshot(to:diff:)``.
    public func snapshot(to directory: String, diff: Bool = false) throws(MachineError) -> MachineSnapshotSummary {
        try snapshot(to: SnapshotFiles(directory: directory), diff: diff)
    }

    /// Writes the paused machine to `paths`: the state file (vCPUs, in-kernel devices,
    /// user-space devices, configuration) and the memory file (RAM; zero pages as holes).
    /// Each is written under a temporary name, flushed, then renamed, so a crash midway
    /// leaves an older snapshot there whole; the machine's own memory file (a restored
    /// machine maps its snapshot's) is never written. The machine must be paused, and
    /// stays paused.
    ///
    /// With `diff`, the memory file holds only the pages written since the snapshot this
    /// machine last took or was restored from (which needs ``startDirtyTracking()`` or
    /// ``MachineConfiguration/trackDirtyPages`` since then), and the state file names that
    /// snapshot as its parent: a restore reads the parent's memory, then this one's pages.
    /// The parent must stay where it is. While tracking, every snapshot becomes the base of
    /// the next diff.
    public func snapshot(to paths: SnapshotFiles, diff: Bool = false) throws(MachineError) -> MachineSnapshotSummary {
        guard state == .paused else { throw .invalidTransition(action: "snapshot", state: state.rawValue) }
        let started = MonotonicClock.nanoseconds()
        let memoryPath = paths.memory ?? SnapshotFiles(directory: paths.stateDirectory).memory!
        let tracked = tracking.withLock { $0 }
        if diff {
            guard tracked.active else {
                throw .snapshot(path: paths.description, .incompatible("a diff snapshot needs the pages written since an earlier "
                    + "snapshot: track dirty pages from the start (--track-dirty-pages, track_dirty_pages) or before that snapshot"))
            }
            guard let base = tracked.base else {
                throw .snapshot(path: paths.description, .incompatible("a diff snapshot builds on an earlier one: take a full "
                    + "snapshot of this VM first (or restore one) while tracking dirty pages"))
            }
            let absoluteState = LoadedSnapshot.absolute(paths.state)
            let absoluteMemory = LoadedSnapshot.absolute(memoryPath)
            guard absoluteState != base.state, absoluteMemory != LoadedSnapshot.absolute(baseMemoryPath(base.state)) else {
                throw .snapshot(path: paths.description, .incompatible("a diff snapshot cannot replace the snapshot it builds on "
                    + "(\(base.state)); write it somewhere else"))
            }
        }
        do {
            if paths.memory == nil || paths == SnapshotFiles(directory: paths.stateDirectory) { try Self.makeDirectory(paths.stateDirectory) }
            let stateDirectory = LoadedSnapshot.absolute(paths.stateDirectory)
            // The pages written since the base: taken while paused, so nothing is missed
            // between them and the memory file.
            let dirty: PageBitmap? = tracked.active ? try takeDirtyPages() : nil
            var memory = SavedMemory(file: SnapshotFiles.relative(LoadedSnapshot.absolute(memoryPath), to: stateDirectory),
                                     size: board.memory.size, parent: nil, pages: nil)
            if diff, let base = tracked.base, let dirty {
                memory.parent = .init(state: SnapshotFiles.relative(base.state, to: stateDirectory), id: base.id)
                memory.pages = dirty.runs.map { [$0.lowerBound, $0.upperBound] }
            }
            let manifest = try captureManifest(memory: memory)
            let written = try Self.writeAtomically(memoryPath) { (descriptor) throws in
                try board.memory.writeImage(to: descriptor, pages: diff ? dirty : nil).pagesWritten
            }
            let encoder = JSONEncoder()
            encoder.outputFormatting = [.prettyPrinted, .sortedKeys]
            let payload = try encoder.encode(manifest)
            let file = SnapshotEnvelope.encode(payload: Array(payload))
            try Self.writeAtomically(paths.state) { (descriptor) throws in
                try Self.writeAll(descriptor, file)
            }
            Self.syncDirectory(paths.stateDirectory)
            Self.syncDirectory(SnapshotFiles.directory(of: memoryPath))
            if tracked.active {
                let state = LoadedSnapshot.absolute(paths.state)
                tracking.withLock { $0.base = (state, manifest.id) }
            }
            return MachineSnapshotSummary(location: paths.description, stateBytes: file.count, pagesWritten: written, isDiff: diff,
                                          nanoseconds: MonotonicClock.nanoseconds() - started)
        } catch let error as MachineError {
            throw error
        } catch {
            throw .snapshot(path: paths.description, .malformed("cannot write it: \(error)"))
        }
    }

    /// The memory file the state file at `state` names (for refusing to overwrite it).
    private func baseMemoryPath(_ state: String) -> String {
        guard let manifest = try? LoadedSnapshot.readManifest(state) else { return state }
        return SnapshotFiles.resolve(manifest.memory.file, from: SnapshotFiles.directory(of: state))
    }

    /// The state of everything but RAM. Each vCPU's state is read on its own thread.
    func captureManifest(memory: SavedMemory) throws -> SnapshotManifest {
        let msrIndices = try board.system.msrIndexList()
        var vcpus: [SavedVCPU] = []
        for runner in runners {
            let vcpu = runner.vcpu
            let size = xsaveSize
            let cpuid = cpuidTables[vcpu.id]
            let result = pauseControl.perform(onRunner: vcpu.id) { () -> Result<SavedVCPU, KVMError> in
                do throws(KVMError) {
                    return .success(try SavedVCPU.capture(vcpu, cpuid: cpuid, msrIndices: msrIndices, xsaveSize: size))
                } catch {
                    return .failure(error)
                }
            }
            guard let result else { throw MachineError.invalidConfiguration("vCPU \(vcpu.id) is not parked; its state cannot be read") }
            vcpus.append(try result.get())
        }
        let features = CPUFeature.all.filter { feature in
            !feature.isManaged && CPUIDTable(vcpus[0].cpuid.map(\.entry)).has(feature.location)
        }.map(\.name)
        return SnapshotManifest(
            format: SnapshotEnvelope.currentVersion, swiftletVersion: SwiftletVersion.current,
            id: Self.randomID(), createdAt: Int64(time(nil)),
            machine: configuration.saved(testDevice: hasTestDevice, diskRateLimiters: diskRateLimiters), cpuFeatures: features,
            memory: memory,
            vm: try SavedVMDevices.capture(board.vm), vcpus: vcpus, devices: board.saveDeviceState())
    }

    /// 128 random bits in hex.
    static func randomID() -> String {
        var generator = SystemRandomNumberGenerator()
        return Hex.digits(generator.next() as UInt64, width: 16) + Hex.digits(generator.next() as UInt64, width: 16)
    }

    static func makeDirectory(_ path: String) throws {
        if mkdir(path, 0o755) != 0, errno != EEXIST {
            throw HostFileError(path: path, purpose: "snapshot directory", reason: String(cString: strerror(errno)))
        }
        var status = stat()
        guard stat(path, &status) == 0, status.st_mode & S_IFMT == S_IFDIR else {
            throw HostFileError(path: path, purpose: "snapshot directory", reason: "it is not a directory")
        }
    }

    /// Writes `path` through `body` under a temporary name, `fsync`s it, and renames it
    /// into place.
    static func writeAtomically<Result>(_ path: String, _ body: (Int32) throws -> Result) throws -> Result {
        let temporary = "\(path).tmp"
        unlink(temporary)
        let descriptor = open(temporary, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0o600)
        guard descriptor >= 0 else {
            throw HostFileError(path: temporary, purpose: "snapshot file", reason: String(cString: strerror(errno)))
        }
        do {
            let result = try body(descriptor)
            guard fsync(descriptor) == 0 else {
                throw HostFileError(path: temporary, purpose: "snapshot file", reason: "fsync: \(String(cString: strerror(errno)))")
            }
            close(descriptor)
            guard rename(temporary, path) == 0 else {
                throw HostFileError(path: path, purpose: "snapshot file", reason: "rename: \(String(cString: strerror(errno)))")
            }
            return result
        } catch {
            close(descriptor)
            unlink(temporary)
            throw error
        }
    }

    static func writeAll(_ descriptor: Int32, _ bytes: [UInt8]) throws {
        var done = 0
        while done < bytes.count {
            let written = bytes.withUnsafeBytes { write(descriptor, $0.baseAddress! + done, bytes.count - done) }
            if written < 0, errno == EINTR { continue }
            guard written > 0 else { throw HostFileError(path: "", purpose: "snapshot file", reason: String(cString: strerror(errno))) }
            done += written
        }
    }

    /// Makes the renames durable.
    static func syncDirectory(_ path: String) {
        let descriptor = open(path, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
        guard descriptor >= 0 else { return }
        fsync(descriptor)
        close(descriptor)
    }
}
