import CZlib
import CZstd

#if canImport(Glibc)
import Glibc
#endif

/// libdeflate, if the system has it (Debian: libdeflate0), loaded at run time with `dlopen`.
///
/// It inflates a whole buffer two to three times faster than zlib. It is optional: without it,
/// or for any stream it does not decode to exactly one cluster, zlib decides.
struct LibDeflate: @unchecked Sendable {  // Holds only C function pointers into a library that is never unloaded.
    typealias Alloc = @convention(c) () -> OpaquePointer?
    typealias Free = @convention(c) (OpaquePointer?) -> Void
    typealias DecompressEx = @convention(c) (OpaquePointer?, UnsafeRawPointer?, Int, UnsafeMutableRawPointer?, Int,
                                             UnsafeMutablePointer<Int>?, UnsafeMutablePointer<Int>?) -> Int32
    let alloc: Alloc
    let free: Free
    let decompress: DecompressEx

    static let shared: LibDeflate? = {
        guard let handle = dlopen("libdeflate.so.0", RTLD_NOW | RTLD_LOCAL),
              let a = dlsym(handle, "libdeflate_alloc_decompressor"),
              let f = dlsym(handle, "libdeflate_free_decompressor"),
              let d = dlsym(handle, "libdeflate_deflate_decompress_ex") else { return nil }
        return LibDeflate(alloc: unsafeBitCast(a, to: Alloc.self), free: unsafeBitCast(f, to: Free.self),
                          decompress: unsafeBitCast(d, to: DecompressEx.self))
    }()

    /// True if `input` starts with a deflate stream that fills `output` exactly.
    func inflate(_ input: UnsafeRawBufferPointer, into output: UnsafeMutableRawBufferPointer) -> Bool {
        guard let d = alloc() else { return false }
        defer { free(d) }
        var consumed = 0, produced = 0
        let r = decompress(d, input.baseAddress, input.count, output.baseAddress, output.count, &consumed, &produced)
        return r == 0 && produced == output.count
    }
}

/// Decompresses one qcow2 compressed cluster. Stateless: each call owns its own stream.
enum ClusterDecompressor {
    /// Inflates `input` into exactly `output.count` bytes.
    ///
    /// QEMU writes raw deflate (no zlib header) and pads the data to a sector,
    /// so bytes after the end of the stream are ignored; the cluster must come out whole.
    static func inflate(_ input: UnsafeRawBufferPointer, into output: UnsafeMutableRawBufferPointer,
                        hostOffset: UInt64, allowLibDeflate: Bool = true) throws {
        guard let inBase = input.baseAddress, let outBase = output.baseAddress else {
            throw DiskImageError.decompressionFailed(hostOffset: hostOffset, reason: "empty buffer")
        }
        if allowLibDeflate, let fast = LibDeflate.shared, fast.inflate(input, into: output) { return }
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
