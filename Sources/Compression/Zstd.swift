import CZstd

/// Decompressing zstd frames with Debian's libzstd: the one home of zstd in Swiftlet (a
/// kernel's payload, a qcow2 cluster).
public enum Zstd {
    static let chunkSize = 1 << 20

    /// Fills all of `output` from the first frame of `input`.
    public static func exactly(_ input: UnsafeRawBufferPointer, into output: UnsafeMutableRawBufferPointer) throws(CompressionError) {
        guard let context = ZSTD_createDCtx() else { throw .setupFailed("ZSTD_createDCtx") }
        defer { ZSTD_freeDCtx(context) }
        var inBuffer = ZSTD_inBuffer(src: input.baseAddress, size: input.count, pos: 0)
        var outBuffer = ZSTD_outBuffer(dst: output.baseAddress, size: output.count, pos: 0)
        while outBuffer.pos < outBuffer.size {
            let before = (inBuffer.pos, outBuffer.pos)
            let result = ZSTD_decompressStream(context, &outBuffer, &inBuffer)
            if ZSTD_isError(result) != 0 { throw .corrupt(detail: String(cString: ZSTD_getErrorName(result))) }
            if result == 0 { break }                               // end of the frame
            if before == (inBuffer.pos, outBuffer.pos) { break }   // input used up, no progress
        }
        guard outBuffer.pos == outBuffer.size else { throw .truncated(produced: outBuffer.pos) }
    }

    /// Decompresses the first frame of `input` (anything after it is ignored: the kernel
    /// build appends a 4-byte size), refusing output beyond `limit` bytes. `windowLogMax`
    /// allows frames made with `--ultra -22` (the kernel's).
    public static func whole(_ input: [UInt8], limit: Int, capacity: Int = 0, windowLogMax: Int32 = 31) throws(CompressionError) -> [UInt8] {
        guard let context = ZSTD_createDStream() else { throw .setupFailed("ZSTD_createDStream") }
        defer { ZSTD_freeDStream(context) }
        ZSTD_initDStream(context)
        ZSTD_DCtx_setParameter(context, ZSTD_d_windowLogMax, windowLogMax)
        var output: [UInt8] = []
        output.reserveCapacity(min(capacity, limit))
        var chunk = [UInt8](repeating: 0, count: chunkSize)
        var failure: CompressionError?
        input.withUnsafeBytes { raw in
            var inBuffer = ZSTD_inBuffer(src: raw.baseAddress, size: raw.count, pos: 0)
            while true {
                let (result, produced) = chunk.withUnsafeMutableBytes { outRaw -> (Int, Int) in
                    var outBuffer = ZSTD_outBuffer(dst: outRaw.baseAddress, size: outRaw.count, pos: 0)
                    let result = ZSTD_decompressStream(context, &outBuffer, &inBuffer)
                    return (result, outBuffer.pos)
                }
                if ZSTD_isError(result) != 0 { failure = .corrupt(detail: String(cString: ZSTD_getErrorName(result))); return }
                if output.count + produced > limit { failure = .tooLarge(limit: limit); return }
                output.append(contentsOf: chunk[0..<produced])
                if result == 0 { return }
                if inBuffer.pos == inBuffer.size && produced < chunk.count { failure = .truncated(produced: output.count); return }
            }
        }
        if let failure { throw failure }
        return output
    }
}
