import Boot
import KVM

/// Turns a loader's ``EntryState`` into the vCPU's registers.
/// The ioctls are `KVM_GET_SREGS`, `KVM_SET_SREGS`, `KVM_SET_REGS` and `KVM_SET_MSRS`.
public enum EntryStateApplier {
    public static func apply(_ state: EntryState, to vcpu: VCPU) throws(KVMError) {
        var sregs = try vcpu.specialRegisters()
        sregs.cs = segment(state.cs)
        sregs.ds = segment(state.ds)
        sregs.es = segment(state.es)
        sregs.fs = segment(state.fs)
        sregs.gs = segment(state.gs)
        sregs.ss = segment(state.ss)
        sregs.gdt.base = state.gdt.base
        sregs.gdt.limit = state.gdt.limit
        sregs.idt.base = state.idt.base
        sregs.idt.limit = state.idt.limit
        sregs.cr0 = state.cr0
        sregs.cr3 = state.cr3
        sregs.cr4 = state.cr4
        sregs.efer = state.efer
        try vcpu.setSpecialRegisters(sregs)

        var regs = kvm_regs()
        regs.rip = state.rip
        regs.rsp = state.rsp
        regs.rbp = state.rbp
        regs.rax = state.rax
        regs.rbx = state.rbx
        regs.rcx = state.rcx
        regs.rdx = state.rdx
        regs.rsi = state.rsi
        regs.rdi = state.rdi
        regs.rflags = state.rflags
        try vcpu.setRegisters(regs)
    }

    static func segment(_ s: SegmentState) -> kvm_segment {
        var segment = kvm_segment()
        segment.base = s.base
        segment.limit = s.limit
        segment.selector = s.selector
        segment.type = s.type
        segment.present = s.present ? 1 : 0
        segment.dpl = s.dpl
        segment.db = s.db ? 1 : 0
        segment.s = s.s ? 1 : 0
        segment.l = s.l ? 1 : 0
        segment.g = s.g ? 1 : 0
        return segment
    }
}
