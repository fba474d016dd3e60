import CZlib
import CZstd

/// Decompresses one qcow2 compressed cluster. Stateless: each call owns its own stream.
enum ClusterDecompressor {
    /// Inflates `input` into exactly `output.count` bytes.
    ///
    /// QEMU writes raw deflate (no zlib header) and pads the data to a sector,
    /// so bytes after the end of the stream are ignored; the cluster must come out whole.
    static func inflate(_ input: UnsafeRawBufferPointer, into output: UnsafeMutableRawBufferPointer,
                        hostOffset: UInt64) throws {
        guard let inBase = input.baseAddress, let outBase = output.baseAddress else {
            throw DiskImageError.decompressionFailed(hostOffset: hostOffset, reason: "empty buffer")
        }
        var stream = z_stream()
        let initResult = inflateInit2_(&stream, -15, zlibVersion(), Int32(MemoryLayout<z_stream>.size))
        guard initResult == Z_OK else {
            throw DiskImageError.decompressionFailed(hostOffset: hostOffset, reason: "inflateInit2 returned \(initResult)")
        }
        defer { inflateEnd(&stream) }
        stream.next_in = UnsafeMutablePointer(mutating: inBase.assumingMemoryBound(to: Bytef.self))
        stream.avail_in = uInt(input.count)
        stream.next_out = outBase.assumingMemoryBound(to: Bytef.self)
        stream.avail_out = uInt(output.count)
        let result = CZlib.inflate(&stream, Z_FINISH)
        guard (result == Z_STREAM_END || result == Z_BUF_ERROR) && stream.avail_out == 0 else {
            let reason: String
            if result == Z_STREAM_END || result == Z_BUF_ERROR {
                reason = "deflate data ends after \(output.count - Int(stream.avail_out)) of \(output.count) bytes"
            } else {
                reason = "invalid deflate data (zlib error \(result))"
            }
            throw DiskImageError.decompressionFailed(hostOffset: hostOffset, reason: reason)
        }
    }

    /// Decompresses one zstd frame from `input` into exactly `output.count` bytes.
    static func zstd(_ input: UnsafeRawBufferPointer, into output: UnsafeMutableRawBufferPointer,
                     hostOffset: UInt64) throws {
        guard let ctx = ZSTD_createDCtx() else {
            throw DiskImageError.decompressionFailed(hostOffset: hostOffset, reason: "cannot create a zstd context")
        }
        defer { ZSTD_freeDCtx(ctx) }
        var inBuf = ZSTD_inBuffer(src: input.baseAddress, size: input.count, pos: 0)
        var outBuf = ZSTD_outBuffer(dst: output.baseAddress, size: output.count, pos: 0)
        while outBuf.pos < outBuf.size {
            let before = (inBuf.pos, outBuf.pos)
            let r = ZSTD_decompressStream(ctx, &outBuf, &inBuf)
            if ZSTD_isError(r) != 0 {
                throw DiskImageError.decompressionFailed(
                    hostOffset: hostOffset, reason: "invalid zstd data (\(String(cString: ZSTD_getErrorName(r))))")
            }
            if r == 0 { break }  // End of frame.
            if before == (inBuf.pos, outBuf.pos) { break }  // Input exhausted, no progress.
        }
        guard outBuf.pos == outBuf.size else {
            throw DiskImageError.decompressionFailed(
                hostOffset: hostOffset, reason: "zstd data ends after \(outBuf.pos) of \(output.count) bytes")
        }
    }
}
