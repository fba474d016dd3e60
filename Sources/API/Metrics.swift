import FoundationEssentials
import Glibc
import Synchronization

/// Firecracker-style metrics: counters kept while the VMM runs, written as one JSON
/// object per line to the file or FIFO `PUT /metrics` names, on `FlushMetrics` and
/// periodically. As in Firecracker, counters are deltas since the previous line.
public final class MetricsRecorder: Sendable {
    struct State {
        var descriptor: Int32?
        var config: MetricsConfig?
        /// Group -> counter -> value since the last flush (`put_api_requests.actions_count`).
        var counters: [String: [String: UInt64]] = [:]
    }

    private let state = Mutex(State())
    private let instanceID: String
    /// When this process started (for `api_server.process_startup_time_us`).
    private let started = Date()

    public init(instanceID: String) { self.instanceID = instanceID }

    deinit {
        state.withLock { if let fd = $0.descriptor { close(fd) } }
    }

    public var isConfigured: Bool { state.withLock { $0.descriptor != nil } }
    var config: MetricsConfig? { state.withLock { $0.config } }

    /// Opens the output once: Firecracker refuses a second `PUT /metrics`.
    public func configure(_ config: MetricsConfig, paths: PathPolicy) throws(APIError) {
        try paths.check(config.metricsPath, "metrics_path")
        if isConfigured { throw APIError("Reinitialization of metrics not allowed.") }
        let descriptor = try LogSink.openOutput(config.metricsPath, what: "metrics_path")
        state.withLock { s in
            s.descriptor = descriptor
            s.config = config
        }
    }

    /// Adds `amount` to `group.name`.
    public func count(_ group: String, _ name: String, _ amount: UInt64 = 1) {
        state.withLock { s in s.counters[group, default: [:]][name, default: 0] &+= amount }
    }

    /// The line a flush writes now.
    func line(resetting: Bool, extra: [String: MetricValue] = [:]) -> [UInt8] {
        state.withLock { s in
            var object: [String: MetricValue] = ["utc_timestamp_ms": .integer(Int64(Date().timeIntervalSince1970 * 1000))]
            for (group, counters) in s.counters {
                object[group] = .object(counters.mapValues { .integer(Int64(clamping: $0)) })
            }
            if s.config?.emitId == true { object["id"] = .string(instanceID) }
            if let properties = s.config?.properties { object["properties"] = .object(properties.mapValues { .string($0) }) }
            for (key, value) in extra { object[key] = value }
            if resetting { s.counters = [:] }
            let encoder = JSONEncoder()
            encoder.outputFormatting = [.sortedKeys]
            let data = (try? encoder.encode(object)) ?? Data("{}".utf8)
            return Array(data) + [0x0A]
        }
    }

    /// Writes one line of metrics; `false` when no output is configured.
    @discardableResult
    public func flush(extra: [String: MetricValue] = [:]) -> Bool {
        guard let descriptor = state.withLock({ $0.descriptor }) else { return false }
        let bytes = line(resetting: true, extra: extra)
        writeAll(descriptor, bytes)
        return true
    }
}

/// A value in a metrics line: a counter, a string, or a group of them.
public enum MetricValue: Encodable, Sendable, Equatable {
    case integer(Int64)
    case string(String)
    case object([String: MetricValue])

    public func encode(to encoder: any Encoder) throws {
        var container = encoder.singleValueContainer()
        switch self {
        case let .integer(value): try container.encode(value)
        case let .string(value): try container.encode(value)
        case let .object(value): try container.encode(value)
        }
    }
}
