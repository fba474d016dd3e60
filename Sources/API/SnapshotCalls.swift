import SwiftletKit

/// `PUT /snapshot/create` and `PUT /snapshot/load` on SwiftletKit: Firecracker's two
/// paths (`snapshot_path`, the state; `mem_file_path`, guest RAM) are SwiftletKit's
/// ``SnapshotPaths``.
enum SnapshotCalls {
    static func create(vm: VM, statePath: String, memoryPath: String, diff: Bool) throws(APIError) {
        do {
            try vm.snapshot(to: SnapshotPaths(state: statePath, memory: memoryPath), diff: diff)
        } catch {
            throw APIError("Create snapshot error: \(error.message)")
        }
    }

    static func load(statePath: String, memoryPath: String, trackDirtyPages: Bool,
                     prepare: (inout VMConfiguration) -> Void) throws(APIError) -> VM {
        var configuration = VMConfiguration(boot: .snapshot(SnapshotPaths(state: statePath, memory: memoryPath)))
        prepare(&configuration)
        configuration.trackDirtyPages = trackDirtyPages
        do {
            return try VM(configuration)
        } catch {
            throw APIError("Load snapshot error: \(error.message)")
        }
    }
}
