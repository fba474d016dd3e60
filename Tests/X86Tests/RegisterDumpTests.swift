import KVM
import Testing
@testable import X86

/// The crash report's hint: the objdump command that shows the instruction at RIP.
@Suite("Register dump")
struct RegisterDumpTests {
    static func state(rip: UInt64, csBase: UInt64 = 0, longMode: Bool = false, protected: Bool = false) -> (kvm_regs, kvm_sregs) {
        var regs = kvm_regs()
        regs.rip = rip
        var sregs = kvm_sregs()
        sregs.cs.base = csBase
        if longMode {
            sregs.efer = 0x500
            sregs.cr0 = 0x8000_0011
            sregs.cs.l = 1
        } else if protected {
            sregs.cr0 = 0x11
            sregs.cs.db = 1
        }
        return (regs, sregs)
    }

    @Test("A flat binary in real mode: CS.base + IP, decoded as 8086 code, the file at 0x7C00")
    func flatRealMode() {
        let (regs, sregs) = Self.state(rip: 0x0023, csBase: 0x7C00)
        let text = RegisterDump.format(regs, sregs, image: .flat(path: "guest.bin", loadAddress: 0x7C00), physicalRIP: 0x7C23)
        #expect(text.contains("  mode: real mode, CPL 0"))
        #expect(text.contains("the instruction at 0x7c23 is byte 0x23 of the file; to see it:"))
        #expect(text.hasSuffix("    objdump -D -b binary -m i8086 --adjust-vma=0x7c00 --start-address=0x7c23 --stop-address=0x7c33 guest.bin"))
    }

    @Test("A flat binary in 64-bit mode whose page tables map RIP elsewhere: the file offset follows the physical address")
    func flatPaged() {
        let (regs, sregs) = Self.state(rip: 0xFFFF_8000_0000_8000, csBase: 0x1234, longMode: true)
        let hint = RegisterDump.disassemblyHint(regs, sregs, image: .flat(path: "g.bin", loadAddress: 0x7C00), physicalRIP: 0x8000)
        #expect(hint == ["  the instruction at linear 0xffff800000008000, guest-physical 0x8000 is byte 0x400 of the file; to see it:",
                         "    objdump -D -b binary -m i386:x86-64 --adjust-vma=0x7c00 --start-address=0x8000 --stop-address=0x8010 g.bin"])
        #expect(RegisterDump.disassemblyHint(regs, sregs, image: .flat(path: "g.bin", loadAddress: 0x7C00), physicalRIP: nil)
            == ["  RIP's linear address 0xffff800000008000 is not mapped by the guest's page tables: nothing to disassemble"])
        #expect(RegisterDump.disassemblyHint(regs, sregs, image: .flat(path: "g.bin", loadAddress: 0x7C00), physicalRIP: 0x100).first?
            .hasSuffix("lies below the file, which starts at 0x7c00: the guest jumped out of its code") == true)
    }

    @Test("An ELF kernel: objdump -d at RIP, in the mode the CPU is in; a bzImage points at its vmlinux")
    func elf() {
        let (regs, sregs) = Self.state(rip: 0x10_2345, protected: true)
        #expect(RegisterDump.disassemblyHint(regs, sregs, image: .elf(path: "k.elf"), physicalRIP: 0x10_2345).last
            == "    objdump -d -m i386 --start-address=0x102345 --stop-address=0x102355 k.elf")
        let (regs64, sregs64) = Self.state(rip: 0xFFFF_FFFF_8100_0000, longMode: true)
        #expect(RegisterDump.disassemblyHint(regs64, sregs64, image: .bzImage(path: "bzImage"), physicalRIP: nil).last
            == "    objdump -d --start-address=0xffffffff81000000 --stop-address=0xffffffff81000010 vmlinux")
        #expect(!RegisterDump.format(regs, sregs).contains("objdump"))
    }
}
