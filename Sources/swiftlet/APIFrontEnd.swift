import API
import APIServer
import FoundationEssentials
import Glibc
import Synchronization
import SwiftletKit

/// Runs Swiftlet the Firecracker way: the VM is configured through the API socket, a
/// `--config-file`, or both; the process lives until the guest stops (or a termination
/// signal), then exits with the guest's status like `swiftlet run`.
struct APIFrontEnd {
    var socketPath: String?
    var configFile: String?
    var instanceID = "anonymous-instance"
    var logger = LoggerConfig()
    var metricsPath: String?
    var maxPayload = APIServer.defaultMaxPayload
    var transport: VMConfiguration.VirtioTransport = .pci
    var console: VMConfiguration.Console = .standardOutput
    var timeout: Duration?
    /// The VM's threads' seccomp filters (the API's own threads are not filtered yet).
    var seccomp: VMConfiguration.Seccomp = .on
    var paths = PathPolicy()
    /// Lines to log once the logger is set up (accepted flags that do nothing here).
    var notes: [String] = []

    static let terminationSignals: [Int32] = [SIGINT, SIGTERM, SIGHUP, SIGQUIT]

    func run() -> Never {
        // Termination signals are taken by this thread with sigtimedwait: block them
        // before any other thread starts, so every thread inherits the mask.
        var signals = sigset_t()
        sigemptyset(&signals)
        for number in Self.terminationSignals { sigaddset(&signals, number) }
        pthread_sigmask(SIG_BLOCK, &signals, nil)

        let finished = Mutex<Result<VMResult, SwiftletError>?>(nil)
        let transport = self.transport
        let console = self.console
        let timeout = self.timeout
        let seccomp = self.seccomp
        let controller = APIController(instanceID: instanceID, paths: paths, prepare: { configuration in
            configuration.virtioTransport = transport
            configuration.console = console
            configuration.timeout = timeout
            configuration.seccomp = seccomp
            configuration.forwardStandardInput = true
            configuration.onWarning = { message in FileHandleOutput.standardError("swiftlet: warning: \(message)") }
            configuration.onConsoleFailure = { message in FileHandleOutput.standardError("swiftlet: \(message)") }
        }, onExit: { result in
            finished.withLock { $0 = result }
        })

        func fail(_ message: String) -> Never {
            FileHandleOutput.standardError("swiftlet: \(message)")
            exit(VMExit.failureStatus)
        }
        // Paths on the command line come from the user who started Swiftlet (/dev/stdout
        // is a fine log path there); the API's clients get `paths`.
        var trusted = PathPolicy()
        trusted.denied = []
        do {
            try controller.logSink.configure(logger, paths: trusted)
            if let metricsPath { try controller.metrics.configure(MetricsConfig(metricsPath: metricsPath), paths: trusted) }
        } catch {
            fail(error.message)
        }
        let log = controller.logSink.makeLogger(label: "main")
        for note in notes { log.info("\(note)") }

        var server: APIServer?
        if let socketPath {
            do {
                server = try APIServer.start(socketPath: socketPath, controller: controller, maxPayload: maxPayload)
            } catch let error as APIError {
                fail(error.message)
            } catch {
                fail("cannot serve the API on '\(socketPath)': \(error)")
            }
            log.info("API server listening on \(socketPath)")
        }
        if let configFile {
            guard let data = FileManager.default.contents(atPath: configFile) else {
                server?.stop()
                fail("cannot read the config file '\(configFile)': \(String(cString: strerror(errno)))")
            }
            do {
                try controller.apply(configFile: Array(data))
                try controller.start()
            } catch {
                server?.stop()
                fail("\(configFile): \(error.message)")
            }
        }

        // Wait for the guest to stop or a termination signal.
        var timeoutSpec = timespec(tv_sec: 0, tv_nsec: 50_000_000)
        var signalled: Int32?
        while true {
            if let result = finished.withLock({ $0 }) {
                server?.stop()
                controller.flushMetrics()
                switch result {
                case let .failure(error): fail(error.message)
                case let .success(result):
                    switch result.exit {
                    case .crash, .timeout, .reset, .powerOff, .signal:
                        FileHandleOutput.standardError("swiftlet: \(result.exit)")
                    default: break
                    }
                    if case let .signal(number) = result.exit { RunCommand.endBySignal(number) }
                    if let signalled { RunCommand.endBySignal(signalled) }
                    exit(result.exit.exitStatus)
                }
            }
            let number = sigtimedwait(&signals, nil, &timeoutSpec)
            guard number > 0 else { continue }
            log.info("Received signal \(number), stopping")
            if signalled == nil, controller.stop(.signal(number)) {
                signalled = number
                continue
            }
            server?.stop()
            controller.flushMetrics()
            RunCommand.endBySignal(number)
        }
    }
}

extension APIFrontEnd {
    /// `firecracker ARGS...`: Swiftlet started through a symlink named `firecracker`.
    static func runAsFirecracker(_ arguments: [String]) -> Never {
        let parsed: FirecrackerArguments
        do {
            parsed = try FirecrackerArguments.parse(arguments)
        } catch {
            FileHandleOutput.standardError("swiftlet: \(error.message)\n(see 'firecracker --help')")
            exit(VMExit.failureStatus)
        }
        if parsed.help {
            print(FirecrackerArguments.helpText)
            exit(0)
        }
        if parsed.version {
            print("Firecracker v\(APIController.version) (Swiftlet)\n")
            exit(0)
        }
        var frontEnd = APIFrontEnd()
        frontEnd.socketPath = parsed.noAPI ? nil : parsed.apiSocket
        frontEnd.configFile = parsed.configFile
        frontEnd.instanceID = parsed.id
        frontEnd.logger = LoggerConfig(level: parsed.level, logPath: parsed.logPath, showLevel: parsed.showLevel,
                                       showLogOrigin: parsed.showLogOrigin, module: parsed.module)
        frontEnd.metricsPath = parsed.metricsPath
        frontEnd.maxPayload = parsed.maxPayload
        frontEnd.transport = parsed.enablePCI ? .pci : .mmio
        if parsed.noSeccomp {
            frontEnd.seccomp = .off
            frontEnd.notes.append("WARNING: --no-seccomp: the VM's threads run WITHOUT seccomp filters. Use this only for debugging.")
        } else if parsed.seccompFilter != nil {
            frontEnd.notes.append("--seccomp-filter accepted and ignored: Swiftlet installs its own per-thread filters (docs/security.md)")
        }
        if parsed.bootTimer {
            frontEnd.notes.append("--boot-timer accepted: Swiftlet has no boot timer device")
        }
        frontEnd.run()
    }
}
