import KVM
import Testing
@testable import X86

@Suite("--cpu syntax")
struct CPUModelSpecTests {
    @Test("A model and its edits, in order")
    func parse() throws {
        let spec = try CPUModelSpec(parsing: "x86-64-v3,+pcid,-avx2,erms=on,smap=off, +sse4.2")
        #expect(spec.base == .baseline(.v3))
        #expect(spec.edits.map(\.description) == ["+pcid", "-avx2", "+erms", "-smap", "+sse4_2"])
        #expect(spec.description == "x86-64-v3,+pcid,-avx2,+erms,-smap,+sse4_2")
        #expect(try CPUModelSpec(parsing: "host") == .host)
        #expect(try CPUModelSpec(parsing: "X86-64-V2").base == .baseline(.v2))
    }

    @Test("Wrong syntax, unknown models and unknown features are errors that say what to do", arguments: [
        ("", "names no model"),
        (",+avx", "names no model"),
        ("host,avx2", "'avx2' is not +feature"),
        ("host,+", "'+' names no feature"),
        ("host,,+avx", "'' is not +feature"),
        ("host,avx=maybe", "'avx=maybe' is not +feature"),
        ("x86-64-v5", "unknown CPU model 'x86-64-v5' (models: host, x86-64-v1, x86-64-v2, x86-64-v3, x86-64-v4)"),
        ("host,+avx3", "unknown CPU feature 'avx3' (did you mean avx, avx2"),
        ("host,-hypervisor", "'hypervisor' is set by Swiftlet"),
        ("host,+ht", "'ht' is set by Swiftlet"),
    ])
    func errors(text: String, message: String) {
        #expect {
            _ = try CPUModelSpec(parsing: text)
        } throws: { error in
            "\(error)".contains(message) && !"\(error)".contains("\n")
        }
    }
}

@Suite("Fixed baselines")
struct CPUBaselineTests {
    @Test("Each level has exactly what the psABI requires, and more than the level below", arguments: CPUBaseline.allCases)
    func levels(baseline: CPUBaseline) {
        let table = baseline.table()
        for name in baseline.psABIFeatures { #expect(table.has(name), "\(baseline.name) lacks \(name)") }
        if let index = CPUBaseline.allCases.firstIndex(of: baseline), index > 0 {
            let below = Set(CPUBaseline.allCases[index - 1].features)
            #expect(below.isStrictSubset(of: Set(baseline.features)))
        }
        // Nothing of the next level leaks in.
        if let index = CPUBaseline.allCases.firstIndex(of: baseline), index + 1 < CPUBaseline.allCases.count {
            let next = CPUBaseline.allCases[index + 1]
            for name in Set(next.psABIFeatures).subtracting(baseline.psABIFeatures) {
                #expect(!table.has(name), "\(baseline.name) has \(name) of \(next.name)")
            }
        }
    }

    @Test("Each baseline is closed under prerequisites and keeps what x86-64 requires", arguments: CPUBaseline.allCases)
    func consistent(baseline: CPUBaseline) {
        let table = baseline.table()
        for name in baseline.features {
            for need in CPUFeature.known(name).allPrerequisites { #expect(table.has(need.location), "\(name) needs \(need)") }
        }
        for name in CPUFeature.longModeRequirements { #expect(table.has(name)) }
        #expect(!baseline.features.contains { CPUFeature.known($0).isManaged })
        // Exactly the listed features: the table sets nothing else.
        let present = Set(CPUFeature.all.filter { table.has($0.location) }.map(\.name))
        #expect(present == Set(baseline.features))
    }

    @Test("Host-dependent features are left out of every baseline", arguments: CPUBaseline.allCases)
    func portable(baseline: CPUBaseline) {
        for name in ["hle", "rtm", "spec_ctrl", "spec_ctrl_ssbd", "md_clear", "arch_capabilities", "pku", "mpx",
                     "invtsc", "la57", "monitor", "vmx", "svm", "pdcm", "xsaves"] {
            #expect(!baseline.table().has(name), "\(baseline.name) has \(name)")
        }
    }

    @Test("The identity is fixed: vendor, signature, brand, maximum leaves, address widths")
    func identity() throws {
        let v3 = CPUBaseline.v3.table()
        #expect(v3.vendor == "GenuineIntel")
        #expect(v3.signature == (6, 60, 1))
        #expect(v3.brand == "Swiftlet x86-64-v3 CPU")
        #expect(v3.maximumBasicLeaf == 0xD)
        #expect(v3.maximumExtendedLeaf == 0x8000_0008)
        #expect(v3.value(0x4000_0000, 0, .eax) == 0x4000_0001)
        #expect(v3.physicalAddressBits == 39)
        #expect(v3.linearAddressBits == 48)
        #expect(CPUBaseline.v1.table().signature == (15, 6, 1))
        #expect(CPUBaseline.v1.table().physicalAddressBits == 36)
        // Leaf 4 describes four caches, then ends; leaf 2 points at it.
        #expect(v3.value(2, 0, .eax) & 0xFF00 == 0xFF00)
        #expect((0..<4).map { v3.value(4, UInt32($0), .eax) & 0x1F } == [1, 2, 3, 3])
        #expect(v3.value(4, 4, .eax) == 0)
        // L1 data: 32 KiB = 8 ways x 64 sets x 64 bytes.
        let l1 = try #require(v3.entry(4, 0))
        let ways = (l1.ebx >> 22) + 1, sets = l1.ecx + 1, lineSize = (l1.ebx & 0xFFF) + 1
        #expect(ways * sets * lineSize == 32 * 1024)
    }

    @Test("XSAVE: v1 and v2 have none, v3 adds AVX, v4 the AVX-512 components, at the SDM's offsets")
    func xsave() {
        #expect(CPUBaseline.v1.table().xsaveMask == 0)
        #expect(CPUBaseline.v2.table().entries.filter { $0.function == 0xD }.allSatisfy { $0.eax | $0.ebx | $0.ecx | $0.edx == 0 })
        let v3 = CPUBaseline.v3.table()
        #expect(v3.xsaveMask == 0x7)
        #expect(v3.value(0xD, 0, .ecx) == 832)
        #expect(v3.value(0xD, 0, .ebx) == 576)
        #expect(v3.value(0xD, 2, .eax) == 256 && v3.value(0xD, 2, .ebx) == 576)
        #expect(v3.value(0xD, 1, .eax) == 0x1) // xsaveopt
        let v4 = CPUBaseline.v4.table()
        #expect(v4.xsaveMask == 0xE7)
        #expect(v4.value(0xD, 0, .ecx) == 0xA80)
        #expect(v4.value(0xD, 7, .ebx) == 0x680)
        #expect(v4.value(0xD, 1, .eax) == 0x7) // xsaveopt, xsavec, xgetbv1
    }
}

@Suite("Resolving a model against KVM_GET_SUPPORTED_CPUID")
struct CPUDefinitionTests {
    @Test("host is KVM's supported list, untouched")
    func host() throws {
        for supported in [try CPUIDFixtures.nestedKVM, try CPUIDFixtures.sapphireRapids] {
            let definition = try CPUDefinition.resolve(.host, supported: supported)
            #expect(definition.table.entries == supported)
            #expect(definition.isSupported)
        }
    }

    @Test("x86-64-v1 fits the nested KVM; v2 lacks exactly SSE3, SSSE3, SSE4 and POPCNT there")
    func nestedHost() throws {
        let supported = try CPUIDFixtures.nestedKVM
        let v1 = try CPUDefinition.resolve(CPUModelSpec(base: .baseline(.v1)), supported: supported)
        #expect(v1.isSupported)
        #expect(v1.table.entries == CPUBaseline.v1.table().entries)
        let v2 = try CPUDefinition.resolve(CPUModelSpec(base: .baseline(.v2)), supported: supported)
        #expect(v2.unsupported.map(\.name) == ["pni", "ssse3", "sse4_1", "sse4_2", "popcnt"])
        #expect(v2.problems.isEmpty)
        #expect {
            try v2.requireSupported()
        } throws: { error in
            "\(error)" == "CPU model x86-64-v2 cannot run on this host: features this KVM does not offer: "
                + "pni ssse3 sse4_1 sse4_2 popcnt (see 'swiftlet cpu --show x86-64-v2')"
        }
        let v4 = try CPUDefinition.resolve(CPUModelSpec(base: .baseline(.v4)), supported: supported)
        #expect(v4.unsupported.contains { $0.name == "avx512f" })
        #expect(v4.problems.isEmpty) // the AVX-512 XSAVE layout matches; only the flags are missing
    }

    @Test("Every baseline fits a CPU with AVX-512 (the Sapphire Rapids table)", arguments: CPUBaseline.allCases)
    func avx512Host(baseline: CPUBaseline) throws {
        let definition = try CPUDefinition.resolve(CPUModelSpec(base: .baseline(baseline)), supported: try CPUIDFixtures.sapphireRapids)
        #expect(definition.unsupported.isEmpty)
        #expect(definition.problems.isEmpty)
    }

    @Test("A host with fewer physical address bits cannot run the model")
    func addressWidth() throws {
        let narrow = modified(try CPUIDFixtures.sapphireRapids, leaf: 0x8000_0008) { $0.eax = ($0.eax & ~0xFF) | 36 }
        let definition = try CPUDefinition.resolve(CPUModelSpec(base: .baseline(.v3)), supported: narrow)
        #expect(definition.problems == ["it has 39-bit physical addresses, this host 36"])
        #expect(try CPUDefinition.resolve(CPUModelSpec(base: .baseline(.v2)), supported: narrow).isSupported)
    }

    @Test("A host whose XSAVE layout differs cannot run the model (the area would not restore)")
    func xsaveLayout() throws {
        let moved = modified(try CPUIDFixtures.sapphireRapids, leaf: 0xD, subleaf: 2) { $0.ebx = 0x400 }
        let definition = try CPUDefinition.resolve(CPUModelSpec(base: .baseline(.v3)), supported: moved)
        #expect(definition.unsupported.isEmpty)
        #expect(definition.problems == ["XSAVE component 2 (AVX) is 256 bytes at offset 1024 on this host, 256 bytes at 576 in the model"])
        // PKRU is not in the SPR table's XCR0 mask: +pku is refused for the flag and the component.
        let pku = try CPUDefinition.resolve(CPUModelSpec(parsing: "x86-64-v4,+pku"), supported: try CPUIDFixtures.sapphireRapids)
        #expect(pku.unsupported.map(\.name) == ["pku"])
        #expect(pku.problems == ["this KVM does not offer XSAVE component 9 (PKRU)"])
        #expect(pku.table.xsaveMask == 0x2E7)
    }

    @Test("+feature is checked against KVM; -feature always works")
    func edits() throws {
        let supported = try CPUIDFixtures.nestedKVM
        let plus = try CPUDefinition.resolve(CPUModelSpec(parsing: "x86-64-v1,+cx16,+est,+smx"), supported: supported)
        #expect(plus.table.has("cx16"))
        #expect(plus.unsupported.map(\.name) == ["smx", "est"])
        let minus = try CPUDefinition.resolve(CPUModelSpec(parsing: "host,-x2apic,-lahf_lm"), supported: supported)
        #expect(minus.isSupported)
        #expect(!minus.table.has("x2apic"))
        #expect(!minus.table.has("lahf_lm"))
        #expect(minus.table.has("tsc_deadline_timer")) // needs apic, not x2apic
        // Later edits win.
        let twice = try CPUDefinition.resolve(CPUModelSpec(parsing: "x86-64-v1,-nx,+nx"), supported: supported)
        #expect(twice.table.has("nx"))
    }

    @Test("-xsave removes the AVX family and empties leaf 0xD")
    func removeXSAVE() throws {
        let definition = try CPUDefinition.resolve(CPUModelSpec(parsing: "x86-64-v3,-xsave"), supported: try CPUIDFixtures.sapphireRapids)
        #expect(Set(definition.removedWithPrerequisites.map(\.name)) == ["avx", "avx2", "fma", "f16c", "xsaveopt"])
        for name in ["xsave", "avx", "avx2", "fma", "f16c", "xsaveopt"] { #expect(!definition.table.has(name)) }
        #expect(definition.table.has("bmi2") && definition.table.has("movbe")) // not AVX state
        #expect(definition.table.entries.filter { $0.function == 0xD }.map(\.index) == [0])
        #expect(definition.table.xsaveMask == 0)
        #expect(definition.table.value(0xD, 0, .ecx) == 0)
        #expect(definition.isSupported)
    }

    @Test("-avx512f on host shrinks XCR0's mask and the XSAVE area")
    func removeAVX512() throws {
        let supported = try CPUIDFixtures.sapphireRapids
        #expect(CPUIDTable(supported).xsaveMask == 0xE7)
        let definition = try CPUDefinition.resolve(CPUModelSpec(parsing: "host,-avx512f"), supported: supported)
        #expect(definition.table.xsaveMask == 0x7)
        #expect(definition.table.value(0xD, 0, .ecx) == 832)
        #expect(definition.table.entry(0xD, 5) == nil)
        for name in ["avx512f", "avx512dq", "avx512bw", "avx512vl", "avx512_vnni", "avx512_fp16", "avx512_bf16"] {
            #expect(!definition.table.has(name))
        }
        #expect(definition.table.has("avx2") && definition.table.has("avx_vnni"))
        // Only what the edit touched changed.
        let untouched = definition.table.entries.filter { $0.function != 0xD && $0.function != 7 }
        #expect(untouched == supported.filter { $0.function != 0xD && $0.function != 7 })
    }

    @Test("+avx on v2 adds the AVX component with the standard layout; +fma alone is refused")
    func addAVX() throws {
        let supported = try CPUIDFixtures.sapphireRapids
        let definition = try CPUDefinition.resolve(CPUModelSpec(parsing: "x86-64-v2,+xsave,+avx,+fma"), supported: supported)
        #expect(definition.isSupported)
        #expect(definition.table.xsaveMask == 0x7)
        #expect(definition.table.value(0xD, 2, .ebx) == 576)
        #expect {
            _ = try CPUDefinition.resolve(CPUModelSpec(parsing: "x86-64-v2,+fma"), supported: supported)
        } throws: { error in
            "\(error)" == "+fma needs avx, xsave, which the model lacks: add +avx,+xsave"
        }
        #expect(throws: CPUModelError.missingPrerequisites(feature: "fma", missing: ["avx"])) {
            _ = try CPUDefinition.resolve(CPUModelSpec(parsing: "x86-64-v3,-avx,+fma"), supported: supported)
        }
        // Removing after adding is fine: the edit order decides.
        #expect(try !CPUDefinition.resolve(CPUModelSpec(parsing: "x86-64-v3,+fma,-avx"), supported: supported).table.has("fma"))
    }

    @Test("What x86-64 requires cannot go while lm stays; with -lm it can")
    func longMode() throws {
        let supported = try CPUIDFixtures.sapphireRapids
        #expect(throws: CPUModelError.requiredByLongMode(missing: ["sse2"])) {
            _ = try CPUDefinition.resolve(CPUModelSpec(parsing: "x86-64-v2,-sse2"), supported: supported)
        }
        #expect {
            _ = try CPUDefinition.resolve(CPUModelSpec(parsing: "host,-fpu"), supported: supported)
        } throws: { error in
            "\(error)" == "x86-64 (lm) requires fpu, fxsr, sse, sse2: keep them, or add -lm for a CPU without 64-bit mode"
        }
        let thirtyTwo = try CPUDefinition.resolve(CPUModelSpec(parsing: "x86-64-v2,-lm,-sse2"), supported: supported)
        #expect(!thirtyTwo.table.has("sse2") && !thirtyTwo.table.has("pni") && !thirtyTwo.table.has("sse4_2"))
        #expect(thirtyTwo.table.has("sse") && thirtyTwo.table.has("popcnt"))
    }

    @Test("Leaves an edit needs are created and made reachable")
    func newLeaves() throws {
        let supported = try CPUIDFixtures.sapphireRapids
        let vnni = try CPUDefinition.resolve(CPUModelSpec(parsing: "x86-64-v3,+avx_vnni"), supported: supported)
        #expect(vnni.table.value(7, 0, .eax) == 1)
        #expect(vnni.table.has("avx_vnni"))
        #expect(vnni.isSupported)
        let la57 = try CPUDefinition.resolve(CPUModelSpec(parsing: "x86-64-v3,+la57"), supported: supported)
        #expect(la57.table.linearAddressBits == 57)
        let host = try CPUDefinition.resolve(CPUModelSpec(parsing: "host,-la57"), supported: supported)
        #expect(host.table.linearAddressBits == 48)
        #expect(CPUIDTable(supported).linearAddressBits == 57)
    }
}

@Suite("Per-vCPU adjustments on top of a model")
struct CPUModelAdjustmentTests {
    @Test("APIC ID, topology, hypervisor bit and TSC leaf are set on a baseline as on host")
    func baseline() {
        let model = CPUModel(base: CPUBaseline.v2.table().entries, cpuCount: 4, tscKHz: 2_400_000)
        let table = CPUIDTable(model.entries(forAPICID: 3))
        #expect(table.value(1, 0, .ebx) >> 24 == 3)
        #expect(table.value(1, 0, .ebx) >> 16 & 0xFF == 4)
        #expect(table.has(CPUFeature.known("hypervisor").location))
        #expect(table.has(CPUFeature.known("ht").location))
        #expect(table.value(0xB, 1, .ebx) == 4)
        #expect(table.value(0xB, 0, .edx) == 3 && table.value(0xB, 1, .edx) == 3)
        #expect(table.value(4, 0, .eax) >> 26 == 3)
        #expect(table.value(0x4000_0010, 0, .eax) == 2_400_000)
        #expect(table.value(0x4000_0000, 0, .eax) == 0x4000_0010)
        // What is not per-vCPU stays the model's.
        #expect(table.vendor == "GenuineIntel")
        #expect(table.value(1, 0, .ecx) & ~(1 << 31) == CPUBaseline.v2.table().value(1, 0, .ecx))
        #expect(table.value(0x4000_0001, 0, .eax) == CPUBaseline.v2.table().value(0x4000_0001, 0, .eax))
    }

    @Test("Leaf 0xB gets its core level even when KVM lists only sub-leaf 0")
    func topologyLevels() throws {
        let supported = try CPUIDFixtures.nestedKVM
        #expect(supported.filter { $0.function == 0xB }.map(\.index) == [0])
        let table = CPUIDTable(CPUModel(base: supported, cpuCount: 2, tscKHz: nil).entries(forAPICID: 1))
        #expect(table.value(0xB, 1, .ecx) == (2 << 8) | 1) // level 1 is the core level
        #expect(table.value(0xB, 1, .ebx) == 2)
        #expect(table.value(0xB, 1, .edx) == 1)
    }
}
