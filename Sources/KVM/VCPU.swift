import CKVM
import Glibc

/// Why `KVM_RUN` returned: Swift's view of `kvm_run.exit_reason` and its union.
///
/// Buffers point into the vCPU's shared `kvm_run` area and are valid until the next
/// `KVM_RUN`; for a read (`in`, MMIO load) the handler fills them and KVM completes the
/// guest instruction on the next entry.
public enum VCPUExit {
    /// `in`/`out` on `port`: `count` repetitions (string I/O) of `size` bytes each.
    case io(port: UInt16, isWrite: Bool, size: Int, count: Int, data: UnsafeMutableRawBufferPointer)
    /// A load or store to guest-physical `address` not backed by a memory slot.
    case mmio(address: UInt64, isWrite: Bool, data: UnsafeMutableRawBufferPointer)
    /// `hlt` (only without the in-kernel irqchip, which handles HLT itself).
    case halt
    /// Triple fault, or another condition that resets the CPU.
    case shutdown
    /// VM entry failed: the state we set is invalid for the hardware.
    case failEntry(reason: UInt64, cpu: UInt32)
    /// KVM could not handle something (e.g. an instruction it failed to emulate).
    case internalError(suberror: UInt32, data: [UInt64])
    /// The guest asked for a shutdown, reset or crash through a paravirtual interface.
    case systemEvent(type: UInt32, flags: UInt64)
    /// `KVM_RUN` returned early: a signal (`EINTR`) or `immediate_exit`.
    case interrupted
    /// The guest can take an injected interrupt now.
    case irqWindowOpen
    /// `KVM_EXIT_DEBUG` or any reason Swiftlet does not handle, by number.
    case other(reason: UInt32)
}

/// One virtual CPU: owns its file descriptor and its mapped `kvm_run` area.
///
/// vCPU ioctls: `KVM_RUN`, `KVM_GET/SET_REGS`, `KVM_GET/SET_SREGS`, `KVM_GET/SET_CPUID2`,
/// `KVM_GET/SET_MSRS`, `KVM_GET/SET_FPU`, `KVM_GET/SET_LAPIC`, `KVM_GET/SET_MP_STATE`,
/// `KVM_GET/SET_XSAVE`, `KVM_GET_XSAVE2`, `KVM_GET/SET_VCPU_EVENTS`, `KVM_TRANSLATE`,
/// `KVM_GET_TSC_KHZ`. KVM requires these to come from the thread that runs the vCPU
/// once it has started; Swiftlet sets the vCPU up, then hands it to its thread.
public final class VCPU: @unchecked Sendable {
    // @unchecked Sendable: the run area is only touched by the vCPU's own thread, except
    // `requestImmediateExit()`, a single-byte store KVM documents for this purpose.

    public let id: Int
    let fd: KVMFileDescriptor
    let runArea: UnsafeMutablePointer<kvm_run>
    let runSize: Int

    init(id: Int, fd: KVMFileDescriptor, runArea: UnsafeMutablePointer<kvm_run>, runSize: Int) {
        self.id = id
        self.fd = fd
        self.runArea = runArea
        self.runSize = runSize
    }

    deinit { munmap(runArea, runSize) }

    /// Enters the guest until the next exit that needs user space.
    /// The corresponding ioctl is `KVM_RUN`; `EINTR` becomes ``VCPUExit/interrupted``.
    public func run() throws(KVMError) -> VCPUExit {
        let result = fd.issue(CKVM_RUN, value: 0)
        if result < 0 {
            if result == -EINTR || result == -EAGAIN { return .interrupted }
            throw .ioctlFailed(name: "KVM_RUN", errno: -result)
        }
        return decodeExit()
    }

    private func decodeExit() -> VCPUExit {
        let state = runArea.pointee
        switch state.exit_reason {
        case CKVM_EXIT_IO:
            let io = state.io
            let length = Int(io.size) * Int(io.count)
            // data_offset is set by KVM; still, never trust an offset blindly.
            guard Int(io.data_offset) + length <= runSize else { return .other(reason: CKVM_EXIT_IO) }
            let data = UnsafeMutableRawBufferPointer(start: ckvm_run_io_data(runArea), count: length)
            return .io(port: io.port, isWrite: io.direction == CKVM_EXIT_IO_OUT, size: Int(io.size), count: Int(io.count), data: data)
        case CKVM_EXIT_MMIO:
            let length = min(Int(state.mmio.len), 8)
            return .mmio(address: state.mmio.phys_addr, isWrite: state.mmio.is_write != 0,
                         data: UnsafeMutableRawBufferPointer(start: ckvm_run_mmio_data(runArea), count: length))
        case CKVM_EXIT_HLT: return .halt
        case CKVM_EXIT_SHUTDOWN: return .shutdown
        case CKVM_EXIT_FAIL_ENTRY:
            return .failEntry(reason: state.fail_entry.hardware_entry_failure_reason, cpu: state.fail_entry.cpu)
        case CKVM_EXIT_INTERNAL_ERROR:
            let failure = state.`internal`
            let count = min(Int(failure.ndata), 16)
            let data = withUnsafeBytes(of: failure.data) { Array($0.bindMemory(to: UInt64.self).prefix(count)) }
            return .internalError(suberror: failure.suberror, data: data)
        case CKVM_EXIT_SYSTEM_EVENT:
            return .systemEvent(type: state.system_event.type, flags: state.system_event.flags)
        case CKVM_EXIT_INTR: return .interrupted
        case CKVM_EXIT_IRQ_WINDOW_OPEN: return .irqWindowOpen
        default: return .other(reason: state.exit_reason)
        }
    }

    /// Makes the next (or current, once kicked by a signal) `KVM_RUN` return at once.
    /// Safe to call from any thread.
    public func requestImmediateExit() {
        withUnsafeMutablePointer(to: &runArea.pointee.immediate_exit) { pointer in
            UnsafeMutableRawPointer(pointer).storeBytes(of: 1, as: UInt8.self)
        }
    }

    /// Lets the next `KVM_RUN` enter the guest again after ``requestImmediateExit()``
    /// (a resumed vCPU). Call it from the vCPU's thread.
    public func clearImmediateExit() {
        withUnsafeMutablePointer(to: &runArea.pointee.immediate_exit) { pointer in
            UnsafeMutableRawPointer(pointer).storeBytes(of: 0, as: UInt8.self)
        }
    }

    // MARK: Registers

    /// The corresponding ioctl is `KVM_GET_REGS`.
    public func registers() throws(KVMError) -> kvm_regs {
        try fd.get("KVM_GET_REGS", CKVM_GET_REGS, kvm_regs())
    }

    /// The corresponding ioctl is `KVM_SET_REGS`.
    public func setRegisters(_ regs: kvm_regs) throws(KVMError) {
        try fd.set("KVM_SET_REGS", CKVM_SET_REGS, regs)
    }

    /// Segment, control and descriptor-table registers. The ioctl is `KVM_GET_SREGS`.
    public func specialRegisters() throws(KVMError) -> kvm_sregs {
        try fd.get("KVM_GET_SREGS", CKVM_GET_SREGS, kvm_sregs())
    }

    /// The corresponding ioctl is `KVM_SET_SREGS`.
    public func setSpecialRegisters(_ sregs: kvm_sregs) throws(KVMError) {
        try fd.set("KVM_SET_SREGS", CKVM_SET_SREGS, sregs)
    }

    /// What the guest sees when it executes CPUID. The ioctl is `KVM_SET_CPUID2`.
    public func setCPUID(_ entries: [CPUIDEntry]) throws(KVMError) {
        try withZeroedBuffer(size: ckvm_cpuid2_size(UInt32(entries.count))) { (buffer) throws(KVMError) in
            let cpuid = buffer.assumingMemoryBound(to: kvm_cpuid2.self)
            cpuid.pointee.nent = UInt32(entries.count)
            let slots = UnsafeMutableRawPointer(cpuid + 1).assumingMemoryBound(to: kvm_cpuid_entry2.self)
            for (index, entry) in entries.enumerated() { slots[index] = entry.kvmEntry }
            try fd.ioctl("KVM_SET_CPUID2", CKVM_SET_CPUID2, buffer: buffer)
        }
    }

    /// What this vCPU reports through CPUID, as KVM holds it: the leaves last set with
    /// `KVM_SET_CPUID2`, with the bits KVM keeps up to date itself (OSXSAVE, the APIC
    /// enable bit, the XSAVE area size for the current XCR0). The ioctl is `KVM_GET_CPUID2`;
    /// it fails with `E2BIG` until the buffer holds every entry, so the room doubles.
    public func cpuid() throws(KVMError) -> [CPUIDEntry] {
        var capacity: UInt32 = 64
        while true {
            let entries = try withZeroedBuffer(size: ckvm_cpuid2_size(capacity)) { (buffer) throws(KVMError) -> [CPUIDEntry]? in
                let cpuid = buffer.assumingMemoryBound(to: kvm_cpuid2.self)
                cpuid.pointee.nent = capacity
                do throws(KVMError) {
                    try fd.ioctl("KVM_GET_CPUID2", CKVM_GET_CPUID2, buffer: buffer)
                } catch let .ioctlFailed(_, err) where err == E2BIG && capacity < 4096 {
                    return nil
                }
                let count = min(Int(cpuid.pointee.nent), Int(capacity))
                let slots = UnsafeMutableRawPointer(cpuid + 1).assumingMemoryBound(to: kvm_cpuid_entry2.self)
                return (0..<count).map { CPUIDEntry(slots[$0]) }
            }
            if let entries { return entries }
            capacity *= 2
        }
    }

    /// Writes model-specific registers. The corresponding ioctl is `KVM_SET_MSRS`; it
    /// returns how many were set, and we insist on all of them.
    public func setMSRs(_ msrs: [(index: UInt32, value: UInt64)]) throws(KVMError) {
        let written = try withZeroedBuffer(size: ckvm_msrs_size(UInt32(msrs.count))) { (buffer) throws(KVMError) in
            let header = buffer.assumingMemoryBound(to: kvm_msrs.self)
            header.pointee.nmsrs = UInt32(msrs.count)
            let entries = UnsafeMutableRawPointer(header + 1).assumingMemoryBound(to: kvm_msr_entry.self)
            for (index, msr) in msrs.enumerated() {
                entries[index].index = msr.index
                entries[index].data = msr.value
            }
            return try fd.ioctl("KVM_SET_MSRS", CKVM_SET_MSRS, buffer: buffer)
        }
        guard written == msrs.count else {
            throw .ioctlFailed(name: "KVM_SET_MSRS (MSR 0x\(String(msrs[Int(written)].index, radix: 16)))", errno: EINVAL)
        }
    }

    /// Reads model-specific registers. The corresponding ioctl is `KVM_GET_MSRS`.
    public func msrs(_ indices: [UInt32]) throws(KVMError) -> [UInt32: UInt64] {
        try withZeroedBuffer(size: ckvm_msrs_size(UInt32(indices.count))) { (buffer) throws(KVMError) in
            let header = buffer.assumingMemoryBound(to: kvm_msrs.self)
            header.pointee.nmsrs = UInt32(indices.count)
            let entries = UnsafeMutableRawPointer(header + 1).assumingMemoryBound(to: kvm_msr_entry.self)
            for (position, index) in indices.enumerated() { entries[position].index = index }
            let read = Int(try fd.ioctl("KVM_GET_MSRS", CKVM_GET_MSRS, buffer: buffer))
            var result: [UInt32: UInt64] = [:]
            for position in 0..<min(read, indices.count) { result[entries[position].index] = entries[position].data }
            return result
        }
    }

    /// Sets the x87/SSE control words to their power-on values (FCW 0x37F, MXCSR 0x1F80).
    /// The corresponding ioctl is `KVM_SET_FPU`.
    public func resetFPU() throws(KVMError) {
        var fpu = kvm_fpu()
        fpu.fcw = 0x37F
        fpu.mxcsr = 0x1F80
        try fd.ioctl("KVM_SET_FPU", CKVM_SET_FPU, &fpu)
    }

    /// The x87 and SSE state in FXSAVE layout: registers, control and status words, MXCSR.
    /// The corresponding ioctl is `KVM_GET_FPU`.
    public func fpu() throws(KVMError) -> kvm_fpu {
        try fd.get("KVM_GET_FPU", CKVM_GET_FPU, kvm_fpu())
    }

    /// Replaces the x87 and SSE state (write back what ``fpu()`` returned, changed).
    /// The corresponding ioctl is `KVM_SET_FPU`.
    public func setFPU(_ state: kvm_fpu) throws(KVMError) {
        try fd.set("KVM_SET_FPU", CKVM_SET_FPU, state)
    }

    /// The x87, SSE and extended state in XSAVE's standard (uncompacted) layout: `size`
    /// bytes, the value of `KVM_CAP_XSAVE2` on the VM, or 4096 without it. Components the
    /// guest has not used read as their initial values (MXCSR 0x1F80 at byte 24).
    /// The corresponding ioctl is `KVM_GET_XSAVE2`, or `KVM_GET_XSAVE` for 4096 bytes.
    public func xsave(size: Int) throws(KVMError) -> [UInt8] {
        let bytes = max(size, 4096)
        return try withZeroedBuffer(size: bytes) { (buffer) throws(KVMError) -> [UInt8] in
            if size > 4096 {
                try fd.ioctl("KVM_GET_XSAVE2", CKVM_GET_XSAVE2, buffer: buffer)
            } else {
                try fd.ioctl("KVM_GET_XSAVE", CKVM_GET_XSAVE, buffer: buffer)
            }
            return Array(UnsafeRawBufferPointer(start: buffer, count: bytes))
        }
    }

    /// Replaces the XSAVE state with `area` (what ``xsave(size:)`` returned, changed), which
    /// KVM checks (reserved MXCSR bits, unsupported components). The ioctl is `KVM_SET_XSAVE`.
    public func setXSAVE(_ area: [UInt8]) throws(KVMError) {
        try withZeroedBuffer(size: max(area.count, 4096)) { (buffer) throws(KVMError) in
            buffer.copyMemory(from: area, byteCount: area.count)
            try fd.ioctl("KVM_SET_XSAVE", CKVM_SET_XSAVE, buffer: buffer)
        }
    }

    /// Exceptions, interrupts and NMIs being delivered or pending, and the interrupt
    /// shadow. The corresponding ioctl is `KVM_GET_VCPU_EVENTS`.
    public func events() throws(KVMError) -> kvm_vcpu_events {
        try fd.get("KVM_GET_VCPU_EVENTS", CKVM_GET_VCPU_EVENTS, kvm_vcpu_events())
    }

    /// Replaces the event state: every field KVM always applies (exception, interrupt,
    /// NMI injected and masked) plus the optional ones `flags` names. Start from
    /// ``events()`` and change what is needed. The ioctl is `KVM_SET_VCPU_EVENTS`.
    public func setEvents(_ events: kvm_vcpu_events) throws(KVMError) {
        try fd.set("KVM_SET_VCPU_EVENTS", CKVM_SET_VCPU_EVENTS, events)
    }

    /// Translates a guest linear address through the vCPU's current page tables, as a
    /// supervisor-mode read would (KVM reports no write or user permission: it sets
    /// `writeable` always). `nil` when the address is not mapped.
    /// The corresponding ioctl is `KVM_TRANSLATE`.
    public func translate(linearAddress: UInt64) throws(KVMError) -> UInt64? {
        var translation = kvm_translation()
        translation.linear_address = linearAddress
        try fd.ioctl("KVM_TRANSLATE", CKVM_TRANSLATE, &translation)
        return translation.valid != 0 ? translation.physical_address : nil
    }

    /// The local APIC's 1 KiB register page. The corresponding ioctl is `KVM_GET_LAPIC`.
    public func lapic() throws(KVMError) -> kvm_lapic_state {
        try fd.get("KVM_GET_LAPIC", CKVM_GET_LAPIC, kvm_lapic_state())
    }

    /// The corresponding ioctl is `KVM_SET_LAPIC`.
    public func setLAPIC(_ state: kvm_lapic_state) throws(KVMError) {
        try fd.set("KVM_SET_LAPIC", CKVM_SET_LAPIC, state)
    }

    /// Runnable, halted, or waiting for INIT/SIPI. The ioctl is `KVM_GET_MP_STATE`.
    public func mpState() throws(KVMError) -> UInt32 {
        try fd.get("KVM_GET_MP_STATE", CKVM_GET_MP_STATE, kvm_mp_state()).mp_state
    }

    /// The corresponding ioctl is `KVM_SET_MP_STATE`.
    public func setMPState(_ value: UInt32) throws(KVMError) {
        try fd.set("KVM_SET_MP_STATE", CKVM_SET_MP_STATE, kvm_mp_state(mp_state: value))
    }

    /// The guest TSC frequency in kHz, if KVM knows it. The ioctl is `KVM_GET_TSC_KHZ`.
    public func tscKHz() -> UInt32? {
        let result = fd.issue(CKVM_GET_TSC_KHZ, value: 0)
        return result > 0 ? UInt32(result) : nil
    }

    /// Makes the guest's TSC tick at `kHz` (KVM scales it when the host's differs; a
    /// restored guest keeps the frequency it calibrated). The ioctl is `KVM_SET_TSC_KHZ`.
    public func setTSCKHz(_ kHz: UInt32) throws(KVMError) {
        _ = try fd.ioctl("KVM_SET_TSC_KHZ", CKVM_SET_TSC_KHZ, value: UInt(kHz))
    }

    /// Tells a guest using kvmclock that it was paused, so its soft-lockup watchdog does
    /// not count the pause. Fails with `EINVAL` when the guest has not set kvmclock up.
    /// The ioctl is `KVM_KVMCLOCK_CTRL`.
    public func notifyPaused() throws(KVMError) {
        _ = try fd.ioctl("KVM_KVMCLOCK_CTRL", CKVM_KVMCLOCK_CTRL)
    }
}

/// What `KVM_EXIT_INTERNAL_ERROR` with suberror `KVM_INTERNAL_ERROR_EMULATION` carries:
/// KVM's instruction emulator failed on the instruction at RIP. Since Linux 5.14 the exit
/// data holds flags and, with `KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES`, the
/// bytes KVM fetched at RIP (`struct kvm_run.emulation_failure`).
public struct EmulationFailure: Sendable, Equatable {
    /// Up to 15 bytes starting at the failing instruction, or `nil` when KVM sent none.
    public let instructionBytes: [UInt8]?

    /// Reads the exit's data; `nil` when the exit is some other internal error.
    public init?(suberror: UInt32, data: [UInt64]) {
        guard suberror == CKVM_INTERNAL_ERROR_EMULATION else { return nil }
        // data[0] = flags; data[1] = insn_size (low byte) and the first 7 bytes; data[2] the next 8.
        guard data.count >= 3, data[0] & CKVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES != 0 else {
            instructionBytes = nil
            return
        }
        let raw = withUnsafeBytes(of: (data[1].littleEndian, data[2].littleEndian)) { Array($0) }
        let size = min(Int(raw[0]), 15)
        instructionBytes = size > 0 ? Array(raw[1...size]) : nil
    }
}
