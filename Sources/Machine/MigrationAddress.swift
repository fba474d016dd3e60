import Glibc

/// Where a migration stream goes (the source's `migrate`) or comes from (the target's
/// `--incoming`), named as QEMU names them: `unix:PATH` or `tcp:HOST:PORT`. An empty host
/// listens on every address, and connects to the local host.
public enum MigrationAddress: Sendable, Equatable, CustomStringConvertible {
    case unix(path: String)
    case tcp(host: String, port: UInt16)

    /// Parses `unix:PATH` or `tcp:HOST:PORT` (an IPv6 host in brackets: `tcp:[::1]:4444`).
    public init(parsing text: String) throws(MachineError) {
        let usage = "'\(text)' is not a migration address: use unix:PATH or tcp:HOST:PORT"
        if text.hasPrefix("unix:") {
            let path = String(text.dropFirst(5))
            guard !path.isEmpty, path.utf8.count < 108, !path.utf8.contains(0) else {
                throw .invalidConfiguration("\(usage) (a Unix socket path has 1 to 107 bytes)")
            }
            self = .unix(path: path)
        } else if text.hasPrefix("tcp:") {
            let rest = text.dropFirst(4)
            guard let colon = rest.lastIndex(of: ":"), let port = UInt16(rest[rest.index(after: colon)...]), port > 0 else {
                throw .invalidConfiguration("\(usage) (the port is a number from 1 to 65535)")
            }
            var host = String(rest[..<colon])
            if host.hasPrefix("["), host.hasSuffix("]") { host = String(host.dropFirst().dropLast()) }
            self = .tcp(host: host, port: port)
        } else {
            throw .invalidConfiguration(usage)
        }
    }

    public var description: String {
        switch self {
        case let .unix(path): return "unix:\(path)"
        case let .tcp(host, port): return host.contains(":") ? "tcp:[\(host)]:\(port)" : "tcp:\(host):\(port)"
        }
    }
}

/// A failed step of a migration, in one line.
struct MigrationFailure: Error, CustomStringConvertible {
    let description: String
    init(_ description: String) { self.description = description }

    static func system(_ what: String, _ code: Int32 = errno) -> MigrationFailure {
        MigrationFailure("\(what): \(String(cString: strerror(code)))")
    }
}

/// The sockets of a migration: connecting (source), listening and accepting one
/// connection (target). Blocking sockets, used by one thread each.
enum MigrationSocket {
    /// Connects to `address`.
    static func connect(_ address: MigrationAddress) throws(MigrationFailure) -> Int32 {
        switch address {
        case let .unix(path):
            let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
            guard fd >= 0 else { throw .system("socket") }
            var socketAddress = unixAddress(path)
            let result = withUnsafePointer(to: &socketAddress) {
                $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { Glibc.connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
            }
            guard result == 0 else {
                let code = errno
                close(fd)
                throw .system("cannot connect to \(address)", code)
            }
            return fd
        case let .tcp(host, port):
            return try withAddresses(host.isEmpty ? "localhost" : host, port, passive: false) { (info) throws(MigrationFailure) -> Int32 in
                let fd = socket(info.ai_family, info.ai_socktype | Int32(SOCK_CLOEXEC.rawValue), info.ai_protocol)
                guard fd >= 0 else { throw .system("socket") }
                guard Glibc.connect(fd, info.ai_addr, info.ai_addrlen) == 0 else {
                    let code = errno
                    close(fd)
                    throw .system("cannot connect to \(address)", code)
                }
                var one: Int32 = 1
                setsockopt(fd, Int32(IPPROTO_TCP), TCP_NODELAY, &one, socklen_t(MemoryLayout<Int32>.size))
                return fd
            }
        }
    }

    /// A socket listening on `address`. A Unix socket left behind by an earlier target is
    /// replaced; any other file at the path is refused.
    static func listen(_ address: MigrationAddress) throws(MigrationFailure) -> Int32 {
        switch address {
        case let .unix(path):
            var status = stat()
            if lstat(path, &status) == 0 {
                guard status.st_mode & S_IFMT == S_IFSOCK else { throw MigrationFailure("cannot listen on \(address): the path exists and is not a socket") }
                unlink(path)
            }
            let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
            guard fd >= 0 else { throw .system("socket") }
            var socketAddress = unixAddress(path)
            let bound = withUnsafePointer(to: &socketAddress) {
                $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
            }
            guard bound == 0, Glibc.listen(fd, 1) == 0 else {
                let code = errno
                close(fd)
                throw .system("cannot listen on \(address)", code)
            }
            return fd
        case let .tcp(host, port):
            return try withAddresses(host.isEmpty ? nil : host, port, passive: true) { (info) throws(MigrationFailure) -> Int32 in
                let fd = socket(info.ai_family, info.ai_socktype | Int32(SOCK_CLOEXEC.rawValue), info.ai_protocol)
                guard fd >= 0 else { throw .system("socket") }
                var one: Int32 = 1
                setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, socklen_t(MemoryLayout<Int32>.size))
                guard bind(fd, info.ai_addr, info.ai_addrlen) == 0, Glibc.listen(fd, 1) == 0 else {
                    let code = errno
                    close(fd)
                    throw .system("cannot listen on \(address)", code)
                }
                return fd
            }
        }
    }

    /// Waits for one connection on `listener`.
    static func accept(_ listener: Int32) throws(MigrationFailure) -> Int32 {
        while true {
            let fd = Glibc.accept(listener, nil, nil)
            if fd >= 0 {
                _ = fcntl(fd, F_SETFD, FD_CLOEXEC)
                var one: Int32 = 1
                setsockopt(fd, Int32(IPPROTO_TCP), TCP_NODELAY, &one, socklen_t(MemoryLayout<Int32>.size))
                return fd
            }
            if errno == EINTR || errno == ECONNABORTED { continue }
            throw .system("accept")
        }
    }

    /// Makes a receive on `fd` fail after `seconds` without data (a peer that hangs).
    static func setReceiveTimeout(_ fd: Int32, seconds: Int) {
        var value = timeval(tv_sec: seconds, tv_usec: 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &value, socklen_t(MemoryLayout<timeval>.size))
        setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &value, socklen_t(MemoryLayout<timeval>.size))
    }

    static func unixAddress(_ path: String) -> sockaddr_un {
        var address = sockaddr_un()
        address.sun_family = sa_family_t(AF_UNIX)
        withUnsafeMutableBytes(of: &address.sun_path) { buffer in
            for (index, byte) in path.utf8.prefix(buffer.count - 1).enumerated() { buffer[index] = byte }
        }
        return address
    }

    /// Tries `body` on each address `host` resolves to, returning the first success.
    private static func withAddresses(_ host: String?, _ port: UInt16, passive: Bool,
                                      _ body: (addrinfo) throws(MigrationFailure) -> Int32) throws(MigrationFailure) -> Int32 {
        var hints = addrinfo()
        hints.ai_family = AF_UNSPEC
        hints.ai_socktype = Int32(SOCK_STREAM.rawValue)
        hints.ai_flags = passive ? AI_PASSIVE : 0
        var list: UnsafeMutablePointer<addrinfo>?
        let result = getaddrinfo(host, String(port), &hints, &list)
        guard result == 0, let first = list else {
            throw MigrationFailure("cannot resolve '\(host ?? "*")': \(String(cString: gai_strerror(result)))")
        }
        defer { freeaddrinfo(first) }
        var lastError = MigrationFailure("no address for '\(host ?? "*")'")
        var current: UnsafeMutablePointer<addrinfo>? = first
        while let info = current {
            do throws(MigrationFailure) {
                return try body(info.pointee)
            } catch {
                lastError = error
            }
            current = info.pointee.ai_next
        }
        throw lastError
    }
}
