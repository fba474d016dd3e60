import CLinux
import DiskImage
import Memory
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// What became of one request: an answer for the driver, or nothing the device can say.
enum BlockOutcome: Equatable, Sendable {
    /// Write `status` into the request's status byte at `statusAddress`, and return the
    /// chain with `written` bytes (data and status) in the used ring.
    case answer(status: UInt8, statusAddress: GuestAddress, written: UInt32)
    /// The chain has no device-writable byte to hold a status: the device must be reset.
    case unanswerable(String)
}

/// Serves one virtio-blk request, on whatever thread calls it: reads the header, checks
/// every value in it against the disk, moves the data between guest memory and the disk
/// without an intermediate copy (each guest segment goes straight to `pread`/`pwrite`
/// through the disk's `read`/`write`), and says what to answer. It never touches the
/// rings; ``BlockQueueServer`` does.
///
/// Framing (virtio 1.2, 2.6.4 and 5.2.6): the device makes no assumption about how the
/// driver splits a request into descriptors. The device-readable buffers are one run of
/// bytes: 16 bytes of header, then the data of a write or the segments of a discard or
/// write-zeroes. The device-writable buffers are another: the data of a read or of a
/// device ID, then the status byte, which is their last byte.
struct BlockRequestHandler: Sendable {
    let memory: GuestMemory
    let disk: any BlockDevice
    let readOnly: Bool
    /// The disk's size in bytes as the guest sees it: whole 512-byte sectors.
    let capacityBytes: UInt64
    /// The device ID, NUL-padded to 20 bytes.
    let identifier: [UInt8]
    /// VIRTIO_BLK_F_FLUSH was negotiated: writes may stay volatile until a flush. Without
    /// it, every write is made durable before it completes (write-through, 5.2.6.1).
    let flushNegotiated: Bool
    let discardNegotiated: Bool
    let writeZeroesNegotiated: Bool
    /// `write_zeroes_may_unmap`: a write-zeroes with the unmap flag may free space.
    let writeZeroesMayUnmap: Bool
    /// Reads that never wait for the disk (``serveIfCached(_:)``).
    let cachedReads = CachedReads()

    /// Serves `chain`. `cancelled` is polled between the pieces of a long discard or
    /// write-zeroes, so that a reset does not wait for all of it.
    func serve(_ chain: DescriptorChain, cancelled: () -> Bool = { false }) -> BlockOutcome {
        guard let statusAddress = Self.lastByte(of: chain.writable) else {
            return .unanswerable("virtio-blk: request \(chain.head) has no device-writable byte for its status")
        }
        let (status, dataWritten) = perform(chain, cancelled: cancelled)
        // `written` counts what the device wrote: the data it filled in, then the status byte.
        return .answer(status: status, statusAddress: statusAddress, written: dataWritten + 1)
    }

    /// The data bytes `chain` moves, for the rate limiter's bandwidth bucket: a read's
    /// device-writable bytes before the status, a write's device-readable bytes after the
    /// header; 0 for every other request and for one whose header cannot be read (it fails
    /// anyway). As in Firecracker, only reads and writes draw on the bandwidth bucket.
    func transferLength(of chain: DescriptorChain) -> UInt64 {
        guard chain.readableLength >= VirtioBlockLayout.headerSize,
              let header = try? copy(from: chain.readable, at: 0, count: 4) else { return 0 }
        let type = header.withUnsafeBytes { UInt32(littleEndian: $0.loadUnaligned(as: UInt32.self)) }
        switch type {
        case VirtioBlockRequestType.read: return chain.writableLength > 0 ? chain.writableLength - 1 : 0
        case VirtioBlockRequestType.write: return chain.readableLength - VirtioBlockLayout.headerSize
        default: return 0
        }
    }

    /// Runs the request; returns its status and how many data bytes it wrote into the
    /// device-writable buffers.
    private func perform(_ chain: DescriptorChain, cancelled: () -> Bool) -> (UInt8, UInt32) {
        let readableLength = chain.readableLength
        // The header must be device-readable: one in a writable descriptor, or shorter
        // than 16 bytes, is not a request.
        guard readableLength >= VirtioBlockLayout.headerSize,
              let header = try? copy(from: chain.readable, at: 0, count: Int(VirtioBlockLayout.headerSize)) else {
            return (VirtioBlockStatus.ioError, 0)
        }
        let type = header.withUnsafeBytes { UInt32(littleEndian: $0.loadUnaligned(fromByteOffset: 0, as: UInt32.self)) }
        let sector = header.withUnsafeBytes { UInt64(littleEndian: $0.loadUnaligned(fromByteOffset: 8, as: UInt64.self)) }
        // Everything before the status byte; the Virtqueue bounded chains to 4 GiB in total.
        let writableData = chain.writableLength - 1
        let readableData = readableLength - VirtioBlockLayout.headerSize

        switch type {
        case VirtioBlockRequestType.read:
            guard let offset = byteRange(sector: sector, count: writableData) else { return (VirtioBlockStatus.ioError, 0) }
            let status = transfer(Self.slice(chain.writable, from: 0, count: writableData), at: offset) { buffer, position in
                try disk.read(into: buffer, at: position)
            }
            return (status, status == VirtioBlockStatus.ok ? UInt32(writableData) : 0)

        case VirtioBlockRequestType.write:
            guard !readOnly else { return (VirtioBlockStatus.ioError, 0) }
            guard let offset = byteRange(sector: sector, count: readableData) else { return (VirtioBlockStatus.ioError, 0) }
            let segments = Self.slice(chain.readable, from: VirtioBlockLayout.headerSize, count: readableData)
            var status = transfer(segments, at: offset) { buffer, position in
                try disk.write(UnsafeRawBufferPointer(buffer), at: position)
            }
            if status == VirtioBlockStatus.ok && !flushNegotiated { status = flush() }
            return (status, 0)

        case VirtioBlockRequestType.flush:
            // Nothing was ever written to a read-only disk: there is nothing to make
            // durable, and the flush succeeds (only writes must fail, 5.2.6.1).
            return (readOnly ? VirtioBlockStatus.ok : flush(), 0)

        case VirtioBlockRequestType.getID:
            let count = min(UInt64(VirtioBlockLayout.idSize), writableData)
            var offset = 0
            for segment in Self.slice(chain.writable, from: 0, count: count) {
                let piece = identifier[offset..<(offset + Int(segment.length))]
                guard (try? memory.write(piece, at: segment.address)) != nil else { return (VirtioBlockStatus.ioError, 0) }
                offset += Int(segment.length)
            }
            return (VirtioBlockStatus.ok, UInt32(count))

        case VirtioBlockRequestType.discard, VirtioBlockRequestType.writeZeroes:
            let zeroes = type == VirtioBlockRequestType.writeZeroes
            guard !readOnly else { return (VirtioBlockStatus.ioError, 0) }
            guard zeroes ? writeZeroesNegotiated : discardNegotiated else { return (VirtioBlockStatus.unsupported, 0) }
            return (zeroRanges(chain, payload: readableData, writeZeroes: zeroes, cancelled: cancelled), 0)

        default:
            // VIRTIO_BLK_T_GET_LIFETIME, VIRTIO_BLK_T_SECURE_ERASE (not offered), the legacy
            // SCSI commands and anything unknown.
            return (VirtioBlockStatus.unsupported, 0)
        }
    }

    // MARK: Cached reads, served at once

    /// The largest read ``serveIfCached(_:)`` takes: a few pages, which cost less to copy
    /// than a worker's wake-up. Larger reads go to the workers, which copy them in parallel
    /// (measured from the guest: 64 KiB reads served here were a quarter slower than with
    /// the workers; 4 KiB reads 1.4 to 2 times faster).
    static let inlineReadLimit: UInt64 = 16 << 10

    /// Serves `chain` here and now if it is a read of at most ``inlineReadLimit`` bytes
    /// from a raw image whose data the host's page cache holds, without ever waiting for
    /// the disk (`preadv2` with `RWF_NOWAIT`, which fails with EAGAIN rather than read
    /// from the disk). Returns nil for anything else, and when any of the data is not
    /// cached: the caller then hands the chain to a worker, which serves it from the start
    /// (overwriting what was copied here) and answers every error.
    func serveIfCached(_ chain: DescriptorChain) -> BlockOutcome? {
        let writable = chain.writableLength
        guard writable >= 1, writable - 1 <= Self.inlineReadLimit, let raw = disk as? RawImage, cachedReads.isSupported,
              let statusAddress = Self.lastByte(of: chain.writable),
              chain.readableLength >= VirtioBlockLayout.headerSize,
              let header = try? copy(from: chain.readable, at: 0, count: Int(VirtioBlockLayout.headerSize)) else {
            return nil
        }
        let type = header.withUnsafeBytes { UInt32(littleEndian: $0.loadUnaligned(fromByteOffset: 0, as: UInt32.self)) }
        let sector = header.withUnsafeBytes { UInt64(littleEndian: $0.loadUnaligned(fromByteOffset: 8, as: UInt64.self)) }
        let count = writable - 1
        guard type == VirtioBlockRequestType.read, let offset = byteRange(sector: sector, count: count) else { return nil }
        var position = offset
        for segment in Self.slice(chain.writable, from: 0, count: count) where segment.length > 0 {
            let copied = try? memory.withBytes(at: segment.address, count: UInt64(segment.length)) { buffer in
                cachedReads.read(raw.file.fd, into: buffer, at: position)
            }
            guard copied == true else { return nil }
            position += UInt64(segment.length)
        }
        return .answer(status: VirtioBlockStatus.ok, statusAddress: statusAddress, written: UInt32(count) + 1)
    }

    // MARK: Reads and writes

    /// The disk byte offset of `count` bytes at `sector`, when they are whole sectors and
    /// lie on the disk without overflowing; `nil` otherwise.
    private func byteRange(sector: UInt64, count: UInt64) -> UInt64? {
        guard count % VirtioBlockLayout.sectorSize == 0 else { return nil }
        let (offset, overflow) = sector.multipliedReportingOverflow(by: VirtioBlockLayout.sectorSize)
        guard !overflow, offset <= capacityBytes, count <= capacityBytes - offset else { return nil }
        return offset
    }

    /// Runs `body` on each guest segment in place, at consecutive disk offsets from `offset`.
    private func transfer(_ segments: [GuestBuffer], at offset: UInt64,
                          _ body: (UnsafeMutableRawBufferPointer, UInt64) throws -> Void) -> UInt8 {
        var position = offset
        do {
            for segment in segments where segment.length > 0 {
                try memory.withBytes(at: segment.address, count: UInt64(segment.length)) { buffer in
                    try body(buffer, position)
                }
                position += UInt64(segment.length)
            }
        } catch {
            return VirtioBlockStatus.ioError
        }
        return VirtioBlockStatus.ok
    }

    private func flush() -> UInt8 {
        (try? disk.flush()) != nil ? VirtioBlockStatus.ok : VirtioBlockStatus.ioError
    }

    // MARK: Discard and write-zeroes

    /// One segment of a discard or write-zeroes request.
    private struct Range {
        var offset: UInt64
        var length: UInt64
        var unmap: Bool
    }

    /// Checks every segment first (so that a bad one changes nothing), then discards or
    /// zeroes them in order, in pieces of at most 64 MiB.
    private func zeroRanges(_ chain: DescriptorChain, payload: UInt64, writeZeroes: Bool, cancelled: () -> Bool) -> UInt8 {
        let size = VirtioBlockLayout.rangeSize
        guard payload > 0, payload % size == 0, payload / size <= UInt64(BlockLimits.zeroingSegments),
              let bytes = try? copy(from: chain.readable, at: VirtioBlockLayout.headerSize, count: Int(payload)) else {
            return VirtioBlockStatus.ioError
        }
        var ranges: [Range] = []
        for index in 0..<Int(payload / size) {
            let base = index * Int(size)
            let (sector, sectors, flags) = bytes.withUnsafeBytes {
                (UInt64(littleEndian: $0.loadUnaligned(fromByteOffset: base, as: UInt64.self)),
                 UInt32(littleEndian: $0.loadUnaligned(fromByteOffset: base + 8, as: UInt32.self)),
                 UInt32(littleEndian: $0.loadUnaligned(fromByteOffset: base + 12, as: UInt32.self)))
            }
            // 5.2.6.1: unknown flags, and unmap on a discard, are VIRTIO_BLK_S_UNSUPP.
            guard flags & ~VirtioBlockLayout.rangeFlagUnmap == 0 else { return VirtioBlockStatus.unsupported }
            let unmap = flags & VirtioBlockLayout.rangeFlagUnmap != 0
            guard writeZeroes || !unmap else { return VirtioBlockStatus.unsupported }
            guard sectors <= BlockLimits.zeroingSectors,
                  let offset = byteRange(sector: sector, count: UInt64(sectors) * VirtioBlockLayout.sectorSize) else {
                return VirtioBlockStatus.ioError
            }
            ranges.append(Range(offset: offset, length: UInt64(sectors) * VirtioBlockLayout.sectorSize, unmap: unmap))
        }
        do {
            for range in ranges {
                var position = range.offset
                let end = range.offset + range.length
                while position < end {
                    guard !cancelled() else { return VirtioBlockStatus.ioError }
                    let count = min(BlockLimits.zeroingPiece, end - position)
                    if writeZeroes {
                        try disk.writeZeroes(at: position, length: count, deallocate: range.unmap && writeZeroesMayUnmap)
                    } else {
                        try disk.discard(at: position, length: count)
                    }
                    position += count
                }
            }
        } catch {
            return VirtioBlockStatus.ioError
        }
        return flushNegotiated ? VirtioBlockStatus.ok : flush()
    }

    // MARK: Guest buffers as runs of bytes

    /// Copies `count` bytes at `offset` of the run of bytes `buffers` make (a small copy:
    /// a header or discard segments).
    private func copy(from buffers: [GuestBuffer], at offset: UInt64, count: Int) throws -> [UInt8] {
        var bytes: [UInt8] = []
        bytes.reserveCapacity(count)
        for segment in Self.slice(buffers, from: offset, count: UInt64(count)) {
            bytes += try memory.read(at: segment.address, count: Int(segment.length))
        }
        return bytes
    }

    /// The pieces of `buffers`, taken as one run of bytes, that cover `[start, start + count)`.
    /// The range must lie within the buffers' total length.
    static func slice(_ buffers: [GuestBuffer], from start: UInt64, count: UInt64) -> [GuestBuffer] {
        var pieces: [GuestBuffer] = []
        var skip = start
        var remaining = count
        for buffer in buffers where remaining > 0 {
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

    /// The guest address of the last byte of `buffers`, if they hold any byte.
    static func lastByte(of buffers: [GuestBuffer]) -> GuestAddress? {
        guard let last = buffers.last(where: { $0.length > 0 }) else { return nil }
        return last.address + UInt64(last.length) - 1
    }
}

/// Reads from the page cache only: `preadv2(RWF_NOWAIT)`. A file system or kernel that
/// cannot do them (EOPNOTSUPP, or EINVAL before Linux 4.14) is not asked again.
final class CachedReads: Sendable {
    private let unsupported = Atomic<Bool>(false)

    var isSupported: Bool { !unsupported.load(ordering: .relaxed) }

    /// Fills `buffer` from `offset` of `fd` if the page cache holds all of it; false
    /// otherwise (the buffer may then hold part of the data).
    func read(_ fd: Int32, into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) -> Bool {
        guard let base = buffer.baseAddress, offset <= UInt64(Int64.max) else { return false }
        let count = clinux_pread_nowait(fd, base, UInt64(buffer.count), Int64(offset))
        if count < 0 && (errno == EOPNOTSUPP || errno == EINVAL) {
            unsupported.store(true, ordering: .relaxed)
        }
        return count == Int64(buffer.count)
    }
}
