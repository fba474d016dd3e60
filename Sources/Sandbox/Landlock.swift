import CSandbox
#if canImport(Glibc)
import Glibc
#endif

/// A path Landlock lets a confined thread open, and how.
public struct LandlockPath: Sendable, Equatable {
    public let path: String
    public let writable: Bool

    public init(_ path: String, writable: Bool = false) {
        self.path = path
        self.writable = writable
    }
}

/// Landlock (Linux 5.13 and later): a second fence, after seccomp, around the files a thread
/// may open. Like seccomp it is per thread and inherited by threads started later. A ruleset
/// handles every file access right the kernel's ABI knows; access is then allowed beneath
/// the given paths only. Files opened before the restriction are not affected.
public enum Landlock {
    /// The kernel's Landlock ABI version, 0 when it has none.
    public static let abiVersion: Int = Int(csandbox_landlock_abi())

    /// Every filesystem access right ABI `version` knows (`LANDLOCK_ACCESS_FS_*`): 13 rights
    /// in ABI 1, REFER in 2, TRUNCATE in 3, IOCTL_DEV in 5.
    static func handledAccess(abi version: Int) -> UInt64 {
        var access: UInt64 = (1 << 13) - 1
        if version >= 2 { access |= 1 << 13 }
        if version >= 3 { access |= 1 << 14 }
        if version >= 5 { access |= 1 << 15 }
        return access
    }

    static let execute: UInt64 = 1 << 0, writeFile: UInt64 = 1 << 1, readFile: UInt64 = 1 << 2, readDirectory: UInt64 = 1 << 3
    static let truncate: UInt64 = 1 << 14, ioctlDevice: UInt64 = 1 << 15

    /// Restricts the calling thread (`no_new_privs` must be set) to `paths`. A path that
    /// cannot be opened is an error: the fence would otherwise silently shut it out.
    static func restrictCallingThread(allowing paths: [LandlockPath]) throws(SandboxError) {
        let handled = handledAccess(abi: abiVersion)
        let ruleset = csandbox_landlock_create_ruleset(handled)
        guard ruleset >= 0 else { throw SandboxError(description: "landlock_create_ruleset: \(Sandbox.errorText(errno))") }
        defer { close(ruleset) }
        for entry in paths {
            let fd = csandbox_open_path(entry.path)
            guard fd >= 0 else { throw SandboxError(description: "Landlock: cannot open \(entry.path): \(Sandbox.errorText(errno))") }
            defer { close(fd) }
            var status = stat()
            let isDirectory = fstat(fd, &status) == 0 && (status.st_mode & S_IFMT) == S_IFDIR
            var access = readFile | (isDirectory ? readDirectory : 0)
            if entry.writable { access |= writeFile | (abiVersion >= 3 ? truncate : 0) }
            if (status.st_mode & S_IFMT) == S_IFCHR, abiVersion >= 5 { access |= ioctlDevice }
            let result = csandbox_landlock_allow_path(ruleset, fd, access & handled)
            guard result == 0 else { throw SandboxError(description: "landlock_add_rule \(entry.path): \(Sandbox.errorText(result))") }
        }
        let result = csandbox_landlock_restrict_self(ruleset)
        guard result == 0 else { throw SandboxError(description: "landlock_restrict_self: \(Sandbox.errorText(result))") }
    }
}
