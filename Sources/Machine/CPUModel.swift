import KVM

/// The CPU the guest sees through CPUID: KVM's supported leaves, adjusted per vCPU.
///
/// Starts from `KVM_GET_SUPPORTED_CPUID` (what the host CPU and KVM can virtualize) and
/// sets what only the VMM knows: each vCPU's APIC ID, the vCPU count in the topology
/// leaves, and the hypervisor bit so the guest knows it runs in a VM.
struct CPUModel {
    let supported: [CPUIDEntry]
    let cpuCount: Int

    init(supported: [CPUIDEntry], cpuCount: Int) {
        self.supported = supported
        self.cpuCount = cpuCount
    }

    func entries(forAPICID apicID: UInt32) -> [CPUIDEntry] {
        supported.map { entry in
            var entry = entry
            switch entry.function {
            case 1:
                // EBX[31:24] initial APIC ID, EBX[23:16] logical processors per package.
                entry.ebx = (entry.ebx & 0x0000_FFFF) | (apicID << 24) | (UInt32(min(cpuCount, 255)) << 16)
                entry.ecx |= 1 << 31 // hypervisor present
                if cpuCount > 1 { entry.edx |= 1 << 28 } // HTT: the count in EBX[23:16] is valid
            case 0xB, 0x1F:
                // Extended topology: EDX is the x2APIC ID of the executing CPU.
                entry.edx = apicID
            default:
                break
            }
            return entry
        }
    }
}
