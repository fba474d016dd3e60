/// QEMU's `isa-debug-exit` device: the guest ends the VM by writing a value to its port
/// (0xF4 by convention, 4 bytes wide).
///
/// A write of V ends the VM; the machine turns V into exit status `(V << 1) | 1`, so a
/// guest can never produce status 0 by accident, nor any even status Swiftlet uses for
/// itself: test runners treat 1 as the guest's "success" code, as kvm-unit-tests does.
/// Reads return all ones.
public final class DebugExit: IODevice {
    public static let defaultPort: UInt64 = 0xF4
    public static let width: UInt64 = 4

    private let onExit: @Sendable (UInt32) -> Void

    /// - Parameter onExit: called with the value V the guest wrote.
    public init(onExit: @escaping @Sendable (UInt32) -> Void) {
        self.onExit = onExit
    }

    public func read(offset: UInt64, into data: UnsafeMutableRawBufferPointer) {
        for index in data.indices { data[index] = 0xFF }
    }

    public func write(offset: UInt64, from data: UnsafeRawBufferPointer) {
        var value: UInt32 = 0
        for (shift, byte) in data.prefix(4).enumerated() { value |= UInt32(byte) << (8 * UInt32(shift)) }
        onExit(value)
    }
}

/// A port range that accepts every access and does nothing, like port 0x80 (the POST
/// diagnostic port firmware and kernels write to as a short delay).
public final class IgnoredPorts: IODevice {
    public init() {}
    public func read(offset: UInt64, into data: UnsafeMutableRawBufferPointer) {
        for index in data.indices { data[index] = 0xFF }
    }
    public func write(offset: UInt64, from data: UnsafeRawBufferPointer) {}
}
