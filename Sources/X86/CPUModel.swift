import KVM

/// The CPU the guest sees through CPUID: a model's leaves, adjusted per vCPU.
///
/// Starts from the leaves of the chosen model (``CPUDefinition``: for `host`, what
/// `KVM_GET_SUPPORTED_CPUID` offers; else a fixed ``CPUBaseline``, with any edits) and
/// sets what only the VMM knows, the same for every model:
/// - each vCPU's APIC ID (leaf 1 EBX[31:24], leaf 0xB EDX);
/// - a topology that matches `--cpus N`: one package of N cores with one thread each
///   (leaf 1 EBX[23:16] and HTT, leaf 4 EAX[31:26], leaf 0xB levels, AMD 0x80000008);
/// - the hypervisor bit (leaf 1 ECX[31]), so the guest knows it is virtualized, next to
///   KVM's own signature leaves at 0x40000000 ("KVMKVMKVM") that KVM reports;
/// - the TSC frequency in leaf 0x40000010 (EAX, kHz) when KVM knows it, the
///   "hypervisor timing" leaf that guests read to skip TSC calibration.
public struct CPUModel: Sendable {
    public static let hypervisorBase: UInt32 = 0x4000_0000
    public static let timingLeaf: UInt32 = 0x4000_0010

    /// The model's leaves, the same for every vCPU.
    public let base: [CPUIDEntry]
    public let cpuCount: Int
    public let tscKHz: UInt32?

    public init(base: [CPUIDEntry], cpuCount: Int, tscKHz: UInt32?) {
        self.base = base
        self.cpuCount = cpuCount
        self.tscKHz = tscKHz
    }

    /// Bits needed to number `cpuCount` cores: the APIC-ID shift of the package level.
    public var coreIDBits: UInt32 {
        var bits: UInt32 = 0
        while (1 << bits) < cpuCount { bits += 1 }
        return bits
    }

    public func entries(forAPICID apicID: UInt32) -> [CPUIDEntry] {
        let count = UInt32(cpuCount)
        var result: [CPUIDEntry] = []
        for var entry in withTopologyLevels(base) {
            switch entry.function {
            case 1:
                entry.ebx = (entry.ebx & 0x0000_FFFF) | (apicID << 24) | (min(count, 255) << 16)
                entry.ecx |= 1 << 31 // hypervisor present
                if count > 1 { entry.edx |= 1 << 28 } else { entry.edx &= ~(1 << 28) }
            case 4:
                // Deterministic cache parameters: EAX[31:26] = cores per package - 1.
                entry.eax = (entry.eax & 0x03FF_FFFF) | ((min(count, 64) - 1) << 26)
                // EAX[25:14] = logical processors sharing this cache - 1: caches are per core.
                entry.eax &= ~(0xFFF << 14)
            case 0xB:
                entry = topologyLeaf(index: entry.index, apicID: apicID, flags: entry.flags)
            case 0x1F:
                continue // leave only leaf 0xB, so the two cannot disagree
            case Self.hypervisorBase where tscKHz != nil:
                entry.eax = max(entry.eax, Self.timingLeaf)
            case 0x8000_0008:
                // AMD: ECX[7:0] = cores - 1, ECX[15:12] = APIC ID bits for the core.
                entry.ecx = (entry.ecx & ~0xF0FF) | (min(count, 256) - 1) | (coreIDBits << 12)
            default:
                break
            }
            result.append(entry)
        }
        if let tscKHz, result.contains(where: { $0.function == Self.hypervisorBase }) {
            result.removeAll { $0.function == Self.timingLeaf }
            // EBX: the local APIC bus frequency in kHz; KVM's APIC timer runs at 1 GHz.
            result.append(CPUIDEntry(function: Self.timingLeaf, eax: tscKHz, ebx: 1_000_000))
        }
        return result
    }

    /// Leaf 0xB needs sub-leaves 0 (SMT) and 1 (core) to describe the package; KVM's
    /// supported list may hold only sub-leaf 0 (Firecracker inserts sub-leaf 1 too).
    private func withTopologyLevels(_ entries: [CPUIDEntry]) -> [CPUIDEntry] {
        guard let level0 = entries.first(where: { $0.function == 0xB && $0.index == 0 }),
              !entries.contains(where: { $0.function == 0xB && $0.index == 1 }) else { return entries }
        var result = entries
        let position = result.firstIndex { $0.function == 0xB && $0.index == 0 }.map { $0 + 1 } ?? result.endIndex
        result.insert(CPUIDEntry(function: 0xB, index: 1, flags: level0.flags), at: position)
        return result
    }

    /// Extended topology (leaf 0xB): level 0 is SMT (1 thread per core), level 1 is the
    /// core level holding every vCPU; any higher sub-leaf is invalid.
    private func topologyLeaf(index: UInt32, apicID: UInt32, flags: UInt32) -> CPUIDEntry {
        switch index {
        case 0:
            return CPUIDEntry(function: 0xB, index: 0, flags: flags, eax: 0, ebx: 1, ecx: (1 << 8) | 0, edx: apicID)
        case 1:
            return CPUIDEntry(function: 0xB, index: 1, flags: flags, eax: coreIDBits, ebx: UInt32(cpuCount), ecx: (2 << 8) | 1, edx: apicID)
        default:
            return CPUIDEntry(function: 0xB, index: index, flags: flags, eax: 0, ebx: 0, ecx: index, edx: apicID)
        }
    }
}
