import Basics
import Synchronization

import Dispatch
#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// Owns one open file descriptor of an image file, and the locks on it; closes it on deinit.
///
/// All I/O is positional (`pread`/`pwrite`), so one `ImageFile` can be used
/// from several threads at once without a shared file position.
///
/// Opening takes QEMU's image locks (see `ImageLock`), so that Swiftlet and QEMU (`qemu-img`,
/// `qemu-io`, `qemu-system-*`) refuse to write an image the other has open, and neither reads
/// one that the other is writing. The locks are open file description locks (`F_OFD_SETLK`):
/// two opens of one file conflict even within one process, and closing the descriptor drops them.
public final class ImageFile: Sendable {
    public let path: String
    public let fd: Int32
    public let writable: Bool
    /// Writes allowed before every further write fails, as if the machine had stopped there.
    /// Only tests lower it, to check that a crash at any point leaves a consistent image.
    let writeBudget = Atomic<Int>(Int.max)

    /// Whether opening may create the file.
    public enum Creation: Sendable {
        case never
        /// The file must not exist yet (`O_EXCL`).
        case new
        /// Created if missing; an existing file is opened as it is (never truncated).
        case ifMissing
    }

    /// Opens `path`, locking it `lock` (by default shared when read-only, exclusive when writable).
    public init(path: String, writable: Bool, create: Creation = .never, lock: ImageLock? = nil) throws {
        var flags = writable ? O_RDWR : O_RDONLY
        flags |= O_CLOEXEC
        switch create {
        case .never: break
        case .new: flags |= O_CREAT | O_EXCL
        case .ifMissing: flags |= O_CREAT
        }
        let fd = open(path, flags, 0o644)
        guard fd >= 0 else { throw DiskImageError.io(operation: "open", path: path, errno: errno) }
        self.path = path
        self.fd = fd
        self.writable = writable
        let mode = lock ?? (writable ? .exclusive : .shared)
        if mode != .unlocked { try self.lock(mode) }
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
            throw DiskImageError.corruptMetadata("\(what) at 0x\(Hex.digits(offset)) runs past the end of the file")
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

/// How an open image is shared with other processes: QEMU's scheme (`block/file-posix.c`,
/// `raw_apply_lock_bytes` and `raw_check_lock_bytes`), so that each sees the other's locks.
///
/// QEMU has four permissions: 0 consistent read, 1 write, 2 write without changing the data,
/// 3 resize. An open file holds a shared lock on byte 100 + p for each permission p it uses,
/// and on byte 200 + p for each permission it refuses to share. Before using permission p, it
/// checks that nobody holds byte 200 + p; before refusing to share p, that nobody holds 100 + p.
public enum ImageLock: Sendable, Equatable {
    /// No lock (only to peek at a file, as format detection does).
    case unlocked
    /// For reading: uses consistent read; refuses to share write and resize (as `qemu-img info`
    /// and a read-only QEMU drive do). Readers share with readers.
    case shared
    /// For writing: uses read, write and resize; refuses to share write and resize (as a
    /// read-write QEMU drive does). Excludes every other reader and writer.
    case exclusive

    static let readPermission = 0, writePermission = 1, resizePermission = 3
    static let permissionCount = 4
    /// What each permission lets a process do, for messages.
    static let verbs = [("read", "reading"), ("write to", "writing to"), ("write to", "writing to"), ("resize", "resizing")]

    /// Permissions used, and permissions not shared with others.
    var permissions: (used: [Int], unshared: [Int]) {
        switch self {
        case .unlocked: return ([], [])
        case .shared: return ([Self.readPermission], [Self.writePermission, Self.resizePermission])
        case .exclusive: return ([Self.readPermission, Self.writePermission, Self.resizePermission],
                                 [Self.writePermission, Self.resizePermission])
        }
    }
}

extension ImageFile {
    static let permissionLockBase: off_t = 100
    static let sharedLockBase: off_t = 200
    // Linux's open file description locks; Glibc defines them only with _GNU_SOURCE.
    static let getOFDLock: Int32 = 36  // F_OFD_GETLK
    static let setOFDLock: Int32 = 37  // F_OFD_SETLK

    /// Takes the locks of `mode` (or drops them all for `.unlocked`), after checking that no other
    /// open file description holds conflicting ones. Throws `imageInUse` on a conflict. Where the
    /// kernel or file system has no OFD locks, nothing is locked (as QEMU's `locking=auto`).
    ///
    /// A conflict is retried for up to ``lockPatience`` seconds before it is reported: a lock
    /// can outlive its holder's close for a moment, while a process that forked holds a copy
    /// of the descriptor until its exec closes it (a supervisor starting another program, or
    /// a test process running qemu-img). A real conflict costs that much delay, once.
    public func lock(_ mode: ImageLock) throws {
        let deadline = DispatchTime.now().uptimeNanoseconds + UInt64(Self.lockPatience * 1e9)
        var pause: useconds_t = 1000
        while true {
            do {
                return try lockOnce(mode)
            } catch DiskImageError.imageInUse where DispatchTime.now().uptimeNanoseconds < deadline {
                usleep(pause)
                pause = min(pause * 2, 50_000)
            }
        }
    }

    /// How long a lock conflict is waited out before it is an error.
    public static let lockPatience = 1.0

    private func lockOnce(_ mode: ImageLock) throws {
        let (used, unshared) = mode.permissions
        var wanted = Set<off_t>()
        for p in used { wanted.insert(Self.permissionLockBase + off_t(p)) }
        for p in unshared { wanted.insert(Self.sharedLockBase + off_t(p)) }
        do {
            // Lock first, then check, as QEMU does: two openers racing both see each other.
            for p in 0..<ImageLock.permissionCount {
                for base in [Self.permissionLockBase, Self.sharedLockBase] {
                    let byte = base + off_t(p)
                    guard try setLock(byte: byte, type: wanted.contains(byte) ? F_RDLCK : F_UNLCK) else { return }
                }
            }
            for p in used where try isLocked(byte: Self.sharedLockBase + off_t(p)) {
                throw DiskImageError.imageInUse(path: path, reason: "does not let others \(ImageLock.verbs[p].0) it")
            }
            for p in unshared where try isLocked(byte: Self.permissionLockBase + off_t(p)) {
                throw DiskImageError.imageInUse(path: path, reason: "is \(ImageLock.verbs[p].1) it")
            }
        } catch {
            for byte in wanted { _ = try? setLock(byte: byte, type: F_UNLCK) }
            throw error
        }
    }

    /// Sets or clears a shared lock on one byte; false if this file cannot be locked at all.
    private func setLock(byte: off_t, type: Int32) throws -> Bool {
        var fl = flock()
        fl.l_type = Int16(type)
        fl.l_whence = Int16(SEEK_SET)
        fl.l_start = byte
        fl.l_len = 1
        while fcntl(fd, Self.setOFDLock, &fl) != 0 {
            switch errno {
            case EINTR: continue
            case EINVAL, ENOLCK, EOPNOTSUPP, ENOSYS: return false  // No OFD locks here.
            case EAGAIN, EACCES: throw DiskImageError.imageInUse(path: path, reason: "holds a write lock on it")
            default: throw DiskImageError.io(operation: "lock", path: path, errno: errno)
            }
        }
        return true
    }

    /// True if another open file description holds any lock on `byte`.
    private func isLocked(byte: off_t) throws -> Bool {
        var fl = flock()
        fl.l_type = Int16(F_WRLCK)
        fl.l_whence = Int16(SEEK_SET)
        fl.l_start = byte
        fl.l_len = 1
        guard fcntl(fd, Self.getOFDLock, &fl) == 0 else {
            throw DiskImageError.io(operation: "lock test", path: path, errno: errno)
        }
        return Int32(fl.l_type) != F_UNLCK
    }
}

/// A file's device and inode numbers: equal identities are the same file.
struct FileIdentity: Hashable, Sendable {
    var device: UInt64
    var inode: UInt64
}
