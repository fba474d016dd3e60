import CSandbox
#if canImport(Glibc)
import Glibc
#endif

/// What a thread of Swiftlet is for; each kind has its own seccomp filter
/// (``ThreadKind/filter``). Every thread Swiftlet starts, and the CLI's main thread,
/// confines itself with ``Sandbox/confine(_:)`` before it touches guest data.
public enum ThreadKind: String, Sendable, CaseIterable {
    /// The CLI's main thread once the VM runs: waits for the stop, restores the terminal,
    /// prints the reports, exits.
    case control
    /// `vcpu<N>`: `KVM_RUN` and the exit loop; every port and MMIO device model runs here.
    case vcpu
    /// `events`: the machine's event loop (timeout, termination signals, standard input).
    case eventLoop = "event-loop"
    /// `blk<D>q<Q>`: takes virtio-blk requests from a queue and hands them to the workers.
    case blockDispatcher = "blk-dispatcher"
    /// `blk<D>q<Q>w<W>`: reads and writes the disk image for virtio-blk requests.
    case blockWorker = "blk-worker"
    /// `net<N>`: the virtio-net event loop, moving frames between the queues and the TAP.
    case netLoop = "net-loop"
    /// The Firecracker-compatible API server's threads (`api`), SwiftNIO over a Unix socket.
    case api
    /// The migration and monitor sockets' threads.
    case migration
}

/// Whether threads are confined, and how a forbidden call ends.
public enum SeccompMode: String, Sendable, CaseIterable {
    /// Filters installed; a forbidden call ends the VM (SIGSYS, one line, status 8).
    case on
    /// No filters (debugging): `swiftlet run --seccomp off` warns loudly.
    case off
    /// Filters installed, but a call they would forbid is allowed and written to the
    /// kernel's audit log (`dmesg`: `type=1326 ... comm="vcpu0" syscall=N`): how the allow
    /// lists were measured.
    case log
}

/// Why a thread could not be confined.
public struct SandboxError: Error, CustomStringConvertible {
    public let description: String
}

/// The confinement of one VM's threads: the seccomp mode, and the paths Landlock lets the
/// threads that may still open files open (none of the kinds Swiftlet has today: they
/// open everything before they are confined).
public struct Sandbox: Sendable {
    public var mode: SeccompMode
    /// Paths and what may be done beneath them, for the thread kinds whose filter allows
    /// opening files (the API thread's boot source and drives).
    public var landlockPaths: [LandlockPath]

    public init(mode: SeccompMode = .on, landlockPaths: [LandlockPath] = []) {
        self.mode = mode
        self.landlockPaths = landlockPaths
    }

    /// No confinement at all.
    public static let off = Sandbox(mode: .off)

    /// The status Swiftlet ends with when a thread makes a forbidden system call: even, like
    /// every status Swiftlet decides itself, and distinct from them (see `swiftlet run --help`).
    public static let violationExitStatus: Int32 = 8

    /// Confines the calling thread as `kind`: `no_new_privs`, then Landlock (when the
    /// kernel has it) with no file access beyond ``landlockPaths`` for the kinds that may
    /// open files, then the kind's seccomp filter. Call it once, from the thread itself,
    /// after everything the filter forbids is done (files and libraries opened, threads
    /// started) and before the thread touches guest data. Does nothing when the mode is
    /// ``SeccompMode/off``.
    public func confine(_ kind: ThreadKind) throws(SandboxError) {
        guard mode != .off else { return }
        Self.installViolationHandler()
        csandbox_label_calling_thread(kind.rawValue)
        let noNewPrivs = csandbox_set_no_new_privs()
        guard noNewPrivs == 0 else { throw SandboxError(description: "prctl(PR_SET_NO_NEW_PRIVS): \(Self.errorText(noNewPrivs))") }
        if Landlock.abiVersion > 0 {
            try Landlock.restrictCallingThread(allowing: kind.opensFiles ? landlockPaths : [])
        }
        let program: [BPFInstruction]
        do {
            program = try kind.filter(otherwise: mode == .log ? .log : .trap).compile()
        } catch {
            throw SandboxError(description: "the \(kind.rawValue) filter does not assemble: \(error)")
        }
        try Self.install(program)
    }

    /// Installs `program` on the calling thread (no_new_privs must be set).
    static func install(_ program: [BPFInstruction]) throws(SandboxError) {
        let instructions = program.map { csandbox_instruction(code: $0.code, jt: $0.jumpIfTrue, jf: $0.jumpIfFalse, k: $0.k) }
        let result = instructions.withUnsafeBufferPointer { csandbox_install_filter($0.baseAddress, UInt16($0.count)) }
        guard result == 0 else { throw SandboxError(description: "seccomp(SECCOMP_SET_MODE_FILTER): \(errorText(result))") }
    }

    private static let handlerInstalled: Bool = {
        csandbox_install_violation_handler(violationExitStatus) == 0
    }()

    static func installViolationHandler() { _ = handlerInstalled }

    static func errorText(_ number: Int32) -> String { String(cString: strerror(number)) }

    /// The calling thread's seccomp mode (`/proc/self/status` `Seccomp:`): 0 none, 2 filter.
    public static var callingThreadSeccompMode: Int32 { csandbox_seccomp_mode() }

    /// Whether `no_new_privs` is set on the calling thread.
    public static var callingThreadHasNoNewPrivs: Bool { csandbox_no_new_privs() == 1 }

    /// Makes system call `number` with three arguments: the forbidden-call test hook uses it.
    @discardableResult
    public static func systemCall(_ call: SystemCall, _ a0: Int = 0, _ a1: Int = 0, _ a2: Int = 0) -> Int {
        csandbox_syscall3(Int(call.rawValue), a0, a1, a2)
    }

    /// The system call's name, as the violation message prints it.
    public static func name(ofSystemCall number: Int32) -> String? {
        csandbox_syscall_name(Int(number)).map { String(cString: $0) }
    }
}

extension Sandbox {
    /// ``confine(_:)``, or one line on stderr and status 2 when the thread cannot be
    /// confined (a kernel without seccomp filters): Swiftlet does not run a guest with a
    /// thread left open by mistake. `--seccomp off` is the way to run without.
    public func confineOrExit(_ kind: ThreadKind) {
        do {
            try confine(kind)
        } catch {
            let line = "swiftlet: cannot confine the \(kind.rawValue) thread: \(error) (--seccomp off runs without filters)\n"
            _ = line.withCString { write(2, $0, strlen($0)) }
            _exit(2)
        }
    }

    /// The test hook's forbidden call: `ioctl(-1, KVM_CREATE_VM)`, which no confined thread
    /// may make (the message then shows the ioctl request too).
    public static func makeForbiddenCall() {
        systemCall(.ioctl, -1, Int(0xAE01), 0)
    }
}

extension Sandbox {
    /// The seccomp filter thread `tid` (of another process) runs under, newest first, read
    /// with PTRACE_SECCOMP_GET_FILTER (root): for audits and tests. Nil when it cannot be
    /// read (no filter, no permission).
    public static func installedFilter(thread tid: Int32) -> [BPFInstruction]? {
        var buffer = [csandbox_instruction](repeating: csandbox_instruction(), count: 4096)
        let count = buffer.withUnsafeMutableBufferPointer { csandbox_read_filter(tid, $0.baseAddress, Int32($0.count)) }
        guard count >= 0 else { return nil }
        return buffer.prefix(Int(count)).map { BPFInstruction(code: $0.code, jumpIfTrue: $0.jt, jumpIfFalse: $0.jf, k: $0.k) }
    }

    /// What happens when a child process under `program` makes `call`: 0 when the call was
    /// allowed (whatever it returned), 128 + SIGSYS when the filter trapped or killed it, 8
    /// with `handler` (the violation handler ran, its line on `stderr`).
    public static func probe(_ program: [BPFInstruction], _ call: Int32, _ a0: Int = 0, _ a1: Int = 0, _ a2: Int = 0,
                             handler: Bool = false, stderr: Int32 = -1) -> Int32 {
        let instructions = program.map { csandbox_instruction(code: $0.code, jt: $0.jumpIfTrue, jf: $0.jumpIfFalse, k: $0.k) }
        return instructions.withUnsafeBufferPointer {
            csandbox_probe($0.baseAddress, UInt16($0.count), handler ? 1 : 0, stderr, Int(call), a0, a1, a2)
        }
    }
}
