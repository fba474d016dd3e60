import Basics
import KVM

/// The file a guest was booted from, so that a crash report can say how to disassemble
/// the instruction at RIP.
public enum GuestImage: Sendable, Equatable {
    /// A flat binary copied byte for byte to guest-physical `loadAddress` (0x7C00).
    case flat(path: String, loadAddress: UInt64)
    /// An ELF kernel (a vmlinux, a Multiboot kernel): its addresses are the ones RIP holds.
    case elf(path: String)
    /// A Linux bzImage: the code is that of the vmlinux it was built from.
    case bzImage(path: String)
}

/// Formats a vCPU's state for a fatal-exit report: what a developer needs to find
/// where the guest was and what mode it was in.
public enum RegisterDump {
    /// The registers, then (with `image`) the `objdump` command that disassembles the
    /// instruction at RIP. `physicalRIP` is where RIP's linear address lies in guest memory
    /// (the vCPU's page tables translate it: `KVM_TRANSLATE`); without paging it equals the
    /// linear address.
    public static func format(_ regs: kvm_regs, _ sregs: kvm_sregs, image: GuestImage? = nil, physicalRIP: UInt64? = nil) -> String {
        var lines = registers(regs, sregs)
        if let image { lines += disassemblyHint(regs, sregs, image: image, physicalRIP: physicalRIP) }
        return lines.joined(separator: "\n")
    }

    /// The processor mode the segment and control registers describe, and the `objdump -m`
    /// architecture that decodes its instructions.
    static func mode(_ sregs: kvm_sregs) -> (name: String, objdump: String) {
        if sregs.efer & 0x400 != 0 {
            return sregs.cs.l != 0 ? ("64-bit long mode", "i386:x86-64") : ("compatibility mode", sregs.cs.db != 0 ? "i386" : "i8086")
        }
        if sregs.cr0 & 1 != 0 { return sregs.cs.db != 0 ? ("32-bit protected mode", "i386") : ("16-bit protected mode", "i8086") }
        return ("real mode", "i8086")
    }

    /// RIP as a linear address: CS's base plus RIP (64-bit mode ignores the base).
    public static func linearRIP(_ regs: kvm_regs, _ sregs: kvm_sregs) -> UInt64 {
        sregs.efer & 0x400 != 0 && sregs.cs.l != 0 ? regs.rip : sregs.cs.base &+ regs.rip
    }

    /// How to see the instruction at RIP: the `objdump` command line for the guest's file,
    /// with the addresses filled in.
    public static func disassemblyHint(_ regs: kvm_regs, _ sregs: kvm_sregs, image: GuestImage, physicalRIP: UInt64?) -> [String] {
        let (_, architecture) = mode(sregs)
        let linear = linearRIP(regs, sregs)
        let window: UInt64 = 16
        switch image {
        case let .flat(path, loadAddress):
            guard let physical = physicalRIP else {
                return ["  RIP's linear address \(Hex.prefixed(linear)) is not mapped by the guest's page tables: nothing to disassemble"]
            }
            let place = physical == linear ? "at \(Hex.prefixed(linear))"
                : "at linear \(Hex.prefixed(linear)), guest-physical \(Hex.prefixed(physical))"
            guard physical >= loadAddress else {
                return ["  the instruction \(place) lies below the file, which starts at \(Hex.prefixed(loadAddress)): the guest jumped out of its code"]
            }
            return ["  the instruction \(place) is byte \(Hex.prefixed(physical - loadAddress)) of the file; to see it:",
                    "    objdump -D -b binary -m \(architecture) --adjust-vma=\(Hex.prefixed(loadAddress)) "
                        + "--start-address=\(Hex.prefixed(physical)) --stop-address=\(Hex.prefixed(physical &+ window)) \(path)"]
        case let .elf(path):
            return ["  the instruction at \(Hex.prefixed(linear)); to see it (with the function around it: drop --stop-address):",
                    "    objdump -d -m \(architecture) --start-address=\(Hex.prefixed(linear)) --stop-address=\(Hex.prefixed(linear &+ window)) \(path)"]
        case let .bzImage(path):
            return ["  the instruction at \(Hex.prefixed(linear)) is in the vmlinux \(path) was built from (Linux's scripts/extract-vmlinux gets it out); to see it:",
                    "    objdump -d --start-address=\(Hex.prefixed(linear)) --stop-address=\(Hex.prefixed(linear &+ window)) vmlinux"]
        }
    }

    static func registers(_ regs: kvm_regs, _ sregs: kvm_sregs) -> [String] {
        func r(_ name: String, _ value: UInt64) -> String { "\(name)=\(Hex.digits(value, width: 16))" }
        func segment(_ name: String, _ s: kvm_segment) -> String {
            "\(name)=\(Hex.digits(s.selector, width: 4)) base=\(Hex.digits(s.base, width: 16)) limit=\(Hex.digits(s.limit, width: 8)) type=\(s.type) dpl=\(s.dpl) \(s.l != 0 ? "L" : "-")\(s.db != 0 ? "D" : "-")\(s.present != 0 ? "P" : "-")"
        }
        return [
            "  mode: \(mode(sregs).name), CPL \(sregs.cs.selector & 3)",
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
        ]
    }
}
