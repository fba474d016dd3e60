import Memory

/// The device-readable or device-writable buffers of a chain taken as one run of bytes:
/// virtio lets a driver frame a request any way it likes (2.6.4), so a header may straddle
/// descriptors, and devices address the run by offset.
struct GuestBufferRun {
    let buffers: [GuestBuffer]

    init(_ buffers: [GuestBuffer]) { self.buffers = buffers }

    var length: UInt64 { buffers.reduce(0) { $0 + UInt64($1.length) } }

    /// The pieces that cover `[start, start + count)`, empty ones left out; shorter when the
    /// run ends first.
    func slice(from start: UInt64, count: UInt64) -> [GuestBuffer] {
        var pieces: [GuestBuffer] = []
        var skip = start
        var remaining = count
        for buffer in buffers where remaining > 0 && buffer.length > 0 {
            let length = UInt64(buffer.length)
            if skip >= length {
                skip -= length
                continue
            }
            let take = min(length - skip, remaining)
            pieces.append(GuestBuffer(address: buffer.address + skip, length: UInt32(take)))
            remaining -= take
            skip = 0
        }
        return pieces
    }

    /// Copies `count` bytes at `offset` of the run into `destination` (a small copy: a
    /// header). Throws when the run is shorter or a piece is not RAM.
    func copy(from offset: UInt64, into destination: UnsafeMutableRawBufferPointer, memory: GuestMemory) throws {
        var position = 0
        for piece in slice(from: offset, count: UInt64(destination.count)) {
            let target = UnsafeMutableRawBufferPointer(rebasing: destination[position..<(position + Int(piece.length))])
            try memory.read(into: target, at: piece.address)
            position += Int(piece.length)
        }
        guard position == destination.count else { throw VirtioError("the buffers end before byte \(offset + UInt64(destination.count))") }
    }

    /// Writes `bytes` at `offset` of the run. Throws when the run is shorter or a piece is
    /// not RAM.
    func write(_ bytes: [UInt8], at offset: UInt64, memory: GuestMemory) throws {
        var position = 0
        for piece in slice(from: offset, count: UInt64(bytes.count)) {
            try memory.write(bytes[position..<(position + Int(piece.length))], at: piece.address)
            position += Int(piece.length)
        }
        guard position == bytes.count else { throw VirtioError("the buffers end before byte \(offset + UInt64(bytes.count))") }
    }
}
