#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// A virtual disk as the guest sees it: a flat array of `virtualSize` bytes.
///
/// Implementations may be called from several threads at once.
public protocol BlockDevice: Sendable {
    /// Size of the disk seen by the guest, in bytes.
    var virtualSize: UInt64 { get }
    var isReadOnly: Bool { get }
    /// Fills `buffer` with the disk contents starting at `offset`.
    func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws
    /// Stores `buffer` at `offset`; throws `readOnly` on a read-only device.
    func write(_ buffer: UnsafeRawBufferPointer, at offset: UInt64) throws
    /// Makes all completed writes durable.
    func flush() throws
    /// True if the range is known to read as zeros without reading data (holes, zero clusters).
    /// May return false when unsure; the default does.
    func isKnownZero(at offset: UInt64, length: UInt64) throws -> Bool
    /// Says the range is no longer needed; it may be deallocated. It then reads as before or
    /// as zeros. Defaults and the raw-file versions: BlockDevice+Discard.swift.
    func discard(at offset: UInt64, length: UInt64) throws
    /// Makes the range read as zeros; with `deallocate`, its space may be freed as well.
    func writeZeroes(at offset: UInt64, length: UInt64, deallocate: Bool) throws
    /// True when `discard` and `writeZeroes(deallocate: true)` can free space.
    var canDeallocate: Bool { get }
    /// The size and alignment, in bytes, of the pieces `discard` frees.
    var discardGranularity: UInt64 { get }
}

/// On-disk formats Swiftlet understands.
public enum ImageFormat: String, Sendable, CaseIterable, CustomStringConvertible {
    case raw
    case qcow2
    public var description: String { rawValue }
}

/// A raw image: the file's bytes are the disk's bytes. Owns its `ImageFile`.
///
/// Like QEMU, the disk is a whole number of 512-byte sectors: a file whose size is not a
/// multiple of 512 gets a last sector completed with zeros (which a write fills in).
public final class RawImage: BlockDevice {
    public let file: ImageFile
    public let virtualSize: UInt64
    public let isReadOnly: Bool

    public init(file: ImageFile) throws {
        self.file = file
        self.virtualSize = (try file.size() + 511) & ~511
        self.isReadOnly = !file.writable
    }

    public func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws {
        try checkRange(offset, buffer.count, virtualSize)
        try file.readZeroFilled(into: buffer, at: offset)
    }

    public func write(_ buffer: UnsafeRawBufferPointer, at offset: UInt64) throws {
        guard !isReadOnly else { throw DiskImageError.readOnly(path: file.path) }
        try checkRange(offset, buffer.count, virtualSize)
        try file.write(buffer, at: offset)
    }

    public func flush() throws {
        if !isReadOnly { try file.sync() }
    }
}

func checkRange(_ offset: UInt64, _ count: Int, _ size: UInt64) throws {
    let (end, overflow) = offset.addingReportingOverflow(UInt64(count))
    guard !overflow, end <= size else {
        throw DiskImageError.outOfRange(offset: offset, length: UInt64(count), virtualSize: size)
    }
}

/// Entry points: open an image by path, detecting its format from its content.
public enum DiskImage {
    /// Longest backing chain followed before giving up.
    public static let maxBackingDepth = 16

    /// The format indicated by the file's first bytes: qcow2 if it starts with `QFI\xfb`, raw otherwise.
    public static func detectFormat(path: String) throws -> ImageFormat {
        let file = try ImageFile(path: path, writable: false, lock: ImageLock.unlocked)
        return try detectFormat(file: file)
    }

    static func detectFormat(file: ImageFile) throws -> ImageFormat {
        var magic = [UInt8](repeating: 0, count: 4)
        let n = try magic.withUnsafeMutableBytes { try file.read(into: $0, at: 0) }
        if n == 4 && magic.be(0, as: UInt32.self) == QCOW2Header.magic { return .qcow2 }
        return .raw
    }

    /// Opens `path` as a block device.
    ///
    /// - Parameters:
    ///   - format: overrides detection; `.raw` never looks for a qcow2 header.
    ///   - readOnly: images open read-only unless this is `false`. Backing images are always read-only.
    ///   - snapshot: open this internal snapshot (by name or id) of a qcow2 image, read-only.
    public static func open(path: String, format: ImageFormat? = nil, readOnly: Bool = true,
                            snapshot: String? = nil) throws -> any BlockDevice {
        var chain = BackingChainState()
        return try open(path: path, format: format, readOnly: readOnly, snapshot: snapshot, chain: &chain)
    }

    static func open(path: String, format: ImageFormat?, readOnly: Bool, snapshot: String?,
                     chain: inout BackingChainState, forCheck: Bool = false) throws -> any BlockDevice {
        let ro = readOnly || snapshot != nil
        let file = try ImageFile(path: path, writable: !ro, lock: ImageLock.unlocked)
        let id = try file.identity()
        // A loop is reported as such, before the lock would report the chain's own open of the file.
        guard chain.seen.insert(id).inserted else { throw DiskImageError.backingLoop(path: path) }
        try file.lock(ro ? .shared : .exclusive)
        let fmt: ImageFormat
        if let format { fmt = format } else { fmt = try detectFormat(file: file) }
        switch fmt {
        case .raw:
            guard snapshot == nil else { throw DiskImageError.invalidArgument("raw images have no snapshots") }
            return try RawImage(file: file)
        case .qcow2:
            return try QCOW2Image(file: file, snapshot: snapshot, chain: &chain, forCheck: forCheck)
        }
    }

    /// Opens the backing image named by an image at `imagePath`.
    static func openBacking(name: String, format: String?, imagePath: String,
                            chain: inout BackingChainState) throws -> any BlockDevice {
        chain.depth += 1
        guard chain.depth <= maxBackingDepth else { throw DiskImageError.backingChainTooDeep(limit: maxBackingDepth) }
        let path = resolveBackingPath(name, relativeTo: imagePath)
        var fmt: ImageFormat?
        if let format {
            guard let f = ImageFormat(rawValue: format) else { throw DiskImageError.unknownBackingFormat(format) }
            fmt = f
        }
        do {
            return try open(path: path, format: fmt, readOnly: true, snapshot: nil, chain: &chain)
        } catch let DiskImageError.io(op, _, err) where op == "open" {
            throw DiskImageError.backingMissing(path: path, errno: err)
        }
    }

    /// A relative backing name is relative to the folder of the image that names it.
    public static func resolveBackingPath(_ name: String, relativeTo imagePath: String) -> String {
        if name.hasPrefix("/") { return name }
        guard let slash = imagePath.lastIndex(of: "/") else { return name }
        return String(imagePath[...slash]) + name
    }
}

/// What has been opened so far while following one backing chain.
struct BackingChainState {
    var depth = 0
    var seen = Set<FileIdentity>()
}
