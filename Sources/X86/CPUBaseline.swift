import KVM

/// A fixed CPU: every leaf the guest reads is defined here, none is copied from the host.
///
/// The four baselines follow the x86-64 psABI micro-architecture levels (x86-64-v1 to -v4,
/// the levels compilers target with `-march=x86-64-v3`). A level only lists instruction
/// sets; a CPU needs more (paging features, the APIC, a vendor, caches), so each baseline
/// adds the system features that every CPU implementing the level has, from both vendors:
///
/// | baseline | hosts it is written for | QEMU model it resembles |
/// | --- | --- | --- |
/// | x86-64-v1 | any x86-64 CPU | kvm64 (family 15, model 6) |
/// | x86-64-v2 | Intel Nehalem and later, AMD Bulldozer and later | Nehalem (6/26) |
/// | x86-64-v3 | Intel Haswell and later, AMD Zen and later | Haswell-noTSX (6/60) |
/// | x86-64-v4 | Intel Skylake-SP and later, AMD Zen 4 and later | Skylake-Server-noTSX (6/85) |
///
/// Features that make a guest depend on one host (TSX, which microcode updates remove;
/// speculation-control bits, which depend on microcode; PKU, whose XSAVE offset differs
/// between vendors; invariant TSC; a PMU) are left out: add them with `+feature` when
/// every host in the pool has them. Like QEMU's named models every baseline has x2APIC,
/// the TSC deadline timer and ARAT, which KVM's in-kernel local APIC emulates on any host,
/// and the KVM paravirtual features QEMU enables by default.
///
/// The vendor is GenuineIntel and the family/model/stepping those of the QEMU model in the
/// table, so a guest takes the same vendor-specific code paths on every host.
public enum CPUBaseline: String, CaseIterable, Sendable {
    case v1 = "x86-64-v1"
    case v2 = "x86-64-v2"
    case v3 = "x86-64-v3"
    case v4 = "x86-64-v4"

    public var name: String { rawValue }

    public var summary: String {
        switch self {
        case .v1: return "x86-64 baseline: SSE2, no SSE3 (any 64-bit x86 CPU; like QEMU's kvm64)"
        case .v2: return "adds SSE3, SSSE3, SSE4.1/4.2, POPCNT, CMPXCHG16B (Intel Nehalem+, AMD Bulldozer+)"
        case .v3: return "adds AVX, AVX2, BMI1/2, FMA, F16C, LZCNT, MOVBE, XSAVE (Intel Haswell+, AMD Zen+)"
        case .v4: return "adds AVX-512 F/BW/CD/DQ/VL (Intel Skylake-SP+, AMD Zen 4+)"
        }
    }

    /// What the psABI level itself requires (the list QEMU's scripts/cpu-x86-uarch-abi.py
    /// checks models against), cumulative.
    public var psABIFeatures: [String] {
        switch self {
        case .v1: return ["cmov", "cx8", "fpu", "fxsr", "mmx", "syscall", "sse", "sse2"]
        case .v2: return CPUBaseline.v1.psABIFeatures + ["cx16", "lahf_lm", "popcnt", "pni", "sse4_1", "sse4_2", "ssse3"]
        case .v3: return CPUBaseline.v2.psABIFeatures + ["avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe", "xsave"]
        case .v4: return CPUBaseline.v3.psABIFeatures + ["avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"]
        }
    }

    /// Every feature flag the baseline sets, cumulative.
    public var features: [String] {
        switch self {
        case .v1:
            return ["fpu", "vme", "de", "pse", "tsc", "msr", "pae", "mce", "cx8", "apic", "sep", "mtrr", "pge", "mca",
                    "cmov", "pat", "pse36", "clflush", "mmx", "fxsr", "sse", "sse2",
                    "x2apic", "tsc_deadline_timer", "syscall", "nx", "lm", "arat",
                    "kvm_clocksource", "kvm_nop_io_delay", "kvm_clocksource2", "kvm_async_pf", "kvm_steal_time",
                    "kvm_pv_eoi", "kvm_async_pf_int", "kvm_clocksource_stable_bit"]
        case .v2:
            return CPUBaseline.v1.features + ["pni", "ssse3", "cx16", "sse4_1", "sse4_2", "popcnt", "lahf_lm"]
        case .v3:
            return CPUBaseline.v2.features + ["pclmulqdq", "fma", "movbe", "aes", "xsave", "avx", "f16c", "rdrand",
                                              "abm", "rdtscp", "pdpe1gb", "fsgsbase", "bmi1", "avx2", "smep", "bmi2",
                                              "xsaveopt"]
        case .v4:
            return CPUBaseline.v3.features + ["pcid", "erms", "invpcid", "rdseed", "adx", "smap", "clflushopt", "clwb",
                                              "avx512f", "avx512dq", "avx512cd", "avx512bw", "avx512vl",
                                              "3dnowprefetch", "xsavec", "xgetbv1"]
        }
    }

    public var vendor: String { "GenuineIntel" }

    public var signature: (family: UInt32, model: UInt32, stepping: UInt32) {
        switch self {
        case .v1: return (15, 6, 1)
        case .v2: return (6, 26, 3)
        case .v3: return (6, 60, 1)
        case .v4: return (6, 85, 4)
        }
    }

    public var brand: String { "Swiftlet \(rawValue) CPU" }

    /// Guest-physical address bits. No more than the oldest host of the level has
    /// (Nehalem-era client CPUs have 36, Haswell-era ones 39), because KVM cannot give a
    /// guest wider addresses than the host's. It bounds guest RAM: 64 GiB and 512 GiB.
    public var physicalAddressBits: UInt32 {
        switch self {
        case .v1, .v2: return 36
        case .v3, .v4: return 39
        }
    }

    /// The highest basic leaf: 0xD (XSAVE), which also covers the topology leaf 0xB.
    static let maximumBasicLeaf: UInt32 = 0xD
    static let maximumExtendedLeaf: UInt32 = 0x8000_0008
    /// KVM's paravirtual leaves: the signature leaf and the feature leaf.
    static let maximumHypervisorLeaf: UInt32 = 0x4000_0001

    /// The leaves, before ``CPUModel`` adds what differs per vCPU (APIC ID, topology).
    public func table() -> CPUIDTable {
        var table = CPUIDTable([])
        let vendorWords = CPUIDTable.words(vendor, count: 3)
        table.update(0) { $0.eax = Self.maximumBasicLeaf; $0.ebx = vendorWords[0]; $0.edx = vendorWords[1]; $0.ecx = vendorWords[2] }
        table.update(1) {
            $0.eax = Self.encodeSignature(signature)
            $0.ebx = 8 << 8 // CLFLUSH line size in 8-byte units: 64 bytes
        }
        // Leaf 2 says "no descriptors here, read leaf 4" (descriptor 0xFF).
        table.update(2) { $0.eax = 0x0000_FF01 }
        for (index, cache) in Self.caches.enumerated() {
            table.update(4, UInt32(index)) { cache.write(to: &$0) }
        }
        table.update(4, UInt32(Self.caches.count)) { _ in } // no more caches
        table.update(6) { _ in }
        table.update(7, 0) { _ in }
        // Topology: filled in per vCPU by CPUModel.
        table.update(0xB, 0) { _ in }
        table.update(0xB, 1) { _ in }
        table.update(0xD, 0) { _ in }
        let signatureWords = CPUIDTable.words("KVMKVMKVM", count: 3)
        table.update(0x4000_0000) { $0.eax = Self.maximumHypervisorLeaf; $0.ebx = signatureWords[0]; $0.ecx = signatureWords[1]; $0.edx = signatureWords[2] }
        table.update(0x4000_0001) { _ in }
        table.update(0x8000_0000) { $0.eax = Self.maximumExtendedLeaf }
        table.update(0x8000_0001) { _ in }
        let brandWords = CPUIDTable.words(brand, count: 12)
        for (offset, leaf) in (UInt32(0x8000_0002)...0x8000_0004).enumerated() {
            table.update(leaf) {
                $0.eax = brandWords[offset * 4]; $0.ebx = brandWords[offset * 4 + 1]
                $0.ecx = brandWords[offset * 4 + 2]; $0.edx = brandWords[offset * 4 + 3]
            }
        }
        // The L2 cache again, in the form Intel also reports in 0x80000006 ECX.
        table.update(0x8000_0006) { $0.ecx = (Self.caches[2].sizeKiB << 16) | (0x8 << 12) | Self.caches[2].lineSize }
        table.update(0x8000_0007) { _ in }
        table.update(0x8000_0008) { $0.eax = physicalAddressBits | (48 << 8) }
        for name in features { table.set(CPUFeature.known(name).location, true) }
        XSAVELayout.apply(to: &table)
        return table
    }

    static func encodeSignature(_ signature: (family: UInt32, model: UInt32, stepping: UInt32)) -> UInt32 {
        let baseFamily = min(signature.family, 0xF)
        let extendedFamily = signature.family >= 0xF ? signature.family - 0xF : 0
        return signature.stepping & 0xF | (signature.model & 0xF) << 4 | baseFamily << 8
            | (signature.model >> 4 & 0xF) << 16 | extendedFamily << 20
    }

    /// A cache as leaf 4 describes it.
    struct Cache {
        let level: UInt32
        /// 1 data, 2 instruction, 3 unified.
        let type: UInt32
        let sizeKiB: UInt32
        let ways: UInt32
        let lineSize: UInt32 = 64
        /// Bit 0: WBINVD need not flush other cores' lower-level caches; bit 1: inclusive
        /// of lower levels; bit 2: complex indexing.
        let flags: UInt32

        func write(to entry: inout CPUIDEntry) {
            let sets = sizeKiB * 1024 / (ways * lineSize)
            // EAX[31:26] (cores) and [25:14] (sharing) are set per vCPU by CPUModel.
            entry.eax = type | level << 5 | 1 << 8 // self-initializing
            entry.ebx = (lineSize - 1) | (ways - 1) << 22
            entry.ecx = sets - 1
            entry.edx = flags
        }
    }

    /// The caches QEMU reports for its named models ("legacy" cache information): 32 KiB
    /// L1 data and instruction caches, 4 MiB L2, 16 MiB L3. A fixed answer, so that what
    /// a guest sizes from them does not change when it moves.
    static let caches = [
        Cache(level: 1, type: 1, sizeKiB: 32, ways: 8, flags: 0b001),
        Cache(level: 1, type: 2, sizeKiB: 32, ways: 8, flags: 0b001),
        Cache(level: 2, type: 3, sizeKiB: 4096, ways: 16, flags: 0b001),
        Cache(level: 3, type: 3, sizeKiB: 16384, ways: 16, flags: 0b110),
    ]
}

/// Keeps leaf 0xD (XSAVE) consistent with the feature flags: a component is in XCR0's
/// allowed mask exactly when the feature that needs it is set, and the area sizes follow.
enum XSAVELayout {
    static func apply(to table: inout CPUIDTable) {
        let hasXSAVE = table.has(CPUFeature.known("xsave").location)
        guard hasXSAVE else {
            // No XSAVE: leaf 0xD is all zero (if it is in range at all).
            let present = table.entries.contains { $0.function == 0xD }
            table = CPUIDTable(table.entries.filter { $0.function != 0xD })
            if present { table.update(0xD, 0) { _ in } }
            return
        }
        let before = table.xsaveMask
        var mask = before | 0b11
        for component in XSAVEComponent.all {
            let bit = UInt64(1) << UInt64(component.index)
            if table.has(CPUFeature.known(component.feature).location) {
                mask |= bit
                if table.value(0xD, component.index, .eax) == 0 {
                    table.update(0xD, component.index) {
                        $0.eax = component.size; $0.ebx = component.offset; $0.ecx = component.flags; $0.edx = 0
                    }
                }
            } else {
                mask &= ~bit
                table.remove(0xD, component.index)
            }
        }
        if table.entry(0xD, 1) == nil { table.update(0xD, 1) { _ in } }
        if !table.has(CPUFeature.known("xsaves").location), table.value(0xD, 1, .ecx) | table.value(0xD, 1, .edx) != 0 {
            // Without XSAVES the supervisor components (IA32_XSS) are unusable.
            let supervisor = UInt64(table.value(0xD, 1, .ecx)) | UInt64(table.value(0xD, 1, .edx)) << 32
            for index in UInt32(0)..<64 where supervisor & (1 << UInt64(index)) != 0 { table.remove(0xD, index) }
            table.update(0xD, 1) { $0.ecx = 0; $0.edx = 0; $0.ebx = 0 }
        }
        guard mask != before || table.value(0xD, 0, .ecx) == 0 else { return }
        var size = XSAVEComponent.legacyAndHeaderSize
        for index in UInt32(2)..<64 where mask & (1 << UInt64(index)) != 0 {
            let entry = table.entry(0xD, index)
            size = max(size, (entry?.eax ?? 0) + (entry?.ebx ?? 0))
        }
        table.update(0xD, 0) {
            $0.eax = UInt32(truncatingIfNeeded: mask)
            $0.edx = UInt32(truncatingIfNeeded: mask >> 32)
            // EBX is the size XCR0 needs now; KVM keeps it current. At reset XCR0 = x87.
            $0.ebx = XSAVEComponent.legacyAndHeaderSize
            $0.ecx = size
        }
    }
}
