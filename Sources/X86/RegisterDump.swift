import Basics
import KVM

/// Formats a vCPU's state for a fatal-exit report: what a developer needs to find
/// where the guest was and what mode it was in.
public enum RegisterDump {
    public static func format(_ regs: kvm_regs, _ sregs: kvm_sregs) -> String {
        func r(_ name: String, _ value: UInt64) -> String { "\(name)=\(Hex.digits(value, width: 16))" }
        func segment(_ name: String, _ s: kvm_segment) -> String {
            "\(name)=\(Hex.digits(s.selector, width: 4)) base=\(Hex.digits(s.base, width: 16)) limit=\(Hex.digits(s.limit, width: 8)) type=\(s.type) dpl=\(s.dpl) \(s.l != 0 ? "L" : "-")\(s.db != 0 ? "D" : "-")\(s.present != 0 ? "P" : "-")"
        }
        let mode: String
        if sregs.efer & 0x400 != 0 { mode = sregs.cs.l != 0 ? "64-bit long mode" : "compatibility mode" }
        else if sregs.cr0 & 1 != 0 { mode = sregs.cs.db != 0 ? "32-bit protected mode" : "16-bit protected mode" }
        else { mode = "real mode" }
        return [
            "  mode: \(mode), CPL \(sregs.cs.selector & 3)",
            "  \(r("RIP", regs.rip)) \(r("RSP", regs.rsp)) \(r("RFLAGS", regs.rflags))",
            "  \(r("RAX", regs.rax)) \(r("RBX", regs.rbx)) \(r("RCX", regs.rcx)) \(r("RDX", regs.rdx))",
            "  \(r("RSI", regs.rsi)) \(r("RDI", regs.rdi)) \(r("RBP", regs.rbp))",
            "  \(r("R8", regs.r8)) \(r("R9", regs.r9)) \(r("R10", regs.r10)) \(r("R11", regs.r11))",
            "  \(r("R12", regs.r12)) \(r("R13", regs.r13)) \(r("R14", regs.r14)) \(r("R15", regs.r15))",
            "  \(r("CR0", sregs.cr0)) \(r("CR2", sregs.cr2)) \(r("CR3", sregs.cr3)) \(r("CR4", sregs.cr4))",
            "  \(r("EFER", sregs.efer)) \(r("APIC_BASE", sregs.apic_base))",
            "  " + segment("CS", sregs.cs), "  " + segment("SS", sregs.ss),
            "  " + segment("DS", sregs.ds), "  " + segment("ES", sregs.es),
            "  " + segment("FS", sregs.fs), "  " + segment("GS", sregs.gs),
            "  " + segment("TR", sregs.tr),
            "  GDT=\(Hex.digits(sregs.gdt.base, width: 16))/\(Hex.digits(sregs.gdt.limit, width: 4)) IDT=\(Hex.digits(sregs.idt.base, width: 16))/\(Hex.digits(sregs.idt.limit, width: 4))",
        ].joined(separator: "\n")
    }
}
