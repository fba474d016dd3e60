import KVM
import Memory
import Testing

/// The KVM calls instruction completion relies on, on real /dev/kvm: a vCPU that is set up
/// but never run is enough to check what they return.
@Suite("KVM calls used by instruction completion")
struct KVMWrapperTests {
    /// A VM with 4 MiB of RAM and one vCPU in 64-bit mode whose page tables map linear
    /// 0x200000-0x3FFFFF to physical 0 (a 2 MiB page) and nothing else.
    static func longModeVCPU() throws -> (VCPU, GuestMemory, VirtualMachine) {
        let system = try KVMSystem()
        let vm = try system.createVM()
        let memory = try GuestMemory(size: 4 << 20, transparentHugePages: false)
        try vm.setUserMemoryRegion(slot: 0, guestAddress: 0, size: memory.size, hostAddress: memory.regions[0].hostAddress)
        try memory.store(UInt64(0x2000 | 3), at: 0x1000)        // PML4[0] -> PDPT
        try memory.store(UInt64(0x3000 | 3), at: 0x2000)        // PDPT[0] -> PD
        try memory.store(UInt64(0 | 3 | 0x80), at: 0x3000 + 8)  // PD[1]: 2 MiB page at physical 0
        let vcpu = try vm.createVCPU(id: 0)
        var special = try vcpu.specialRegisters()
        special.cr0 = 0x8000_0011
        special.cr3 = 0x1000
        special.cr4 = 0x20
        special.efer = 0x500
        special.cs.l = 1
        special.cs.db = 0
        try vcpu.setSpecialRegisters(special)
        return (vcpu, memory, vm)
    }

    @Test("KVM_TRANSLATE walks the vCPU's page tables; an unmapped address gives nil")
    func translate() throws {
        let (vcpu, memory, _) = try Self.longModeVCPU()
        // Run it once to a HLT (which exits: there is no irqchip), as a vCPU whose
        // instruction failed has: this project's hosts set up a vCPU's paging for
        // KVM_TRANSLATE only once it ran.
        try memory.write([0xF4], at: 0)
        var registers = try vcpu.registers()
        registers.rip = 0x200000
        registers.rflags = 2
        try vcpu.setRegisters(registers)
        guard case .halt = try vcpu.run() else { Issue.record("the vCPU did not reach its HLT"); return }
        #expect(try vcpu.translate(linearAddress: 0x20_0123) == 0x123)
        #expect(try vcpu.translate(linearAddress: 0x3F_FFFF) == 0x1F_FFFF)
        #expect(try vcpu.translate(linearAddress: 0x40_0000) == nil)
        #expect(try vcpu.translate(linearAddress: 0x123) == nil)
    }

    @Test("KVM_GET_XSAVE reports the initial MXCSR; KVM_SET_XSAVE changes it")
    func xsaveMXCSR() throws {
        let (vcpu, _, vm) = try Self.longModeVCPU()
        let size = Int(vm.check(.xsave2))
        var area = try vcpu.xsave(size: size)
        #expect(area.count == max(size, 4096))
        func mxcsr(_ bytes: [UInt8]) -> UInt32 { (0..<4).reduce(0) { $0 | UInt32(bytes[24 + $1]) << (8 * $1) } }
        #expect(mxcsr(area) == 0x1F80)
        area[24] = 0x80; area[25] = 0x3F // 0x3F80
        area[512] |= 2                   // SSE state in use
        try vcpu.setXSAVE(area)
        #expect(mxcsr(try vcpu.xsave(size: size)) == 0x3F80)
    }

    @Test("KVM_GET/SET_VCPU_EVENTS: an injected #GP(0) reads back")
    func events() throws {
        let (vcpu, _, _) = try Self.longModeVCPU()
        var events = try vcpu.events()
        #expect(events.exception.injected == 0)
        events.exception.injected = 1
        events.exception.nr = 13
        events.exception.has_error_code = 1
        events.exception.error_code = 0
        events.flags = 0
        try vcpu.setEvents(events)
        let back = try vcpu.events()
        #expect(back.exception.injected == 1 && back.exception.nr == 13 && back.exception.has_error_code == 1)
    }

    @Test("Emulation-failure exit data: the instruction bytes when KVM flags them, else none")
    func emulationFailureData() {
        // flags = INSTRUCTION_BYTES; insn_size 15, bytes cc 56 48 8d 35 b3 00 ...
        let failure = EmulationFailure(suberror: 1, data: [1, 0xb3_358d_4856_cc0f, 0x5eff_ffff_1ee8_0000, 0x1000])
        #expect(failure?.instructionBytes == [0xcc, 0x56, 0x48, 0x8d, 0x35, 0xb3, 0x00, 0x00, 0x00, 0xe8, 0x1e, 0xff, 0xff, 0xff, 0x5e])
        #expect(EmulationFailure(suberror: 1, data: [0, 0x0f, 0])?.instructionBytes == nil)
        #expect(EmulationFailure(suberror: 1, data: [])?.instructionBytes == nil)
        #expect(EmulationFailure(suberror: 1, data: [1, 0x2, 0])?.instructionBytes == [0, 0])
        #expect(EmulationFailure(suberror: 2, data: [1, 0x0f, 0]) == nil)
    }
}
