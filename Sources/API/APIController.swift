import Basics
import FoundationEssentials
import Glibc
import Logging
import Synchronization
import SwiftletKit

/// One HTTP request as the API sees it: no sockets, so tests drive it directly.
public struct APIRequest: Sendable {
    public var method: String
    public var path: String
    public var body: [UInt8]
    public init(method: String, path: String, body: [UInt8] = []) {
        self.method = method
        self.path = path
        self.body = body
    }
}

/// An answer: 204 with no body, 200 with JSON, 400 with `{"fault_message": ...}`.
public struct APIResponse: Sendable, Equatable {
    public var status: Int
    public var body: [UInt8]

    public static let noContent = APIResponse(status: 204, body: [])

    public static func json(_ value: some Encodable) -> APIResponse {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys, .withoutEscapingSlashes]
        return APIResponse(status: 200, body: Array((try? encoder.encode(value)) ?? Data("{}".utf8)))
    }

    public static func fault(_ message: String, status: Int = 400) -> APIResponse {
        APIResponse(status: status, body: Array((try? JSONEncoder().encode(["fault_message": message])) ?? Data()))
    }

    /// The fault message of a 4xx/5xx answer.
    public var faultMessage: String? {
        (try? JSONDecoder().decode([String: String].self, from: Data(body)))?["fault_message"]
    }
}

/// Firecracker's API over one Swiftlet VM: the resources configured before boot, the
/// rules for what may be called in which state, and the VM's life (start, pause,
/// resume, snapshot, load). Requests are handled one at a time (a lock serializes them);
/// a call that waits (pause waits for the vCPUs to park) holds up only other API calls,
/// never a vCPU, which takes no lock of the controller's.
public final class APIController: Sendable {
    /// Where the VM is, in Firecracker's terms.
    enum Phase {
        /// Configuring: no VM yet ("Not started").
        case notStarted
        /// Running on the runner thread.
        case running(VM)
        /// Paused. `started` is false for a snapshot loaded without `resume_vm`: resuming
        /// starts its runner thread.
        case paused(VM, started: Bool)
        /// The guest stopped (the process is about to exit).
        case stopped
    }

    struct State {
        var phase: Phase = .notStarted
        var machine = MachineConfig.defaults
        var bootSource: BootSource?
        var drives: [Drive] = []
        var networks: [NetworkInterface] = []
        /// Something other than logger and metrics was configured: a snapshot may no
        /// longer be loaded into this process.
        var configured = false
        var restored = false
    }

    private let state = Mutex(State())
    public let instanceID: String
    public let paths: PathPolicy
    public let logSink: LogSink
    public let metrics: MetricsRecorder
    private let logger: Logger
    /// Options applied to the VM when it is built (console, warnings): the front end's.
    private let prepare: @Sendable (inout VMConfiguration) -> Void
    /// Called on the runner thread when the VM stops, with its result or failure.
    private let onExit: @Sendable (Result<VMResult, SwiftletError>) -> Void

    public static let version = "1.10.0"
    public static let appName = "Firecracker"

    public init(instanceID: String = "anonymous-instance", paths: PathPolicy = PathPolicy(),
                prepare: @escaping @Sendable (inout VMConfiguration) -> Void = { _ in },
                onExit: @escaping @Sendable (Result<VMResult, SwiftletError>) -> Void = { _ in }) {
        self.instanceID = instanceID
        self.paths = paths
        self.logSink = LogSink(instanceID: instanceID)
        self.metrics = MetricsRecorder(instanceID: instanceID)
        self.logger = logSink.makeLogger(label: "api_server")
        self.prepare = prepare
        self.onExit = onExit
    }

    /// Firecracker's `state` string for `GET /`.
    public var stateName: String {
        state.withLock { s in
            switch s.phase {
            case .notStarted: return "Not started"
            case .running: return "Running"
            case .paused: return "Paused"
            case .stopped: return "Not started"
            }
        }
    }

    // MARK: - Requests

    /// Handles one request; never throws and never traps on any input.
    public func handle(_ request: APIRequest) -> APIResponse {
        let path = request.path.split(separator: "?", maxSplits: 1, omittingEmptySubsequences: false).first.map(String.init) ?? ""
        let parts = path.split(separator: "/", omittingEmptySubsequences: true).map(String.init)
        let endpoint = Self.metricName(parts)
        let group = "\(request.method.lowercased())_api_requests"
        metrics.count(group, "\(endpoint)_count")
        logger.info("The API server received a \(request.method.capitalized) request on \"\(path.prefix(200))\".")
        let response: APIResponse
        do {
            response = try route(method: request.method, parts: parts, body: request.body)
        } catch {
            metrics.count(group, "\(endpoint)_fails")
            logger.info("Received Error. Status code: 400 Bad Request. Message: \(error.message)")
            return .fault(error.message)
        }
        return response
    }

    static func metricName(_ parts: [String]) -> String {
        switch parts.first {
        case nil: return "instance_info"
        case "machine-config": return "machine_cfg"
        case "boot-source": return "boot_source"
        case "drives": return "drive"
        case "network-interfaces": return "network"
        case "snapshot": return parts.count > 1 && parts[1] == "load" ? "load_snapshot" : "create_snapshot"
        case "vm": return parts.count > 1 ? "vmm_config" : "vm"
        case let other?: return String(other.prefix(32).map { $0.isLetter || $0.isNumber ? $0 : "_" })
        }
    }

    private func route(method: String, parts: [String], body: [UInt8]) throws(APIError) -> APIResponse {
        func invalid() -> APIError {
            APIError("Invalid request method and/or path: \(method) /\(parts.joined(separator: "/").prefix(200)).")
        }
        switch (method, parts.count, parts.first) {
        case ("GET", 0, _):
            return .json(InstanceInfo(appName: Self.appName, id: instanceID, state: stateName, vmmVersion: Self.version))
        case ("GET", 1, "version"):
            return .json(VersionInfo(firecrackerVersion: Self.version))
        case ("GET", 1, "machine-config"):
            return .json(state.withLock { $0.machine })
        case ("PUT", 1, "machine-config"):
            let config = try decode(MachineConfig.self, body, method)
            try config.validate()
            try preBoot { $0.machine = config }
            return .noContent
        case ("PATCH", 1, "machine-config"):
            let update = try decode(MachineConfigUpdate.self, body, method)
            guard !update.isEmpty else { throw APIError("Empty PATCH request.") }
            try preBoot { (s) throws(APIError) in
                let config = update.applied(to: s.machine)
                try config.validate()
                s.machine = config
            }
            return .noContent
        case ("PUT", 1, "boot-source"):
            let source = try decode(BootSource.self, body, method)
            try source.validate(paths: paths)
            try preBoot { $0.bootSource = source }
            return .noContent
        case ("PUT", 2, "drives"):
            var drive = try decode(Drive.self, body, method)
            try checkPathID(parts[1], drive.driveId)
            try drive.validate(paths: paths)
            if drive.isReadOnly == nil { drive.isReadOnly = false }
            try preBoot { (s) throws(APIError) in
                if drive.isRootDevice, s.drives.contains(where: { $0.isRootDevice && $0.driveId != drive.driveId }) {
                    throw APIError("A root block device already exists!")
                }
                if let index = s.drives.firstIndex(where: { $0.driveId == drive.driveId }) {
                    s.drives[index] = drive
                } else {
                    guard s.drives.count < 16 else { throw APIError("Too many drives (Swiftlet takes at most 16)") }
                    s.drives.append(drive)
                }
            }
            return .noContent
        case ("PATCH", 2, "drives"):
            let update = try decode(PartialDrive.self, body, method)
            try checkPathID(parts[1], update.driveId)
            try update.rateLimiter?.validate("rate_limiter")
            let (vm, index) = try postBoot { (s) throws(APIError) -> Int in
                // The VM's disk index: the root drive first, as VMMapping orders them.
                guard let index = VMMapping.ordered(s.drives).firstIndex(where: { $0.driveId == update.driveId }) else {
                    throw APIError("Invalid block device ID: \(update.driveId)")
                }
                return index
            }
            if let path = update.pathOnHost {
                try paths.check(path, "path_on_host")
                throw APIError.notSupported("changing a running drive's backing file (path_on_host)")
            }
            guard update.rateLimiter != nil else { return .noContent }
            try VMMapping.updateRateLimiters(vm: vm, driveIndex: index, networkIndex: nil, limiter: update.rateLimiter, rx: nil, tx: nil)
            state.withLock { s in
                if let stored = s.drives.firstIndex(where: { $0.driveId == update.driveId }) { s.drives[stored].rateLimiter = update.rateLimiter }
            }
            return .noContent
        case ("PUT", 2, "network-interfaces"):
            let interface = try decode(NetworkInterface.self, body, method)
            try checkPathID(parts[1], interface.ifaceId)
            try interface.validate()
            try preBoot { (s) throws(APIError) in
                if s.networks.contains(where: { $0.ifaceId != interface.ifaceId && $0.hostDevName == interface.hostDevName }) {
                    throw APIError("The host device `\(interface.hostDevName)` is already used by another network interface")
                }
                if let mac = interface.guestMac, s.networks.contains(where: { $0.ifaceId != interface.ifaceId && $0.guestMac?.lowercased() == mac.lowercased() }) {
                    throw APIError("The guest MAC address \(mac) is already in use.")
                }
                if let index = s.networks.firstIndex(where: { $0.ifaceId == interface.ifaceId }) {
                    s.networks[index] = interface
                } else {
                    guard s.networks.count < 16 else { throw APIError("Too many network interfaces (Swiftlet takes at most 16)") }
                    s.networks.append(interface)
                }
            }
            return .noContent
        case ("PATCH", 2, "network-interfaces"):
            let update = try decode(PartialNetworkInterface.self, body, method)
            try checkPathID(parts[1], update.ifaceId)
            try update.rxRateLimiter?.validate("rx_rate_limiter")
            try update.txRateLimiter?.validate("tx_rate_limiter")
            let (vm, index) = try postBoot { (s) throws(APIError) -> Int in
                guard let index = s.networks.firstIndex(where: { $0.ifaceId == update.ifaceId }) else {
                    throw APIError("Invalid network interface ID: \(update.ifaceId)")
                }
                return index
            }
            guard update.rxRateLimiter != nil || update.txRateLimiter != nil else { return .noContent }
            try VMMapping.updateRateLimiters(vm: vm, driveIndex: nil, networkIndex: index, limiter: nil,
                                             rx: update.rxRateLimiter, tx: update.txRateLimiter)
            state.withLock { s in
                if let rx = update.rxRateLimiter { s.networks[index].rxRateLimiter = rx }
                if let tx = update.txRateLimiter { s.networks[index].txRateLimiter = tx }
            }
            return .noContent
        case ("PUT", 1, "actions"):
            let action = try decode(InstanceAction.self, body, method)
            switch action.actionType {
            case .instanceStart: try start()
            case .flushMetrics:
                guard flushMetrics() else { throw APIError("Cannot flush metrics: the metrics system is not initialized (PUT /metrics first).") }
            case .sendCtrlAltDel:
                _ = try postBoot { _ in 0 }
                throw APIError.notSupported("SendCtrlAltDel (Swiftlet's i8042 has no keyboard to send it through)")
            }
            return .noContent
        case ("PATCH", 1, "vm"):
            let request = try decode(VMStateRequest.self, body, method)
            switch request.state {
            case .paused: try pause()
            case .resumed: try resume()
            }
            return .noContent
        case ("PUT", 2, "snapshot") where parts[1] == "create":
            let params = try decode(SnapshotCreateParams.self, body, method)
            try createSnapshot(params)
            return .noContent
        case ("PUT", 2, "snapshot") where parts[1] == "load":
            let params = try decode(SnapshotLoadParams.self, body, method)
            try loadSnapshot(params)
            return .noContent
        case ("GET", 2, "vm") where parts[1] == "config":
            return .json(fullConfiguration())
        case ("PUT", 1, "logger"):
            let config = try decode(LoggerConfig.self, body, method)
            try logSink.configure(config, paths: paths)
            return .noContent
        case ("PUT", 1, "metrics"):
            let config = try decode(MetricsConfig.self, body, method)
            try metrics.configure(config, paths: paths)
            return .noContent
        case (_, _, "balloon"?), (_, _, "vsock"?), (_, _, "mmds"?), (_, _, "entropy"?), (_, _, "cpu-config"?),
             (_, _, "pmem"?), (_, _, "serial"?), (_, _, "hotplug"?):
            throw APIError.notSupported("`/\(parts[0])` (Swiftlet has no such device)")
        default:
            throw invalid()
        }
    }

    private func decode<T: Decodable>(_ type: T.Type, _ body: [UInt8], _ method: String) throws(APIError) -> T {
        guard !body.isEmpty else { throw APIError("Empty \(method) request.") }
        do {
            return try JSONDecoder().decode(T.self, from: Data(body))
        } catch let error as DecodingError {
            throw APIError("An error occurred when deserializing the json body of a request: \(error.summary).")
        } catch {
            throw APIError("An error occurred when deserializing the json body of a request: \(error)")
        }
    }

    private func checkPathID(_ pathID: String, _ bodyID: String) throws(APIError) {
        try validateID(pathID)
        guard pathID == bodyID else { throw APIError("The id from the path [\(pathID)] does not match the id from the body [\(bodyID)]!") }
    }

    /// Runs `change` if no VM was started yet (or loaded), else Firecracker's post-boot error.
    private func preBoot(_ change: (inout State) throws(APIError) -> Void) throws(APIError) {
        try state.withLock { (s) throws(APIError) in
            guard case .notStarted = s.phase else { throw .notSupportedPostBoot }
            try change(&s)
            s.configured = true
        }
    }

    /// The running or paused VM and `find`'s answer, or Firecracker's pre-boot error.
    private func postBoot<T>(_ find: (State) throws(APIError) -> T) throws(APIError) -> (VM, T) {
        try state.withLock { (s) throws(APIError) -> (VM, T) in
            switch s.phase {
            case .notStarted: throw .notSupportedPreBoot
            case .stopped: throw APIError("The microVM has stopped.")
            case let .running(vm), let .paused(vm, _): return (vm, try find(s))
            }
        }
    }

    // MARK: - Life

    /// `InstanceStart`: builds the VM from the configured resources and starts it.
    public func start() throws(APIError) {
        try state.withLock { (s) throws(APIError) in
            guard case .notStarted = s.phase else { throw .notSupportedPostBoot }
            guard let source = s.bootSource else {
                throw APIError("Start microVM error: Missing kernel configuration (PUT /boot-source first).")
            }
            var configuration = try VMMapping.configuration(machine: s.machine, boot: source, drives: s.drives, networks: s.networks)
            prepare(&configuration)
            let vm: VM
            do throws(SwiftletError) { vm = try VM(configuration) } catch { throw APIError("Start microVM error: \(error.message)") }
            try launch(vm)
            s.phase = .running(vm)
        }
        logger.info("Successfully started microvm that was configured from one single json")
    }

    /// Starts `vm.run()` on the runner thread and waits until the VM left `created`, so
    /// that a pause right after `InstanceStart` finds it running.
    private func launch(_ vm: VM) throws(APIError) {
        let onExit = self.onExit
        do throws(ThreadStartError) {
            try APIThreads.start(APIThreads.runnerName) { [weak self] in
                let result: Result<VMResult, SwiftletError>
                do throws(SwiftletError) { result = .success(try vm.run()) } catch { result = .failure(error) }
                self?.state.withLock { $0.phase = .stopped }
                onExit(result)
            }
        } catch {
            throw APIError("Start microVM error: \(error.description)")
        }
        let deadline = Date().addingTimeInterval(10)
        while vm.state == .created && Date() < deadline { usleep(200) }
    }

    func pause() throws(APIError) {
        try state.withLock { (s) throws(APIError) in
            switch s.phase {
            case .notStarted: throw .notSupportedPreBoot
            case .stopped: throw APIError("The microVM has stopped.")
            case .paused: return     // Firecracker: pausing a paused VM succeeds
            case let .running(vm):
                do throws(SwiftletError) { try vm.pause() } catch { throw APIError("Failed to pause the microVM: \(error.message)") }
                s.phase = .paused(vm, started: true)
            }
        }
        logger.info("The microVM is paused")
    }

    func resume() throws(APIError) {
        try state.withLock { (s) throws(APIError) in
            switch s.phase {
            case .notStarted: throw .notSupportedPreBoot
            case .stopped: throw APIError("The microVM has stopped.")
            case .running: return
            case let .paused(vm, started):
                if started {
                    do throws(SwiftletError) { try vm.resume() } catch { throw APIError("Failed to resume the microVM: \(error.message)") }
                } else {
                    try launch(vm)
                }
                s.phase = .running(vm)
            }
        }
        logger.info("The microVM is running")
    }

    func createSnapshot(_ params: SnapshotCreateParams) throws(APIError) {
        try paths.check(params.snapshotPath, "snapshot_path")
        try paths.check(params.memFilePath, "mem_file_path")
        let diff: Bool
        switch params.snapshotType {
        case nil, "Full": diff = false
        case "Diff": diff = true
        case let other?: throw APIError("unknown variant `\(other)` of snapshot_type, expected `Full` or `Diff`")
        }
        try state.withLock { (s) throws(APIError) in
            switch s.phase {
            case .notStarted: throw .notSupportedPreBoot
            case .stopped: throw APIError("The microVM has stopped.")
            case .running: throw APIError("Create snapshot error: the microVM must be paused (PATCH /vm {\"state\": \"Paused\"}) first.")
            case let .paused(vm, _):
                try SnapshotCalls.create(vm: vm, statePath: params.snapshotPath, memoryPath: params.memFilePath, diff: diff)
            }
        }
        logger.info("Snapshot written to \(params.snapshotPath) and \(params.memFilePath)")
    }

    func loadSnapshot(_ params: SnapshotLoadParams) throws(APIError) {
        try paths.check(params.snapshotPath, "snapshot_path")
        let memoryPath = try params.memoryFile()
        try paths.check(memoryPath, "mem_file_path")
        if let overrides = params.networkOverrides, !overrides.isEmpty {
            throw APIError.notSupported("network_overrides (a restored interface keeps its TAP)")
        }
        switch params.hugePages {
        case nil, "Snapshot", "None", "Transparent": break
        case "2M": throw APIError.notSupported("hugetlbfs huge pages (`2M`)")
        case let other?: throw APIError("unknown variant `\(other)` of huge_pages")
        }
        try state.withLock { (s) throws(APIError) in
            guard case .notStarted = s.phase else { throw .notSupportedPostBoot }
            guard !s.configured else {
                throw APIError("Loading a microVM snapshot not allowed after configuring boot-specific resources.")
            }
            let vm = try SnapshotCalls.load(statePath: params.snapshotPath, memoryPath: memoryPath,
                                            trackDirtyPages: params.trackDirtyPages ?? false, prepare: prepare)
            if params.resumeVM == true {
                try launch(vm)
                s.phase = .running(vm)
            } else {
                s.phase = .paused(vm, started: false)
            }
            s.restored = true
        }
        logger.info("Snapshot loaded from \(params.snapshotPath)")
    }

    /// Asks a started VM to stop with `exit` (a paused one is resumed first, so its vCPUs
    /// see the stop); `onExit` follows on the runner thread. `false` when no VM runs.
    public func stop(_ exit: VMExit) -> Bool {
        state.withLock { s in
            switch s.phase {
            case .notStarted, .stopped, .paused(_, started: false): return false
            case let .running(vm):
                vm.stop(exit)
                return true
            case let .paused(vm, started: true):
                try? vm.resume()
                vm.stop(exit)
                return true
            }
        }
    }

    @discardableResult
    public func flushMetrics() -> Bool {
        metrics.flush(extra: ["swiftlet": .object(["state": .string(stateName)])])
    }

    /// `GET /vm/config`: everything configured (after a restore, what the snapshot had is
    /// not repeated: boot-source is empty, as in Firecracker).
    public func fullConfiguration() -> FullVMConfiguration {
        let logger = logSink.current
        let metricsConfig = metrics.config
        return state.withLock { s in
            FullVMConfiguration(bootSource: s.restored ? nil : s.bootSource, drives: s.drives, machineConfig: s.machine,
                                networkInterfaces: s.networks, logger: logger, metrics: metricsConfig)
        }
    }

    // MARK: - Config file

    /// Applies a `--config-file` (Firecracker's `FullVmConfiguration` JSON) as the
    /// equivalent API calls, in Firecracker's order: logger, metrics, machine, boot
    /// source, drives, network interfaces.
    public func apply(configFile bytes: [UInt8]) throws(APIError) {
        let config = try decode(FullVMConfiguration.self, bytes, "config file")
        func put(_ path: String, _ value: some Encodable) throws(APIError) {
            let encoder = JSONEncoder()
            let body = Array((try? encoder.encode(value)) ?? Data())
            let response = handle(APIRequest(method: "PUT", path: path, body: body))
            guard response.status == 204 else { throw APIError("\(path): \(response.faultMessage ?? "error \(response.status)")") }
        }
        if let logger = config.logger { try put("/logger", logger) }
        if let metrics = config.metrics { try put("/metrics", metrics) }
        if let machine = config.machineConfig { try put("/machine-config", machine) }
        if let source = config.bootSource { try put("/boot-source", source) }
        for drive in config.drives { try put("/drives/\(drive.driveId)", drive) }
        for interface in config.networkInterfaces { try put("/network-interfaces/\(interface.ifaceId)", interface) }
    }
}

extension NetworkInterface {
    public func encode(to encoder: any Encoder) throws {
        var c = encoder.container(keyedBy: CodingKeys.self)
        try c.encode(ifaceId, forKey: .ifaceId)
        try c.encode(hostDevName, forKey: .hostDevName)
        try c.encodeIfPresent(guestMac, forKey: .guestMac)
        try c.encodeIfPresent(mtu, forKey: .mtu)
        try c.encodeIfPresent(rxRateLimiter, forKey: .rxRateLimiter)
        try c.encodeIfPresent(txRateLimiter, forKey: .txRateLimiter)
    }
}
