import Memory

/// Bounds-checked little-endian reads over a file's bytes. Every accessor returns `nil`
/// instead of trapping when the field would run past the end, so a hostile or truncated
/// file can only produce a typed error.
extension Array where Element == UInt8 {
    func le<T: FixedWidthInteger>(_ type: T.Type, at offset: Int) -> T? {
        guard offset >= 0, offset <= count - MemoryLayout<T>.size else { return nil }
        return withUnsafeBytes { T(littleEndian: $0.loadUnaligned(fromByteOffset: offset, as: T.self)) }
    }

    func le<T: FixedWidthInteger>(_ type: T.Type, at offset: UInt64) -> T? {
        guard let offset = Int(exactly: offset) else { return nil }
        return le(type, at: offset)
    }

    /// `true` when `[offset, offset + length)` is inside the array (no overflow).
    func contains(offset: UInt64, length: UInt64) -> Bool {
        let (end, overflow) = offset.addingReportingOverflow(length)
        return !overflow && end <= UInt64(count)
    }

    /// Stores `value` little-endian at `offset`; the caller guarantees the bounds (used
    /// only on buffers Swiftlet itself sized).
    mutating func put<T: FixedWidthInteger>(_ value: T, at offset: Int) {
        precondition(offset >= 0 && offset + MemoryLayout<T>.size <= count)
        withUnsafeMutableBytes { $0.storeBytes(of: value.littleEndian, toByteOffset: offset, as: T.self) }
    }

    mutating func put(bytes: some Collection<UInt8>, at offset: Int) {
        precondition(offset >= 0 && offset + bytes.count <= count)
        replaceSubrange(offset..<(offset + bytes.count), with: bytes)
    }
}

extension GuestMemory {
    /// Copies `bytes[offset ..< offset + length]` to guest `address`, naming `what` in the
    /// error when the destination is not RAM.
    func copy(_ bytes: [UInt8], offset: Int, length: Int, to address: GuestAddress, what: String) throws(BootError) {
        guard offset >= 0, length >= 0, offset <= bytes.count - length else {
            throw .truncated(what: what, needed: UInt64(max(offset, 0)) &+ UInt64(max(length, 0)), available: UInt64(bytes.count))
        }
        let target: UnsafeMutableRawBufferPointer
        do { target = try checkedBuffer(at: address, count: UInt64(length)) } catch { throw .memory(error, what) }
        guard length > 0, let destination = target.baseAddress else { return }
        bytes.withUnsafeBytes { raw in
            destination.copyMemory(from: raw.baseAddress! + offset, byteCount: length)
        }
    }

    /// `write` that reports failures as a `BootError` naming `what`.
    func put(_ bytes: [UInt8], at address: GuestAddress, what: String) throws(BootError) {
        do { try write(bytes, at: address) } catch { throw .memory(error, what) }
    }

    func zeroRange(at address: GuestAddress, count: UInt64, what: String) throws(BootError) {
        do { try zero(at: address, count: count) } catch { throw .memory(error, what) }
    }

    /// The end of RAM below 4 GiB (the first region's end).
    var lowRAMEnd: GuestAddress { regions[0].guestEnd }
}

func alignUp(_ value: UInt64, _ alignment: UInt64) -> UInt64? {
    guard alignment > 0 else { return value }
    let (sum, overflow) = value.addingReportingOverflow(alignment - 1)
    return overflow ? nil : sum / alignment * alignment
}

func alignDown(_ value: UInt64, _ alignment: UInt64) -> UInt64 {
    alignment > 0 ? value / alignment * alignment : value
}
