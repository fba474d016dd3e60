import CLinux

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

// Discard and write-zeroes: what a guest's TRIM and "write zeroes" (virtio-blk's
// VIRTIO_BLK_T_DISCARD and VIRTIO_BLK_T_WRITE_ZEROES) do to a disk image.
//
// - Raw files punch holes (`fallocate(PUNCH_HOLE | KEEP_SIZE)`) and zero ranges in place
//   (`fallocate(ZERO_RANGE | KEEP_SIZE)`); on a file system that cannot, write-zeroes
//   writes zeros and discard does nothing.
// - Every other format (qcow2 today) gets the defaults below: discard does nothing (it is
//   a hint; writing zeros for it would turn a guest's `fstrim` into a fully allocated
//   image), and write-zeroes writes zeros through `write`, skipping pieces that already
//   read as zeros (`isKnownZero`: unallocated clusters over no backing data). A format
//   that can record zero or deallocated clusters overrides both.

/// Where the default write-zeroes takes its zeros from, and the largest piece it writes at once.
private let zeroChunk = 1 << 20

extension BlockDevice {
    /// Default: nothing is deallocated, the range keeps its contents (allowed: a discard is
    /// a hint). Still refuses a read-only disk and a range past the end, like a write.
    public func discard(at offset: UInt64, length: UInt64) throws {
        try checkZeroingAllowed(offset, length)
    }

    /// Default: writes zeros through ``write(_:at:)``, one piece of at most 1 MiB at a time,
    /// skipping pieces ``isKnownZero(at:length:)`` says already read as zeros. `deallocate`
    /// is ignored (nothing is freed).
    public func writeZeroes(at offset: UInt64, length: UInt64, deallocate: Bool) throws {
        try checkZeroingAllowed(offset, length)
        guard length > 0 else { return }
        let zeros = UnsafeMutableRawBufferPointer.allocate(byteCount: Int(min(length, UInt64(zeroChunk))), alignment: 4096)
        defer { zeros.deallocate() }
        zeros.initializeMemory(as: UInt8.self, repeating: 0)
        var position = offset
        let end = offset + length
        while position < end {
            // Pieces end on chunk boundaries, so that `isKnownZero` asks about aligned ranges.
            let pieceEnd = min(end, (position / UInt64(zeroChunk) + 1) * UInt64(zeroChunk))
            let count = pieceEnd - position
            if try !isKnownZero(at: position, length: count) {
                try write(UnsafeRawBufferPointer(rebasing: zeros[0..<Int(count)]), at: position)
            }
            position = pieceEnd
        }
    }

    /// Default: nothing can be freed.
    public var canDeallocate: Bool { false }

    /// Default: one 512-byte sector.
    public var discardGranularity: UInt64 { 512 }

    /// The checks a write makes, for a range given by its length.
    func checkZeroingAllowed(_ offset: UInt64, _ length: UInt64) throws {
        guard !isReadOnly else { throw DiskImageError.invalidArgument("cannot discard or zero a range of a read-only disk") }
        let (end, overflow) = offset.addingReportingOverflow(length)
        guard !overflow, end <= virtualSize else {
            throw DiskImageError.outOfRange(offset: offset, length: length, virtualSize: virtualSize)
        }
    }
}

extension RawImage {
    /// Punches a hole: the file's blocks in the range are freed and read as zeros. Does
    /// nothing on a file system that cannot punch holes.
    public func discard(at offset: UInt64, length: UInt64) throws {
        try checkZeroingAllowed(offset, length)
        guard length > 0 else { return }
        _ = try allocate(CLINUX_FALLOC_PUNCH_HOLE | CLINUX_FALLOC_KEEP_SIZE, offset, length, "fallocate(PUNCH_HOLE)")
    }

    /// With `deallocate`, punches a hole; otherwise zeroes the range in place, keeping its
    /// blocks (`ZERO_RANGE`). Where the file system can do neither, writes zeros.
    public func writeZeroes(at offset: UInt64, length: UInt64, deallocate: Bool) throws {
        try checkZeroingAllowed(offset, length)
        guard length > 0 else { return }
        if deallocate,
           try allocate(CLINUX_FALLOC_PUNCH_HOLE | CLINUX_FALLOC_KEEP_SIZE, offset, length, "fallocate(PUNCH_HOLE)") {
            return
        }
        if try allocate(CLINUX_FALLOC_ZERO_RANGE | CLINUX_FALLOC_KEEP_SIZE, offset, length, "fallocate(ZERO_RANGE)") {
            return
        }
        try writeZeroBytes(at: offset, length: length)
    }

    /// A writable raw file can punch holes (where its file system cannot, discard does nothing).
    public var canDeallocate: Bool { !isReadOnly }

    /// The file system's block size: the unit in which holes are punched.
    public var discardGranularity: UInt64 {
        var st = stat()
        guard fstat(file.fd, &st) == 0, st.st_blksize >= 512 else { return 512 }
        return UInt64(st.st_blksize)
    }

    /// `fallocate` with `mode`. Returns false when the file system does not support it,
    /// throws on any other failure.
    private func allocate(_ mode: Int32, _ offset: UInt64, _ length: UInt64, _ operation: String) throws -> Bool {
        guard offset <= UInt64(Int64.max), length <= UInt64(Int64.max) - offset else {
            throw DiskImageError.outOfRange(offset: offset, length: length, virtualSize: virtualSize)
        }
        while true {
            if clinux_fallocate(file.fd, mode, Int64(offset), Int64(length)) == 0 { return true }
            switch errno {
            case EINTR: continue
            case EOPNOTSUPP, ENOSYS: return false
            case let err: throw DiskImageError.io(operation: operation, path: file.path, errno: err)
            }
        }
    }

    /// Writes zeros with `pwrite`, 1 MiB at a time.
    private func writeZeroBytes(at offset: UInt64, length: UInt64) throws {
        let zeros = UnsafeMutableRawBufferPointer.allocate(byteCount: Int(min(length, UInt64(zeroChunk))), alignment: 4096)
        defer { zeros.deallocate() }
        zeros.initializeMemory(as: UInt8.self, repeating: 0)
        var position = offset
        while position < offset + length {
            let count = Int(min(UInt64(zeros.count), offset + length - position))
            try file.write(UnsafeRawBufferPointer(rebasing: zeros[0..<count]), at: position)
            position += UInt64(count)
        }
    }
}
