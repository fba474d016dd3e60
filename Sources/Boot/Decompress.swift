import Basics
import CLz4
import CLzma
import Compression

/// Decompresses the payload of a bzImage on the host, with Debian's zlib, liblzma,
/// liblz4 and libzstd. Owns nothing beyond one call: each function takes the compressed
/// bytes and returns a new array, never larger than `limit` bytes.
public enum PayloadDecompressor {
    public enum Format: String, Sendable, Equatable {
        case gzip, xz, lz4, zstd, bzip2, lzma, lzo
    }

    /// Output chunk size for the streaming decoders.
    static let chunkSize = 1 << 20
    /// A legacy LZ4 frame's blocks decompress to at most 8 MiB each.
    static let lz4LegacyBlockSize = 8 << 20
    static let lz4LegacyMagic: UInt32 = 0x184C_2102

    /// Identifies the compression by its magic bytes.
    public static func detect(_ payload: ArraySlice<UInt8>) -> Format? {
        let bytes = Array(payload.prefix(6))
        func starts(_ magic: [UInt8]) -> Bool { bytes.count >= magic.count && bytes.starts(with: magic) }
        if starts([0x1F, 0x8B]) { return .gzip }
        if starts([0xFD, 0x37, 0x7A, 0x58, 0x5A, 0x00]) { return .xz }
        if starts([0x02, 0x21, 0x4C, 0x18]) { return .lz4 }
        if starts([0x28, 0xB5, 0x2F, 0xFD]) { return .zstd }
        if starts([0x42, 0x5A, 0x68]) { return .bzip2 }
        if starts([0x89, 0x4C, 0x5A, 0x4F]) { return .lzo }
        if starts([0x5D, 0x00, 0x00]) { return .lzma }
        return nil
    }

    /// Decompresses `payload`, refusing output beyond `limit` bytes.
    public static func decompress(_ payload: ArraySlice<UInt8>, limit: Int) throws(BootError) -> (Format, [UInt8]) {
        guard let format = detect(payload) else {
            throw .decompressionFailed(format: "unknown", reason: "the payload starts with no known compression magic")
        }
        let input = Array(payload)
        // The kernel build appends the uncompressed size (gzip's own trailer holds it
        // too): a hint for the output's capacity, never trusted beyond `limit`.
        let hint = input.count >= 4 ? Int(input.le(UInt32.self, at: input.count - 4) ?? 0) : 0
        let capacity = hint > 0 && hint <= limit ? hint : 0
        let output: [UInt8]
        switch format {
        case .gzip: output = try gunzip(input, limit: limit, capacity: capacity)
        case .xz: output = try unxz(input, limit: limit, capacity: capacity)
        case .lz4: output = try unlz4Legacy(input, limit: limit, capacity: capacity)
        case .zstd: output = try unzstd(input, limit: limit, capacity: capacity)
        case .bzip2, .lzma, .lzo:
            throw .decompressionFailed(format: format.rawValue, reason: "only gzip, xz, lz4 and zstd are supported on the host")
        }
        return (format, output)
    }

    static func tooLarge(_ format: Format, _ limit: Int) -> BootError {
        .decompressionFailed(format: format.rawValue, reason: "output exceeds the limit of \(limit) bytes")
    }

    static func gunzip(_ input: [UInt8], limit: Int, capacity: Int = 0) throws(BootError) -> [UInt8] {
        do { return try Inflate.whole(input, format: .gzip, limit: limit, capacity: capacity) } catch { throw failure(.gzip, error) }
    }

    /// A `CompressionError` as the boot error naming the payload's format.
    static func failure(_ format: Format, _ error: CompressionError) -> BootError {
        switch error {
        case .tooLarge: return tooLarge(format, (error.limit ?? 0))
        case .truncated: return .decompressionFailed(format: format.rawValue, reason: "the data is truncated")
        case let .corrupt(detail): return .decompressionFailed(format: format.rawValue, reason: "corrupt data (\(detail))")
        case let .setupFailed(what): return .decompressionFailed(format: format.rawValue, reason: "\(what) failed")
        }
    }

    static func unxz(_ input: [UInt8], limit: Int, capacity: Int = 0) throws(BootError) -> [UInt8] {
        var stream = lzma_stream()
        guard lzma_stream_decoder(&stream, UInt64.max, 0) == LZMA_OK else {
            throw .decompressionFailed(format: "xz", reason: "lzma_stream_decoder failed")
        }
        defer { lzma_end(&stream) }
        var output: [UInt8] = []
        output.reserveCapacity(capacity)
        var chunk = [UInt8](repeating: 0, count: chunkSize)
        var exceeded = false
        let status: lzma_ret = input.withUnsafeBufferPointer { inBuffer in
            stream.next_in = inBuffer.baseAddress
            stream.avail_in = inBuffer.count
            while true {
                let (ret, produced) = chunk.withUnsafeMutableBufferPointer { outBuffer -> (lzma_ret, Int) in
                    stream.next_out = outBuffer.baseAddress
                    stream.avail_out = outBuffer.count
                    let ret = lzma_code(&stream, LZMA_FINISH)
                    return (ret, outBuffer.count - stream.avail_out)
                }
                if output.count + produced > limit { exceeded = true; return LZMA_MEMLIMIT_ERROR }
                output.append(contentsOf: chunk[0..<produced])
                if ret != LZMA_OK { return ret }
            }
        }
        if exceeded { throw tooLarge(.xz, limit) }
        guard status == LZMA_STREAM_END else {
            throw .decompressionFailed(format: "xz", reason: status == LZMA_BUF_ERROR ? "the data is truncated" : "corrupt data (liblzma error \(status.rawValue))")
        }
        return output
    }

    /// The legacy LZ4 frame the kernel build uses (`lz4 -l`): the magic, then blocks of
    /// (little-endian 32-bit compressed size, data), each at most 8 MiB decompressed. The
    /// kernel appends the decompressed size as 4 more bytes, which ends the stream.
    static func unlz4Legacy(_ input: [UInt8], limit: Int, capacity: Int = 0) throws(BootError) -> [UInt8] {
        var position = 4
        var output: [UInt8] = []
        output.reserveCapacity(capacity)
        var block = [UInt8](repeating: 0, count: lz4LegacyBlockSize)
        while position + 4 <= input.count {
            guard let size = input.le(UInt32.self, at: position) else { break }
            position += 4
            if size == lz4LegacyMagic { continue }   // a concatenated stream
            if size == 0 { break }
            guard Int(size) <= input.count - position else {
                // The 4-byte size trailer the kernel build appends ends the data.
                if position == input.count { break }
                throw .decompressionFailed(format: "lz4", reason: "the data is truncated")
            }
            guard Int(size) <= LZ4_compressBound(Int32(lz4LegacyBlockSize)) else {
                throw .decompressionFailed(format: "lz4", reason: "block of \(size) bytes is larger than a legacy block can be")
            }
            let produced: Int32 = input.withUnsafeBufferPointer { inBuffer in
                block.withUnsafeMutableBufferPointer { outBuffer in
                    inBuffer.baseAddress!.withMemoryRebound(to: CChar.self, capacity: inBuffer.count) { src in
                        outBuffer.baseAddress!.withMemoryRebound(to: CChar.self, capacity: outBuffer.count) { dst in
                            LZ4_decompress_safe(src + position, dst, Int32(size), Int32(outBuffer.count))
                        }
                    }
                }
            }
            guard produced >= 0 else { throw .decompressionFailed(format: "lz4", reason: "corrupt block") }
            guard output.count + Int(produced) <= limit else { throw tooLarge(.lz4, limit) }
            output.append(contentsOf: block[0..<Int(produced)])
            position += Int(size)
        }
        guard !output.isEmpty else { throw .decompressionFailed(format: "lz4", reason: "no data blocks") }
        return output
    }

    /// Decodes the first zstd frame (the kernel appends a 4-byte size after it).
    static func unzstd(_ input: [UInt8], limit: Int, capacity: Int = 0) throws(BootError) -> [UInt8] {
        do { return try Zstd.whole(input, limit: limit, capacity: capacity) } catch { throw failure(.zstd, error) }
    }
}
