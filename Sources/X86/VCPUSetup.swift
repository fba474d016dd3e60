import KVM

/// Puts a new vCPU in the state a kernel expects at entry, beyond the registers a
/// loader chooses: CPUID, MSRs, FPU and the local APIC's LINT pins.
/// The ioctls are `KVM_SET_CPUID2`, `KVM_SET_MSRS`, `KVM_SET_FPU`, `KVM_GET_LAPIC` and
/// `KVM_SET_LAPIC`.
public enum VCPUSetup {
    // MSR numbers (Intel SDM volume 4).
    static let tsc: UInt32 = 0x10
    static let sysenterCS: UInt32 = 0x174
    static let sysenterESP: UInt32 = 0x175
    static let sysenterEIP: UInt32 = 0x176
    static let miscEnable: UInt32 = 0x1A0
    static let mtrrDefaultType: UInt32 = 0x2FF
    static let star: UInt32 = 0xC000_0081
    static let lstar: UInt32 = 0xC000_0082
    static let cstar: UInt32 = 0xC000_0083
    static let syscallMask: UInt32 = 0xC000_0084
    static let kernelGSBase: UInt32 = 0xC000_0102

    /// MSR values at power-on, as firmware would leave them: syscall MSRs zero, fast
    /// string operations enabled, MTRRs enabled with write-back as the default memory
    /// type (without it Linux maps all of RAM uncached).
    static let bootMSRs: [(index: UInt32, value: UInt64)] = [
        (sysenterCS, 0), (sysenterESP, 0), (sysenterEIP, 0),
        (star, 0), (lstar, 0), (cstar, 0), (syscallMask, 0), (kernelGSBase, 0),
        (tsc, 0),
        (miscEnable, 1), // fast string operations
        (mtrrDefaultType, (1 << 11) | 6), // MTRRs enabled, default type write-back
    ]

    // Local APIC register offsets and delivery modes.
    static let lvtLINT0: Int = 0x350
    static let lvtLINT1: Int = 0x360
    static let deliveryExtINT: UInt32 = 0x7
    static let deliveryNMI: UInt32 = 0x4

    public static func configure(_ vcpu: VCPU, cpuid: [CPUIDEntry]) throws(KVMError) {
        try vcpu.setCPUID(cpuid)
        try vcpu.setMSRs(bootMSRs)
        try vcpu.resetFPU()
        try wireLINTPins(vcpu)
    }

    /// Without a BIOS nobody programs the LINT pins: LINT0 receives the 8259 PIC's
    /// interrupts (ExtINT) and LINT1 the NMI line, as on a PC.
    static func wireLINTPins(_ vcpu: VCPU) throws(KVMError) {
        var state = try vcpu.lapic()
        withUnsafeMutableBytes(of: &state.regs) { registers in
            for (offset, mode) in [(lvtLINT0, deliveryExtINT), (lvtLINT1, deliveryNMI)] {
                let value = registers.loadUnaligned(fromByteOffset: offset, as: UInt32.self)
                registers.storeBytes(of: (value & ~0x700) | (mode << 8), toByteOffset: offset, as: UInt32.self)
            }
        }
        try vcpu.setLAPIC(state)
    }
}
