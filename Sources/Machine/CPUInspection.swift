import KVM
import X86

/// What a CPU model gives one vCPU on this host, checked through KVM itself: the model is
/// resolved against `KVM_GET_SUPPORTED_CPUID`, set on a real vCPU of a scratch VM with
/// `KVM_SET_CPUID2` and read back with `KVM_GET_CPUID2`.
///
/// This is how `swiftlet cpu --show` and the tests see the model, because a guest cannot
/// always show it: on some nested KVMs the guest's CPUID ignores the feature masks set
/// with `KVM_SET_CPUID2` (see docs/booting.md, "The CPU model").
public struct CPUInspection: Sendable {
    public let definition: CPUDefinition
    /// The leaves Swiftlet sets on the vCPU (the model plus the per-vCPU adjustments).
    public let programmed: [CPUIDEntry]
    /// `KVM_GET_CPUID2` after `KVM_SET_CPUID2`; `nil` when the host cannot provide the
    /// model (nothing is set then).
    public let readBack: [CPUIDEntry]?

    /// Resolves `spec` and, when this KVM can provide it, programs vCPU `vcpuID` of a
    /// machine with `cpuCount` vCPUs and reads its CPUID back. Throws for a wrong spec or
    /// a KVM that cannot be opened; an unsupported model is reported, not thrown.
    public static func inspect(_ spec: CPUModelSpec, cpuCount: Int = 1, vcpuID: Int = 0,
                               kvmPath: String = KVMSystem.defaultPath) throws(MachineError) -> CPUInspection {
        guard cpuCount >= 1, cpuCount <= Machine.maximumCPUs, vcpuID >= 0, vcpuID < cpuCount else {
            throw .invalidConfiguration("vCPU \(vcpuID) of \(cpuCount) does not exist (1 to \(Machine.maximumCPUs) vCPUs)")
        }
        do {
            let system = try KVMSystem(path: kvmPath)
            let definition = try CPUDefinition.resolve(spec, supported: try system.supportedCPUID())
            let vm = try system.createVM()
            let vcpu = try vm.createVCPU(id: vcpuID)
            let model = CPUModel(base: definition.table.entries, cpuCount: cpuCount, tscKHz: vcpu.tscKHz())
            let programmed = model.entries(forAPICID: UInt32(vcpuID))
            guard definition.isSupported else {
                return CPUInspection(definition: definition, programmed: programmed, readBack: nil)
            }
            try vcpu.setCPUID(programmed)
            return CPUInspection(definition: definition, programmed: programmed, readBack: try vcpu.cpuid())
        } catch let error as CPUModelError {
            throw .invalidConfiguration(error.description)
        } catch let error as KVMError {
            throw .kvm(error)
        } catch {
            throw .invalidConfiguration("\(error)")
        }
    }

    /// `KVM_GET_SUPPORTED_CPUID` of the KVM at `kvmPath`.
    public static func supportedCPUID(kvmPath: String = KVMSystem.defaultPath) throws(MachineError) -> [CPUIDEntry] {
        do {
            return try KVMSystem(path: kvmPath).supportedCPUID()
        } catch {
            throw .kvm(error)
        }
    }
}
