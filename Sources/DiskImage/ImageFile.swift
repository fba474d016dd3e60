import Synchronization

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// Owns one open file descriptor of an image file and closes it on deinit.
///
/// All I/O is positional (`pread`/`pwrite`), so one `ImageFile` can be used
/// from several threads at once without a shared file position.
public final class ImageFile: Sendable {
    public let path: String
    public let fd: Int32
    public let writable: Bool
    /// Writes allowed before every further write fails, as if the machine had stopped there.
    /// Only tests lower it, to check that a crash at any point leaves a consistent image.
    let writeBudget = Atomic<Int>(Int.max)

    public init(path: String, writable: Bool, create: Bool = false) throws {
        var flags = writable ? O_RDWR : O_RDONLY
        flags |= O_CLOEXEC
        if create { flags |= O_CREAT | O_EXCL }
        let fd = open(path, flags, 0o644)
        guard fd >= 0 else { throw DiskImageError.io(operation: "open", path: path, errno: errno) }
        self.path = path
        self.fd = fd
        self.writable = writable
    }

    deinit { close(fd) }

    /// Current size of the file in bytes.
    public func size() throws -> UInt64 {
        var st = stat()
        guard fstat(fd, &st) == 0 else { throw DiskImageError.io(operation: "fstat", path: path, errno: errno) }
        return UInt64(max(0, st.st_size))
    }

    /// Device and inode, used to detect loops in backing chains.
    func identity() throws -> FileIdentity {
        var st = stat()
        guard fstat(fd, &st) == 0 else { throw DiskImageError.io(operation: "fstat", path: path, errno: errno) }
        return FileIdentity(device: UInt64(st.st_dev), inode: UInt64(st.st_ino))
    }

    /// Reads up to `buffer.count` bytes at `offset`; returns how many were read (short only at end of file).
    @discardableResult
    public func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws -> Int {
        // Offsets come from the image; one past what off_t can hold is simply past the end of the file.
        guard offset <= UInt64(Int64.max) - UInt64(buffer.count) else { return 0 }
        var done = 0
        while done < buffer.count {
            guard let base = buffer.baseAddress else { return 0 }
            let n = pread(fd, base + done, buffer.count - done, off_t(offset) + off_t(done))
            if n < 0 {
                if errno == EINTR { continue }
                throw DiskImageError.io(operation: "read", path: path, errno: errno)
            }
            if n == 0 { break }
            done += n
        }
        return done
    }

    /// Reads exactly `buffer.count` bytes at `offset`, filling anything past end of file with zeros.
    public func readZeroFilled(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws {
        let n = try read(into: buffer, at: offset)
        if n < buffer.count, let base = buffer.baseAddress {
            memset(base + n, 0, buffer.count - n)
        }
    }

    /// Reads `count` bytes at `offset` into a new array, failing if the file is shorter.
    func readBytes(_ count: Int, at offset: UInt64, what: String) throws -> [UInt8] {
        var bytes = [UInt8](repeating: 0, count: count)
        let n = try bytes.withUnsafeMutableBytes { try read(into: $0, at: offset) }
        guard n == count else {
            throw DiskImageError.corruptMetadata("\(what) at 0x\(hex(offset)) runs past the end of the file")
        }
        return bytes
    }

    public func write(_ buffer: UnsafeRawBufferPointer, at offset: UInt64) throws {
        if writeBudget.load(ordering: .relaxed) != Int.max {
            guard writeBudget.wrappingSubtract(1, ordering: .relaxed).newValue >= 0 else {
                throw DiskImageError.io(operation: "write (simulated crash)", path: path, errno: EIO)
            }
        }
        guard offset <= UInt64(Int64.max) - UInt64(buffer.count) else {
            throw DiskImageError.io(operation: "write", path: path, errno: EFBIG)
        }
        var done = 0
        while done < buffer.count {
            guard let base = buffer.baseAddress else { return }
            let n = pwrite(fd, base + done, buffer.count - done, off_t(offset) + off_t(done))
            if n < 0 {
                if errno == EINTR { continue }
                throw DiskImageError.io(operation: "write", path: path, errno: errno)
            }
            done += n
        }
    }

    func write(bytes: [UInt8], at offset: UInt64) throws {
        try bytes.withUnsafeBytes { try write($0, at: offset) }
    }

    public func truncate(to size: UInt64) throws {
        guard ftruncate(fd, off_t(size)) == 0 else {
            throw DiskImageError.io(operation: "ftruncate", path: path, errno: errno)
        }
    }

    /// Makes written data durable (`fdatasync`).
    public func sync() throws {
        guard writeBudget.load(ordering: .relaxed) >= 0 else {
            throw DiskImageError.io(operation: "fdatasync (simulated crash)", path: path, errno: EIO)
        }
        guard fdatasync(fd) == 0 else { throw DiskImageError.io(operation: "fdatasync", path: path, errno: errno) }
    }
}

/// A file's device and inode numbers: equal identities are the same file.
struct FileIdentity: Hashable, Sendable {
    var device: UInt64
    var inode: UInt64
}

// MARK: - Big-endian field access

extension Array where Element == UInt8 {
    /// Reads a big-endian integer at `offset`; the caller has checked the bounds.
    func be<T: FixedWidthInteger>(_ offset: Int, as: T.Type = T.self) -> T {
        withUnsafeBytes { T(bigEndian: $0.loadUnaligned(fromByteOffset: offset, as: T.self)) }
    }

    mutating func setBE<T: FixedWidthInteger>(_ value: T, at offset: Int) {
        withUnsafeMutableBytes { $0.storeBytes(of: value.bigEndian, toByteOffset: offset, as: T.self) }
    }
}

extension UnsafeRawBufferPointer {
    func be<T: FixedWidthInteger>(_ offset: Int, as: T.Type = T.self) -> T {
        T(bigEndian: loadUnaligned(fromByteOffset: offset, as: T.self))
    }
}
