import FoundationEssentials
import Glibc

/// Which host paths an API client may name (kernels, drives, snapshot files, log and
/// metrics outputs). A client of the socket is less trusted than the user who started
/// Swiftlet: it may not point Swiftlet at the kernel's own interfaces (/proc, /sys) or at
/// device nodes, and a path is judged after `..` and symbolic links are resolved, so
/// `/tmp/link -> /proc/self/mem` is refused too. With ``root``, every path must lie
/// beneath that directory (a chroot-like confinement, like Firecracker's jailer).
public struct PathPolicy: Sendable, Equatable {
    /// Everything must resolve beneath this directory, when set.
    public var root: String?
    /// Resolved prefixes that are always refused.
    public var denied: [String] = ["/proc", "/sys", "/dev"]

    public init(root: String? = nil) { self.root = root }

    /// Throws when `path` (for the field `field`) is empty, too long, has a NUL, or
    /// resolves somewhere the policy refuses.
    public func check(_ path: String, _ field: String) throws(APIError) {
        guard !path.isEmpty else { throw APIError("\(field) is empty") }
        guard path.utf8.count < 4096, !path.utf8.contains(0) else {
            throw APIError("\(field) must be shorter than 4096 bytes and have no NUL")
        }
        let resolved = Self.resolve(path)
        for prefix in denied where Self.isBeneath(resolved, prefix) {
            throw APIError("\(field) `\(path)` is outside what Swiftlet may open (\(prefix))")
        }
        if let root, !Self.isBeneath(resolved, Self.resolve(root)) {
            throw APIError("\(field) `\(path)` is outside \(root)")
        }
    }

    /// The absolute path with `.`/`..` removed and symbolic links of the longest existing
    /// prefix resolved (a file that does not exist yet is judged by its directory).
    static func resolve(_ path: String) -> String {
        let absolute = path.hasPrefix("/") ? path : FileManager.default.currentDirectoryPath + "/" + path
        // `.` and `..` removed lexically (`..` at the root stays at the root).
        var components: [String] = []
        for part in absolute.split(separator: "/") {
            if part == "." { continue }
            if part == ".." { _ = components.popLast(); continue }
            components.append(String(part))
        }
        var rest: [String] = []
        var existing = "/" + components.joined(separator: "/")
        while existing != "/" && !FileManager.default.fileExists(atPath: existing) {
            rest.insert(components.removeLast(), at: 0)
            existing = "/" + components.joined(separator: "/")
        }
        var resolvedBase = existing
        if let real = realpath(existing, nil) {
            resolvedBase = String(cString: real)
            free(real)
        }
        guard !rest.isEmpty else { return resolvedBase }
        return (resolvedBase == "/" ? "" : resolvedBase) + "/" + rest.joined(separator: "/")
    }

    static func isBeneath(_ path: String, _ prefix: String) -> Bool {
        prefix == "/" || path == prefix || path.hasPrefix(prefix.hasSuffix("/") ? prefix : prefix + "/")
    }
}
