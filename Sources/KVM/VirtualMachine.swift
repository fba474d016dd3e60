@_exported import CKVM
import Glibc

/// A KVM virtual machine: owns the VM file descriptor.
///
/// VM ioctls: `KVM_SET_USER_MEMORY_REGION`, `KVM_GET_DIRTY_LOG` (MemorySlot.swift), `KVM_SET_TSS_ADDR`,
/// `KVM_SET_IDENTITY_MAP_ADDR`, `KVM_CREATE_IRQCHIP`, `KVM_GET_IRQCHIP`,
/// `KVM_SET_IRQCHIP`, `KVM_CREATE_PIT2`, `KVM_IRQ_LINE`, `KVM_CHECK_EXTENSION`,
/// `KVM_ENABLE_CAP` and `KVM_CREATE_VCPU` (the fast paths, `KVM_IOEVENTFD`, `KVM_IRQFD`,
/// `KVM_SET_GSI_ROUTING` and `KVM_SIGNAL_MSI`, are in FastPaths.swift). Each is safe to
/// call from any thread.
public final class VirtualMachine: Sendable {
    let fd: KVMFileDescriptor
    public let system: KVMSystem

    init(fd: KVMFileDescriptor, system: KVMSystem) {
        self.fd = fd
        self.system = system
    }

    /// Maps `size` bytes of host memory at `hostAddress` into the guest at `guestAddress`
    /// as memory slot `slot`. The hardware (EPT/NPT) then translates guest accesses to it
    /// without exits, except what `flags` asks for: a write to a ``MemorySlotFlags/readOnly``
    /// slot exits as MMIO, and a ``MemorySlotFlags/logDirtyPages`` slot records the pages
    /// the guest writes (``dirtyLog(slot:pageCount:)``). Calling it again for `slot`
    /// replaces the slot; a size of 0 deletes it. It may be called while vCPUs run.
    /// The corresponding ioctl is `KVM_SET_USER_MEMORY_REGION`.
    public func setUserMemoryRegion(slot: UInt32, guestAddress: UInt64, size: UInt64, hostAddress: UInt,
                                    flags: MemorySlotFlags = []) throws(KVMError) {
        var region = kvm_userspace_memory_region()
        region.slot = slot
        region.flags = flags.rawValue
        region.guest_phys_addr = guestAddress
        region.memory_size = size
        region.userspace_addr = UInt64(hostAddress)
        try fd.ioctl("KVM_SET_USER_MEMORY_REGION", CKVM_SET_USER_MEMORY_REGION, &region)
    }

    /// Intel VMX needs three pages of guest-physical space for a real-mode TSS; they must
    /// not overlap RAM or devices. The corresponding ioctl is `KVM_SET_TSS_ADDR`.
    public func setTSSAddress(_ address: UInt64) throws(KVMError) {
        try fd.ioctl("KVM_SET_TSS_ADDR", CKVM_SET_TSS_ADDR, value: UInt(address))
    }

    /// One page for the identity map VMX uses while the guest runs unpaged.
    /// The corresponding ioctl is `KVM_SET_IDENTITY_MAP_ADDR`.
    public func setIdentityMapAddress(_ address: UInt64) throws(KVMError) {
        var value = address
        try fd.ioctl("KVM_SET_IDENTITY_MAP_ADDR", CKVM_SET_IDENTITY_MAP_ADDR, &value)
    }

    /// Creates the in-kernel interrupt controllers: two 8259 PICs, an IOAPIC and a local
    /// APIC per vCPU. The corresponding ioctl is `KVM_CREATE_IRQCHIP`.
    public func createIRQChip() throws(KVMError) {
        try fd.ioctl("KVM_CREATE_IRQCHIP", CKVM_CREATE_IRQCHIP)
    }

    /// Creates the in-kernel 8254 PIT (timer on IRQ 0, ports 0x40-0x43; port 0x61's
    /// speaker bits are emulated as a dummy). The corresponding ioctl is `KVM_CREATE_PIT2`.
    public func createPIT2() throws(KVMError) {
        var config = kvm_pit_config()
        config.flags = CKVM_PIT_SPEAKER_DUMMY
        try fd.ioctl("KVM_CREATE_PIT2", CKVM_CREATE_PIT2, &config)
    }

    /// Programs the two in-kernel 8259 PICs the way a PC BIOS leaves them: interrupt
    /// vectors 0x08-0x0F (master) and 0x70-0x77 (slave), every input masked except the
    /// cascade. Without this they sit in their reset state, unmasked and delivering IRQ n
    /// as vector n, which is an exception vector: a guest that never touches the PIC
    /// would take any ISA interrupt as a fault. Kernels that use the PIC program it anew.
    /// The corresponding ioctls are `KVM_GET_IRQCHIP` and `KVM_SET_IRQCHIP`.
    public func programPICsLikeFirmware() throws(KVMError) {
        for (chip, base, mask) in [(CKVM_IRQCHIP_PIC_MASTER, UInt8(0x08), UInt8(0xFB)), (CKVM_IRQCHIP_PIC_SLAVE, UInt8(0x70), UInt8(0xFF))] {
            var state = kvm_irqchip()
            state.chip_id = chip
            try fd.ioctl("KVM_GET_IRQCHIP", CKVM_GET_IRQCHIP, &state)
            state.chip.pic.irq_base = base
            state.chip.pic.imr = mask
            state.chip.pic.init4 = 1
            state.chip.pic.init_state = 0
            try fd.ioctl("KVM_SET_IRQCHIP", CKVM_SET_IRQCHIP, &state)
        }
    }

    /// Raises or lowers interrupt input `gsi` of the in-kernel irqchip.
    /// The corresponding ioctl is `KVM_IRQ_LINE`.
    public func setIRQLine(_ gsi: UInt32, high: Bool) throws(KVMError) {
        var level = kvm_irq_level()
        level.irq = gsi
        level.level = high ? 1 : 0
        try fd.ioctl("KVM_IRQ_LINE", CKVM_IRQ_LINE, &level)
    }

    /// `KVM_CHECK_EXTENSION` on the VM: 0 when absent, else a capability-specific value.
    /// Some answers depend on the VM (`KVM_CAP_XSAVE2`'s size).
    public func check(_ capability: KVMCapability) -> Int32 {
        (try? fd.ioctl("KVM_CHECK_EXTENSION", CKVM_CHECK_EXTENSION, value: UInt(capability.rawValue))) ?? 0
    }

    /// Turns on a VM capability that must be asked for (`KVM_CAP_EXIT_ON_EMULATION_FAILURE`
    /// ...), with its arguments. The corresponding ioctl is `KVM_ENABLE_CAP`.
    public func enable(_ capability: KVMCapability, arguments: [UInt64] = []) throws(KVMError) {
        var request = kvm_enable_cap()
        request.cap = UInt32(capability.rawValue)
        withUnsafeMutableBytes(of: &request.args) { slots in
            for (index, value) in arguments.prefix(4).enumerated() {
                slots.storeBytes(of: value, toByteOffset: index * 8, as: UInt64.self)
            }
        }
        try fd.ioctl("KVM_ENABLE_CAP", CKVM_ENABLE_CAP, &request)
    }

    /// Creates vCPU `id` (its initial APIC ID). The corresponding ioctl is `KVM_CREATE_VCPU`.
    public func createVCPU(id: Int) throws(KVMError) -> VCPU {
        let raw = try fd.ioctl("KVM_CREATE_VCPU", CKVM_CREATE_VCPU, value: UInt(id))
        let owner = KVMFileDescriptor(owning: raw)
        let size = system.vcpuMmapSize
        let mapping = mmap(nil, size, PROT_READ | PROT_WRITE, MAP_SHARED, raw, 0)
        guard let mapping, mapping != MAP_FAILED else { throw .mmapFailed(errno: errno) }
        return VCPU(id: id, fd: owner, runArea: mapping.assumingMemoryBound(to: kvm_run.self), runSize: size)
    }
}
