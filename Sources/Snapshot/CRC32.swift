import CZlib

/// zlib's CRC-32 over bytes in memory, without copying them into an array: the check on
/// each frame of a migration stream, which carries guest RAM.
public enum CRC32 {
    /// The CRC-32 of `bytes`; with `continuing`, of the bytes that gave that CRC followed
    /// by `bytes`.
    public static func checksum(_ bytes: UnsafeRawBufferPointer, continuing previous: UInt32 = 0) -> UInt32 {
        var crc = uLong(previous)
        guard let base = bytes.baseAddress?.assumingMemoryBound(to: UInt8.self) else { return previous }
        var offset = 0
        // zlib takes a 32-bit length: feed large buffers in pieces.
        while offset < bytes.count {
            let chunk = min(bytes.count - offset, 1 << 30)
            crc = crc32(crc, base + offset, uInt(chunk))
            offset += chunk
        }
        return UInt32(truncatingIfNeeded: crc)
    }
}
