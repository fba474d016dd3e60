import CKVM
import Foundation
import KVM
import Testing

@Suite("KVM state for snapshots", .enabled(if: FileManager.default.isReadableFile(atPath: "/dev/kvm"), "needs /dev/kvm"))
struct SavedStateTests {
    @Test("The MSR index list names the MSRs a vCPU has, the TSC among them")
    func msrIndexList() throws {
        let list = try KVMSystem().msrIndexList()
        #expect(list.count > 10)
        #expect(list.contains(0x10), "IA32_TIME_STAMP_COUNTER")
        #expect(list.contains(0xC000_0082), "LSTAR")
    }

    @Test("vCPU debug and extended control registers round-trip through their raw bytes")
    func vcpuRegisters() throws {
        let tiny = try TinyVM(code: [0xF4])
        var debug = try tiny.vcpu.debugRegisters()
        debug.db.0 = 0x1234_5000
        debug.dr7 = 0x400 | 0x1 // DR0 enabled, local
        try tiny.vcpu.setDebugRegisters(debug)
        let saved = rawBytes(of: try tiny.vcpu.debugRegisters())
        let restored = try #require(fromRawBytes(saved, as: kvm_debugregs.self, initial: kvm_debugregs()))
        #expect(restored.db.0 == 0x1234_5000)
        #expect(restored.dr7 & 0x1 == 0x1)
        #expect(fromRawBytes([1, 2, 3], as: kvm_debugregs.self, initial: kvm_debugregs()) == nil, "a wrong size is refused")
        let xcrs = try tiny.vcpu.extendedControlRegisters()
        try tiny.vcpu.setExtendedControlRegisters(xcrs)
    }

    @Test("The in-kernel PICs, IOAPIC, PIT and kvmclock can be read and written back")
    func vmDevices() throws {
        let tiny = try TinyVM(code: [0xF4])
        try tiny.vm.createPIT2()
        for chip: UInt32 in [0, 1, 2] {
            var state = try tiny.vm.irqchip(chip)
            if chip == 0 { state.chip.pic.imr = 0xA5 }
            try tiny.vm.setIRQChip(state)
            if chip == 0 { #expect(try tiny.vm.irqchip(0).chip.pic.imr == 0xA5) }
        }
        let pit = try tiny.vm.pit()
        try tiny.vm.setPIT(pit)
        let before = try tiny.vm.clock()
        var later = before
        later.clock += 5_000_000_000
        try tiny.vm.setClock(later)
        #expect(try tiny.vm.clock().clock >= before.clock + 5_000_000_000)
    }
}
