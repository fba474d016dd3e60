import API
import Foundation
import SwiftletKit
import Testing

let guestsDirectory = URL(fileURLWithPath: #filePath)
    .deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
    .appendingPathComponent("guests/build").path

extension APIController {
    func call(_ method: String, _ path: String, _ json: String? = nil) -> APIResponse {
        handle(APIRequest(method: method, path: path, body: json.map { Array($0.utf8) } ?? []))
    }
}

/// Expects a 400 whose fault message contains `text`.
func expectFault(_ response: APIResponse, _ text: String, sourceLocation: SourceLocation = #_sourceLocation) {
    #expect(response.status == 400, sourceLocation: sourceLocation)
    #expect(response.faultMessage?.contains(text) == true, "fault: \(response.faultMessage ?? "none")", sourceLocation: sourceLocation)
}

@Suite("API controller before boot (no KVM, no socket)")
struct ControllerTests {
    @Test("GET / describes the instance; GET /machine-config gives Firecracker's defaults")
    func describe() throws {
        let api = APIController(instanceID: "vm1")
        let info = api.call("GET", "/")
        #expect(info.status == 200)
        let object = try #require(try JSONSerialization.jsonObject(with: Data(info.body)) as? [String: String])
        #expect(object["id"] == "vm1" && object["state"] == "Not started" && object["app_name"] == "Firecracker")
        let machine = api.call("GET", "/machine-config")
        let config = try JSONSerialization.jsonObject(with: Data(machine.body)) as? [String: Any]
        #expect(config?["vcpu_count"] as? Int == 1 && config?["mem_size_mib"] as? Int == 128)
        #expect(api.call("GET", "/version").status == 200)
    }

    @Test("PUT and PATCH /machine-config change it; bad values are refused and change nothing")
    func machineConfig() throws {
        let api = APIController()
        #expect(api.call("PUT", "/machine-config", #"{"vcpu_count": 2, "mem_size_mib": 64}"#) == .noContent)
        #expect(api.call("PATCH", "/machine-config", #"{"mem_size_mib": 32}"#) == .noContent)
        expectFault(api.call("PUT", "/machine-config", #"{"vcpu_count": 0, "mem_size_mib": 64}"#), "vCPU number is invalid")
        expectFault(api.call("PUT", "/machine-config", #"{"vcpu_count": 33, "mem_size_mib": 64}"#), "vCPU number is invalid")
        expectFault(api.call("PUT", "/machine-config", #"{"vcpu_count": 3, "mem_size_mib": 64, "smt": true}"#), "vCPU number")
        expectFault(api.call("PUT", "/machine-config", #"{"vcpu_count": 1, "mem_size_mib": -5}"#), "memory size")
        expectFault(api.call("PUT", "/machine-config", #"{"vcpu_count": 1, "mem_size_mib": 99999999999}"#), "memory size")
        expectFault(api.call("PATCH", "/machine-config", #"{"mem_size_mib": 0}"#), "memory size")
        expectFault(api.call("PATCH", "/machine-config", #"{}"#), "Empty PATCH")
        expectFault(api.call("PUT", "/machine-config", #"{"vcpu_count": "two", "mem_size_mib": 64}"#), "invalid type")
        expectFault(api.call("PUT", "/machine-config", #"{"vcpu_count": 1.5, "mem_size_mib": 64}"#), "deserializing")
        expectFault(api.call("PUT", "/machine-config", #"{"vcpu_count": 1, "mem_size_mib": 64, "color": "red"}"#), "unknown field `color`")
        expectFault(api.call("PUT", "/machine-config", #"{"mem_size_mib": 64}"#), "missing field `vcpu_count`")
        expectFault(api.call("PUT", "/machine-config", #"{"vcpu_count": 1, "mem_size_mib": 64, "huge_pages": "2M"}"#), "not supported")
        expectFault(api.call("PUT", "/machine-config", #"{"vcpu_count": 1, "mem_size_mib": 64, "cpu_template": "T2"}"#), "not supported")
        let machine = api.call("GET", "/machine-config")
        let config = try JSONSerialization.jsonObject(with: Data(machine.body)) as? [String: Any]
        #expect(config?["vcpu_count"] as? Int == 2 && config?["mem_size_mib"] as? Int == 32)
    }

    @Test("Malformed bodies: invalid JSON, wrong top-level type, empty, NUL bytes")
    func malformedBodies() {
        let api = APIController()
        expectFault(api.call("PUT", "/machine-config", "{"), "deserializing")
        expectFault(api.call("PUT", "/machine-config", "[1, 2]"), "deserializing")
        expectFault(api.call("PUT", "/machine-config", "null"), "deserializing")
        expectFault(api.call("PUT", "/machine-config"), "Empty PUT")
        expectFault(api.call("PUT", "/boot-source", #"{"kernel_image_path": "a\u0000b"}"#), "NUL")
        expectFault(api.call("PUT", "/boot-source", "{\"kernel_image_path\": \"a\u{0}b\"}"), "deserializing")
        expectFault(api.call("PUT", "/actions", #"{"action_type": "Explode"}"#), "deserializing")
        expectFault(api.call("PATCH", "/vm", #"{"state": "Sleeping"}"#), "deserializing")
    }

    @Test("Unknown paths and methods get Firecracker's message; unsupported devices say so")
    func routes() {
        let api = APIController()
        expectFault(api.call("GET", "/nothing"), "Invalid request method and/or path: GET /nothing.")
        expectFault(api.call("DELETE", "/machine-config"), "Invalid request method and/or path")
        expectFault(api.call("PUT", "/drives"), "Invalid request method and/or path")
        expectFault(api.call("PUT", "/balloon", "{}"), "not supported")
        expectFault(api.call("PUT", "/vsock", "{}"), "not supported")
    }

    @Test("Drives: path and body IDs must match, IDs are checked, one root device, paths policed")
    func drives() throws {
        let api = APIController()
        let disk = FileManager.default.temporaryDirectory.appendingPathComponent("api-disk-\(UUID().uuidString)").path
        _ = FileManager.default.createFile(atPath: disk, contents: Data(count: 4096))
        defer { try? FileManager.default.removeItem(atPath: disk) }
        #expect(api.call("PUT", "/drives/rootfs", #"{"drive_id": "rootfs", "path_on_host": "\#(disk)", "is_root_device": true, "is_read_only": false}"#) == .noContent)
        expectFault(api.call("PUT", "/drives/other", #"{"drive_id": "rootfs", "path_on_host": "\#(disk)", "is_root_device": false}"#),
                    "does not match the id from the body")
        expectFault(api.call("PUT", "/drives/second", #"{"drive_id": "second", "path_on_host": "\#(disk)", "is_root_device": true}"#),
                    "A root block device already exists")
        expectFault(api.call("PUT", "/drives/bad%20id", #"{"drive_id": "bad%20id", "path_on_host": "\#(disk)", "is_root_device": false}"#), "Invalid ID")
        expectFault(api.call("PUT", "/drives/p", #"{"drive_id": "p", "path_on_host": "/proc/self/mem", "is_root_device": false}"#), "outside what Swiftlet may open")
        expectFault(api.call("PUT", "/drives/p", #"{"drive_id": "p", "path_on_host": "/tmp/../dev/sda", "is_root_device": false}"#), "outside what Swiftlet may open")
        let link = disk + ".link"
        try FileManager.default.createSymbolicLink(atPath: link, withDestinationPath: "/sys/kernel")
        defer { try? FileManager.default.removeItem(atPath: link) }
        expectFault(api.call("PUT", "/drives/p", #"{"drive_id": "p", "path_on_host": "\#(link)", "is_root_device": false}"#), "outside what Swiftlet may open")
        expectFault(api.call("PUT", "/drives/v", #"{"drive_id": "v", "socket": "/tmp/s", "is_root_device": false}"#), "vhost-user")
        expectFault(api.call("PUT", "/drives/a", #"{"drive_id": "a", "path_on_host": "\#(disk)", "is_root_device": false, "io_engine": "Async"}"#), "not supported")
        // Rate limiters are parsed and checked field by field.
        #expect(api.call("PUT", "/drives/limited", #"{"drive_id": "limited", "path_on_host": "\#(disk)", "is_root_device": false, "rate_limiter": {"bandwidth": {"size": 1048576, "refill_time": 100, "one_time_burst": 4096}, "ops": {"size": 100, "refill_time": 1000}}}"#) == .noContent)
        expectFault(api.call("PUT", "/drives/limited", #"{"drive_id": "limited", "path_on_host": "\#(disk)", "is_root_device": false, "rate_limiter": {"bandwidth": {"size": 1, "refill_time": 1, "burst": 2}}}"#), "unknown field `burst`")
        expectFault(api.call("PUT", "/drives/limited", #"{"drive_id": "limited", "path_on_host": "\#(disk)", "is_root_device": false, "rate_limiter": {"ops": {"size": -1, "refill_time": 1}}}"#), "deserializing")
        expectFault(api.call("PUT", "/drives/limited", #"{"drive_id": "limited", "path_on_host": "\#(disk)", "is_root_device": false, "rate_limiter": {"ops": {"size": 1}}}"#), "missing field `refill_time`")
        // PATCH is post-boot only.
        expectFault(api.call("PATCH", "/drives/rootfs", #"{"drive_id": "rootfs"}"#), "not supported before starting the microVM")
        let config = api.fullConfiguration()
        #expect(config.drives.map(\.driveId) == ["rootfs", "limited"])
        #expect(config.drives[1].rateLimiter?.bandwidth?.oneTimeBurst == 4096)
    }

    @Test("Network interfaces: names, MACs and duplicates are checked")
    func networkInterfaces() {
        let api = APIController()
        #expect(api.call("PUT", "/network-interfaces/eth0", #"{"iface_id": "eth0", "host_dev_name": "tap0", "guest_mac": "06:00:AC:10:00:02"}"#) == .noContent)
        expectFault(api.call("PUT", "/network-interfaces/eth1", #"{"iface_id": "eth1", "host_dev_name": "tap0"}"#), "already used")
        expectFault(api.call("PUT", "/network-interfaces/eth1", #"{"iface_id": "eth1", "host_dev_name": "tap1", "guest_mac": "06:00:ac:10:00:02"}"#), "already in use")
        expectFault(api.call("PUT", "/network-interfaces/eth1", #"{"iface_id": "eth1", "host_dev_name": "a/b"}"#), "not an interface name")
        expectFault(api.call("PUT", "/network-interfaces/eth1", #"{"iface_id": "eth1", "host_dev_name": "tap1", "guest_mac": "01:00:00:00:00:01"}"#), "unicast")
        expectFault(api.call("PUT", "/network-interfaces/eth1", #"{"iface_id": "eth1", "host_dev_name": "tap1", "rx_rate_limiter": {"bandwidth": {"size": 10, "refill_time": 99999999999}}}"#), "refill_time")
        #expect(api.call("PUT", "/network-interfaces/eth1", #"{"iface_id": "eth1", "host_dev_name": "tap1", "tx_rate_limiter": {"ops": {"size": 10, "refill_time": 100}}}"#) == .noContent)
        expectFault(api.call("PATCH", "/network-interfaces/eth0", #"{"iface_id": "eth0"}"#), "not supported before starting")
    }

    @Test("Calls in the wrong state: pause, snapshot, ctrl-alt-del before boot; start without a kernel")
    func wrongState() {
        let api = APIController()
        expectFault(api.call("PATCH", "/vm", #"{"state": "Paused"}"#), "not supported before starting the microVM")
        expectFault(api.call("PATCH", "/vm", #"{"state": "Resumed"}"#), "not supported before starting the microVM")
        expectFault(api.call("PUT", "/snapshot/create", #"{"snapshot_path": "/tmp/s", "mem_file_path": "/tmp/m"}"#), "not supported before starting")
        expectFault(api.call("PUT", "/actions", #"{"action_type": "SendCtrlAltDel"}"#), "not supported before starting")
        expectFault(api.call("PUT", "/actions", #"{"action_type": "InstanceStart"}"#), "Missing kernel configuration")
        expectFault(api.call("PUT", "/actions", #"{"action_type": "FlushMetrics"}"#), "metrics system is not initialized")
        // A snapshot may only be loaded into a fresh process.
        #expect(api.call("PUT", "/machine-config", #"{"vcpu_count": 1, "mem_size_mib": 16}"#) == .noContent)
        expectFault(api.call("PUT", "/snapshot/load", #"{"snapshot_path": "/tmp/s", "mem_file_path": "/tmp/m"}"#), "not allowed after configuring")
        expectFault(api.call("PUT", "/snapshot/load", #"{"snapshot_path": "/tmp/s"}"#), "either `mem_file_path` or `mem_backend`")
        expectFault(api.call("PUT", "/snapshot/load", #"{"snapshot_path": "/tmp/s", "mem_backend": {"backend_type": "Uffd", "backend_path": "/tmp/u"}}"#), "Uffd")
    }

    @Test("Logger and metrics: files are written; a second PUT /metrics is refused")
    func loggerAndMetrics() throws {
        let directory = FileManager.default.temporaryDirectory.appendingPathComponent("api-log-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: directory) }
        let api = APIController(instanceID: "logged")
        let logPath = directory.appendingPathComponent("log").path
        let metricsPath = directory.appendingPathComponent("metrics").path
        #expect(api.call("PUT", "/logger", #"{"log_path": "\#(logPath)", "level": "Info", "show_level": true}"#) == .noContent)
        expectFault(api.call("PUT", "/logger", #"{"level": "Loud"}"#), "Invalid log level")
        #expect(api.call("PUT", "/metrics", #"{"metrics_path": "\#(metricsPath)", "emit_id": true}"#) == .noContent)
        expectFault(api.call("PUT", "/metrics", #"{"metrics_path": "\#(metricsPath)"}"#), "Reinitialization of metrics not allowed")
        _ = api.call("GET", "/machine-config")
        #expect(api.call("PUT", "/actions", #"{"action_type": "FlushMetrics"}"#) == .noContent)
        let log = try String(contentsOfFile: logPath, encoding: .utf8)
        #expect(log.contains("[logged:") && log.contains("[Info]") && log.contains("/machine-config"))
        let lines = try String(contentsOfFile: metricsPath, encoding: .utf8).split(separator: "\n")
        let first = try #require(lines.first)
        let object = try #require(try JSONSerialization.jsonObject(with: Data(first.utf8)) as? [String: Any])
        #expect(object["id"] as? String == "logged")
        #expect((object["get_api_requests"] as? [String: Int])?["machine_cfg_count"] == 1)
        #expect((object["put_api_requests"] as? [String: Int])?["metrics_fails"] == 1)
        #expect(object["utc_timestamp_ms"] is Int)
    }

    @Test("A config file is applied as the equivalent API calls; unknown sections are refused")
    func configFile() throws {
        let api = APIController()
        let kernel = "\(guestsDirectory)/counter.bin"
        try api.apply(configFile: Array("""
            {"boot-source": {"kernel_image_path": "\(kernel)", "boot_args": "console=ttyS0"},
             "machine-config": {"vcpu_count": 1, "mem_size_mib": 16}, "drives": [], "network-interfaces": []}
            """.utf8))
        #expect(api.fullConfiguration().bootSource?.kernelImagePath == kernel)
        #expect(throws: APIError.self) { try APIController().apply(configFile: Array(#"{"balloon": {"amount_mib": 1}}"#.utf8)) }
        #expect(throws: APIError.self) { try APIController().apply(configFile: Array(#"{"machine-config": {"vcpu_count": 0, "mem_size_mib": 1}}"#.utf8)) }
        #expect(throws: APIError.self) { try APIController().apply(configFile: Array("not json".utf8)) }
    }
}

@Suite("Mapping the API's resources to a VMConfiguration")
struct MappingTests {
    @Test("A flat binary boots flat; a Multiboot ELF boots as a kernel")
    func bootKinds() throws {
        let flat = try VMMapping.boot(BootSource(kernelImagePath: "\(guestsDirectory)/counter.bin"), commandLine: nil)
        guard case .flat = flat else { Issue.record("counter.bin should boot flat"); return }
        let kernel = try VMMapping.boot(BootSource(kernelImagePath: "\(guestsDirectory)/multiboot.elf"), commandLine: "x")
        guard case .kernel = kernel else { Issue.record("multiboot.elf should boot as a kernel"); return }
        #expect(throws: APIError.self) { try VMMapping.boot(BootSource(kernelImagePath: "/nonexistent/kernel"), commandLine: nil) }
    }

    @Test("is_root_device adds root= as Firecracker does and puts that drive first")
    func rootDevice() throws {
        var data = Drive(driveId: "data", pathOnHost: "/tmp/data", isRootDevice: false)
        data.format = "qcow2"
        let root = Drive(driveId: "rootfs", pathOnHost: "/tmp/root", isRootDevice: true, isReadOnly: true)
        #expect(VMMapping.commandLine(bootArgs: "console=ttyS0", drives: [data, root]) == "console=ttyS0 root=/dev/vda ro")
        var uuid = root
        uuid.partuuid = "1234-01"
        uuid.isReadOnly = false
        #expect(VMMapping.commandLine(bootArgs: "a", drives: [uuid]) == "a root=PARTUUID=1234-01 rw")
        let configuration = try VMMapping.configuration(machine: MachineConfig(vcpuCount: 2, memSizeMib: 64),
                                                        boot: BootSource(kernelImagePath: "\(guestsDirectory)/multiboot.elf"),
                                                        drives: [data, root], networks: [NetworkInterface(ifaceId: "eth0", hostDevName: "tap9")])
        #expect(configuration.disks.map(\.path) == ["/tmp/root", "/tmp/data"])
        #expect(configuration.disks[0].readOnly && configuration.disks[1].format == .qcow2)
        #expect(configuration.memorySize == 64 << 20 && configuration.cpus == 2)
        #expect(configuration.networks.map(\.tap) == ["tap9"])
        // Rate limiters reach the VM configuration, following the drive's new position.
        data.rateLimiter = RateLimiter(bandwidth: TokenBucket(size: 4096, oneTimeBurst: 512, refillTime: 100))
        var interface = NetworkInterface(ifaceId: "eth0", hostDevName: "tap9")
        interface.txRateLimiter = RateLimiter(ops: TokenBucket(size: 10, refillTime: 1000))
        let limited = try VMMapping.configuration(machine: MachineConfig(vcpuCount: 1, memSizeMib: 64),
                                                  boot: BootSource(kernelImagePath: "\(guestsDirectory)/multiboot.elf"),
                                                  drives: [data, root], networks: [interface])
        #expect(limited.disks[0].rateLimiter == nil)
        #expect(limited.disks[1].rateLimiter?.bandwidth?.size == 4096 && limited.disks[1].rateLimiter?.bandwidth?.oneTimeBurst == 512)
        #expect(limited.networks[0].txRateLimiter?.ops?.refillTime == 1000 && limited.networks[0].rxRateLimiter == nil)
    }
}

@Suite("Firecracker's command line")
struct FirecrackerArgumentsTests {
    @Test("The flags tools pass are parsed")
    func parses() throws {
        let parsed = try FirecrackerArguments.parse(["--api-sock", "/tmp/fc.sock", "--id", "vm-7", "--level", "Debug", "--log-path=/tmp/l",
                                                     "--show-level", "--show-log-origin", "--boot-timer", "--no-seccomp",
                                                     "--http-api-max-payload-size", "4096", "--start-time-us", "12", "--enable-pci"])
        #expect(parsed.apiSocket == "/tmp/fc.sock" && parsed.id == "vm-7" && parsed.level == "Debug" && parsed.logPath == "/tmp/l")
        #expect(parsed.showLevel && parsed.showLogOrigin && parsed.bootTimer && parsed.noSeccomp && parsed.enablePCI)
        #expect(parsed.maxPayload == 4096)
        #expect(try FirecrackerArguments.parse(["--config-file", "c.json", "--no-api"]).noAPI)
    }

    @Test("Unknown flags, missing values, conflicts and bad numbers are errors")
    func refuses() {
        for arguments in [["--frobnicate"], ["--api-sock"], ["--no-api"], ["--no-seccomp", "--seccomp-filter", "f"],
                          ["--http-api-max-payload-size", "lots"], ["--level", "Shouty"], ["--id", "has space"],
                          ["positional"], ["--id", "a", "--id", "b"], ["--metadata", "m.json"], ["--show-level=yes"]] {
            #expect(throws: APIError.self, "\(arguments)") { try FirecrackerArguments.parse(arguments) }
        }
    }
}
