import CKVM
import Foundation
import Testing
@testable import Sandbox

/// The filters' behaviour, checked in child processes that install them for real and make
/// the call (`Sandbox.probe`): 0 means the kernel let the call through, 128 + SIGSYS that the
/// filter stopped it.
@Suite struct SeccompFilterTests {
    static let trapped = 128 + SIGSYS
    static let allowed: Int32 = 0
    static let refusedWithEACCES: Int32 = 13

    func program(_ kind: ThreadKind) throws -> [BPFInstruction] { try kind.filter().compile() }

    @Test func everyKindsFilterAssembles() throws {
        for kind in ThreadKind.allCases {
            let program = try kind.filter().compile()
            #expect(program.count > 6 && program.count < 512, "\(kind): \(program.count) instructions")
        }
    }

    @Test(arguments: ThreadKind.allCases)
    func noKindMayOpenProgramsSocketsOrPrivileges(kind: ThreadKind) throws {
        let program = try program(kind)
        var forbidden: [SystemCall] = [.execve, .execveat, .fork, .vfork, .clone, .clone3, .ptrace, .mount, .setuid, .setgid,
                                       .socket, .connect, .bpf, .rt_sigaction, .process_vm_writev, .kill, .unshare, .setns,
                                       .pivot_root, .chroot, .init_module, .finit_module, .kexec_load, .perf_event_open]
        if !kind.opensFiles {
            forbidden += [.openat2, .creat, .unlink, .rename, .mknod, .symlink]
            // open and openat fail with EACCES (glibc's malloc opens a /proc file on its own
            // and copes with a failure); they never reach the kernel.
            for call in [SystemCall.open, .openat] {
                #expect(Sandbox.probe(program, call.rawValue, -100, 0, 0) == Self.refusedWithEACCES, "\(kind) allows \(call)")
            }
        }
        if kind != .api && kind != .migration { forbidden += [.accept4, .sendmsg, .recvmsg] }
        if kind == .control { forbidden.removeAll { $0 == .rt_sigaction } }
        for call in forbidden {
            // Arguments that make the call fail harmlessly should the filter let it through.
            #expect(Sandbox.probe(program, call.rawValue, -1, -1, -1) == Self.trapped, "\(kind) allows \(call)")
        }
    }

    @Test(arguments: ThreadKind.allCases)
    func executableMemoryIsRefusedEverywhere(kind: ThreadKind) throws {
        let program = try program(kind)
        // mmap(NULL, 4096, PROT_READ|PROT_EXEC, MAP_PRIVATE|MAP_ANONYMOUS): only 3 arguments
        // are passed, so flags are garbage and the call fails if allowed; the filter decides
        // on the protection alone.
        #expect(Sandbox.probe(program, SystemCall.mmap.rawValue, 0, 4096, Int(PROT_READ | PROT_EXEC)) == Self.trapped)
        #expect(Sandbox.probe(program, SystemCall.mprotect.rawValue, 0, 4096, Int(PROT_READ | PROT_EXEC)) == Self.trapped)
        #expect(Sandbox.probe(program, SystemCall.mmap.rawValue, 0, 4096, Int(PROT_READ | PROT_WRITE)) == Self.allowed)
    }

    @Test func vcpuThreadsMayMakeOnlyTheirKVMRequests() throws {
        let program = try program(.vcpu)
        let ioctl = SystemCall.ioctl.rawValue
        #expect(Sandbox.probe(program, ioctl, -1, Int(CKVM_RUN)) == Self.allowed)
        #expect(Sandbox.probe(program, ioctl, -1, Int(CKVM_IRQ_LINE)) == Self.allowed)
        for request in [CKVM_CREATE_VM, CKVM_CREATE_VCPU, CKVM_SET_CPUID2, CKVM_CREATE_IRQCHIP, CKVM_SET_TSC_KHZ, 0x5401 /* TCGETS */] {
            #expect(Sandbox.probe(program, ioctl, -1, Int(request)) == Self.trapped, "request \(String(request, radix: 16))")
        }
        // Only the request's low 32 bits count, as in the kernel: high bits change nothing.
        #expect(Sandbox.probe(program, ioctl, -1, Int(CKVM_RUN) | (1 << 40)) == Self.allowed)
        #expect(Sandbox.probe(program, ioctl, -1, Int(CKVM_CREATE_VM) | (1 << 40)) == Self.trapped)
    }

    @Test func vcpuKicksOnlyItsOwnProcessWithTheKickSignal() throws {
        let program = try program(.vcpu)
        let tgkill = SystemCall.tgkill.rawValue
        let pid = Int(getpid())
        // The child's pid differs from ours: the filter is compiled here, so a tgkill to
        // this (parent) process's pid is allowed, to any other refused.
        #expect(Sandbox.probe(program, tgkill, pid, -1, Int(ckvm_kick_signal())) == Self.allowed)
        #expect(Sandbox.probe(program, tgkill, pid, -1, Int(SIGKILL)) == Self.trapped)
        #expect(Sandbox.probe(program, tgkill, 1, -1, Int(ckvm_kick_signal())) == Self.trapped)
    }

    @Test func diskWorkersMayReadAndWriteButDispatchersMayNot() throws {
        let worker = try program(.blockWorker), dispatcher = try program(.blockDispatcher)
        for call in [SystemCall.pread64, .pwrite64, .fdatasync, .fallocate] {
            #expect(Sandbox.probe(worker, call.rawValue, -1) == Self.allowed, "\(call)")
            #expect(Sandbox.probe(dispatcher, call.rawValue, -1) == Self.trapped, "\(call)")
        }
        #expect(Sandbox.probe(worker, SystemCall.ioctl.rawValue, -1, Int(CKVM_RUN)) == Self.trapped)
    }

    @Test func onlyStandardErrorIsWritableByCallsCommonToAll() {
        let filter = SeccompFilter(rules: ThreadKind.common)
        let program = try! filter.compile()
        #expect(Sandbox.probe(program, SystemCall.write.rawValue, 2, 0, 0) == Self.allowed)
        #expect(Sandbox.probe(program, SystemCall.write.rawValue, 3, 0, 0) == Self.trapped)
    }

    @Test func x32CallsKillTheProcess() throws {
        // The x32 ABI bit on a number the filter allows: killed (SIGSYS, core-less).
        let program = try program(.vcpu)
        #expect(Sandbox.probe(program, SystemCall.getpid.rawValue | 0x4000_0000) == Self.trapped)
        #expect(Sandbox.probe(program, SystemCall.getpid.rawValue) == Self.allowed)
    }

    @Test func theViolationHandlerNamesTheThreadAndTheCallAndEndsWithStatus8() throws {
        var fds: [Int32] = [0, 0]
        #expect(pipe(&fds) == 0)
        defer { close(fds[0]) }
        let program = try program(.blockWorker)
        let status = Sandbox.probe(program, SystemCall.ioctl.rawValue, -1, 0xAE01, handler: true, stderr: fds[1])
        close(fds[1])
        var bytes = [UInt8](repeating: 0, count: 512)
        let count = read(fds[0], &bytes, bytes.count)
        let line = String(decoding: bytes.prefix(max(0, count)), as: UTF8.self)
        #expect(status == Sandbox.violationExitStatus)
        #expect(line.contains("(probe) made a forbidden system call: ioctl (16) request 0xae01; the VM is stopped (exit status 8)"), "\(line)")
        #expect(line.hasPrefix("swiftlet: seccomp: thread '"))
    }
}

@Suite struct BPFAssemblerTests {
    @Test func aJumpBeyond255InstructionsIsRefused() {
        var asm = BPFAssembler()
        let far = asm.newLabel()
        asm.jump(BPFInstruction.jeq, 1, ifTrue: far, ifFalse: nil)
        for _ in 0..<256 { asm.emit(.return(0)) }
        asm.place(far)
        asm.emit(.return(0))
        #expect(throws: BPFAssemblyError.self) { try asm.assemble() }
    }

    @Test func aLabelNeverPlacedIsRefused() {
        var asm = BPFAssembler()
        let nowhere = asm.newLabel()
        asm.jumpAlways(nowhere)
        #expect(throws: BPFAssemblyError.self) { try asm.assemble() }
    }

    @Test func theProgramStartsWithTheArchitectureCheck() throws {
        let program = try ThreadKind.vcpu.filter().compile()
        #expect(program[0] == BPFInstruction.load(offset: 4))
        #expect(program[1].k == SeccompFilter.auditArchX86_64)
        #expect(program[2] == BPFInstruction.return(SeccompAction.killProcess.value))
        #expect(program.last == BPFInstruction.return(SeccompAction.trap.value))
        // The vCPU's hottest call, ioctl, is the first one compared.
        #expect(program[6].k == UInt32(SystemCall.ioctl.rawValue))
    }

    @Test func conditionsOnTheSameCallAreAlternatives() throws {
        let filter = SeccompFilter(rules: [
            .allow(.write, when: .argument(0, is: 1)),
            .allow(.write, when: .argument(0, is: 2)),
            .allow(.exit_group),
        ])
        let program = try filter.compile()
        #expect(Sandbox.probe(program, SystemCall.write.rawValue, 1, 0, 0) == 0)
        #expect(Sandbox.probe(program, SystemCall.write.rawValue, 2, 0, 0) == 0)
        #expect(Sandbox.probe(program, SystemCall.write.rawValue, 3, 0, 0) == 128 + SIGSYS)
    }
}

@Suite struct LandlockTests {
    @Test func theABIIsReadOrZero() {
        #expect(Landlock.abiVersion >= 0)
        if Landlock.abiVersion > 0 { #expect(Landlock.handledAccess(abi: Landlock.abiVersion) & 0x1FFF == 0x1FFF) }
    }
}
