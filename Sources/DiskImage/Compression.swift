import Compression

/// Decompresses one qcow2 compressed cluster. Stateless: each call owns its own stream.
enum ClusterDecompressor {
    /// Inflates `input` into exactly `output.count` bytes.
    ///
    /// QEMU writes raw deflate (no zlib header) and pads the data to a sector,
    /// so bytes after the end of the stream are ignored; the cluster must come out whole.
    static func inflate(_ input: UnsafeRawBufferPointer, into output: UnsafeMutableRawBufferPointer,
                        hostOffset: UInt64, allowLibDeflate: Bool = true) throws {
        do {
            try Inflate.exactly(input, into: output, format: .raw, allowLibDeflate: allowLibDeflate)
        } catch {
            throw DiskImageError.decompressionFailed(hostOffset: hostOffset, reason: reason(error, "deflate", output.count))
        }
    }

    /// Decompresses one zstd frame from `input` into exactly `output.count` bytes.
    static func zstd(_ input: UnsafeRawBufferPointer, into output: UnsafeMutableRawBufferPointer,
                     hostOffset: UInt64) throws {
        do {
            try Zstd.exactly(input, into: output)
        } catch {
            throw DiskImageError.decompressionFailed(hostOffset: hostOffset, reason: reason(error, "zstd", output.count))
        }
    }

    static func reason(_ error: CompressionError, _ format: String, _ size: Int) -> String {
        switch error {
        case let .truncated(produced): return "\(format) data ends after \(produced) of \(size) bytes"
        case let .corrupt(detail): return "invalid \(format) data (\(detail))"
        default: return error.description
        }
    }
}
