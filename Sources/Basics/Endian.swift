/// Bounds-checked reads of fixed-width integers from file bytes, little- or big-endian.
///
/// Every accessor returns `nil` instead of trapping when the field would run past the
/// end, so a hostile or truncated file (a kernel, a disk image) can only produce a typed
/// error. x86, ELF and virtio are little-endian; qcow2 is big-endian.

extension Array where Element == UInt8 {
    /// The little-endian `T` at `offset`, or `nil` past the end.
    public func le<T: FixedWidthInteger>(_ type: T.Type, at offset: Int) -> T? {
        guard offset >= 0, offset <= count - MemoryLayout<T>.size else { return nil }
        return withUnsafeBytes { T(littleEndian: $0.loadUnaligned(fromByteOffset: offset, as: T.self)) }
    }

    /// The little-endian `T` at a 64-bit `offset`, or `nil` past the end.
    public func le<T: FixedWidthInteger>(_ type: T.Type, at offset: UInt64) -> T? {
        guard let offset = Int(exactly: offset) else { return nil }
        return le(type, at: offset)
    }

    /// The big-endian `T` at `offset`, or `nil` past the end.
    public func be<T: FixedWidthInteger>(_ type: T.Type, at offset: Int) -> T? {
        guard offset >= 0, offset <= count - MemoryLayout<T>.size else { return nil }
        return withUnsafeBytes { T(bigEndian: $0.loadUnaligned(fromByteOffset: offset, as: T.self)) }
    }

    /// `true` when `[offset, offset + length)` is inside the array (no overflow).
    public func contains(offset: UInt64, length: UInt64) -> Bool {
        let (end, overflow) = offset.addingReportingOverflow(length)
        return !overflow && end <= UInt64(count)
    }

    /// Stores `value` little-endian at `offset`. The caller owns the bounds: use it only on
    /// buffers Swiftlet itself sized (a precondition failure is a Swiftlet bug).
    public mutating func putLE<T: FixedWidthInteger>(_ value: T, at offset: Int) {
        precondition(offset >= 0 && offset + MemoryLayout<T>.size <= count)
        withUnsafeMutableBytes { $0.storeBytes(of: value.littleEndian, toByteOffset: offset, as: T.self) }
    }

    /// Stores `value` big-endian at `offset`; same contract as ``putLE(_:at:)``.
    public mutating func putBE<T: FixedWidthInteger>(_ value: T, at offset: Int) {
        precondition(offset >= 0 && offset + MemoryLayout<T>.size <= count)
        withUnsafeMutableBytes { $0.storeBytes(of: value.bigEndian, toByteOffset: offset, as: T.self) }
    }

    /// Copies `bytes` in at `offset`; same contract as ``putLE(_:at:)``.
    public mutating func put(bytes: some Collection<UInt8>, at offset: Int) {
        precondition(offset >= 0 && offset + bytes.count <= count)
        replaceSubrange(offset..<(offset + bytes.count), with: bytes)
    }

    /// `value` as its little-endian bytes.
    public static func littleEndian<T: FixedWidthInteger>(_ value: T) -> [UInt8] {
        Swift.withUnsafeBytes(of: value.littleEndian) { Array($0) }
    }
}

/// Rounds `value` up to a multiple of `alignment`; `nil` on overflow.
public func alignUp(_ value: UInt64, _ alignment: UInt64) -> UInt64? {
    guard alignment > 0 else { return value }
    let (sum, overflow) = value.addingReportingOverflow(alignment - 1)
    return overflow ? nil : sum / alignment * alignment
}

/// Rounds `value` down to a multiple of `alignment`.
public func alignDown(_ value: UInt64, _ alignment: UInt64) -> UInt64 {
    alignment > 0 ? value / alignment * alignment : value
}

// MARK: Fields the caller has already bounds-checked

extension Array where Element == UInt8 {
    /// The big-endian `T` at `offset`, which the caller has checked lies inside the array
    /// (a parser that validated a structure's size first). Out of bounds is a Swiftlet bug,
    /// and traps.
    public func be<T: FixedWidthInteger>(_ offset: Int, as: T.Type = T.self) -> T {
        precondition(offset >= 0 && offset <= count - MemoryLayout<T>.size, "big-endian read past the end")
        return withUnsafeBytes { T(bigEndian: $0.loadUnaligned(fromByteOffset: offset, as: T.self)) }
    }

    /// Stores `value` big-endian at `offset`; same contract as ``be(_:as:)``.
    public mutating func setBE<T: FixedWidthInteger>(_ value: T, at offset: Int) {
        precondition(offset >= 0 && offset <= count - MemoryLayout<T>.size, "big-endian write past the end")
        withUnsafeMutableBytes { $0.storeBytes(of: value.bigEndian, toByteOffset: offset, as: T.self) }
    }
}

extension UnsafeRawBufferPointer {
    /// The big-endian `T` at `offset` of a buffer whose size the caller has checked.
    public func be<T: FixedWidthInteger>(_ offset: Int, as: T.Type = T.self) -> T {
        precondition(offset >= 0 && offset <= count - MemoryLayout<T>.size, "big-endian read past the end")
        return T(bigEndian: loadUnaligned(fromByteOffset: offset, as: T.self))
    }
}
