import Basics
import FoundationEssentials
import Glibc
import KVM
import Memory
import Snapshot
import X86

/// The receiving side of a migration (`swiftlet run --incoming ADDRESS`): waits for one
/// source, checks the machine it offers against this one, takes RAM into fresh guest
/// memory while the source's guest still runs, then the state. ``Machine`` builds itself
/// from what arrived and calls ``complete()``: the target says it is ready and runs only
/// once the source commits.
final class IncomingMigration {
    let address: MigrationAddress
    let hello: MigrationHello
    let memory: GuestMemory
    let manifest: SnapshotManifest
    /// Pages received with data, and as zero counts.
    let pagesReceived: Int
    private let channel: MigrationChannel

    private init(address: MigrationAddress, hello: MigrationHello, memory: GuestMemory, manifest: SnapshotManifest,
                 pagesReceived: Int, channel: MigrationChannel) {
        self.address = address
        self.hello = hello
        self.memory = memory
        self.manifest = manifest
        self.pagesReceived = pagesReceived
        self.channel = channel
    }

    /// Listens on `address`, accepts one source and receives the VM up to its state.
    /// `report` gets a line when the target listens (people, and tests, wait for it).
    static func receive(at address: MigrationAddress, configuration: MachineConfiguration,
                        report: (@Sendable (String) -> Void)?) throws(MachineError) -> IncomingMigration {
        let channel: MigrationChannel
        do {
            let listener = try MigrationSocket.listen(address)
            report?("waiting for a migration on \(address)")
            let accepted: Int32
            do {
                accepted = try MigrationSocket.accept(listener)
            } catch {
                close(listener)
                throw error
            }
            close(listener)
            if case let .unix(path) = address { unlink(path) }
            report?("receiving a VM on \(address)")
            channel = MigrationChannel(fd: accepted)
            MigrationSocket.setReceiveTimeout(accepted, seconds: Machine.migrationPeerTimeout)
        } catch {
            throw .migration("\(error)")
        }
        do {
            let first = try channel.receive()
            guard first.kind == .hello else { throw MigrationFailure("the source began with a \(first.kind) frame, not a hello") }
            let hello: MigrationHello
            do { hello = try JSONDecoder().decode(MigrationHello.self, from: Data(first.payload)) } catch {
                throw MigrationFailure("the source's hello does not decode: \(LoadedSnapshot.describe(error))")
            }
            if let problem = incompatibility(of: hello, with: configuration) {
                try? channel.send(.refuse, bytes: Array(problem.utf8))
                throw MigrationFailure("refused the incoming VM: \(problem)")
            }
            let memory: GuestMemory
            do { memory = try GuestMemory(size: hello.machine.memorySize, transparentHugePages: configuration.transparentHugePages) } catch {
                try? channel.send(.refuse, bytes: Array("the target cannot allocate the guest's RAM: \(error)".utf8))
                throw MigrationFailure("cannot allocate the guest's RAM: \(error)")
            }
            try channel.send(.accept, bytes: [])
            let (manifest, pages) = try receiveMemory(into: memory, from: channel)
            return IncomingMigration(address: address, hello: hello, memory: memory, manifest: manifest, pagesReceived: pages, channel: channel)
        } catch {
            throw .migration("\(error)")
        }
    }

    /// Takes `pages` and `zeroPages` frames into `memory` until the state arrives.
    private static func receiveMemory(into memory: GuestMemory, from channel: MigrationChannel) throws(MigrationFailure) -> (SnapshotManifest, Int) {
        let pageSize = Int(GuestMemory.pageSize)
        let zeros = [UInt8](repeating: 0, count: MigrationChannel.pagesPerFrame * pageSize)
        var pages = 0
        while true {
            let frame = try channel.receive()
            let payload = Array(frame.payload)
            switch frame.kind {
            case .pages:
                guard payload.count > 8, (payload.count - 8) % pageSize == 0, let first = payload.le(UInt64.self, at: 0),
                      let start = Int(exactly: first) else {
                    throw MigrationFailure("a pages frame of \(payload.count) bytes is not a page number and whole pages")
                }
                let failure = payload.withUnsafeBytes { (bytes) -> GuestMemoryError? in
                    do throws(GuestMemoryError) { try memory.storePages(UnsafeRawBufferPointer(rebasing: bytes[8...]), at: start) } catch { return error }
                    return nil
                }
                if let failure { throw MigrationFailure("the source sent pages outside guest RAM: \(failure)") }
                pages += (payload.count - 8) / pageSize
            case .zeroPages:
                guard payload.count == 16, let first = payload.le(UInt64.self, at: 0), let count = payload.le(UInt64.self, at: 8),
                      let start = Int(exactly: first), let total = Int(exactly: count), total <= MigrationChannel.pagesPerFrame else {
                    throw MigrationFailure("a zero-pages frame is malformed")
                }
                let failure = zeros.withUnsafeBytes { (bytes) -> GuestMemoryError? in
                    do throws(GuestMemoryError) {
                        try memory.storePages(UnsafeRawBufferPointer(rebasing: bytes[0..<(total * pageSize)]), at: start)
                    } catch { return error }
                    return nil
                }
                if let failure { throw MigrationFailure("the source sent zero pages outside guest RAM: \(failure)") }
                pages += total
            case .state:
                let manifest: SnapshotManifest
                do { manifest = try JSONDecoder().decode(SnapshotManifest.self, from: Data(payload)) } catch {
                    throw MigrationFailure("the VM's state does not decode: \(LoadedSnapshot.describe(error))")
                }
                guard manifest.format <= SnapshotEnvelope.currentVersion else {
                    throw MigrationFailure("the VM's state is in format \(manifest.format), newer than this Swiftlet reads (\(SnapshotEnvelope.currentVersion))")
                }
                do { try LoadedSnapshot.checkShape(manifest) } catch { throw MigrationFailure("the VM's state: \(error)") }
                guard manifest.memory.size == memory.size else {
                    throw MigrationFailure("the VM's state has \(manifest.memory.size) bytes of RAM, the hello \(memory.size)")
                }
                return (manifest, pages)
            case .failure:
                throw MigrationFailure(String(decoding: payload, as: UTF8.self))
            default:
                throw MigrationFailure("unexpected \(frame.kind) frame while receiving RAM")
            }
        }
    }

    /// Why this target cannot take the machine `hello` offers, or `nil`. The target was
    /// started with the source's machine options; RAM, vCPUs, transport and disks must agree.
    static func incompatibility(of hello: MigrationHello, with configuration: MachineConfiguration) -> String? {
        guard hello.protocolVersion <= MigrationHello.currentProtocol else {
            return "the source speaks migration protocol \(hello.protocolVersion), newer than this Swiftlet's (\(MigrationHello.currentProtocol))"
        }
        let machine = hello.machine
        guard machine.memorySize == configuration.memorySize else {
            return "the source's VM has \(ByteSize.exact(machine.memorySize)) of RAM, this target \(ByteSize.exact(configuration.memorySize)) "
                + "(start the target with the source's --memory)"
        }
        guard machine.memorySize > 0, machine.memorySize % GuestMemory.pageSize == 0, machine.memorySize <= GuestMemory.maximumSize else {
            return "\(machine.memorySize) bytes is not a size guest RAM can have"
        }
        guard machine.cpuCount == configuration.cpuCount else {
            return "the source's VM has \(machine.cpuCount) vCPUs, this target \(configuration.cpuCount) (start the target with the source's --cpus)"
        }
        guard machine.virtioTransport == configuration.virtioTransport.rawValue else {
            return "the source's VM uses the \(machine.virtioTransport) transport, this target \(configuration.virtioTransport.rawValue)"
        }
        let disks = configuration.disks.map(\.path)
        guard machine.disks.map(\.path) == disks, machine.disks.map(\.readOnly) == configuration.disks.map(\.readOnly) else {
            // On one host the paths name the same files: the source hands each writable
            // image's lock over just before it sends the state.
            return "the source's VM has the disks [\(machine.disks.map(\.path).joined(separator: ", "))], this target "
                + "[\(disks.joined(separator: ", "))] (give the target the same --disk options)"
        }
        guard configuration.networks.isEmpty else { return "this target has network interfaces; migrating them is not supported yet" }
        do {
            let table = CPUIDTable(try KVMSystem(path: configuration.kvmPath).supportedCPUID())
            let missing = hello.cpuFeatures.filter { name in
                guard let feature = CPUFeature.named(name) else { return true }
                return !feature.isManaged && !table.has(feature.location)
            }
            guard missing.isEmpty else { return "this host's KVM lacks CPU features the guest was given: \(missing.joined(separator: ", "))" }
        } catch {
            return "the target cannot use KVM: \(error)"
        }
        return nil
    }

    /// Puts the received state into the new machine's KVM VM, vCPUs and devices.
    func restore(vm: VirtualMachine, vcpus: [VCPU], board: Board) throws(MachineError) {
        do {
            try manifest.vm.restore(into: vm)
            for (vcpu, saved) in zip(vcpus, manifest.vcpus) { try saved.restore(into: vcpu) }
        } catch {
            throw .migration("restoring the VM's state: \(error.description)")
        }
        try board.restoreDeviceState(manifest.devices)
    }

    /// Tells the source this target failed (it then resumes its VM).
    func fail(_ reason: String) {
        try? channel.send(.failure, bytes: Array(reason.utf8))
    }

    /// Says the VM is restored and waits for the source's commit: only then may this VM run
    /// (the source has stopped its copy). Without a commit the target must not run.
    func complete() throws(MachineError) {
        do {
            try channel.send(.ready, bytes: [])
            let answer = try channel.receive()
            switch answer.kind {
            case .commit: return
            case .failure: throw MigrationFailure(String(decoding: answer.payload, as: UTF8.self))
            default: throw MigrationFailure("the source answered 'ready' with a \(answer.kind) frame")
            }
        } catch {
            throw .migration("the source did not commit the migration (\(error)); the VM does not run here")
        }
    }
}
