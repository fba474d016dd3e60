import Basics
import FoundationEssentials
import Glibc
import KVM
import Memory
import Snapshot
import X86

/// What ``Machine/snapshot(to:)`` wrote, for messages and measurements.
public struct MachineSnapshotSummary: Sendable, Equatable {
    public var directory: String
    /// Bytes of the state file.
    public var stateBytes: Int
    /// Pages of RAM written to the memory file (the rest are holes: zeros, or in a diff,
    /// the parent's).
    public var pagesWritten: Int
    /// Nanoseconds from the start of the snapshot to its files being on disk.
    public var nanoseconds: UInt64
}

extension Machine {
    /// Writes the paused machine to `directory` (made if missing): the state file
    /// (`state`: vCPUs, in-kernel devices, user-space devices, configuration) and the
    /// memory file (`memory`: RAM, zero pages as holes). Each is written under a temporary
    /// name, flushed, then renamed, so a crash midway leaves the older snapshot whole; the
    /// machine's own memory file (a restored machine maps its snapshot's) is never written.
    /// The machine must be paused, and stays paused.
    public func snapshot(to directory: String) throws(MachineError) -> MachineSnapshotSummary {
        guard state == .paused else { throw .invalidTransition(action: "snapshot", state: state.rawValue) }
        let started = MonotonicClock.nanoseconds()
        do {
            try Self.makeDirectory(directory)
            let manifest = try captureManifest(memoryFile: LoadedSnapshot.memoryFileName)
            let memoryPath = "\(directory)/\(LoadedSnapshot.memoryFileName)"
            let written = try Self.writeAtomically(memoryPath) { (descriptor) throws in
                try board.memory.writeImage(to: descriptor).pagesWritten
            }
            let encoder = JSONEncoder()
            encoder.outputFormatting = [.prettyPrinted, .sortedKeys]
            let payload = try encoder.encode(manifest)
            let file = SnapshotEnvelope.encode(payload: Array(payload))
            try Self.writeAtomically("\(directory)/\(LoadedSnapshot.stateFileName)") { (descriptor) throws in
                try Self.writeAll(descriptor, file)
            }
            Self.syncDirectory(directory)
            return MachineSnapshotSummary(directory: directory, stateBytes: file.count, pagesWritten: written,
                                   nanoseconds: MonotonicClock.nanoseconds() - started)
        } catch let error as MachineError {
            throw error
        } catch {
            throw .snapshot(directory: directory, .malformed("cannot write it: \(error)"))
        }
    }

    /// The state of everything but RAM. Each vCPU's state is read on its own thread.
    func captureManifest(memoryFile: String) throws -> SnapshotManifest {
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
            machine: configuration.saved(testDevice: hasTestDevice, networkMACs: board.networkInterfaces.map(\.mac)), cpuFeatures: features,
            memory: SavedMemory(file: memoryFile, size: board.memory.size, parent: nil, pages: nil),
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
