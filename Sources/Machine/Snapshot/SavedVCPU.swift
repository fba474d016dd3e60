import KVM
import Snapshot

/// Everything KVM holds for one vCPU, as a snapshot records it. The KVM structures are
/// kept byte for byte (``HexBytes``): their layout is the kernel's ABI.
struct SavedVCPU: Codable, Sendable, Equatable {
    /// One model-specific register.
    struct MSR: Codable, Sendable, Equatable {
        var index: UInt32
        var value: UInt64
    }

    /// One CPUID leaf as the vCPU had it (`KVM_GET_CPUID2`).
    struct CPUIDLeaf: Codable, Sendable, Equatable {
        var function: UInt32, index: UInt32, flags: UInt32
        var eax: UInt32, ebx: UInt32, ecx: UInt32, edx: UInt32

        init(_ entry: CPUIDEntry) {
            function = entry.function; index = entry.index; flags = entry.flags
            eax = entry.eax; ebx = entry.ebx; ecx = entry.ecx; edx = entry.edx
        }

        var entry: CPUIDEntry {
            CPUIDEntry(function: function, index: index, flags: flags, eax: eax, ebx: ebx, ecx: ecx, edx: edx)
        }
    }

    var id: Int
    var cpuid: [CPUIDLeaf]
    /// `KVM_MP_STATE_*`: runnable, halted, waiting for INIT/SIPI.
    var mpState: UInt32
    /// `struct kvm_regs`: the general registers, RIP and RFLAGS.
    var registers: HexBytes
    /// `struct kvm_sregs`: segments, descriptor tables, control registers, EFER, APIC base.
    var specialRegisters: HexBytes
    /// The XSAVE area (x87, SSE, AVX and later state).
    var xsave: HexBytes
    /// `struct kvm_xcrs` (XCR0).
    var extendedControlRegisters: HexBytes
    /// `struct kvm_debugregs`.
    var debugRegisters: HexBytes
    /// `struct kvm_lapic_state`: the local APIC's registers page.
    var localAPIC: HexBytes
    /// `struct kvm_vcpu_events`: exceptions, interrupts and NMIs in flight.
    var events: HexBytes
    /// Every MSR of `KVM_GET_MSR_INDEX_LIST` that this vCPU could read, the TSC among them.
    var msrs: [MSR]
    /// The TSC frequency the guest calibrated against (`KVM_GET_TSC_KHZ`).
    var tscKHz: UInt32?
}

/// The IA32_TSC MSR: restored before the others (the TSC deadline is relative to it).
let msrTSC: UInt32 = 0x10

extension SavedVCPU {
    /// Reads `vcpu`'s state. Call it on the vCPU's own thread while it is parked outside
    /// `KVM_RUN`. The order follows what KVM needs: `KVM_GET_MP_STATE` first (it may move
    /// pending INIT/SIPI into the local APIC), the local APIC before the MSRs.
    /// `cpuid` is what the vCPU was given.
    static func capture(_ vcpu: VCPU, cpuid: [CPUIDEntry], msrIndices: [UInt32], xsaveSize: Int) throws(KVMError) -> SavedVCPU {
        let mpState = try vcpu.mpState()
        let registers = rawBytes(of: try vcpu.registers())
        let specialRegisters = rawBytes(of: try vcpu.specialRegisters())
        let xsave = try vcpu.xsave(size: xsaveSize)
        let xcrs = rawBytes(of: try vcpu.extendedControlRegisters())
        let debug = rawBytes(of: try vcpu.debugRegisters())
        let lapic = rawBytes(of: try vcpu.lapic())
        let msrs = try readableMSRs(vcpu, indices: msrIndices)
        let events = rawBytes(of: try vcpu.events())
        return SavedVCPU(id: vcpu.id, cpuid: cpuid.map(CPUIDLeaf.init), mpState: mpState, registers: HexBytes(registers),
                         specialRegisters: HexBytes(specialRegisters), xsave: HexBytes(xsave),
                         extendedControlRegisters: HexBytes(xcrs), debugRegisters: HexBytes(debug),
                         localAPIC: HexBytes(lapic), events: HexBytes(events), msrs: msrs, tscKHz: vcpu.tscKHz())
    }

    /// Reads every MSR in `indices` that KVM lets this vCPU read. `KVM_GET_MSRS` stops at
    /// the first it cannot read (one the CPU model lacks, say); that one is skipped and
    /// the rest read on.
    private static func readableMSRs(_ vcpu: VCPU, indices: [UInt32]) throws(KVMError) -> [MSR] {
        var result: [MSR] = []
        var remaining = indices[...]
        while !remaining.isEmpty {
            let batch = Array(remaining)
            let values = try vcpu.msrs(batch)
            var taken = 0
            for index in batch {
                guard let value = values[index] else { break }
                result.append(MSR(index: index, value: value))
                taken += 1
            }
            remaining = remaining.dropFirst(taken + 1)
        }
        return result
    }

    /// Puts this state into `vcpu`, which has not run yet: CPUID first (KVM checks the rest
    /// against it), the MP state, registers, FPU state, the local APIC, then the MSRs
    /// (the TSC first), then the pending events.
    func restore(into vcpu: VCPU) throws(SnapshotRestoreError) {
        func decode<T>(_ bytes: HexBytes, _ initial: T, _ name: String) throws(SnapshotRestoreError) -> T {
            guard let value = fromRawBytes(bytes.bytes, as: T.self, initial: initial) else {
                throw .malformed("vCPU \(id): \(name) has \(bytes.bytes.count) bytes, KVM's structure \(MemoryLayout<T>.size)")
            }
            return value
        }
        let regs = try decode(registers, kvm_regs(), "the registers")
        let sregs = try decode(specialRegisters, kvm_sregs(), "the special registers")
        let xcrs = try decode(extendedControlRegisters, kvm_xcrs(), "the XCRs")
        let debug = try decode(debugRegisters, kvm_debugregs(), "the debug registers")
        let lapic = try decode(localAPIC, kvm_lapic_state(), "the local APIC")
        let pending = try decode(events, kvm_vcpu_events(), "the events")
        guard xsave.bytes.count >= 4096 else { throw .malformed("vCPU \(id): the XSAVE area has \(xsave.bytes.count) bytes, fewer than 4096") }
        func step(_ what: String, _ body: () throws -> Void) throws(SnapshotRestoreError) {
            do { try body() } catch { throw .kvm("vCPU \(id): \(what): \(error)") }
        }
        try step("CPUID") { try vcpu.setCPUID(cpuid.map(\.entry)) }
        if let tscKHz, tscKHz != vcpu.tscKHz() {
            // The guest calibrated its clocks against this frequency; KVM scales the TSC
            // when the host's differs (TSC scaling). Without it the guest's time drifts.
            try step("TSC frequency \(tscKHz) kHz") { try vcpu.setTSCKHz(tscKHz) }
        }
        try step("MP state") { try vcpu.setMPState(mpState) }
        try step("registers") { try vcpu.setRegisters(regs) }
        try step("special registers") { try vcpu.setSpecialRegisters(sregs) }
        try step("XSAVE area") { try vcpu.setXSAVE(xsave.bytes) }
        try step("XCRs") { try vcpu.setExtendedControlRegisters(xcrs) }
        try step("debug registers") { try vcpu.setDebugRegisters(debug) }
        try step("local APIC") { try vcpu.setLAPIC(lapic) }
        let ordered = msrs.filter { $0.index == msrTSC } + msrs.filter { $0.index != msrTSC }
        try step("MSRs") { try vcpu.setMSRs(ordered.map { ($0.index, $0.value) }) }
        try step("events") { try vcpu.setEvents(pending) }
    }
}

/// The state of the in-kernel devices KVM emulates for the whole VM: the two 8259 PICs,
/// the IOAPIC, the 8254 PIT and kvmclock.
struct SavedVMDevices: Codable, Sendable, Equatable {
    /// `struct kvm_irqchip` for chip 0 (PIC master), 1 (PIC slave) and 2 (IOAPIC).
    var interruptControllers: [HexBytes]
    /// `struct kvm_pit_state2`.
    var pit: HexBytes
    /// kvmclock's value in nanoseconds when the snapshot was taken: restored, the guest's
    /// clock goes on from there instead of jumping by the time the snapshot sat on disk.
    var clock: UInt64

    static let chips: [UInt32] = [CKVM_IRQCHIP_PIC_MASTER, CKVM_IRQCHIP_PIC_SLAVE, CKVM_IRQCHIP_IOAPIC]

    static func capture(_ vm: VirtualMachine) throws(KVMError) -> SavedVMDevices {
        var saved: [HexBytes] = []
        for chip in chips { saved.append(HexBytes(rawBytes(of: try vm.irqchip(chip)))) }
        return SavedVMDevices(interruptControllers: saved, pit: HexBytes(rawBytes(of: try vm.pit())), clock: try vm.clock().clock)
    }

    /// Puts the state back into `vm`, whose vCPUs have not run.
    func restore(into vm: VirtualMachine) throws(SnapshotRestoreError) {
        guard interruptControllers.count == Self.chips.count else {
            throw .malformed("\(interruptControllers.count) interrupt controllers saved, \(Self.chips.count) expected")
        }
        for (chip, saved) in zip(Self.chips, interruptControllers) {
            guard var state = fromRawBytes(saved.bytes, as: kvm_irqchip.self, initial: kvm_irqchip()) else {
                throw .malformed("interrupt controller \(chip) has \(saved.bytes.count) bytes, KVM's structure \(MemoryLayout<kvm_irqchip>.size)")
            }
            guard state.chip_id == chip else { throw .malformed("interrupt controller \(chip) is saved as chip \(state.chip_id)") }
            state.chip_id = chip
            do { try vm.setIRQChip(state) } catch { throw .kvm("interrupt controller \(chip): \(error)") }
        }
        guard let pitState = fromRawBytes(pit.bytes, as: kvm_pit_state2.self, initial: kvm_pit_state2()) else {
            throw .malformed("the PIT has \(pit.bytes.count) bytes, KVM's structure \(MemoryLayout<kvm_pit_state2>.size)")
        }
        do { try vm.setPIT(pitState) } catch { throw .kvm("PIT: \(error)") }
        var value = kvm_clock_data()
        value.clock = clock
        do { try vm.setClock(value) } catch { throw .kvm("kvmclock: \(error)") }
    }
}

/// Why a snapshot could not be put into a new machine.
enum SnapshotRestoreError: Error, CustomStringConvertible {
    /// The state does not have the shape KVM's structures have.
    case malformed(String)
    /// KVM refused a piece of state.
    case kvm(String)

    var description: String {
        switch self {
        case let .malformed(what): return "the snapshot is damaged: \(what)"
        case let .kvm(what): return "KVM refused the snapshot's state: \(what)"
        }
    }
}
