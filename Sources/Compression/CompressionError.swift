/// Why compressed data could not be decompressed. Callers turn it into their own error,
/// naming what the data was (a kernel's payload, a disk image's cluster).
public enum CompressionError: Error, Equatable, CustomStringConvertible, Sendable {
    /// The data ends before the stream does (or before the output is full).
    case truncated(produced: Int)
    /// The data is not valid for its format; `detail` is the library's word for it.
    case corrupt(detail: String)
    /// The output would be larger than the caller allows.
    case tooLarge(limit: Int)
    /// The library could not start (out of memory).
    case setupFailed(String)

    /// The limit of a ``tooLarge(limit:)``.
    public var limit: Int? {
        if case let .tooLarge(limit) = self { return limit }
        return nil
    }

    public var description: String {
        switch self {
        case let .truncated(produced): return "the data ends after \(produced) bytes of output"
        case let .corrupt(detail): return "corrupt data (\(detail))"
        case let .tooLarge(limit): return "the output exceeds the limit of \(limit) bytes"
        case let .setupFailed(what): return "\(what) failed"
        }
    }
}
