import Foundation
import SwiftletKit

/// Firecracker names a snapshot's two files separately (`snapshot_path` for the state,
/// `mem_file_path` for guest RAM); SwiftletKit writes and reads a snapshot directory
/// holding `state` and `memory`. This adapts one to the other: create writes the
/// directory beside `snapshot_path` and moves the two files into place; load links the
/// two files into a private directory and restores from it.
enum SnapshotFiles {
    static let stateName = "state"
    static let memoryName = "memory"

    static func create(vm: VM, statePath: String, memoryPath: String) throws(APIError) {
        let stateURL = URL(fileURLWithPath: statePath)
        let directory = stateURL.deletingLastPathComponent()
            .appendingPathComponent(".swiftlet-snapshot-\(getpid())-\(UUID().uuidString.prefix(8))").path
        defer { try? FileManager.default.removeItem(atPath: directory) }
        do {
            try vm.snapshot(to: directory)
        } catch {
            throw APIError("Create snapshot error: \(error.message)")
        }
        for (name, target) in [(stateName, statePath), (memoryName, memoryPath)] {
            if rename("\(directory)/\(name)", target) != 0 {
                let reason = String(cString: strerror(errno))
                throw APIError("Create snapshot error: cannot move the \(name) file to `\(target)`: \(reason)"
                               + (errno == EXDEV ? " (snapshot_path and mem_file_path must be on one file system)" : ""))
            }
        }
    }

    static func load(statePath: String, memoryPath: String, prepare: (inout VMConfiguration) -> Void) throws(APIError) -> VM {
        for (path, field) in [(statePath, "snapshot_path"), (memoryPath, "mem_file_path")] {
            var status = stat()
            guard stat(path, &status) == 0 else {
                throw APIError("Load snapshot error: cannot open \(field) `\(path)`: \(String(cString: strerror(errno)))")
            }
            guard (status.st_mode & S_IFMT) == S_IFREG else { throw APIError("Load snapshot error: \(field) `\(path)` is not a regular file") }
        }
        let directory = FileManager.default.temporaryDirectory
            .appendingPathComponent("swiftlet-restore-\(getpid())-\(UUID().uuidString.prefix(8))").path
        defer { try? FileManager.default.removeItem(atPath: directory) }
        do {
            try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: false,
                                                    attributes: [.posixPermissions: 0o700])
            try FileManager.default.createSymbolicLink(atPath: "\(directory)/\(stateName)", withDestinationPath: PathPolicy.resolve(statePath))
            try FileManager.default.createSymbolicLink(atPath: "\(directory)/\(memoryName)", withDestinationPath: PathPolicy.resolve(memoryPath))
        } catch {
            throw APIError("Load snapshot error: \(error.localizedDescription)")
        }
        var configuration = VMConfiguration(boot: .snapshot(directory: directory))
        prepare(&configuration)
        do {
            return try VM(configuration)
        } catch {
            throw APIError("Load snapshot error: \(error.message)")
        }
    }
}
