/// Firecracker's command line (src/firecracker/src/main.rs), for `swiftlet` started
/// through a symlink named `firecracker`. Flags are `--name value` or `--name=value`; an
/// unknown flag, a missing value or a bad number is an error naming it.
public struct FirecrackerArguments: Sendable, Equatable {
    public var apiSocket = "/run/firecracker.socket"
    public var noAPI = false
    public var configFile: String?
    public var id = "anonymous-instance"
    public var logPath: String?
    public var level: String?
    public var module: String?
    public var showLevel = false
    public var showLogOrigin = false
    public var metricsPath: String?
    public var bootTimer = false
    public var maxPayload = 51_200
    public var enablePCI = false
    /// `--no-seccomp` or `--seccomp-filter FILE`: accepted; Swiftlet installs no seccomp
    /// filter of its own yet (docs/api.md).
    public var noSeccomp = false
    public var seccompFilter: String?
    public var version = false
    public var help = false

    public init() {}

    /// Flags that take a value, and flags that do not.
    static let valued: Set<String> = ["api-sock", "id", "seccomp-filter", "start-time-us", "start-time-cpu-us",
                                      "parent-cpu-time-us", "config-file", "metadata", "log-path", "level", "module",
                                      "metrics-path", "http-api-max-payload-size", "mmds-size-limit", "describe-snapshot"]
    static let switches: Set<String> = ["no-seccomp", "no-api", "show-level", "show-log-origin", "boot-timer", "version",
                                        "snapshot-version", "enable-pci", "help"]

    public static func parse(_ arguments: [String]) throws(APIError) -> FirecrackerArguments {
        var result = FirecrackerArguments()
        var seen = Set<String>()
        var rest = arguments[...]
        while let argument = rest.popFirst() {
            guard argument.hasPrefix("--"), argument.count > 2 else {
                throw APIError("Found argument '\(argument)' which wasn't expected, or isn't valid in this context.")
            }
            var name = String(argument.dropFirst(2))
            var value: String?
            if let equals = name.firstIndex(of: "=") {
                value = String(name[name.index(after: equals)...])
                name = String(name[..<equals])
            }
            guard !seen.contains(name) else { throw APIError("The argument '--\(name)' was provided more than once.") }
            seen.insert(name)
            if valued.contains(name) {
                if value == nil {
                    guard let next = rest.popFirst(), !next.hasPrefix("--") else {
                        throw APIError("The argument '--\(name)' requires a value, but none was supplied")
                    }
                    value = next
                }
            } else if switches.contains(name) {
                guard value == nil else { throw APIError("The argument '--\(name)' takes no value") }
            } else {
                throw APIError("Found argument '--\(name)' which wasn't expected, or isn't valid in this context.")
            }
            let text = value ?? ""
            func number() throws(APIError) -> UInt64 {
                guard let n = UInt64(text) else { throw APIError("--\(name): '\(text)' is not a non-negative integer") }
                return n
            }
            switch name {
            case "api-sock": result.apiSocket = text
            case "id":
                guard (1...64).contains(text.utf8.count), text.utf8.allSatisfy({ $0 == UInt8(ascii: "-") || ($0 < 0x80 && ($0 >= 0x30 && $0 <= 0x39 || $0 | 0x20 >= 0x61 && $0 | 0x20 <= 0x7A)) }) else {
                    throw APIError("Invalid instance ID: '\(text)' (1 to 64 ASCII letters, digits or '-')")
                }
                result.id = text
            case "seccomp-filter": result.seccompFilter = text
            case "no-seccomp": result.noSeccomp = true
            case "start-time-us", "start-time-cpu-us", "parent-cpu-time-us": _ = try number()
            case "config-file": result.configFile = text
            case "metadata": throw APIError.notSupported("--metadata (Swiftlet has no MMDS)")
            case "mmds-size-limit": _ = try number()
            case "no-api": result.noAPI = true
            case "log-path": result.logPath = text
            case "level":
                _ = try LogSink.level(named: text)
                result.level = text
            case "module": result.module = text
            case "show-level": result.showLevel = true
            case "show-log-origin": result.showLogOrigin = true
            case "metrics-path": result.metricsPath = text
            case "boot-timer": result.bootTimer = true
            case "version": result.version = true
            case "snapshot-version": throw APIError.notSupported("--snapshot-version (Swiftlet's snapshot format is not Firecracker's)")
            case "describe-snapshot": throw APIError.notSupported("--describe-snapshot (Swiftlet's snapshot format is not Firecracker's)")
            case "http-api-max-payload-size":
                let n = try number()
                guard n >= 1024, n <= 64 << 20 else { throw APIError("--http-api-max-payload-size must be 1024 to \(64 << 20) bytes") }
                result.maxPayload = Int(n)
            case "enable-pci": result.enablePCI = true
            case "help": result.help = true
            default: break
            }
        }
        if result.noSeccomp && result.seccompFilter != nil {
            throw APIError("The argument '--no-seccomp' cannot be used with '--seccomp-filter'")
        }
        if result.noAPI && result.configFile == nil {
            throw APIError("The argument '--no-api' requires '--config-file'")
        }
        return result
    }

    public static let helpText = """
        Firecracker-compatible command line of Swiftlet (see docs/api.md).

        --api-sock PATH              the API's Unix socket (default /run/firecracker.socket)
        --config-file PATH           boot from a JSON VM configuration without API calls
        --no-api                     serve no API (needs --config-file)
        --id ID                      the instance ID (logs, metrics, GET /)
        --log-path PATH              log to a file or FIFO
        --level LEVEL                Error, Warning, Info, Debug, Trace or Off
        --module NAME                log only from this module
        --show-level, --show-log-origin
        --metrics-path PATH          metrics as JSON lines to a file or FIFO
        --http-api-max-payload-size N
        --enable-pci                 virtio over PCI (default: virtio-mmio, as Firecracker)
        --boot-timer, --no-seccomp, --seccomp-filter FILE, --start-time-us N,
        --start-time-cpu-us N, --parent-cpu-time-us N, --mmds-size-limit N: accepted
        --version                    print the API version Swiftlet implements
        """
}
