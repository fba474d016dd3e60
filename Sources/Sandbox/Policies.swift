import CKVM
import CSandbox
#if canImport(Glibc)
import Glibc
#endif

// The allow list of each thread kind, as data. Every entry was measured: the test suite and
// the bundled guests were run under `strace -f` and with `--seccomp log` (see
// docs/security.md, "How the lists were made"), and each call is listed with the code that
// makes it. Order matters only for speed: the hot calls of a kind come first.

extension ThreadKind {
    /// The kind's filter; every call it does not allow gets `otherwise`. `processID` is the
    /// process the thread belongs to (a vCPU may signal only its own process's threads).
    public func filter(otherwise: SeccompAction = .trap, processID: Int32 = getpid()) -> SeccompFilter {
        SeccompFilter(rules: rules(processID: processID), otherwise: otherwise)
    }

    /// Whether the kind may open files once confined (Landlock then limits which).
    public var opensFiles: Bool { self == .api || self == .migration }

    /// The rules of the kind, hot calls first.
    public func rules(processID: Int32 = getpid()) -> [SeccompRule] {
        switch self {
        case .vcpu: return Self.vcpuRules(processID: processID) + Self.common
        case .control: return Self.controlRules + Self.common
        case .eventLoop: return Self.eventLoopRules + Self.common
        case .blockDispatcher: return Self.blockDispatcherRules + Self.common
        case .blockWorker: return Self.blockWorkerRules + Self.common
        case .netLoop: return Self.netLoopRules + Self.common
        case .api: return Self.apiRules + Self.common
        case .migration: return Self.migrationRules + Self.common
        }
    }
}

/// Request numbers as the filters compare them (the kernel reads ioctl's request as an
/// unsigned int).
private func requests(_ values: UInt...) -> [UInt64] { values.map { UInt64($0) } }

extension ThreadKind {
    /// What every Swiftlet thread does: the Swift runtime and glibc (locks, memory, thread
    /// exit), and the violation handler's one line on stderr and exit.
    static let common: [SeccompRule] = [
        .fail(.openat, errno: EACCES, because: "glibc's malloc reads /proc/sys/vm/overcommit_memory the first time a thread's heap "
              + "shrinks, and takes a failure as 'no overcommit'; every other open fails the same way (Landlock refuses them too)"),
        .fail(.open, errno: EACCES, because: "as openat"),
        .allow(.futex, "Mutex, DispatchSemaphore, condition variables, pthread_join"),
        .allow(.write, when: .argument(0, is: 2), because: "messages on stderr; the SIGSYS handler's line"),
        .allow(.madvise, "malloc returning memory; glibc freeing a thread's stack"),
        .allow(.mmap, when: .argument(2, masked: UInt64(PROT_EXEC), is: 0), because: "malloc (never executable memory)"),
        .allow(.mprotect, when: .argument(2, masked: UInt64(PROT_EXEC), is: 0), because: "malloc growing an arena (never executable)"),
        .allow(.munmap, "free of large blocks"),
        .allow(.brk, "malloc"),
        .allow(.rt_sigprocmask, "glibc around thread exit and locks"),
        .allow(.rt_sigreturn, "return from the kick signal's handler"),
        .allow(.sched_yield, "spin locks in the Swift runtime and glibc"),
        .allow(.gettid, "glibc, the Swift runtime"),
        .allow(.getpid, "glibc raise, the Swift runtime"),
        .allow(.clock_gettime, "when the vDSO is not used"),
        .allow(.exit, "a thread's body returning"),
        .allow(.exit_group, "the process ending (and the SIGSYS handler)"),
        .allow(.restart_syscall, "a futex wait interrupted by a signal"),
        .allow(.close, "an owned descriptor (eventfd, timerfd, epoll) is closed by whichever thread drops its last "
               + "reference: a device thread ending its session can be that thread"),
    ]

    /// vCPU requests: `KVM_RUN` first, then state reads (crash report, snapshot, the objdump
    /// hint's KVM_TRANSLATE) and the VM requests devices make from the exit loop.
    static let vcpuIoctls: [UInt64] = requests(
        CKVM_RUN,
        CKVM_IRQ_LINE, CKVM_SIGNAL_MSI, CKVM_IOEVENTFD, CKVM_IRQFD, CKVM_SET_GSI_ROUTING,
        CKVM_SET_USER_MEMORY_REGION, CKVM_GET_DIRTY_LOG,
        CKVM_GET_REGS, CKVM_SET_REGS, CKVM_GET_SREGS, CKVM_SET_SREGS, CKVM_GET_MSRS, CKVM_SET_MSRS,
        CKVM_GET_FPU, CKVM_SET_FPU, CKVM_GET_LAPIC, CKVM_SET_LAPIC, CKVM_GET_VCPU_EVENTS, CKVM_SET_VCPU_EVENTS,
        CKVM_TRANSLATE, CKVM_GET_XSAVE, CKVM_GET_XSAVE2, CKVM_SET_XSAVE, CKVM_GET_MP_STATE, CKVM_SET_MP_STATE,
        CKVM_GET_CPUID2, CKVM_GET_XCRS, CKVM_SET_XCRS, CKVM_GET_DEBUGREGS, CKVM_SET_DEBUGREGS,
        CKVM_GET_TSC_KHZ, CKVM_KVMCLOCK_CTRL, CKVM_CHECK_EXTENSION,
        CSANDBOX_TUNSETOFFLOAD
    )

    static func vcpuRules(processID: Int32) -> [SeccompRule] {
        [
            .allow(.ioctl, when: .argument(1, in: vcpuIoctls), because: "KVM_RUN; KVM state and VM requests; TUNSETOFFLOAD at virtio-net activation"),
            .allow(.write, "serial output to stdout or a --serial file; eventfd signals to device threads"),
            .allow(.read, "eventfd counters"),
            .allow(.tgkill, when: .argument(0, is: UInt64(UInt32(bitPattern: processID))), .argument(2, is: UInt64(ckvm_kick_signal())),
                   because: "a stop kicks the other vCPUs out of KVM_RUN"),
            .allow(.eventfd2, "virtio activation: notify and interrupt eventfds, virtio-net's event loop"),
            .allow(.timerfd_create, "virtio activation: the rate limiters' refill timers (blk queues, net)"),
            .allow(.epoll_create1, "virtio-net activation makes its event loop"),
            .allow(.epoll_ctl, "virtio-net activation registers the TAP and queues"),
            .allow(.close, "virtio reset closes the session's eventfds"),
            .allow(.nanosleep, "virtio-blk pause waits for requests in flight"),
            .allow(.clock_nanosleep, "virtio-blk pause waits for requests in flight"),
        ]
    }

    static let controlRules: [SeccompRule] = [
        .allow(.write, "reports on stderr"),
        .allow(.ioctl, when: .argument(1, in: requests(CSANDBOX_TCGETS, CSANDBOX_TCSETS, CSANDBOX_TCSETSW, CSANDBOX_TCSETSF,
                                                        CKVM_GET_DIRTY_LOG, CKVM_IOEVENTFD, CKVM_IRQFD)),
               because: "restoring the terminal; --show-memory's written pages at the end; tearing the board down "
                   + "detaches each virtio transport's ioeventfds and irqfds"),
        .allow(.tgkill, "kicking vCPUs; ending by the signal that stopped the VM"),
        .allow(.rt_sigaction, "ending by the signal that stopped the VM (SIG_DFL)"),
        .allow(.setrlimit, "no core dump for SIGQUIT"),
        .allow(.prlimit64, "no core dump for SIGQUIT"),
        .allow(.close, "closing the VM's descriptors"),
        .allow(.read, "tearing the board down resets each virtio transport, which drains its eventfds"),
        .allow(.epoll_ctl, "a migrated-away VM's descriptors leave the event loop"),
        .allow(.fsync, "--serial file flushed at the end"),
        .allow(.fdatasync, "disk images flushed at the end"),
    ]

    static let eventLoopRules: [SeccompRule] = [
        .allow(.epoll_wait, "waiting"),
        .allow(.epoll_pwait, "waiting"),
        .allow(.read, "timerfd, signalfd, eventfd, standard input"),
        .allow(.write, "stop eventfd; console output"),
        .allow(.epoll_ctl, "unregistering at the end"),
        .allow(.tgkill, "a stop kicks the vCPUs"),
        .allow(.close, "descriptors it owns"),
        .allow(.ioctl, when: .argument(1, in: requests(CSANDBOX_TCGETS, CSANDBOX_TCSETS, CSANDBOX_TCSETSW, CSANDBOX_TCSETSF)),
               because: "the console restores the terminal when it quits"),
    ]

    static let blockDispatcherRules: [SeccompRule] = [
        .allow(.poll, "waiting on the queue's notify eventfd and the stop eventfd"),
        .allow(.timerfd_settime, "the rate limiter's refill timer"),
        .allow(.preadv2, "reads answered inline when the page cache has the data (RWF_NOWAIT)"),
        .allow(.pwritev2, "writes answered inline (RWF_NOWAIT)"),
        .allow(.ppoll, "waiting on the queue's notify eventfd and the stop eventfd"),
        .allow(.read, "eventfd counters"),
        .allow(.write, "waking workers, the interrupt eventfd"),
        .allow(.ioctl, when: .argument(1, in: requests(CKVM_IRQ_LINE, CKVM_SIGNAL_MSI)), because: "interrupts without irqfd"),
    ]

    static let blockWorkerRules: [SeccompRule] = [
        .allow(.pread64, "reading the image"),
        .allow(.pwrite64, "writing the image"),
        .allow(.preadv, "reading the image"),
        .allow(.preadv2, "reading the image"),
        .allow(.pwritev2, "writing the image"),
        .allow(.pwritev, "writing the image"),
        .allow(.read, "eventfd counters"),
        .allow(.write, "the interrupt eventfd"),
        .allow(.poll, "waiting for work"),
        .allow(.ppoll, "waiting for work"),
        .allow(.fdatasync, "VIRTIO_BLK_T_FLUSH"),
        .allow(.fsync, "VIRTIO_BLK_T_FLUSH"),
        .allow(.fallocate, "discard and write-zeroes"),
        .allow(.fstat, "the image's size"),
        .allow(.newfstatat, "the image's size"),
        .allow(.lseek, "SEEK_DATA/SEEK_HOLE"),
        .allow(.ftruncate, "qcow2 growth"),
        .allow(.ioctl, when: .argument(1, in: requests(CKVM_IRQ_LINE, CKVM_SIGNAL_MSI)), because: "interrupts without irqfd"),
    ]

    static let netLoopRules: [SeccompRule] = [
        .allow(.epoll_wait, "waiting"),
        .allow(.epoll_pwait, "waiting"),
        .allow(.readv, "frames from the TAP"),
        .allow(.writev, "frames to the TAP"),
        .allow(.read, "frames from the TAP; eventfd counters"),
        .allow(.write, "frames to the TAP; the interrupt eventfd"),
        .allow(.epoll_ctl, "interest in the TAP's writability"),
        .allow(.timerfd_settime, "the rate limiters' refill timers"),
        .allow(.close, "the session's descriptors at reset"),
        .allow(.ioctl, when: .argument(1, in: requests(CKVM_IRQ_LINE, CKVM_SIGNAL_MSI)), because: "interrupts without irqfd"),
    ]

    /// The API server (SwiftNIO over a Unix socket). Not measured yet: the branch is not
    /// in main; the lead measures it when merging (docs/security.md).
    static let apiRules: [SeccompRule] = [
        .allow(.epoll_wait), .allow(.epoll_pwait), .allow(.epoll_ctl), .allow(.eventfd2), .allow(.epoll_create1),
        .allow(.accept4), .allow(.read), .allow(.write), .allow(.readv), .allow(.writev), .allow(.recvmsg), .allow(.sendmsg),
        .allow(.close), .allow(.shutdown), .allow(.getsockopt), .allow(.setsockopt), .allow(.fcntl),
        .allow(.openat, "boot source and drives named by API calls (Landlock limits the paths)"),
        .allow(.newfstatat), .allow(.fstat), .allow(.lseek), .allow(.pread64),
        .allow(.timerfd_create), .allow(.timerfd_settime), .allow(.tgkill),
    ]

    /// Migration and monitor sockets. Not measured yet, as ``apiRules``.
    static let migrationRules: [SeccompRule] = [
        .allow(.epoll_wait), .allow(.epoll_pwait), .allow(.epoll_ctl), .allow(.accept4), .allow(.read), .allow(.write),
        .allow(.readv), .allow(.writev), .allow(.recvmsg), .allow(.sendmsg), .allow(.close), .allow(.shutdown),
        .allow(.getsockopt), .allow(.setsockopt), .allow(.fcntl), .allow(.openat), .allow(.newfstatat), .allow(.fstat),
        .allow(.pread64), .allow(.pwrite64), .allow(.ioctl, when: .argument(1, in: vcpuIoctls)),
    ]
}
