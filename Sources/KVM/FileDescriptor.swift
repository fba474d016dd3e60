import CKVM
import Glibc

/// Owns one KVM file descriptor (the system, a VM or a vCPU) and closes it in `deinit`.
///
/// Every KVM ioctl Swiftlet issues goes through ``issue(_:value:)`` or
/// ``issue(_:pointer:)``, directly (`KVM_RUN`, `KVM_CREATE_VM`, which look at `errno`
/// themselves) or through the throwing ``ioctl(_:_:)`` family, so error handling lives in
/// one place. `EINTR` is never retried here: for `KVM_RUN` it is how a vCPU thread is
/// kicked out of the guest, and the caller decides.
public final class KVMFileDescriptor: Sendable {
    public let rawValue: Int32

    init(owning rawValue: Int32) { self.rawValue = rawValue }

    deinit { close(rawValue) }

    /// The funnel: issues `request` with an integer argument (0 for none) and returns
    /// its non-negative result, or `-errno`.
    @inline(__always)
    func issue(_ request: UInt, value: UInt) -> Int32 {
        let result = ckvm_ioctl_value(rawValue, request, value)
        return result >= 0 ? result : -errno
    }

    /// The funnel for a pointer argument: returns the non-negative result, or `-errno`.
    @inline(__always)
    func issue(_ request: UInt, pointer: UnsafeMutableRawPointer) -> Int32 {
        let result = ckvm_ioctl_pointer(rawValue, request, pointer)
        return result >= 0 ? result : -errno
    }

    /// An ioctl without argument; returns its non-negative result.
    @discardableResult
    func ioctl(_ name: StaticString, _ request: UInt) throws(KVMError) -> Int32 {
        let result = issue(request, value: 0)
        guard result >= 0 else { throw .ioctlFailed(name: "\(name)", errno: -result) }
        return result
    }

    /// An ioctl with an integer argument.
    @discardableResult
    func ioctl(_ name: StaticString, _ request: UInt, value: UInt) throws(KVMError) -> Int32 {
        let result = issue(request, value: value)
        guard result >= 0 else { throw .ioctlFailed(name: "\(name)", errno: -result) }
        return result
    }

    /// An ioctl with a pointer to a structure (in, out or both).
    @discardableResult
    func ioctl<T>(_ name: StaticString, _ request: UInt, _ argument: inout T) throws(KVMError) -> Int32 {
        let result = withUnsafeMutablePointer(to: &argument) { issue(request, pointer: UnsafeMutableRawPointer($0)) }
        guard result >= 0 else { throw .ioctlFailed(name: "\(name)", errno: -result) }
        return result
    }

    /// An ioctl that fills a structure: returns `initial` as the kernel left it.
    func get<T>(_ name: StaticString, _ request: UInt, _ initial: T) throws(KVMError) -> T {
        var value = initial
        try ioctl(name, request, &value)
        return value
    }

    /// An ioctl that takes a structure by pointer and only reads it.
    func set<T>(_ name: StaticString, _ request: UInt, _ value: T) throws(KVMError) {
        var value = value
        try ioctl(name, request, &value)
    }

    /// An ioctl with a raw buffer (variable-length structures such as `kvm_cpuid2`).
    @discardableResult
    func ioctl(_ name: StaticString, _ request: UInt, buffer: UnsafeMutableRawPointer) throws(KVMError) -> Int32 {
        let result = issue(request, pointer: buffer)
        guard result >= 0 else { throw .ioctlFailed(name: "\(name)", errno: -result) }
        return result
    }
}

/// Runs `body` with a zeroed, 8-byte-aligned buffer of `size` bytes: the storage for the
/// variable-length structures (`kvm_cpuid2`, `kvm_msrs`) that are a header followed by a
/// flexible array.
func withZeroedBuffer<Result>(size: Int, _ body: (UnsafeMutableRawPointer) throws(KVMError) -> Result) throws(KVMError) -> Result {
    let buffer = UnsafeMutableRawPointer.allocate(byteCount: size, alignment: 8)
    defer { buffer.deallocate() }
    buffer.initializeMemory(as: UInt8.self, repeating: 0, count: size)
    return try body(buffer)
}
