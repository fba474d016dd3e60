import DiskImage
import KVM
import RateLimit
import Snapshot
import X86

/// The version of Swiftlet, recorded in snapshots and shown by `swiftlet --version`.
public enum SwiftletVersion {
    public static let current = "0.1.0"
}

/// What a snapshot's state file holds (as JSON, inside a ``SnapshotEnvelope``): how the
/// machine was built, and the state of every piece of it except RAM, which is the memory
/// file next to it.
struct SnapshotManifest: Codable, Sendable {
    /// The format of this payload (the envelope's version).
    var format: Int
    /// The Swiftlet that wrote it.
    var swiftletVersion: String
    /// A random name for this snapshot: a diff snapshot names its parent by it.
    var id: String
    /// Seconds since 1970 when it was written.
    var createdAt: Int64
    var machine: SavedMachineConfiguration
    /// The CPU features the guest was given (by /proc/cpuinfo name): a host whose KVM lacks
    /// one cannot run it, since the guest may be using it.
    var cpuFeatures: [String]
    var memory: SavedMemory
    var vm: SavedVMDevices
    var vcpus: [SavedVCPU]
    var devices: BoardDeviceState
}

/// How the machine was built: a restore builds the same one.
struct SavedMachineConfiguration: Codable, Sendable, Equatable {
    struct Disk: Codable, Sendable, Equatable {
        var path: String
        var readOnly: Bool
        var format: String?
        var serial: String?
        var queues: Int
        /// The rate limiter as it was when the snapshot was taken (absent: unlimited).
        var rateLimiter: RateLimiterConfiguration?
    }

    var memorySize: UInt64
    var cpuCount: Int
    /// The CPU model as given (`host`, `x86-64-v2,-avx`): for people reading the file; the
    /// vCPUs' CPUID leaves themselves are saved with each vCPU.
    var cpuModel: String
    var virtioTransport: String
    var disks: [Disk]
    var completeInstructions: Bool
    var tripleFault: String
    /// With the multiboot test device (kvm-unit-tests).
    var testDevice: Bool
}

/// Where RAM is and which pages the memory file holds.
struct SavedMemory: Codable, Sendable, Equatable {
    /// The memory file: a name or path relative to the state file's directory, or an
    /// absolute path.
    var file: String
    /// Bytes of RAM (the memory file's length).
    var size: UInt64
    /// A diff snapshot: the snapshot whose RAM this one changes (its state file, relative
    /// to this state file's directory or absolute, and its ``SnapshotManifest/id``), and
    /// the pages (runs of page numbers, `[first, end)`) this memory file holds. The other
    /// pages come from the parent.
    var parent: Parent?
    var pages: [[Int]]?

    struct Parent: Codable, Sendable, Equatable {
        var state: String
        var id: String
    }
}

extension MachineConfiguration {
    /// The part of the configuration a snapshot records.
    /// `diskRateLimiters` are the disks' limiters as they are now (they may have changed
    /// since the machine was built).
    func saved(testDevice: Bool, diskRateLimiters: [RateLimiterConfiguration] = []) -> SavedMachineConfiguration {
        SavedMachineConfiguration(
            memorySize: memorySize, cpuCount: cpuCount, cpuModel: cpuModel.description,
            virtioTransport: virtioTransport.rawValue,
            disks: disks.enumerated().map { index, disk in
                let limiter = diskRateLimiters.indices.contains(index) ? diskRateLimiters[index] : disk.rateLimiter
                return .init(path: disk.path, readOnly: disk.readOnly, format: disk.format?.rawValue, serial: disk.serial,
                             queues: disk.queues, rateLimiter: limiter?.isLimiting == true ? limiter : nil)
            },
            completeInstructions: completeInstructions, tripleFault: tripleFault.rawValue, testDevice: testDevice)
    }

    /// This configuration with the machine `saved` describes (what a restore must build);
    /// the run-time options (console, timeout, tracing) stay.
    func applying(_ saved: SavedMachineConfiguration) throws(SnapshotError) -> MachineConfiguration {
        var result = self
        result.memorySize = saved.memorySize
        result.cpuCount = saved.cpuCount
        guard let transport = VirtioTransportKind(rawValue: saved.virtioTransport) else {
            throw .malformed("unknown virtio transport '\(saved.virtioTransport)'")
        }
        result.virtioTransport = transport
        result.disks = try saved.disks.map { (disk) throws(SnapshotError) in
            var converted = DiskConfiguration(path: disk.path, readOnly: disk.readOnly, serial: disk.serial)
            if let format = disk.format {
                guard let known = ImageFormat(rawValue: format) else { throw .malformed("unknown disk format '\(format)'") }
                converted.format = known
            }
            converted.queues = disk.queues
            converted.rateLimiter = disk.rateLimiter
            return converted
        }
        result.completeInstructions = saved.completeInstructions
        result.tripleFault = TripleFaultAction(rawValue: saved.tripleFault) ?? .stop
        return result
    }
}
