import CKVM
import Glibc

/// A capability `KVM_CHECK_EXTENSION` can be asked about.
public struct KVMCapability: Sendable, Hashable, CustomStringConvertible {
    public let rawValue: Int32
    public let name: String

    public static let irqchip = KVMCapability(rawValue: CKVM_CAP_IRQCHIP, name: "KVM_CAP_IRQCHIP")
    public static let userMemory = KVMCapability(rawValue: CKVM_CAP_USER_MEMORY, name: "KVM_CAP_USER_MEMORY")
    public static let setTSSAddress = KVMCapability(rawValue: CKVM_CAP_SET_TSS_ADDR, name: "KVM_CAP_SET_TSS_ADDR")
    public static let pit2 = KVMCapability(rawValue: CKVM_CAP_PIT2, name: "KVM_CAP_PIT2")
    public static let irqfd = KVMCapability(rawValue: CKVM_CAP_IRQFD, name: "KVM_CAP_IRQFD")
    public static let ioeventfd = KVMCapability(rawValue: CKVM_CAP_IOEVENTFD, name: "KVM_CAP_IOEVENTFD")
    public static let immediateExit = KVMCapability(rawValue: CKVM_CAP_IMMEDIATE_EXIT, name: "KVM_CAP_IMMEDIATE_EXIT")
    public static let recommendedVCPUs = KVMCapability(rawValue: CKVM_CAP_NR_VCPUS, name: "KVM_CAP_NR_VCPUS")
    public static let maximumVCPUs = KVMCapability(rawValue: CKVM_CAP_MAX_VCPUS, name: "KVM_CAP_MAX_VCPUS")
    public static let tscFrequency = KVMCapability(rawValue: CKVM_CAP_GET_TSC_KHZ, name: "KVM_CAP_GET_TSC_KHZ")
    /// The guest's TSC frequency can be set (`KVM_SET_TSC_KHZ`, TSC scaling).
    public static let tscControl = KVMCapability(rawValue: CKVM_CAP_TSC_CONTROL, name: "KVM_CAP_TSC_CONTROL")
    /// A paused guest can be told so through kvmclock (`KVM_KVMCLOCK_CTRL`).
    public static let kvmclockControl = KVMCapability(rawValue: CKVM_CAP_KVMCLOCK_CTRL, name: "KVM_CAP_KVMCLOCK_CTRL")
    public static let extendedCPUID = KVMCapability(rawValue: CKVM_CAP_EXT_CPUID, name: "KVM_CAP_EXT_CPUID")
    public static let signalMSI = KVMCapability(rawValue: CKVM_CAP_SIGNAL_MSI, name: "KVM_CAP_SIGNAL_MSI")
    public static let xsave = KVMCapability(rawValue: CKVM_CAP_XSAVE, name: "KVM_CAP_XSAVE")
    /// On a VM: the size of the XSAVE area `KVM_GET_XSAVE2` returns (0 without it).
    public static let xsave2 = KVMCapability(rawValue: CKVM_CAP_XSAVE2, name: "KVM_CAP_XSAVE2")
    /// Memory slots can be read-only (``MemorySlotFlags/readOnly``).
    public static let readOnlyMemory = KVMCapability(rawValue: CKVM_CAP_READONLY_MEM, name: "KVM_CAP_READONLY_MEM")
    /// The number of memory slots a VM may have.
    public static let memorySlots = KVMCapability(rawValue: CKVM_CAP_NR_MEMSLOTS, name: "KVM_CAP_NR_MEMSLOTS")
    public static let vcpuEvents = KVMCapability(rawValue: CKVM_CAP_VCPU_EVENTS, name: "KVM_CAP_VCPU_EVENTS")
    /// Emulation failures exit to user space at every CPL instead of injecting #UD at CPL > 0.
    public static let exitOnEmulationFailure = KVMCapability(rawValue: CKVM_CAP_EXIT_ON_EMULATION_FAILURE,
                                                             name: "KVM_CAP_EXIT_ON_EMULATION_FAILURE")

    public var description: String { name }
}

/// The KVM subsystem: owns the `/dev/kvm` file descriptor.
///
/// System ioctls: `KVM_GET_API_VERSION`, `KVM_CHECK_EXTENSION`, `KVM_GET_VCPU_MMAP_SIZE`,
/// `KVM_GET_SUPPORTED_CPUID` and `KVM_CREATE_VM`.
public final class KVMSystem: Sendable {
    public static let defaultPath = "/dev/kvm"
    /// The stable KVM API version; anything else is refused.
    public static let expectedAPIVersion = CKVM_API_VERSION_EXPECTED

    let fd: KVMFileDescriptor
    /// Size of each vCPU's shared `kvm_run` area.
    public let vcpuMmapSize: Int

    /// Opens `/dev/kvm` and checks the API version and the capabilities Swiftlet needs.
    public init(path: String = KVMSystem.defaultPath) throws(KVMError) {
        let raw = open(path, O_RDWR | O_CLOEXEC | O_NONBLOCK)
        guard raw >= 0 else {
            let err = errno
            switch err {
            case ENOENT: throw .deviceMissing(path: path)
            case ENXIO, ENODEV: throw .noDevice(path: path, errno: err)
            case EACCES, EPERM: throw .permissionDenied(path: path)
            default: throw .openFailed(path: path, errno: err)
            }
        }
        fd = KVMFileDescriptor(owning: raw)
        var info = stat()
        guard fstat(raw, &info) == 0, info.st_mode & S_IFMT == S_IFCHR else { throw .notKVM(path: path) }
        let version: Int32
        do {
            version = try fd.ioctl("KVM_GET_API_VERSION", CKVM_GET_API_VERSION)
        } catch let .ioctlFailed(_, err) where err == ENOTTY || err == EINVAL {
            throw .notKVM(path: path)
        }
        guard version == Self.expectedAPIVersion else {
            throw .apiVersionMismatch(found: version, expected: Self.expectedAPIVersion)
        }
        for capability in [KVMCapability.userMemory, .irqchip, .setTSSAddress, .immediateExit] {
            guard (try? fd.ioctl("KVM_CHECK_EXTENSION", CKVM_CHECK_EXTENSION, value: UInt(capability.rawValue))) ?? 0 > 0 else {
                throw .missingCapability(capability.name)
            }
        }
        vcpuMmapSize = Int(try fd.ioctl("KVM_GET_VCPU_MMAP_SIZE", CKVM_GET_VCPU_MMAP_SIZE))
    }

    /// `KVM_CHECK_EXTENSION`: 0 when absent, else a capability-specific positive value.
    public func check(_ capability: KVMCapability) -> Int32 {
        (try? fd.ioctl("KVM_CHECK_EXTENSION", CKVM_CHECK_EXTENSION, value: UInt(capability.rawValue))) ?? 0
    }

    /// The most vCPUs one VM may have (`KVM_CAP_MAX_VCPUS`, falling back to `NR_VCPUS`).
    public var maximumVCPUs: Int {
        let maximum = check(.maximumVCPUs)
        return Int(maximum > 0 ? maximum : max(check(.recommendedVCPUs), 4))
    }

    /// `KVM_GET_SUPPORTED_CPUID`: the CPUID leaves this host's KVM can expose to a guest.
    public func supportedCPUID() throws(KVMError) -> [CPUIDEntry] {
        var capacity: UInt32 = 128
        while true {
            let entries = try withZeroedBuffer(size: ckvm_cpuid2_size(capacity)) { (buffer) throws(KVMError) -> [CPUIDEntry]? in
                let cpuid = buffer.assumingMemoryBound(to: kvm_cpuid2.self)
                cpuid.pointee.nent = capacity
                do throws(KVMError) {
                    try fd.ioctl("KVM_GET_SUPPORTED_CPUID", CKVM_GET_SUPPORTED_CPUID, buffer: buffer)
                } catch let .ioctlFailed(_, err) where err == E2BIG && capacity < 4096 {
                    return nil // too small: try again with twice the room
                }
                let slots = UnsafeMutableRawPointer(cpuid + 1).assumingMemoryBound(to: kvm_cpuid_entry2.self)
                return (0..<Int(cpuid.pointee.nent)).map { CPUIDEntry(slots[$0]) }
            }
            if let entries { return entries }
            capacity *= 2
        }
    }

    /// `KVM_CREATE_VM`: a new, empty virtual machine.
    public func createVM() throws(KVMError) -> VirtualMachine {
        // KVM_CREATE_VM can fail with EINTR when a signal arrives during creation.
        var result: Int32
        repeat {
            result = fd.issue(CKVM_CREATE_VM, value: 0)
        } while result == -EINTR
        guard result >= 0 else { throw .ioctlFailed(name: "KVM_CREATE_VM", errno: -result) }
        return VirtualMachine(fd: KVMFileDescriptor(owning: result), system: self)
    }
}

/// One CPUID leaf (function, index) and the four registers it returns: Swift's view of
/// `struct kvm_cpuid_entry2`.
public struct CPUIDEntry: Sendable, Equatable {
    public var function: UInt32
    public var index: UInt32
    /// `KVM_CPUID_FLAG_SIGNIFCANT_INDEX` and friends.
    public var flags: UInt32
    public var eax: UInt32
    public var ebx: UInt32
    public var ecx: UInt32
    public var edx: UInt32

    public init(function: UInt32, index: UInt32 = 0, flags: UInt32 = 0, eax: UInt32 = 0, ebx: UInt32 = 0, ecx: UInt32 = 0, edx: UInt32 = 0) {
        self.function = function; self.index = index; self.flags = flags
        self.eax = eax; self.ebx = ebx; self.ecx = ecx; self.edx = edx
    }

    init(_ entry: kvm_cpuid_entry2) {
        self.init(function: entry.function, index: entry.index, flags: entry.flags,
                  eax: entry.eax, ebx: entry.ebx, ecx: entry.ecx, edx: entry.edx)
    }

    var kvmEntry: kvm_cpuid_entry2 {
        var entry = kvm_cpuid_entry2()
        entry.function = function; entry.index = index; entry.flags = flags
        entry.eax = eax; entry.ebx = ebx; entry.ecx = ecx; entry.edx = edx
        return entry
    }
}
