/// Where a snapshot's two files are: the state file (everything but RAM, checked JSON) and
/// the memory file (RAM, byte for byte). `swiftlet` keeps both in one directory
/// (`DIR/state`, `DIR/memory`); Firecracker's API names each file (`snapshot_path`,
/// `mem_file_path`).
public struct SnapshotFiles: Sendable, Equatable, CustomStringConvertible {
    /// The state file.
    public var state: String
    /// The memory file. When restoring, `nil` means the file the state file names (a
    /// relative name is taken from the state file's directory).
    public var memory: String?

    public init(state: String, memory: String?) {
        self.state = state
        self.memory = memory
    }

    /// `directory/state` and `directory/memory`.
    public init(directory: String) {
        let base = directory.hasSuffix("/") && directory.count > 1 ? String(directory.dropLast()) : directory
        self.init(state: "\(base)/\(LoadedSnapshot.stateFileName)", memory: "\(base)/\(LoadedSnapshot.memoryFileName)")
    }

    /// The directory of the state file (`.` for a bare name).
    public var stateDirectory: String { Self.directory(of: state) }

    public var description: String {
        guard let memory else { return state }
        let directory = stateDirectory
        if memory == "\(directory)/\(LoadedSnapshot.memoryFileName)", state == "\(directory)/\(LoadedSnapshot.stateFileName)" {
            return directory
        }
        return "\(state) (memory \(memory))"
    }

    static func directory(of path: String) -> String {
        guard let slash = path.lastIndex(of: "/") else { return "." }
        return slash == path.startIndex ? "/" : String(path[..<slash])
    }

    /// `path` as seen from `directory`: itself when absolute.
    static func resolve(_ path: String, from directory: String) -> String {
        path.hasPrefix("/") || directory == "." ? path : "\(directory)/\(path)"
    }

    /// `path` as a name relative to `directory` when it is inside it, else as given.
    static func relative(_ path: String, to directory: String) -> String {
        let prefix = directory == "/" ? "/" : directory + "/"
        if path.hasPrefix(prefix), !path.dropFirst(prefix.count).contains("/") { return String(path.dropFirst(prefix.count)) }
        if directory == ".", !path.contains("/") { return path }
        return path
    }
}
