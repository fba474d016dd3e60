#if canImport(Glibc)
import Glibc
#endif

/// Why a host file named by the user (a kernel, an initrd, a disk image, a console log)
/// could not be opened or read.
public struct HostFileError: Error, CustomStringConvertible, Equatable {
    public let path: String
    /// What the file is for, as the user would say it: "kernel", "initrd", "backing file".
    public let purpose: String
    public let reason: String

    public init(path: String, purpose: String, reason: String) {
        self.path = path; self.purpose = purpose; self.reason = reason
    }

    public var description: String { "cannot open \(purpose) '\(path)': \(reason)" }
}

/// Opening host files named by the user without surprises: a FIFO, a socket or a
/// directory named by mistake (or by a hostile image's backing-file name) is refused at
/// once instead of blocking in `open(2)` or failing later.
public enum HostFile {
    /// What kinds of file a caller accepts besides regular files.
    public struct Kinds: OptionSet, Sendable {
        public let rawValue: UInt8
        public init(rawValue: UInt8) { self.rawValue = rawValue }
        public static let regular = Kinds(rawValue: 1 << 0)
        /// Block devices (a disk given as /dev/sdb or /dev/loop0).
        public static let blockDevice = Kinds(rawValue: 1 << 1)
        /// Character devices (/dev/null, a terminal).
        public static let characterDevice = Kinds(rawValue: 1 << 2)
    }

    /// Opens `path` with `flags` plus `O_NONBLOCK` (so a FIFO cannot block the open),
    /// checks its type with `fstat`, then clears `O_NONBLOCK`. Returns the descriptor;
    /// the caller closes it.
    public static func open(_ path: String, purpose: String, flags: Int32 = O_RDONLY,
                            accepting kinds: Kinds = .regular, mode: mode_t = 0o644) throws(HostFileError) -> Int32 {
        let fd = Glibc.open(path, flags | O_NONBLOCK | O_CLOEXEC, mode)
        guard fd >= 0 else {
            let err = errno
            let reason = err == ENXIO ? "no process has it open for reading (a FIFO?)" : String(cString: strerror(err))
            throw HostFileError(path: path, purpose: purpose, reason: reason)
        }
        var info = stat()
        guard fstat(fd, &info) == 0 else {
            let err = errno
            close(fd)
            throw HostFileError(path: path, purpose: purpose, reason: String(cString: strerror(err)))
        }
        let type = info.st_mode & S_IFMT
        let accepted = (type == S_IFREG && kinds.contains(.regular))
            || (type == S_IFBLK && kinds.contains(.blockDevice))
            || (type == S_IFCHR && kinds.contains(.characterDevice))
        guard accepted else {
            close(fd)
            throw HostFileError(path: path, purpose: purpose, reason: "it is \(describe(type)), not \(expected(kinds))")
        }
        let current = fcntl(fd, F_GETFL)
        if current >= 0 { _ = fcntl(fd, F_SETFL, current & ~O_NONBLOCK) }
        return fd
    }

    /// Reads all of the regular file at `path`, at most `maximumSize` bytes. When
    /// `headerCheck` is given it first sees the file's first `headerBytes` bytes (fewer
    /// for a short file) and may throw, so a file that is not what it should be is
    /// refused before a large read.
    public static func read(_ path: String, purpose: String, maximumSize: UInt64 = 1 << 32,
                            headerBytes: Int = 0, headerCheck: (([UInt8]) throws -> Void)? = nil,
                            tooLarge: String? = nil) throws -> [UInt8] {
        let fd = try open(path, purpose: purpose)
        defer { close(fd) }
        var info = stat()
        guard fstat(fd, &info) == 0 else {
            throw HostFileError(path: path, purpose: purpose, reason: String(cString: strerror(errno)))
        }
        let size = UInt64(max(info.st_size, 0))
        if let headerCheck {
            let prefix = try readExactly(fd, count: Int(min(UInt64(headerBytes), size)), at: 0, path: path, purpose: purpose)
            try headerCheck(prefix)
        }
        guard size <= maximumSize else {
            throw HostFileError(path: path, purpose: purpose, reason: tooLarge ?? "it is larger than \(ByteSize.human(maximumSize))")
        }
        return try readExactly(fd, count: Int(size), at: 0, path: path, purpose: purpose)
    }

    /// `count` bytes from `offset` of `fd`, with `pread` retried on EINTR and short reads.
    public static func readExactly(_ fd: Int32, count: Int, at offset: UInt64, path: String, purpose: String) throws(HostFileError) -> [UInt8] {
        var bytes = [UInt8](repeating: 0, count: count)
        var done = 0
        while done < count {
            let result = bytes.withUnsafeMutableBytes { pread(fd, $0.baseAddress! + done, count - done, off_t(offset) + off_t(done)) }
            if result < 0 && errno == EINTR { continue }
            guard result > 0 else {
                throw HostFileError(path: path, purpose: purpose, reason: result < 0 ? String(cString: strerror(errno)) : "the file shrank while it was read")
            }
            done += result
        }
        return bytes
    }

    static func describe(_ type: mode_t) -> String {
        switch type {
        case S_IFIFO: return "a FIFO"
        case S_IFSOCK: return "a socket"
        case S_IFDIR: return "a directory"
        case S_IFCHR: return "a character device"
        case S_IFBLK: return "a block device"
        case S_IFLNK: return "a symbolic link"
        default: return "not a regular file"
        }
    }

    static func expected(_ kinds: Kinds) -> String {
        var names: [String] = []
        if kinds.contains(.regular) { names.append("a regular file") }
        if kinds.contains(.blockDevice) { names.append("a block device") }
        if kinds.contains(.characterDevice) { names.append("a character device") }
        return names.joined(separator: " or ")
    }
}
