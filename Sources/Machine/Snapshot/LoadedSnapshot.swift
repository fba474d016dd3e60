import Basics
import FoundationEssentials
import Glibc
import KVM
import Memory
import Snapshot
import X86

/// A snapshot read and checked, ready to become a machine: its state file decoded, its
/// memory file (and those of the snapshots a diff builds on) open.
///
/// Every check that can refuse it runs before any vCPU exists: the state file's format,
/// length and checksum (``SnapshotEnvelope``), the memory files' sizes, a diff's parent,
/// and (with the VM's KVM, ``checkCPUFeatures(supported:)``) the CPU features.
final class LoadedSnapshot {
    /// The state file's name in a snapshot directory.
    static let stateFileName = "state"
    /// The memory file's name.
    static let memoryFileName = "memory"
    /// The longest chain of diff snapshots followed.
    static let maximumChain = 64

    let paths: SnapshotFiles
    let manifest: SnapshotManifest
    /// The state file as an absolute path (what a diff over this snapshot names).
    let absoluteStatePath: String
    /// The memory files, the full one first, then each diff over it in order, with the
    /// pages each diff holds.
    private let layers: [(descriptor: Int32, pages: [Range<Int>]?)]

    private init(paths: SnapshotFiles, manifest: SnapshotManifest, layers: [(descriptor: Int32, pages: [Range<Int>]?)]) {
        self.paths = paths
        self.manifest = manifest
        absoluteStatePath = Self.absolute(paths.state)
        self.layers = layers
    }

    deinit {
        for layer in layers { close(layer.descriptor) }
    }

    /// `path` made absolute against the working directory (and resolved, when it exists).
    static func absolute(_ path: String) -> String {
        if let resolved = realpath(path, nil) {
            defer { free(resolved) }
            return String(cString: resolved)
        }
        if path.hasPrefix("/") { return path }
        guard let cwd = getcwd(nil, 0) else { return path }
        defer { free(cwd) }
        return "\(String(cString: cwd))/\(path)"
    }

    /// Reads and checks the snapshot whose state file is `paths.state`; its memory file is
    /// `paths.memory`, or without one the file the state file names.
    static func load(paths: SnapshotFiles) throws(MachineError) -> LoadedSnapshot {
        var descriptors: [Int32] = []
        do {
            // Each link: the manifest, and its memory file's path.
            var chain: [(SnapshotManifest, String)] = []
            var current = paths.state
            var expectedID: String?
            while true {
                let manifest = try readManifest(current)
                if let expectedID, manifest.id != expectedID {
                    throw SnapshotError.incompatible("the diff snapshot's parent '\(current)' is another snapshot (id \(manifest.id), expected \(expectedID))")
                }
                let directory = SnapshotFiles.directory(of: current)
                let memoryPath = chain.isEmpty ? (paths.memory ?? SnapshotFiles.resolve(manifest.memory.file, from: directory))
                    : SnapshotFiles.resolve(manifest.memory.file, from: directory)
                chain.append((manifest, memoryPath))
                guard let parent = manifest.memory.parent else { break }
                guard chain.count < maximumChain else { throw SnapshotError.malformed("more than \(maximumChain) diff snapshots in a chain") }
                expectedID = parent.id
                current = SnapshotFiles.resolve(parent.state, from: directory)
            }
            let newest = chain[0].0
            var layers: [(descriptor: Int32, pages: [Range<Int>]?)] = []
            for (manifest, path) in chain.reversed() {
                guard manifest.memory.size == newest.memory.size else {
                    throw SnapshotError.incompatible("the snapshot in '\(path)' has \(manifest.memory.size) bytes of RAM, its diff \(newest.memory.size)")
                }
                let descriptor = try openMemoryFile(manifest, at: path)
                descriptors.append(descriptor)
                let pages = try manifest.memory.pages.map { (runs) throws(SnapshotError) -> [Range<Int>] in
                    try runs.map { (pair) throws(SnapshotError) -> Range<Int> in
                        let pageCount = Int(manifest.memory.size / GuestMemory.pageSize)
                        guard pair.count == 2, pair[0] >= 0, pair[1] > pair[0], pair[1] <= pageCount else {
                            throw .malformed("the page run \(pair) is outside the \(pageCount) pages of RAM")
                        }
                        return pair[0]..<pair[1]
                    }
                }
                if manifest.memory.parent != nil, pages == nil { throw SnapshotError.malformed("a diff snapshot without its page list") }
                layers.append((descriptor, manifest.memory.parent == nil ? nil : pages))
            }
            try checkShape(newest)
            return LoadedSnapshot(paths: paths, manifest: newest, layers: layers)
        } catch {
            for descriptor in descriptors { close(descriptor) }
            if let error = error as? SnapshotError { throw .snapshot(path: paths.description, error) }
            if let error = error as? MachineError { throw error }
            throw .snapshot(path: paths.description, .malformed("\(error)"))
        }
    }

    /// The manifest of the state file at `path`, checked.
    static func readManifest(_ path: String) throws -> SnapshotManifest {
        let bytes: [UInt8]
        do {
            bytes = try HostFile.read(path, purpose: "snapshot state file", maximumSize: UInt64(SnapshotEnvelope.maximumPayload + 4096))
        } catch let error as HostFileError {
            throw MachineError(error)
        }
        let (_, payload) = try SnapshotEnvelope.decode(bytes)
        let manifest: SnapshotManifest
        do {
            manifest = try JSONDecoder().decode(SnapshotManifest.self, from: Data(payload))
        } catch {
            throw SnapshotError.malformed("the state does not decode: \(Self.describe(error))")
        }
        guard manifest.format <= SnapshotEnvelope.currentVersion else {
            throw SnapshotError.newerFormat(found: manifest.format, supported: SnapshotEnvelope.currentVersion)
        }
        return manifest
    }

    /// A decoding error in one line: what was wrong, and where.
    static func describe(_ error: any Error) -> String {
        guard let error = error as? DecodingError else { return "\(error)" }
        func path(_ context: DecodingError.Context) -> String {
            let keys = context.codingPath.map { $0.intValue.map { "[\($0)]" } ?? ".\($0.stringValue)" }.joined()
            return keys.isEmpty ? "the top level" : String(keys.drop { $0 == "." })
        }
        switch error {
        case let .keyNotFound(key, context): return "'\(key.stringValue)' is missing at \(path(context))"
        case let .typeMismatch(_, context): return "\(path(context)): \(context.debugDescription)"
        case let .valueNotFound(_, context): return "\(path(context)) is null"
        case let .dataCorrupted(context): return "\(path(context)): \(context.debugDescription)"
        @unknown default: return "\(error)"
        }
    }

    /// Opens the memory file of `manifest` at `path` and checks its size.
    private static func openMemoryFile(_ manifest: SnapshotManifest, at path: String) throws -> Int32 {
        guard !manifest.memory.file.isEmpty else { throw SnapshotError.malformed("the state names no memory file") }
        let descriptor: Int32
        do { descriptor = try HostFile.open(path, purpose: "snapshot memory file") } catch {
            throw MachineError.cannotOpen(path: path, purpose: "snapshot memory file", reason: error.reason)
        }
        var status = stat()
        fstat(descriptor, &status)
        let length = UInt64(max(0, status.st_size))
        guard length == manifest.memory.size else {
            close(descriptor)
            if length < manifest.memory.size {
                throw SnapshotError.truncated("the memory file '\(path)' has \(length) of its \(manifest.memory.size) bytes")
            }
            throw SnapshotError.malformed("the memory file '\(path)' has \(length) bytes, \(manifest.memory.size) expected")
        }
        return descriptor
    }

    /// Checks that the parts of the manifest agree with each other.
    static func checkShape(_ manifest: SnapshotManifest) throws(SnapshotError) {
        let machine = manifest.machine
        guard machine.memorySize == manifest.memory.size else {
            throw .malformed("the machine has \(machine.memorySize) bytes of RAM, the memory file \(manifest.memory.size)")
        }
        guard machine.memorySize > 0, machine.memorySize % GuestMemory.pageSize == 0, machine.memorySize <= GuestMemory.maximumSize else {
            throw .malformed("\(machine.memorySize) bytes is not a size guest RAM can have")
        }
        guard machine.cpuCount >= 1, machine.cpuCount <= Machine.maximumCPUs, manifest.vcpus.count == machine.cpuCount else {
            throw .malformed("the machine has \(machine.cpuCount) vCPUs, the state \(manifest.vcpus.count)")
        }
        for (index, vcpu) in manifest.vcpus.enumerated() where vcpu.id != index {
            throw .malformed("vCPU \(index) is saved as vCPU \(vcpu.id)")
        }
    }

    /// Guest RAM mapped from the memory file (`MAP_PRIVATE`: pages are read when the
    /// guest first touches them, and its writes never reach the file), with each diff's
    /// pages read over it.
    func mapMemory(transparentHugePages: Bool) throws(MachineError) -> GuestMemory {
        do {
            let memory = try GuestMemory(size: manifest.memory.size, transparentHugePages: false,
                                         backing: .privateFile(descriptor: layers[0].descriptor))
            for layer in layers.dropFirst() {
                for run in layer.pages ?? [] { try memory.readPages(run, from: layer.descriptor) }
            }
            return memory
        } catch {
            throw .snapshot(path: paths.description, .malformed("cannot map the memory file: \(error)"))
        }
    }

    /// Refuses the snapshot when this host's KVM lacks a CPU feature the guest was given:
    /// the guest may be using it, and would fault (or compute wrongly) here.
    func checkCPUFeatures(supported: [CPUIDEntry]) throws(MachineError) {
        let table = CPUIDTable(supported)
        var missing: [String] = []
        for name in manifest.cpuFeatures {
            guard let feature = CPUFeature.named(name) else {
                throw .snapshot(path: paths.description, .incompatible("it needs the CPU feature '\(name)', which this Swiftlet does not know"))
            }
            if !feature.isManaged, !table.has(feature.location) { missing.append(name) }
        }
        guard missing.isEmpty else {
            throw .snapshot(path: paths.description, .incompatible("the guest was given CPU features this host's KVM lacks: \(missing.joined(separator: ", "))"))
        }
    }

    /// Puts the saved state into the new machine's KVM VM, vCPUs and devices.
    func restore(vm: VirtualMachine, vcpus: [VCPU], board: Board) throws(MachineError) {
        do {
            try manifest.vm.restore(into: vm)
            for (vcpu, saved) in zip(vcpus, manifest.vcpus) { try saved.restore(into: vcpu) }
        } catch {
            throw .snapshot(path: paths.description, .incompatible(error.description))
        }
        try board.restoreDeviceState(manifest.devices)
    }
}
