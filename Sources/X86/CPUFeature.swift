/// A CPU feature flag the guest sees through CPUID, by the name Linux's /proc/cpuinfo uses.
///
/// The names come from Linux's `arch/x86/include/asm/cpufeatures.h`: the quoted name when
/// there is one ("pni", "pdpe1gb", "dts"), else the `X86_FEATURE_` macro name in lower case.
/// Where /proc/cpuinfo shows nothing for a bit (`spec_ctrl`, `intel_stibp`, `amd_ibpb`) the
/// macro name is used too. KVM's paravirtual features (leaf 0x40000001) are named after
/// `KVM_FEATURE_` in <asm/kvm_para.h>, `kvm_` kept; `invtsc` is QEMU's name for the bit
/// Linux reports as `constant_tsc` and `nonstop_tsc`.
///
/// ``all`` is the one table of name -> leaf/sub-leaf/register/bit in Swiftlet. Bits that
/// Swiftlet or KVM set by themselves (``isManaged``: the hypervisor bit, HTT) are listed so
/// they can be shown, but cannot be edited; OSXSAVE and OSPKE, which follow CR4 at run
/// time, are not listed at all.
public struct CPUFeature: Hashable, Sendable, CustomStringConvertible {
    public let name: String
    public let location: CPUIDBit
    public let isManaged: Bool

    init(_ name: String, _ location: CPUIDBit, managed: Bool = false) {
        self.name = name
        self.location = location
        self.isManaged = managed
    }

    public var description: String { name }

    /// Every feature Swiftlet knows, in CPUID order (leaf, sub-leaf, register, bit).
    public static let all: [CPUFeature] = {
        var table: [CPUFeature] = []
        func word(_ leaf: UInt32, _ subleaf: UInt32, _ register: CPUIDRegister, _ bits: KeyValuePairs<UInt32, String>) {
            for (bit, name) in bits {
                let location = CPUIDBit(leaf: leaf, subleaf: subleaf, register: register, bit: bit)
                table.append(CPUFeature(name, location, managed: managedNames.contains(name)))
            }
        }
        word(0x1, 0, .edx, [0: "fpu", 1: "vme", 2: "de", 3: "pse", 4: "tsc", 5: "msr", 6: "pae", 7: "mce",
                            8: "cx8", 9: "apic", 11: "sep", 12: "mtrr", 13: "pge", 14: "mca", 15: "cmov", 16: "pat",
                            17: "pse36", 18: "pn", 19: "clflush", 21: "dts", 22: "acpi", 23: "mmx", 24: "fxsr",
                            25: "sse", 26: "sse2", 27: "ss", 28: "ht", 29: "tm", 30: "ia64", 31: "pbe"])
        word(0x1, 0, .ecx, [0: "pni", 1: "pclmulqdq", 2: "dtes64", 3: "monitor", 4: "ds_cpl", 5: "vmx", 6: "smx",
                            7: "est", 8: "tm2", 9: "ssse3", 10: "cid", 11: "sdbg", 12: "fma", 13: "cx16", 14: "xtpr",
                            15: "pdcm", 17: "pcid", 18: "dca", 19: "sse4_1", 20: "sse4_2", 21: "x2apic", 22: "movbe",
                            23: "popcnt", 24: "tsc_deadline_timer", 25: "aes", 26: "xsave", 28: "avx", 29: "f16c",
                            30: "rdrand", 31: "hypervisor"])
        word(0x6, 0, .eax, [2: "arat"])
        word(0x7, 0, .ebx, [0: "fsgsbase", 1: "tsc_adjust", 2: "sgx", 3: "bmi1", 4: "hle", 5: "avx2",
                            6: "fdp_excptn_only", 7: "smep", 8: "bmi2", 9: "erms", 10: "invpcid", 11: "rtm", 12: "cqm",
                            13: "zero_fcs_fds", 14: "mpx", 15: "rdt_a", 16: "avx512f", 17: "avx512dq", 18: "rdseed",
                            19: "adx", 20: "smap", 21: "avx512ifma", 23: "clflushopt", 24: "clwb", 25: "intel_pt",
                            26: "avx512pf", 27: "avx512er", 28: "avx512cd", 29: "sha_ni", 30: "avx512bw", 31: "avx512vl"])
        word(0x7, 0, .ecx, [1: "avx512vbmi", 2: "umip", 3: "pku", 5: "waitpkg", 6: "avx512_vbmi2", 7: "shstk",
                            8: "gfni", 9: "vaes", 10: "vpclmulqdq", 11: "avx512_vnni", 12: "avx512_bitalg", 13: "tme",
                            14: "avx512_vpopcntdq", 16: "la57", 22: "rdpid", 24: "bus_lock_detect", 25: "cldemote",
                            27: "movdiri", 28: "movdir64b", 29: "enqcmd", 30: "sgx_lc"])
        word(0x7, 0, .edx, [2: "avx512_4vnniw", 3: "avx512_4fmaps", 4: "fsrm", 8: "avx512_vp2intersect",
                            9: "srbds_ctrl", 10: "md_clear", 11: "rtm_always_abort", 13: "tsx_force_abort",
                            14: "serialize", 15: "hybrid_cpu", 16: "tsxldtrk", 18: "pconfig", 19: "arch_lbr", 20: "ibt",
                            22: "amx_bf16", 23: "avx512_fp16", 24: "amx_tile", 25: "amx_int8", 26: "spec_ctrl",
                            27: "intel_stibp", 28: "flush_l1d", 29: "arch_capabilities", 30: "core_capabilities",
                            31: "spec_ctrl_ssbd"])
        word(0x7, 1, .eax, [4: "avx_vnni", 5: "avx512_bf16", 7: "cmpccxadd", 10: "fzrm", 11: "fsrs", 12: "fsrc",
                            18: "lkgs", 21: "amx_fp16", 23: "avx_ifma", 26: "lam"])
        word(0xD, 1, .eax, [0: "xsaveopt", 1: "xsavec", 2: "xgetbv1", 3: "xsaves", 4: "xfd"])
        word(0x4000_0001, 0, .eax, [0: "kvm_clocksource", 1: "kvm_nop_io_delay", 2: "kvm_mmu_op",
                                    3: "kvm_clocksource2", 4: "kvm_async_pf", 5: "kvm_steal_time", 6: "kvm_pv_eoi",
                                    7: "kvm_pv_unhalt", 9: "kvm_pv_tlb_flush", 10: "kvm_async_pf_vmexit",
                                    11: "kvm_pv_send_ipi", 12: "kvm_poll_control", 13: "kvm_pv_sched_yield",
                                    14: "kvm_async_pf_int", 15: "kvm_msi_ext_dest_id", 16: "kvm_hc_map_gpa_range",
                                    17: "kvm_migration_control", 24: "kvm_clocksource_stable_bit"])
        word(0x8000_0001, 0, .ecx, [0: "lahf_lm", 1: "cmp_legacy", 2: "svm", 3: "extapic", 4: "cr8_legacy", 5: "abm",
                                    6: "sse4a", 7: "misalignsse", 8: "3dnowprefetch", 9: "osvw", 10: "ibs", 11: "xop",
                                    12: "skinit", 13: "wdt", 15: "lwp", 16: "fma4", 17: "tce", 19: "nodeid_msr",
                                    21: "tbm", 22: "topoext", 23: "perfctr_core", 24: "perfctr_nb", 26: "bpext",
                                    27: "ptsc", 28: "perfctr_llc", 29: "mwaitx"])
        word(0x8000_0001, 0, .edx, [11: "syscall", 19: "mp", 20: "nx", 22: "mmxext", 25: "fxsr_opt", 26: "pdpe1gb",
                                    27: "rdtscp", 29: "lm", 30: "3dnowext", 31: "3dnow"])
        word(0x8000_0007, 0, .edx, [8: "invtsc"])
        word(0x8000_0008, 0, .ebx, [0: "clzero", 1: "irperf", 2: "xsaveerptr", 4: "rdpru", 9: "wbnoinvd",
                                    12: "amd_ibpb", 14: "amd_ibrs", 15: "amd_stibp", 17: "amd_stibp_always_on",
                                    24: "amd_ssbd", 25: "virt_ssbd", 26: "amd_ssb_no", 27: "cppc", 28: "amd_psfd",
                                    29: "btc_no"])
        return table
    }()

    /// Set by Swiftlet per vCPU (``CPUModel``), never by a model or an edit.
    static let managedNames: Set<String> = ["hypervisor", "ht"]

    /// Other spellings people type: QEMU's, the SDM's, compilers'. Hyphens and dots count
    /// as underscores everywhere ("sse4.2", "lahf-lm").
    static let aliases: [String: String] = [
        "sse3": "pni", "lzcnt": "abm", "pclmul": "pclmulqdq", "sha": "sha_ni", "tsc_deadline": "tsc_deadline_timer",
        "gbpages": "pdpe1gb", "prfchw": "3dnowprefetch", "constant_tsc": "invtsc", "nonstop_tsc": "invtsc",
        "ssbd": "spec_ctrl_ssbd", "stibp": "intel_stibp", "ds": "dts", "syscall32": "syscall",
    ]

    private static let byName: [String: CPUFeature] = Dictionary(uniqueKeysWithValues: all.map { ($0.name, $0) })

    /// The feature called `name`; `nil` if Swiftlet does not know it.
    public static func named(_ name: String) -> CPUFeature? {
        let key = normalized(name)
        if let feature = byName[key] { return feature }
        if let target = aliases[key] { return byName[target] }
        // "sse42", "avx512vnni": the same name without its underscores, if that is unique.
        let squeezed = key.replacingUnderscores()
        let matches = all.filter { $0.name.replacingUnderscores() == squeezed }
        return matches.count == 1 ? matches[0] : nil
    }

    /// A feature of the constant tables below; a wrong name there is a programming error
    /// that the X86 unit tests catch.
    static func known(_ name: String) -> CPUFeature {
        guard let feature = byName[name] else { preconditionFailure("CPU feature table has no '\(name)'") }
        return feature
    }

    /// Up to three known names closest to `name` (edit distance), for "did you mean".
    public static func suggestions(for name: String) -> [String] {
        let key = normalized(name)
        let scored = all.map { ($0.name, editDistance(key, $0.name)) }
            + aliases.keys.map { ($0, editDistance(key, $0)) }
        let limit = max(2, key.count / 3)
        let best = scored.filter { $0.1 <= limit }.sorted { $0.1 != $1.1 ? $0.1 < $1.1 : $0.0 < $1.0 }
        var names: [String] = []
        for (candidate, _) in best where !names.contains(candidate) && names.count < 3 { names.append(candidate) }
        return names
    }

    static func normalized(_ name: String) -> String {
        String(name.lowercased().map { $0 == "-" || $0 == "." ? "_" : $0 })
    }

    static func editDistance(_ a: String, _ b: String) -> Int {
        let a = Array(a), b = Array(b)
        if a.isEmpty { return b.count }
        if b.isEmpty { return a.count }
        var previous = Array(0...b.count)
        for i in 1...a.count {
            var current = [i] + [Int](repeating: 0, count: b.count)
            for j in 1...b.count {
                let substitution = previous[j - 1] + (a[i - 1] == b[j - 1] ? 0 : 1)
                current[j] = min(previous[j] + 1, current[j - 1] + 1, substitution)
            }
            previous = current
        }
        return previous[b.count]
    }
}

private extension String {
    func replacingUnderscores() -> String { String(filter { $0 != "_" }) }
}

// MARK: How features depend on each other

extension CPUFeature {
    /// What each feature needs: the instructions or state it builds on. Removing a feature
    /// removes everything that needs it (as Linux's `cpuid-deps.c` does); adding one whose
    /// needs are missing is refused.
    static let prerequisites: [String: [String]] = [
        "fxsr": ["fpu"], "mmx": ["fpu"], "sse": ["fxsr"], "sse2": ["sse"], "pni": ["sse2"], "ssse3": ["pni"],
        "sse4_1": ["ssse3"], "sse4_2": ["sse4_1"], "sse4a": ["sse2"], "pclmulqdq": ["sse2"], "aes": ["sse2"],
        "sha_ni": ["sse2"], "gfni": ["sse2"],
        "xsaveopt": ["xsave"], "xsavec": ["xsave"], "xgetbv1": ["xsave"], "xsaves": ["xsave"],
        "xfd": ["xsaves", "xgetbv1"], "avx": ["xsave"], "pku": ["xsave"], "mpx": ["xsave"],
        "shstk": ["xsaves"], "ibt": ["xsaves"], "enqcmd": ["xsaves"],
        "fma": ["avx"], "f16c": ["avx"], "avx2": ["avx"], "vaes": ["avx"], "vpclmulqdq": ["avx"],
        "avx_vnni": ["avx2"], "avx_ifma": ["avx2"], "fma4": ["avx"], "xop": ["avx"],
        "avx512f": ["avx"],
        "avx512dq": ["avx512f"], "avx512cd": ["avx512f"], "avx512bw": ["avx512f"], "avx512vl": ["avx512f"],
        "avx512ifma": ["avx512f"], "avx512vbmi": ["avx512f"], "avx512_vpopcntdq": ["avx512f"],
        "avx512_4vnniw": ["avx512f"], "avx512_4fmaps": ["avx512f"], "avx512pf": ["avx512f"], "avx512er": ["avx512f"],
        "avx512_vbmi2": ["avx512vl"], "avx512_vnni": ["avx512vl"], "avx512_bitalg": ["avx512vl"],
        "avx512_vp2intersect": ["avx512vl"], "avx512_bf16": ["avx512vl"], "avx512_fp16": ["avx512bw"],
        "amx_tile": ["xfd"], "amx_bf16": ["amx_tile"], "amx_int8": ["amx_tile"], "amx_fp16": ["amx_tile"],
        "x2apic": ["apic"], "tsc_deadline_timer": ["apic"], "invpcid": ["pcid"], "sgx_lc": ["sgx"],
        "la57": ["lm"], "pdpe1gb": ["lm"],
        "kvm_async_pf_int": ["kvm_async_pf"],
        "kvm_async_pf_vmexit": ["kvm_async_pf"],
    ]

    /// What an x86-64 CPU always has (the AMD64 architecture, and what a 64-bit Linux
    /// kernel refuses to boot without: `REQUIRED_MASK` in `required-features.h`). These
    /// cannot be removed while `lm` is on: a guest would not boot. QEMU lets a user remove
    /// them and the guest fails; Swiftlet refuses and says so.
    public static let longModeRequirements = ["fpu", "pse", "msr", "pae", "cx8", "pge", "fxsr", "cmov", "sse", "sse2", "syscall"]

    /// The features this one needs, directly or through others.
    public var allPrerequisites: [CPUFeature] {
        var result: [CPUFeature] = []
        var pending = Self.prerequisites[name] ?? []
        while let next = pending.popLast() {
            let feature = Self.known(next)
            if !result.contains(feature) {
                result.append(feature)
                pending += Self.prerequisites[next] ?? []
            }
        }
        return result
    }

    /// The features that need this one, directly or through others.
    public var allDependents: [CPUFeature] {
        Self.all.filter { $0.allPrerequisites.contains(self) }
    }
}

// MARK: XSAVE state components

/// One user state component of XSAVE (a bit of XCR0 above x87 and SSE), the feature that
/// needs it, and its place in the standard (non-compacted) XSAVE area.
///
/// The sizes and offsets are fixed by the hardware: XSAVE runs natively in the guest, so
/// leaf 0xD must report what the host CPU really does. A fixed model therefore carries the
/// layout the SDM documents for Intel CPUs, and ``CPUDefinition`` refuses a host whose
/// layout differs (AMD puts PKRU elsewhere, for example), since a saved guest would not
/// restore there.
public struct XSAVEComponent: Sendable, Equatable {
    public let index: UInt32
    public let name: String
    public let feature: String
    public let size: UInt32
    public let offset: UInt32
    /// Leaf 0xD sub-leaf ECX: bit 1 = 64-byte aligned when compacted, bit 2 = XFD support.
    public let flags: UInt32

    public static let all: [XSAVEComponent] = [
        XSAVEComponent(index: 2, name: "AVX", feature: "avx", size: 256, offset: 576, flags: 0),
        XSAVEComponent(index: 3, name: "MPX BNDREGS", feature: "mpx", size: 64, offset: 960, flags: 0),
        XSAVEComponent(index: 4, name: "MPX BNDCSR", feature: "mpx", size: 64, offset: 1024, flags: 0),
        XSAVEComponent(index: 5, name: "AVX-512 opmask", feature: "avx512f", size: 64, offset: 1088, flags: 0),
        XSAVEComponent(index: 6, name: "AVX-512 ZMM_Hi256", feature: "avx512f", size: 512, offset: 1152, flags: 0),
        XSAVEComponent(index: 7, name: "AVX-512 Hi16_ZMM", feature: "avx512f", size: 1024, offset: 1664, flags: 0),
        XSAVEComponent(index: 9, name: "PKRU", feature: "pku", size: 8, offset: 2688, flags: 0),
        XSAVEComponent(index: 17, name: "AMX TILECFG", feature: "amx_tile", size: 64, offset: 2752, flags: 0b110),
        XSAVEComponent(index: 18, name: "AMX TILEDATA", feature: "amx_tile", size: 8192, offset: 2816, flags: 0b110),
    ]

    /// The legacy area (x87 and SSE, 512 bytes) plus the XSAVE header (64 bytes).
    public static let legacyAndHeaderSize: UInt32 = 576

    /// Names of the components in an XCR0 mask, for people.
    public static func names(in mask: UInt64) -> [String] {
        var names: [String] = []
        if mask & 1 != 0 { names.append("x87") }
        if mask & 2 != 0 { names.append("SSE") }
        for bit in UInt32(2)..<64 where mask & (1 << UInt64(bit)) != 0 {
            names.append(all.first { $0.index == bit }?.name ?? "component \(bit)")
        }
        return names
    }
}
