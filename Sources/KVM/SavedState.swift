import CKVM
import Glibc

/// The raw bytes of a KVM structure, for saving it as it is: the kernel's layout is its
/// ABI (the sizes are pinned by `_Static_assert`s in ckvm.c), so a state saved by one
/// Swiftlet is read back by another byte for byte, without a field-by-field mapping that
/// could forget a field.
public func rawBytes<T>(of value: T) -> [UInt8] {
    withUnsafeBytes(of: value) { Array($0) }
}

/// A KVM structure from bytes saved by ``rawBytes(of:)``; `nil` when the size is wrong.
public func fromRawBytes<T>(_ bytes: [UInt8], as type: T.Type, initial: T) -> T? {
    guard bytes.count == MemoryLayout<T>.size else { return nil }
    var value = initial
    withUnsafeMutableBytes(of: &value) { $0.copyBytes(from: bytes) }
    return value
}

extension KVMSystem {
    /// Every MSR KVM saves and restores for a vCPU. The ioctl is `KVM_GET_MSR_INDEX_LIST`.
    public func msrIndexList() throws(KVMError) -> [UInt32] {
        var capacity: UInt32 = 256
        while true {
            let list = try withZeroedBuffer(size: ckvm_msr_list_size(capacity)) { (buffer) throws(KVMError) -> [UInt32]? in
                let header = buffer.assumingMemoryBound(to: kvm_msr_list.self)
                header.pointee.nmsrs = capacity
                do throws(KVMError) {
                    try fd.ioctl("KVM_GET_MSR_INDEX_LIST", CKVM_GET_MSR_INDEX_LIST, buffer: buffer)
                } catch let .ioctlFailed(_, err) where err == E2BIG && capacity < 65536 {
                    return nil
                }
                let count = Int(header.pointee.nmsrs)
                let indices = UnsafeMutableRawPointer(header + 1).assumingMemoryBound(to: UInt32.self)
                return (0..<count).map { indices[$0] }
            }
            if let list { return list }
            capacity *= 2
        }
    }
}

extension VCPU {
    /// DR0-DR3, DR6, DR7. The corresponding ioctl is `KVM_GET_DEBUGREGS`.
    public func debugRegisters() throws(KVMError) -> kvm_debugregs {
        try fd.get("KVM_GET_DEBUGREGS", CKVM_GET_DEBUGREGS, kvm_debugregs())
    }

    /// The corresponding ioctl is `KVM_SET_DEBUGREGS`.
    public func setDebugRegisters(_ registers: kvm_debugregs) throws(KVMError) {
        try fd.set("KVM_SET_DEBUGREGS", CKVM_SET_DEBUGREGS, registers)
    }

    /// The extended control registers (XCR0: which XSAVE components are on).
    /// The corresponding ioctl is `KVM_GET_XCRS`.
    public func extendedControlRegisters() throws(KVMError) -> kvm_xcrs {
        try fd.get("KVM_GET_XCRS", CKVM_GET_XCRS, kvm_xcrs())
    }

    /// The corresponding ioctl is `KVM_SET_XCRS`.
    public func setExtendedControlRegisters(_ registers: kvm_xcrs) throws(KVMError) {
        try fd.set("KVM_SET_XCRS", CKVM_SET_XCRS, registers)
    }
}

extension VirtualMachine {
    /// One in-kernel interrupt controller: the PIC master (0), the PIC slave (1) or the
    /// IOAPIC (2). The corresponding ioctl is `KVM_GET_IRQCHIP`.
    public func irqchip(_ chip: UInt32) throws(KVMError) -> kvm_irqchip {
        var state = kvm_irqchip()
        state.chip_id = chip
        try fd.ioctl("KVM_GET_IRQCHIP", CKVM_GET_IRQCHIP, &state)
        return state
    }

    /// The corresponding ioctl is `KVM_SET_IRQCHIP`.
    public func setIRQChip(_ state: kvm_irqchip) throws(KVMError) {
        try fd.set("KVM_SET_IRQCHIP", CKVM_SET_IRQCHIP, state)
    }

    /// The in-kernel PIT's three channels and its flags. The ioctl is `KVM_GET_PIT2`.
    public func pit() throws(KVMError) -> kvm_pit_state2 {
        try fd.get("KVM_GET_PIT2", CKVM_GET_PIT2, kvm_pit_state2())
    }

    /// The corresponding ioctl is `KVM_SET_PIT2`.
    public func setPIT(_ state: kvm_pit_state2) throws(KVMError) {
        try fd.set("KVM_SET_PIT2", CKVM_SET_PIT2, state)
    }

    /// kvmclock's current value (nanoseconds of guest time). The ioctl is `KVM_GET_CLOCK`.
    public func clock() throws(KVMError) -> kvm_clock_data {
        try fd.get("KVM_GET_CLOCK", CKVM_GET_CLOCK, kvm_clock_data())
    }

    /// Sets kvmclock so that guest time goes on from `clock` (only the time and the
    /// flags KVM accepts back are passed). The corresponding ioctl is `KVM_SET_CLOCK`.
    public func setClock(_ clock: kvm_clock_data) throws(KVMError) {
        var value = kvm_clock_data()
        value.clock = clock.clock
        try fd.set("KVM_SET_CLOCK", CKVM_SET_CLOCK, value)
    }
}
