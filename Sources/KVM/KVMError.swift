import Glibc

/// An error from `/dev/kvm`: which operation failed and the `errno` it returned.
public enum KVMError: Error, Equatable, CustomStringConvertible {
    /// `/dev/kvm` does not exist: KVM is not loaded or not exposed to this machine.
    case deviceMissing(path: String)
    /// `/dev/kvm` exists but this user may not open it.
    case permissionDenied(path: String)
    /// The path exists but no device answers behind it (`ENXIO`, `ENODEV`): `/dev/tty`
    /// without a controlling terminal, a device whose driver is not loaded.
    case noDevice(path: String, errno: Int32)
    /// The file opened, but it is not KVM (its ioctls fail with `ENOTTY` or `EINVAL`).
    case notKVM(path: String)
    /// `/dev/kvm` could not be opened for another reason.
    case openFailed(path: String, errno: Int32)
    /// `KVM_GET_API_VERSION` returned something other than 12, the only stable API.
    case apiVersionMismatch(found: Int32, expected: Int32)
    /// A required capability is missing.
    case missingCapability(String)
    /// An ioctl failed.
    case ioctlFailed(name: String, errno: Int32)
    /// `mmap` of a vCPU's `kvm_run` area failed.
    case mmapFailed(errno: Int32)

    public var description: String {
        switch self {
        case let .deviceMissing(path):
            return "\(path) does not exist: this machine has no KVM (load kvm_intel or kvm_amd, or enable nested virtualization)"
        case let .permissionDenied(path):
            return "permission denied opening \(path): add your user to the 'kvm' group or run as root"
        case let .noDevice(path, err):
            return "cannot open \(path): no device answers behind it (\(String(cString: strerror(err))))"
        case let .notKVM(path):
            return "\(path) is not a KVM device (KVM_GET_API_VERSION is not supported by it)"
        case let .openFailed(path, err):
            return "cannot open \(path): \(String(cString: strerror(err)))"
        case let .apiVersionMismatch(found, expected):
            return "KVM API version \(found) is not supported (Swiftlet needs version \(expected))"
        case let .missingCapability(name):
            return "this KVM lacks the capability \(name), which Swiftlet requires"
        case let .ioctlFailed(name, err):
            return "\(name) failed: \(String(cString: strerror(err)))"
        case let .mmapFailed(err):
            return "cannot map the vCPU run area: \(String(cString: strerror(err)))"
        }
    }
}
