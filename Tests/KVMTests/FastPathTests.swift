import EventLoop
import Foundation
import KVM
import Memory
import Testing

/// A VM with 1 MiB of RAM, the in-kernel irqchip, and one vCPU in real mode at 0x7C00
/// running `code`: enough to watch KVM's fast paths work without the rest of Swiftlet.
final class TinyVM {
    let vm: VirtualMachine
    let memory: GuestMemory
    let vcpu: VCPU

    init(code: [UInt8], enableLocalAPIC: Bool = false, slotFlags: MemorySlotFlags = []) throws {
        let system = try KVMSystem()
        vm = try system.createVM()
        memory = try GuestMemory(size: 1 << 20, transparentHugePages: false)
        let region = memory.regions[0]
        try vm.setUserMemoryRegion(slot: 0, guestAddress: 0, size: region.size, hostAddress: region.hostAddress, flags: slotFlags)
        try vm.setTSSAddress(0xFFFB_D000)
        try vm.createIRQChip()
        try memory.write(code, at: 0x7C00)
        vcpu = try vm.createVCPU(id: 0)
        var sregs = try vcpu.specialRegisters()
        sregs.cs.base = 0
        sregs.cs.selector = 0
        try vcpu.setSpecialRegisters(sregs)
        var regs = kvm_regs()
        regs.rip = 0x7C00
        regs.rflags = 2
        regs.rsp = 0x7000
        try vcpu.setRegisters(regs)
        if enableLocalAPIC {
            // Software-enable the local APIC (spurious-interrupt register, bit 8), as a
            // guest's kernel would: an APIC that is off accepts no interrupt.
            var lapic = try vcpu.lapic()
            withUnsafeMutableBytes(of: &lapic.regs) { $0.storeBytes(of: UInt32(0x1FF), toByteOffset: 0xF0, as: UInt32.self) }
            try vcpu.setLAPIC(lapic)
        }
    }

    /// Runs until an exit to user space other than an interruption; returns it as (port, value) for port I/O.
    func runToPortExit() throws -> (port: UInt16, value: UInt8)? {
        for _ in 0..<100 {
            switch try vcpu.run() {
            case let .io(port, _, _, _, data): return (port, data.first ?? 0)
            case .interrupted: continue
            default: return nil
            }
        }
        return nil
    }
}

@Suite("KVM fast paths: ioeventfd, irqfd, GSI routing, MSI", .enabled(if: FileManager.default.isReadableFile(atPath: "/dev/kvm"), "needs /dev/kvm"))
struct FastPathTests {
    @Test("A port write that matches an ioeventfd signals it in the kernel, with no exit")
    func ioeventfd() throws {
        // mov $0x42, %al; out %al, $0x80; out %al, $0x80; out %al, $0x81; hlt
        let tiny = try TinyVM(code: [0xB0, 0x42, 0xE6, 0x80, 0xE6, 0x80, 0xE6, 0x81, 0xF4])
        let event = try EventFD()
        try tiny.vm.assignIOEventFD(event.rawValue, IOEventTrigger(space: .port, address: 0x80, length: 1))
        let exit = try tiny.runToPortExit()
        #expect(exit?.port == 0x81, "the writes to 0x80 should not have left the kernel")
        #expect(event.drain() == 2)
        try tiny.vm.deassignIOEventFD(event.rawValue, IOEventTrigger(space: .port, address: 0x80, length: 1))
    }

    @Test("With a data match, only that value signals; others exit as usual")
    func dataMatch() throws {
        // mov $1, %al; out %al, $0x80; mov $2, %al; out %al, $0x80; hlt
        let tiny = try TinyVM(code: [0xB0, 0x01, 0xE6, 0x80, 0xB0, 0x02, 0xE6, 0x80, 0xF4])
        let event = try EventFD()
        try tiny.vm.assignIOEventFD(event.rawValue, IOEventTrigger(space: .port, address: 0x80, length: 1, dataMatch: 1))
        let exit = try tiny.runToPortExit()
        #expect(exit?.port == 0x80 && exit?.value == 2)
        #expect(event.drain() == 1)
    }

    /// A real-mode guest that takes vector 0x40 through its interrupt vector table: the
    /// handler at 0x7D00 writes 0x40 to port 0x81. The main code enables interrupts and
    /// halts.
    static func interruptGuest() -> [UInt8] {
        var code = [UInt8](repeating: 0x90, count: 0x120)
        // 0x7C00: sti; hlt; jmp $-3 (back to hlt)
        code.replaceSubrange(0..<4, with: [0xFB, 0xF4, 0xEB, 0xFD])
        // 0x7D00: mov $0x40, %al; out %al, $0x81; iret
        code.replaceSubrange(0x100..<0x105, with: [0xB0, 0x40, 0xE6, 0x81, 0xCF])
        return code
    }

    static func installVector(_ tiny: TinyVM) throws {
        // IVT entry 0x40 at 0x100: offset 0x7D00, segment 0.
        try tiny.memory.store(UInt16(0x7D00), at: 0x40 * 4)
        try tiny.memory.store(UInt16(0), at: 0x40 * 4 + 2)
    }

    @Test("An irqfd on an MSI route delivers the message's vector when the eventfd is written")
    func irqfdMSI() throws {
        let tiny = try TinyVM(code: Self.interruptGuest(), enableLocalAPIC: true)
        try Self.installVector(tiny)
        // MSI to APIC ID 0, fixed delivery, vector 0x40.
        try tiny.vm.setGSIRouting(GSIRoute.defaultIRQChip + [.msi(gsi: 24, address: 0xFEE0_0000, data: 0x40)])
        let event = try EventFD()
        try tiny.vm.assignIRQFD(event.rawValue, gsi: 24)
        event.signal()
        let exit = try tiny.runToPortExit()
        #expect(exit?.port == 0x81 && exit?.value == 0x40)
        try tiny.vm.deassignIRQFD(event.rawValue, gsi: 24)
    }

    @Test("KVM_SIGNAL_MSI delivers a message directly")
    func signalMSI() throws {
        let tiny = try TinyVM(code: Self.interruptGuest(), enableLocalAPIC: true)
        try Self.installVector(tiny)
        #expect(try tiny.vm.signalMSI(address: 0xFEE0_0000, data: 0x40))
        let exit = try tiny.runToPortExit()
        #expect(exit?.port == 0x81 && exit?.value == 0x40)
    }

    @Test("An irqfd needs an eventfd: anything else is refused with an error, not a crash")
    func badIRQFD() throws {
        let tiny = try TinyVM(code: [0xF4])
        #expect(throws: KVMError.self) { try tiny.vm.assignIRQFD(-1, gsi: 5) }
        #expect(throws: KVMError.self) { try tiny.vm.assignIOEventFD(0, IOEventTrigger(space: .port, address: 0x80, length: 3)) }
    }
}
