import Basics
import Glibc
import KVM
import Snapshot

/// An error that stops a VM from being built or started. Each prints as one line that
/// tells the user what to fix.
public enum MachineError: Error, CustomStringConvertible {
    case cannotOpen(path: String, purpose: String, reason: String)
    case invalidConfiguration(String)
    case kvm(KVMError)
    case load(String)
    case thread(ThreadStartError)
    /// A lifecycle move the machine's state does not allow (resume a running VM, ...).
    case invalidTransition(action: String, state: String)
    /// A snapshot that cannot be written, read or run here.
    case snapshot(path: String, SnapshotError)
    /// A migration that failed, on either side.
    case migration(String)

    public var description: String {
        switch self {
        case let .cannotOpen(path, purpose, reason):
            return "cannot open \(purpose) '\(path)': \(reason)"
        case let .invalidConfiguration(message): return message
        case let .kvm(error): return error.description
        case let .load(message): return message
        case let .thread(error): return error.description
        case let .invalidTransition(action, state): return "cannot \(action) the VM: it is \(state)"
        case let .snapshot(path, error): return "snapshot '\(path)': \(error)"
        case let .migration(message): return "migration: \(message)"
        }
    }
}

extension MachineError {
    init(_ error: HostFileError) {
        self = .cannotOpen(path: error.path, purpose: error.purpose, reason: error.reason)
    }
}
