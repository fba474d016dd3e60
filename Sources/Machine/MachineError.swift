import Glibc
import KVM

/// An error that stops a VM from being built or started. Each prints as one line that
/// tells the user what to fix.
public enum MachineError: Error, CustomStringConvertible {
    case cannotOpen(path: String, purpose: String, errno: Int32)
    case invalidConfiguration(String)
    case kvm(KVMError)
    case load(String)

    public var description: String {
        switch self {
        case let .cannotOpen(path, purpose, err):
            return "cannot open \(purpose) '\(path)': \(String(cString: strerror(err)))"
        case let .invalidConfiguration(message): return message
        case let .kvm(error): return error.description
        case let .load(message): return message
        }
    }
}
