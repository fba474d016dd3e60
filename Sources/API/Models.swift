import SwiftletKit

/// Firecracker's request and response bodies (src/firecracker/swagger/firecracker.yaml),
/// with its JSON field names. Decoding is strict: an unknown field, a wrong type or a
/// missing required field is an error. Range checks live in ``validate()`` so that the
/// same rules apply to the API and to `--config-file`.

/// `TokenBucket`: `size` tokens, refilled completely every `refill_time` ms, plus a
/// one-time burst. Mirrors the `RateLimit` module's `TokenBucketConfiguration`.
public struct TokenBucket: Codable, Sendable, Equatable {
    public var size: UInt64
    public var oneTimeBurst: UInt64?
    /// Milliseconds to refill the bucket from empty.
    public var refillTime: UInt64

    enum CodingKeys: String, CodingKey, CaseIterable {
        case size
        case oneTimeBurst = "one_time_burst"
        case refillTime = "refill_time"
    }

    public init(size: UInt64, oneTimeBurst: UInt64? = nil, refillTime: UInt64) {
        self.size = size
        self.oneTimeBurst = oneTimeBurst
        self.refillTime = refillTime
    }

    public init(from decoder: any Decoder) throws {
        let c = try decoder.strictContainer(CodingKeys.self)
        size = try c.decode(UInt64.self, forKey: .size)
        oneTimeBurst = try c.decodeIfPresent(UInt64.self, forKey: .oneTimeBurst)
        refillTime = try c.decode(UInt64.self, forKey: .refillTime)
    }

    func validate(_ name: String) throws(APIError) {
        // Firecracker treats size 0 or refill_time 0 as "no limit"; a refill time past a
        // day is certainly a mistake (and would overflow rate arithmetic).
        guard refillTime <= 86_400_000 else { throw APIError("\(name): refill_time must be at most 86400000 ms") }
        guard size <= UInt64(Int64.max), (oneTimeBurst ?? 0) <= UInt64(Int64.max) else {
            throw APIError("\(name): size and one_time_burst must be at most \(Int64.max)")
        }
    }
}

/// `RateLimiter`: a bandwidth bucket (bytes) and an operations bucket. Mirrors the
/// `RateLimit` module's `RateLimiterConfiguration`.
public struct RateLimiter: Codable, Sendable, Equatable {
    public var bandwidth: TokenBucket?
    public var ops: TokenBucket?

    enum CodingKeys: String, CodingKey, CaseIterable { case bandwidth, ops }

    public init(bandwidth: TokenBucket? = nil, ops: TokenBucket? = nil) {
        self.bandwidth = bandwidth
        self.ops = ops
    }

    public init(from decoder: any Decoder) throws {
        let c = try decoder.strictContainer(CodingKeys.self)
        bandwidth = try c.decodeIfPresent(TokenBucket.self, forKey: .bandwidth)
        ops = try c.decodeIfPresent(TokenBucket.self, forKey: .ops)
    }

    func validate(_ name: String) throws(APIError) {
        try bandwidth?.validate("\(name).bandwidth")
        try ops?.validate("\(name).ops")
    }
}

/// `MachineConfiguration` (`/machine-config`).
public struct MachineConfig: Codable, Sendable, Equatable {
    public var vcpuCount: Int
    public var memSizeMib: Int
    public var smt: Bool?
    public var trackDirtyPages: Bool?
    /// Firecracker's static CPU templates (`C3`, `T2`, ...); only `None` is accepted.
    public var cpuTemplate: String?
    /// `None`, `Transparent` or `2M`; `2M` (hugetlbfs) is refused.
    public var hugePages: String?

    enum CodingKeys: String, CodingKey, CaseIterable {
        case vcpuCount = "vcpu_count"
        case memSizeMib = "mem_size_mib"
        case smt
        case trackDirtyPages = "track_dirty_pages"
        case cpuTemplate = "cpu_template"
        case hugePages = "huge_pages"
    }

    /// Firecracker's defaults: 1 vCPU, 128 MiB.
    public static let defaults = MachineConfig(vcpuCount: 1, memSizeMib: 128)

    public init(vcpuCount: Int, memSizeMib: Int, smt: Bool? = false, trackDirtyPages: Bool? = false,
                cpuTemplate: String? = nil, hugePages: String? = "None") {
        self.vcpuCount = vcpuCount
        self.memSizeMib = memSizeMib
        self.smt = smt
        self.trackDirtyPages = trackDirtyPages
        self.cpuTemplate = cpuTemplate
        self.hugePages = hugePages
    }

    public init(from decoder: any Decoder) throws {
        let c = try decoder.strictContainer(CodingKeys.self)
        vcpuCount = try c.decode(Int.self, forKey: .vcpuCount)
        memSizeMib = try c.decode(Int.self, forKey: .memSizeMib)
        smt = try c.decodeIfPresent(Bool.self, forKey: .smt)
        trackDirtyPages = try c.decodeIfPresent(Bool.self, forKey: .trackDirtyPages)
        cpuTemplate = try c.decodeIfPresent(String.self, forKey: .cpuTemplate)
        hugePages = try c.decodeIfPresent(String.self, forKey: .hugePages)
    }

    public func encode(to encoder: any Encoder) throws {
        var c = encoder.container(keyedBy: CodingKeys.self)
        try c.encode(vcpuCount, forKey: .vcpuCount)
        try c.encode(memSizeMib, forKey: .memSizeMib)
        try c.encode(smt ?? false, forKey: .smt)
        try c.encode(trackDirtyPages ?? false, forKey: .trackDirtyPages)
        try c.encodeIfPresent(cpuTemplate, forKey: .cpuTemplate)
        try c.encode(hugePages ?? "None", forKey: .hugePages)
    }

    /// Largest guest RAM the API accepts (1 TiB): beyond it `mem_size_mib << 20` is no
    /// longer a sensible mapping on any host.
    public static let maximumMemoryMib = 1 << 20

    func validate() throws(APIError) {
        guard (1...32).contains(vcpuCount) else { throw APIError("The vCPU number is invalid! The vCPU number can only be 1 or an even number when SMT is enabled.") }
        if smt == true, vcpuCount > 1, vcpuCount % 2 != 0 {
            throw APIError("The vCPU number is invalid! The vCPU number can only be 1 or an even number when SMT is enabled.")
        }
        guard (1...Self.maximumMemoryMib).contains(memSizeMib) else {
            throw APIError("The memory size (MiB) is invalid: mem_size_mib must be 1 to \(Self.maximumMemoryMib)")
        }
        if let cpuTemplate, cpuTemplate != "None" {
            throw APIError.notSupported("CPU template `\(cpuTemplate)` (Swiftlet has no CPU templates; only \"None\")")
        }
        switch hugePages {
        case nil, "None", "Transparent": break
        case "2M": throw APIError.notSupported("hugetlbfs huge pages (`2M`); use \"Transparent\"")
        case let other?: throw APIError("unknown variant `\(other)` of huge_pages, expected one of `None`, `Transparent`, `2M`")
        }
    }
}

/// A PATCH of `/machine-config`: every field optional.
struct MachineConfigUpdate: Decodable {
    var vcpuCount: Int?
    var memSizeMib: Int?
    var smt: Bool?
    var trackDirtyPages: Bool?
    var cpuTemplate: String?
    var hugePages: String?

    init(from decoder: any Decoder) throws {
        let c = try decoder.strictContainer(MachineConfig.CodingKeys.self)
        vcpuCount = try c.decodeIfPresent(Int.self, forKey: .vcpuCount)
        memSizeMib = try c.decodeIfPresent(Int.self, forKey: .memSizeMib)
        smt = try c.decodeIfPresent(Bool.self, forKey: .smt)
        trackDirtyPages = try c.decodeIfPresent(Bool.self, forKey: .trackDirtyPages)
        cpuTemplate = try c.decodeIfPresent(String.self, forKey: .cpuTemplate)
        hugePages = try c.decodeIfPresent(String.self, forKey: .hugePages)
    }

    var isEmpty: Bool {
        vcpuCount == nil && memSizeMib == nil && smt == nil && trackDirtyPages == nil && cpuTemplate == nil && hugePages == nil
    }

    func applied(to base: MachineConfig) -> MachineConfig {
        var result = base
        if let vcpuCount { result.vcpuCount = vcpuCount }
        if let memSizeMib { result.memSizeMib = memSizeMib }
        if let smt { result.smt = smt }
        if let trackDirtyPages { result.trackDirtyPages = trackDirtyPages }
        if let cpuTemplate { result.cpuTemplate = cpuTemplate }
        if let hugePages { result.hugePages = hugePages }
        return result
    }
}

/// `BootSource` (`/boot-source`). `kernel_image_path` may name a Linux bzImage or
/// vmlinux, a Multiboot kernel, or (Swiftlet) a flat binary started at 0x7C00.
public struct BootSource: Codable, Sendable, Equatable {
    public var kernelImagePath: String
    public var bootArgs: String?
    public var initrdPath: String?

    enum CodingKeys: String, CodingKey, CaseIterable {
        case kernelImagePath = "kernel_image_path"
        case bootArgs = "boot_args"
        case initrdPath = "initrd_path"
    }

    public init(kernelImagePath: String, bootArgs: String? = nil, initrdPath: String? = nil) {
        self.kernelImagePath = kernelImagePath
        self.bootArgs = bootArgs
        self.initrdPath = initrdPath
    }

    public init(from decoder: any Decoder) throws {
        let c = try decoder.strictContainer(CodingKeys.self)
        kernelImagePath = try c.decode(String.self, forKey: .kernelImagePath)
        bootArgs = try c.decodeIfPresent(String.self, forKey: .bootArgs)
        initrdPath = try c.decodeIfPresent(String.self, forKey: .initrdPath)
    }

    func validate(paths: PathPolicy) throws(APIError) {
        try paths.check(kernelImagePath, "kernel_image_path")
        if let initrdPath { try paths.check(initrdPath, "initrd_path") }
        if let bootArgs, bootArgs.utf8.count > 4095 || bootArgs.utf8.contains(0) {
            throw APIError("boot_args must be at most 4095 bytes without NUL")
        }
    }
}

/// `Drive` (`/drives/{drive_id}`): a virtio-blk disk. `format` is Swiftlet's
/// (`raw` or `qcow2`; detected from the file when absent).
public struct Drive: Codable, Sendable, Equatable {
    public var driveId: String
    public var pathOnHost: String
    public var isRootDevice: Bool
    public var isReadOnly: Bool?
    public var partuuid: String?
    public var cacheType: String?
    public var ioEngine: String?
    public var rateLimiter: RateLimiter?
    /// Swiftlet: `raw` or `qcow2`.
    public var format: String?

    enum CodingKeys: String, CodingKey, CaseIterable {
        case driveId = "drive_id"
        case pathOnHost = "path_on_host"
        case isRootDevice = "is_root_device"
        case isReadOnly = "is_read_only"
        case partuuid
        case cacheType = "cache_type"
        case ioEngine = "io_engine"
        case rateLimiter = "rate_limiter"
        case socket
        case format
    }

    public init(driveId: String, pathOnHost: String, isRootDevice: Bool, isReadOnly: Bool? = false) {
        self.driveId = driveId
        self.pathOnHost = pathOnHost
        self.isRootDevice = isRootDevice
        self.isReadOnly = isReadOnly
    }

    public init(from decoder: any Decoder) throws {
        let c = try decoder.strictContainer(CodingKeys.self)
        driveId = try c.decode(String.self, forKey: .driveId)
        if c.contains(.socket) {
            throw DecodingError.dataCorruptedError(forKey: .socket, in: c,
                                                   debugDescription: "vhost-user block devices (`socket`) are not supported by Swiftlet")
        }
        pathOnHost = try c.decode(String.self, forKey: .pathOnHost)
        isRootDevice = try c.decode(Bool.self, forKey: .isRootDevice)
        isReadOnly = try c.decodeIfPresent(Bool.self, forKey: .isReadOnly)
        partuuid = try c.decodeIfPresent(String.self, forKey: .partuuid)
        cacheType = try c.decodeIfPresent(String.self, forKey: .cacheType)
        ioEngine = try c.decodeIfPresent(String.self, forKey: .ioEngine)
        rateLimiter = try c.decodeIfPresent(RateLimiter.self, forKey: .rateLimiter)
        format = try c.decodeIfPresent(String.self, forKey: .format)
    }

    public func encode(to encoder: any Encoder) throws {
        var c = encoder.container(keyedBy: CodingKeys.self)
        try c.encode(driveId, forKey: .driveId)
        try c.encode(pathOnHost, forKey: .pathOnHost)
        try c.encode(isRootDevice, forKey: .isRootDevice)
        try c.encode(isReadOnly ?? false, forKey: .isReadOnly)
        try c.encodeIfPresent(partuuid, forKey: .partuuid)
        try c.encode(cacheType ?? "Unsafe", forKey: .cacheType)
        try c.encode(ioEngine ?? "Sync", forKey: .ioEngine)
        try c.encodeIfPresent(rateLimiter, forKey: .rateLimiter)
        try c.encodeIfPresent(format, forKey: .format)
    }

    func validate(paths: PathPolicy) throws(APIError) {
        try validateID(driveId)
        try paths.check(pathOnHost, "path_on_host")
        switch cacheType {
        case nil, "Unsafe", "Writeback": break
        case let other?: throw APIError("unknown variant `\(other)` of cache_type, expected `Unsafe` or `Writeback`")
        }
        switch ioEngine {
        case nil, "Sync": break
        case "Async": throw APIError.notSupported("io_engine `Async`; Swiftlet's block I/O runs on its own worker threads (use `Sync`)")
        case let other?: throw APIError("unknown variant `\(other)` of io_engine, expected `Sync` or `Async`")
        }
        switch format {
        case nil, "raw", "qcow2": break
        case let other?: throw APIError("unknown format `\(other)`, expected `raw` or `qcow2`")
        }
        if let partuuid, partuuid.isEmpty || partuuid.utf8.count > 64 || partuuid.contains(where: { $0 == " " || $0 == "\0" }) {
            throw APIError("partuuid must be 1 to 64 characters without spaces")
        }
        try rateLimiter?.validate("rate_limiter")
    }
}

/// A PATCH of `/drives/{drive_id}` (after boot: a new backing file or rate limiter).
struct PartialDrive: Decodable {
    var driveId: String
    var pathOnHost: String?
    var rateLimiter: RateLimiter?

    enum CodingKeys: String, CodingKey, CaseIterable {
        case driveId = "drive_id"
        case pathOnHost = "path_on_host"
        case rateLimiter = "rate_limiter"
    }

    init(from decoder: any Decoder) throws {
        let c = try decoder.strictContainer(CodingKeys.self)
        driveId = try c.decode(String.self, forKey: .driveId)
        pathOnHost = try c.decodeIfPresent(String.self, forKey: .pathOnHost)
        rateLimiter = try c.decodeIfPresent(RateLimiter.self, forKey: .rateLimiter)
    }
}

/// `NetworkInterface` (`/network-interfaces/{iface_id}`): virtio-net over a TAP.
public struct NetworkInterface: Codable, Sendable, Equatable {
    public var ifaceId: String
    public var hostDevName: String
    public var guestMac: String?
    public var mtu: Int?
    public var rxRateLimiter: RateLimiter?
    public var txRateLimiter: RateLimiter?

    enum CodingKeys: String, CodingKey, CaseIterable {
        case ifaceId = "iface_id"
        case hostDevName = "host_dev_name"
        case guestMac = "guest_mac"
        case mtu
        case rxRateLimiter = "rx_rate_limiter"
        case txRateLimiter = "tx_rate_limiter"
    }

    public init(ifaceId: String, hostDevName: String, guestMac: String? = nil) {
        self.ifaceId = ifaceId
        self.hostDevName = hostDevName
        self.guestMac = guestMac
    }

    public init(from decoder: any Decoder) throws {
        let c = try decoder.strictContainer(CodingKeys.self)
        ifaceId = try c.decode(String.self, forKey: .ifaceId)
        hostDevName = try c.decode(String.self, forKey: .hostDevName)
        guestMac = try c.decodeIfPresent(String.self, forKey: .guestMac)
        mtu = try c.decodeIfPresent(Int.self, forKey: .mtu)
        rxRateLimiter = try c.decodeIfPresent(RateLimiter.self, forKey: .rxRateLimiter)
        txRateLimiter = try c.decodeIfPresent(RateLimiter.self, forKey: .txRateLimiter)
    }

    func validate() throws(APIError) {
        try validateID(ifaceId)
        guard VMConfiguration.Network.isValidInterfaceName(hostDevName) else {
            throw APIError("host_dev_name `\(hostDevName)` is not an interface name (1 to 15 bytes, no '/', ':' or spaces)")
        }
        if let guestMac, !VMConfiguration.Network.isValidMAC(guestMac) {
            throw APIError("guest_mac `\(guestMac)` is not a unicast MAC address (like 06:00:AC:10:00:02)")
        }
        if let mtu {
            guard (68...65535).contains(mtu) else { throw APIError("mtu must be 68 to 65535") }
            throw APIError.notSupported("mtu (Swiftlet's virtio-net does not offer VIRTIO_NET_F_MTU)")
        }
        try rxRateLimiter?.validate("rx_rate_limiter")
        try txRateLimiter?.validate("tx_rate_limiter")
    }
}

/// A PATCH of `/network-interfaces/{iface_id}`: new rate limiters.
struct PartialNetworkInterface: Decodable {
    var ifaceId: String
    var rxRateLimiter: RateLimiter?
    var txRateLimiter: RateLimiter?

    enum CodingKeys: String, CodingKey, CaseIterable {
        case ifaceId = "iface_id"
        case rxRateLimiter = "rx_rate_limiter"
        case txRateLimiter = "tx_rate_limiter"
    }

    init(from decoder: any Decoder) throws {
        let c = try decoder.strictContainer(CodingKeys.self)
        ifaceId = try c.decode(String.self, forKey: .ifaceId)
        rxRateLimiter = try c.decodeIfPresent(RateLimiter.self, forKey: .rxRateLimiter)
        txRateLimiter = try c.decodeIfPresent(RateLimiter.self, forKey: .txRateLimiter)
    }
}

/// `InstanceActionInfo` (`PUT /actions`).
struct InstanceAction: Decodable {
    enum Kind: String, Decodable { case instanceStart = "InstanceStart", sendCtrlAltDel = "SendCtrlAltDel", flushMetrics = "FlushMetrics" }
    var actionType: Kind

    enum CodingKeys: String, CodingKey, CaseIterable { case actionType = "action_type" }

    init(from decoder: any Decoder) throws {
        let c = try decoder.strictContainer(CodingKeys.self)
        actionType = try c.decode(Kind.self, forKey: .actionType)
    }
}

/// `Vm` (`PATCH /vm`).
struct VMStateRequest: Decodable {
    enum Kind: String, Decodable { case paused = "Paused", resumed = "Resumed" }
    var state: Kind

    enum CodingKeys: String, CodingKey, CaseIterable { case state }

    init(from decoder: any Decoder) throws {
        let c = try decoder.strictContainer(CodingKeys.self)
        state = try c.decode(Kind.self, forKey: .state)
    }
}

/// `SnapshotCreateParams` (`PUT /snapshot/create`).
public struct SnapshotCreateParams: Decodable, Sendable, Equatable {
    public var snapshotPath: String
    public var memFilePath: String
    /// `Full` (default) or `Diff`.
    public var snapshotType: String?

    enum CodingKeys: String, CodingKey, CaseIterable {
        case snapshotPath = "snapshot_path"
        case memFilePath = "mem_file_path"
        case snapshotType = "snapshot_type"
        case version
    }

    public init(from decoder: any Decoder) throws {
        let c = try decoder.strictContainer(CodingKeys.self)
        snapshotPath = try c.decode(String.self, forKey: .snapshotPath)
        memFilePath = try c.decode(String.self, forKey: .memFilePath)
        snapshotType = try c.decodeIfPresent(String.self, forKey: .snapshotType)
    }
}

/// `SnapshotLoadParams` (`PUT /snapshot/load`).
public struct SnapshotLoadParams: Decodable, Sendable, Equatable {
    public struct MemoryBackend: Decodable, Sendable, Equatable {
        public var backendType: String
        public var backendPath: String
        enum CodingKeys: String, CodingKey, CaseIterable {
            case backendType = "backend_type"
            case backendPath = "backend_path"
        }
        public init(from decoder: any Decoder) throws {
            let c = try decoder.strictContainer(CodingKeys.self)
            backendType = try c.decode(String.self, forKey: .backendType)
            backendPath = try c.decode(String.self, forKey: .backendPath)
        }
    }

    public struct NetworkOverride: Decodable, Sendable, Equatable {
        public var ifaceId: String
        public var hostDevName: String
        enum CodingKeys: String, CodingKey, CaseIterable {
            case ifaceId = "iface_id"
            case hostDevName = "host_dev_name"
        }
        public init(from decoder: any Decoder) throws {
            let c = try decoder.strictContainer(CodingKeys.self)
            ifaceId = try c.decode(String.self, forKey: .ifaceId)
            hostDevName = try c.decode(String.self, forKey: .hostDevName)
        }
    }

    public var snapshotPath: String
    public var memFilePath: String?
    public var memBackend: MemoryBackend?
    public var trackDirtyPages: Bool?
    public var resumeVM: Bool?
    public var networkOverrides: [NetworkOverride]?
    public var clockRealtime: Bool?
    public var hugePages: String?

    enum CodingKeys: String, CodingKey, CaseIterable {
        case snapshotPath = "snapshot_path"
        case memFilePath = "mem_file_path"
        case memBackend = "mem_backend"
        case enableDiffSnapshots = "enable_diff_snapshots"
        case trackDirtyPages = "track_dirty_pages"
        case resumeVM = "resume_vm"
        case networkOverrides = "network_overrides"
        case vsockOverride = "vsock_override"
        case clockRealtime = "clock_realtime"
        case hugePages = "huge_pages"
    }

    public init(from decoder: any Decoder) throws {
        let c = try decoder.strictContainer(CodingKeys.self)
        snapshotPath = try c.decode(String.self, forKey: .snapshotPath)
        memFilePath = try c.decodeIfPresent(String.self, forKey: .memFilePath)
        memBackend = try c.decodeIfPresent(MemoryBackend.self, forKey: .memBackend)
        let deprecated = try c.decodeIfPresent(Bool.self, forKey: .enableDiffSnapshots)
        trackDirtyPages = try c.decodeIfPresent(Bool.self, forKey: .trackDirtyPages) ?? deprecated
        resumeVM = try c.decodeIfPresent(Bool.self, forKey: .resumeVM)
        networkOverrides = try c.decodeIfPresent([NetworkOverride].self, forKey: .networkOverrides)
        if c.contains(.vsockOverride) {
            throw DecodingError.dataCorruptedError(forKey: .vsockOverride, in: c, debugDescription: "Swiftlet has no vsock device")
        }
        clockRealtime = try c.decodeIfPresent(Bool.self, forKey: .clockRealtime)
        hugePages = try c.decodeIfPresent(String.self, forKey: .hugePages)
    }

    /// The memory file: `mem_file_path`, or `mem_backend` of type `File`. Exactly one of
    /// the two must be given; a `Uffd` backend is refused.
    func memoryFile() throws(APIError) -> String {
        switch (memFilePath, memBackend) {
        case let (path?, nil): return path
        case let (nil, backend?):
            guard backend.backendType == "File" else {
                if backend.backendType == "Uffd" { throw APIError.notSupported("a `Uffd` memory backend; Swiftlet maps the memory file itself") }
                throw APIError("unknown variant `\(backend.backendType)` of backend_type, expected `File` or `Uffd`")
            }
            return backend.backendPath
        case (nil, nil): throw APIError("missing field: either `mem_file_path` or `mem_backend` is required")
        case (_?, _?): throw APIError("too many fields: either `mem_file_path` exclusively or `mem_backend` exclusively is allowed")
        }
    }
}

/// `Logger` (`PUT /logger`).
public struct LoggerConfig: Codable, Sendable, Equatable {
    public var level: String?
    public var logPath: String?
    public var showLevel: Bool?
    public var showLogOrigin: Bool?
    public var module: String?

    enum CodingKeys: String, CodingKey, CaseIterable {
        case level
        case logPath = "log_path"
        case showLevel = "show_level"
        case showLogOrigin = "show_log_origin"
        case module
    }

    public init(level: String? = nil, logPath: String? = nil, showLevel: Bool? = nil, showLogOrigin: Bool? = nil, module: String? = nil) {
        self.level = level
        self.logPath = logPath
        self.showLevel = showLevel
        self.showLogOrigin = showLogOrigin
        self.module = module
    }

    public init(from decoder: any Decoder) throws {
        let c = try decoder.strictContainer(CodingKeys.self)
        level = try c.decodeIfPresent(String.self, forKey: .level)
        logPath = try c.decodeIfPresent(String.self, forKey: .logPath)
        showLevel = try c.decodeIfPresent(Bool.self, forKey: .showLevel)
        showLogOrigin = try c.decodeIfPresent(Bool.self, forKey: .showLogOrigin)
        module = try c.decodeIfPresent(String.self, forKey: .module)
    }
}

/// `Metrics` (`PUT /metrics`).
public struct MetricsConfig: Codable, Sendable, Equatable {
    public var metricsPath: String
    public var emitId: Bool?
    public var properties: [String: String]?

    enum CodingKeys: String, CodingKey, CaseIterable {
        case metricsPath = "metrics_path"
        case emitId = "emit_id"
        case properties
    }

    public init(metricsPath: String) { self.metricsPath = metricsPath }

    public init(from decoder: any Decoder) throws {
        let c = try decoder.strictContainer(CodingKeys.self)
        metricsPath = try c.decode(String.self, forKey: .metricsPath)
        emitId = try c.decodeIfPresent(Bool.self, forKey: .emitId)
        properties = try c.decodeIfPresent([String: String].self, forKey: .properties)
    }
}

/// `InstanceInfo` (`GET /`).
struct InstanceInfo: Encodable {
    let appName: String
    let id: String
    let state: String
    let vmmVersion: String
    enum CodingKeys: String, CodingKey {
        case appName = "app_name", id, state
        case vmmVersion = "vmm_version"
    }
}

/// `FirecrackerVersion` (`GET /version`).
struct VersionInfo: Encodable {
    let firecrackerVersion: String
    enum CodingKeys: String, CodingKey { case firecrackerVersion = "firecracker_version" }
}

/// `FullVmConfiguration`: what `GET /vm/config` answers and what `--config-file` holds.
public struct FullVMConfiguration: Codable, Sendable, Equatable {
    public var bootSource: BootSource?
    public var drives: [Drive]
    public var machineConfig: MachineConfig?
    public var networkInterfaces: [NetworkInterface]
    public var logger: LoggerConfig?
    public var metrics: MetricsConfig?

    enum CodingKeys: String, CodingKey, CaseIterable {
        case bootSource = "boot-source"
        case drives
        case machineConfig = "machine-config"
        case networkInterfaces = "network-interfaces"
        case logger
        case metrics
        // Firecracker sections Swiftlet has no device for: present only to be refused
        // with a clear message (a null or empty value is accepted).
        case balloon, vsock, entropy, pmem, serial
        case cpuConfig = "cpu-config"
        case mmdsConfig = "mmds-config"
        case memoryHotplug = "memory-hotplug"
    }

    public init(bootSource: BootSource? = nil, drives: [Drive] = [], machineConfig: MachineConfig? = nil,
                networkInterfaces: [NetworkInterface] = [], logger: LoggerConfig? = nil, metrics: MetricsConfig? = nil) {
        self.bootSource = bootSource
        self.drives = drives
        self.machineConfig = machineConfig
        self.networkInterfaces = networkInterfaces
        self.logger = logger
        self.metrics = metrics
    }

    public init(from decoder: any Decoder) throws {
        let c = try decoder.strictContainer(CodingKeys.self)
        bootSource = try c.decodeIfPresent(BootSource.self, forKey: .bootSource)
        drives = try c.decodeIfPresent([Drive].self, forKey: .drives) ?? []
        machineConfig = try c.decodeIfPresent(MachineConfig.self, forKey: .machineConfig)
        networkInterfaces = try c.decodeIfPresent([NetworkInterface].self, forKey: .networkInterfaces) ?? []
        logger = try c.decodeIfPresent(LoggerConfig.self, forKey: .logger)
        metrics = try c.decodeIfPresent(MetricsConfig.self, forKey: .metrics)
        for key in [CodingKeys.balloon, .vsock, .entropy, .pmem, .serial, .cpuConfig, .mmdsConfig, .memoryHotplug] where c.contains(key) {
            if try c.decodeNil(forKey: key) { continue }
            throw DecodingError.dataCorruptedError(forKey: key, in: c, debugDescription: "`\(key.stringValue)` is not supported by Swiftlet")
        }
    }

    public func encode(to encoder: any Encoder) throws {
        var c = encoder.container(keyedBy: CodingKeys.self)
        try c.encodeIfPresent(bootSource, forKey: .bootSource)
        try c.encode(drives, forKey: .drives)
        try c.encodeIfPresent(machineConfig, forKey: .machineConfig)
        try c.encode(networkInterfaces, forKey: .networkInterfaces)
        try c.encodeIfPresent(logger, forKey: .logger)
        try c.encodeIfPresent(metrics, forKey: .metrics)
    }
}

/// Firecracker's rule for resource IDs: 1 to 64 ASCII letters, digits and underscores.
func validateID(_ id: String) throws(APIError) {
    let bytes = Array(id.utf8)
    guard (1...64).contains(bytes.count), bytes.allSatisfy({ $0 == UInt8(ascii: "_") || ($0 < 0x80 && (Character(UnicodeScalar($0)).isLetter || Character(UnicodeScalar($0)).isNumber)) }) else {
        throw APIError("Invalid ID: `\(id.prefix(80))` (1 to 64 ASCII letters, digits or underscores)")
    }
}
