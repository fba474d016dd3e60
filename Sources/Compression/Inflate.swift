import CZlib

#if canImport(Glibc)
import Glibc
#endif

/// Which wrapper a deflate stream has.
public enum DeflateFormat: Sendable {
    /// No wrapper: qcow2's compressed clusters.
    case raw
    /// The gzip wrapper: a Linux kernel's compressed payload.
    case gzip

    var windowBits: Int32 { self == .raw ? -15 : 15 + 16 }
}

/// Inflating deflate streams with Debian's zlib (and libdeflate, when the system has it, for
/// a whole buffer at once). The one home of zlib in Swiftlet: the kernel loader and the
/// qcow2 reader both come here.
public enum Inflate {
    /// Output chunk size for streams of unknown length.
    static let chunkSize = 1 << 20

    /// Fills all of `output` from the stream at the start of `input`; bytes after the end
    /// of the stream are ignored (qcow2 pads compressed clusters to a sector). libdeflate
    /// decodes it when present and `allowLibDeflate`; zlib decides otherwise.
    public static func exactly(_ input: UnsafeRawBufferPointer, into output: UnsafeMutableRawBufferPointer,
                               format: DeflateFormat, allowLibDeflate: Bool = true) throws(CompressionError) {
        guard let inBase = input.baseAddress, let outBase = output.baseAddress else { throw .truncated(produced: 0) }
        if allowLibDeflate, format == .raw, let fast = LibDeflate.shared, fast.inflate(input, into: output) { return }
        var stream = z_stream()
        let initResult = inflateInit2_(&stream, format.windowBits, zlibVersion(), Int32(MemoryLayout<z_stream>.size))
        guard initResult == Z_OK else { throw .setupFailed("inflateInit2 (zlib error \(initResult))") }
        defer { inflateEnd(&stream) }
        stream.next_in = UnsafeMutablePointer(mutating: inBase.assumingMemoryBound(to: Bytef.self))
        stream.avail_in = uInt(clamping: input.count)
        stream.next_out = outBase.assumingMemoryBound(to: Bytef.self)
        stream.avail_out = uInt(clamping: output.count)
        let result = CZlib.inflate(&stream, Z_FINISH)
        let produced = output.count - Int(stream.avail_out)
        guard (result == Z_STREAM_END || result == Z_BUF_ERROR) && stream.avail_out == 0 else {
            if result == Z_STREAM_END || result == Z_BUF_ERROR { throw .truncated(produced: produced) }
            throw .corrupt(detail: "zlib error \(result)")
        }
    }

    /// Inflates the whole stream in `input`, refusing output beyond `limit` bytes.
    /// `capacity` is a hint for the output's size.
    public static func whole(_ input: [UInt8], format: DeflateFormat, limit: Int, capacity: Int = 0) throws(CompressionError) -> [UInt8] {
        var stream = z_stream()
        let initResult = inflateInit2_(&stream, format.windowBits, zlibVersion(), Int32(MemoryLayout<z_stream>.size))
        guard initResult == Z_OK else { throw .setupFailed("inflateInit2 (zlib error \(initResult))") }
        defer { inflateEnd(&stream) }
        var output: [UInt8] = []
        output.reserveCapacity(min(capacity, limit))
        var chunk = [UInt8](repeating: 0, count: chunkSize)
        var input = input
        var failure: CompressionError?
        input.withUnsafeMutableBufferPointer { inBuffer in
            stream.next_in = inBuffer.baseAddress
            stream.avail_in = uInt(clamping: inBuffer.count)
            while true {
                let (result, produced) = chunk.withUnsafeMutableBufferPointer { outBuffer -> (Int32, Int) in
                    stream.next_out = outBuffer.baseAddress
                    stream.avail_out = uInt(outBuffer.count)
                    let result = CZlib.inflate(&stream, Z_NO_FLUSH)
                    return (result, outBuffer.count - Int(stream.avail_out))
                }
                if output.count + produced > limit { failure = .tooLarge(limit: limit); return }
                output.append(contentsOf: chunk[0..<produced])
                if result == Z_STREAM_END { return }
                if result != Z_OK {
                    failure = result == Z_BUF_ERROR ? .truncated(produced: output.count) : .corrupt(detail: "zlib error \(result)")
                    return
                }
                if produced == 0 && stream.avail_in == 0 { failure = .truncated(produced: output.count); return }
            }
        }
        if let failure { throw failure }
        return output
    }
}

/// libdeflate, if the system has it (Debian: libdeflate0), loaded at run time with `dlopen`.
///
/// It inflates a whole buffer two to three times faster than zlib. It is optional: without it,
/// or for any stream it does not decode to exactly the output's size, zlib decides.
public struct LibDeflate: @unchecked Sendable {  // Holds only C function pointers into a library that is never unloaded.
    typealias Alloc = @convention(c) () -> OpaquePointer?
    typealias Free = @convention(c) (OpaquePointer?) -> Void
    typealias DecompressEx = @convention(c) (OpaquePointer?, UnsafeRawPointer?, Int, UnsafeMutableRawPointer?, Int,
                                             UnsafeMutablePointer<Int>?, UnsafeMutablePointer<Int>?) -> Int32
    let alloc: Alloc
    let free: Free
    let decompress: DecompressEx

    /// The library, or nil when the system does not have it.
    public static let shared: LibDeflate? = {
        guard let handle = dlopen("libdeflate.so.0", RTLD_NOW | RTLD_LOCAL),
              let a = dlsym(handle, "libdeflate_alloc_decompressor"),
              let f = dlsym(handle, "libdeflate_free_decompressor"),
              let d = dlsym(handle, "libdeflate_deflate_decompress_ex") else { return nil }
        return LibDeflate(alloc: unsafeBitCast(a, to: Alloc.self), free: unsafeBitCast(f, to: Free.self),
                          decompress: unsafeBitCast(d, to: DecompressEx.self))
    }()

    /// True if `input` starts with a raw deflate stream that fills `output` exactly.
    func inflate(_ input: UnsafeRawBufferPointer, into output: UnsafeMutableRawBufferPointer) -> Bool {
        guard let d = alloc() else { return false }
        defer { free(d) }
        var consumed = 0, produced = 0
        let r = decompress(d, input.baseAddress, input.count, output.baseAddress, output.count, &consumed, &produced)
        return r == 0 && produced == output.count
    }
}
