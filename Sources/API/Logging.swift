import CLinux
import FoundationEssentials
import Glibc
import Logging
import Synchronization

/// Where the API's log lines go and how they look: Firecracker's `Logger` settings
/// (`level`, `log_path`, `show_level`, `show_log_origin`, `module`), changeable while
/// running. One sink per controller; every `Logger` made by ``makeLogger(label:)`` writes
/// through it, so `PUT /logger` redirects them all.
public final class LogSink: Sendable {
    struct Settings {
        var level: Logger.Level? = .warning      // nil: Off
        var descriptor: Int32 = STDERR_FILENO
        var ownsDescriptor = false
        var showLevel = false
        var showOrigin = false
        var module: String?
        var path: String?
    }

    private let settings = Mutex(Settings())
    /// The instance ID printed in each line (`--id`).
    public let instanceID: String

    public init(instanceID: String) { self.instanceID = instanceID }

    deinit {
        settings.withLock { if $0.ownsDescriptor { close($0.descriptor) } }
    }

    /// Parses Firecracker's level names (case-insensitive): Error, Warning, Info, Debug,
    /// Trace, Off. `nil` result means Off.
    public static func level(named name: String) throws(APIError) -> Logger.Level? {
        switch name.lowercased() {
        case "error": return .error
        case "warning", "warn": return .warning
        case "info": return .info
        case "debug": return .debug
        case "trace": return .trace
        case "off": return nil
        default: throw APIError("Invalid log level: `\(name)` (expected Error, Warning, Info, Debug, Trace or Off)")
        }
    }

    /// Applies `config`: opens `log_path` (a file, appended to, or a FIFO, opened without
    /// blocking) before changing anything, so a bad path leaves the old settings.
    public func configure(_ config: LoggerConfig, paths: PathPolicy) throws(APIError) {
        let level = try config.level.map { (name) throws(APIError) in try Self.level(named: name) }
        var descriptor: Int32?
        if let path = config.logPath {
            try paths.check(path, "log_path")
            descriptor = try Self.openOutput(path, what: "log_path")
        }
        settings.withLock { s in
            if let level { s.level = level }
            if let descriptor {
                if s.ownsDescriptor { close(s.descriptor) }
                s.descriptor = descriptor
                s.ownsDescriptor = true
                s.path = config.logPath
            }
            if let show = config.showLevel { s.showLevel = show }
            if let show = config.showLogOrigin { s.showOrigin = show }
            if let module = config.module { s.module = module.isEmpty ? nil : module }
        }
    }

    /// The settings as Firecracker's `Logger` object, for `GET /vm/config`.
    var current: LoggerConfig {
        settings.withLock { s in
            LoggerConfig(level: s.level.map(Self.name(of:)) ?? "Off", logPath: s.path, showLevel: s.showLevel,
                         showLogOrigin: s.showOrigin, module: s.module)
        }
    }

    static func name(of level: Logger.Level) -> String {
        switch level {
        case .trace: return "Trace"
        case .debug: return "Debug"
        case .info, .notice: return "Info"
        case .warning: return "Warning"
        case .error, .critical: return "Error"
        }
    }

    /// Opens a log or metrics output for appending: created if missing (mode 0600); a
    /// FIFO is opened without blocking, so a FIFO nobody reads is an error, not a hang.
    static func openOutput(_ path: String, what: String) throws(APIError) -> Int32 {
        let descriptor = open(path, O_WRONLY | O_APPEND | O_CREAT | O_NONBLOCK | O_CLOEXEC, 0o600)
        guard descriptor >= 0 else {
            throw APIError("cannot open \(what) `\(path)`: \(String(cString: strerror(errno)))")
        }
        var status = stat()
        guard fstat(descriptor, &status) == 0,
              (status.st_mode & S_IFMT) == S_IFREG || (status.st_mode & S_IFMT) == S_IFIFO else {
            close(descriptor)
            throw APIError("\(what) `\(path)` must be a regular file or a FIFO")
        }
        return descriptor
    }

    func write(level: Logger.Level, label: String, message: String, file: String, line: UInt) {
        settings.withLock { s in
            guard let threshold = s.level, level >= threshold else { return }
            if let module = s.module, !label.hasPrefix(module) { return }
            var text = Self.timestamp() + " [\(instanceID):\(Self.threadName())]"
            if s.showLevel { text += " [\(Self.name(of: level))]" }
            if s.showOrigin { text += " [\(file.split(separator: "/").last.map(String.init) ?? file):\(line)]" }
            text += " " + message + "\n"
            writeAll(s.descriptor, Array(text.utf8))
        }
    }

    static func timestamp() -> String {
        var now = timespec()
        clock_gettime(CLOCK_REALTIME, &now)
        var seconds = time_t(now.tv_sec)
        var parts = tm()
        gmtime_r(&seconds, &parts)
        func padded(_ value: Int, _ width: Int) -> String {
            let digits = String(value)
            return String(repeating: "0", count: max(0, width - digits.count)) + digits
        }
        return "\(padded(Int(parts.tm_year) + 1900, 4))-\(padded(Int(parts.tm_mon) + 1, 2))-\(padded(Int(parts.tm_mday), 2))T"
            + "\(padded(Int(parts.tm_hour), 2)):\(padded(Int(parts.tm_min), 2)):\(padded(Int(parts.tm_sec), 2)).\(padded(Int(now.tv_nsec), 9))"
    }

    static func threadName() -> String {
        var buffer = [CChar](repeating: 0, count: 32)
        _ = clinux_get_thread_name(&buffer, UInt(buffer.count))
        return String(decoding: buffer.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }

    /// A swift-log `Logger` that writes through this sink.
    public func makeLogger(label: String) -> Logger {
        Logger(label: label) { label in SinkLogHandler(label: label, sink: self) }
    }
}

/// Writes all of `bytes` to `descriptor`, retrying on EINTR; gives up on any other error
/// (a full FIFO drops the line rather than stalling the API).
func writeAll(_ descriptor: Int32, _ bytes: [UInt8]) {
    bytes.withUnsafeBytes { buffer in
        var offset = 0
        while offset < buffer.count {
            let written = Glibc.write(descriptor, buffer.baseAddress! + offset, buffer.count - offset)
            if written < 0 && errno == EINTR { continue }
            guard written > 0 else { return }
            offset += written
        }
    }
}

/// swift-log's handler for a ``LogSink``.
struct SinkLogHandler: LogHandler {
    let label: String
    let sink: LogSink
    var metadata: Logger.Metadata = [:]
    var logLevel: Logger.Level = .trace    // the sink filters by its own level

    subscript(metadataKey key: String) -> Logger.Metadata.Value? {
        get { metadata[key] }
        set { metadata[key] = newValue }
    }

    func log(event: LogEvent) {
        sink.write(level: event.level, label: label, message: event.message.description, file: event.file, line: event.line)
    }
}
