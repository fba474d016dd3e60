import KVM
import Testing
@testable import X86

@Suite("CPU feature table")
struct CPUFeatureTests {
    @Test("Every name and every bit appears once")
    func unique() {
        let names = CPUFeature.all.map(\.name)
        #expect(Set(names).count == names.count)
        let locations = CPUFeature.all.map(\.location)
        #expect(Set(locations).count == locations.count)
        for alias in CPUFeature.aliases.keys { #expect(!names.contains(alias), "alias \(alias) shadows a name") }
    }

    @Test("Bits are where the SDM and Linux's cpufeatures.h put them", arguments: [
        ("sse4_2", CPUIDBit(leaf: 1, register: .ecx, bit: 20)),
        ("avx2", CPUIDBit(leaf: 7, register: .ebx, bit: 5)),
        ("x2apic", CPUIDBit(leaf: 1, register: .ecx, bit: 21)),
        ("pdpe1gb", CPUIDBit(leaf: 0x8000_0001, register: .edx, bit: 26)),
        ("pcid", CPUIDBit(leaf: 1, register: .ecx, bit: 17)),
        ("erms", CPUIDBit(leaf: 7, register: .ebx, bit: 9)),
        ("smep", CPUIDBit(leaf: 7, register: .ebx, bit: 7)),
        ("smap", CPUIDBit(leaf: 7, register: .ebx, bit: 20)),
        ("fsgsbase", CPUIDBit(leaf: 7, register: .ebx, bit: 0)),
        ("aes", CPUIDBit(leaf: 1, register: .ecx, bit: 25)),
        ("popcnt", CPUIDBit(leaf: 1, register: .ecx, bit: 23)),
        ("cx16", CPUIDBit(leaf: 1, register: .ecx, bit: 13)),
        ("movbe", CPUIDBit(leaf: 1, register: .ecx, bit: 22)),
        ("xsave", CPUIDBit(leaf: 1, register: .ecx, bit: 26)),
        ("avx512f", CPUIDBit(leaf: 7, register: .ebx, bit: 16)),
        ("la57", CPUIDBit(leaf: 7, register: .ecx, bit: 16)),
        ("lahf_lm", CPUIDBit(leaf: 0x8000_0001, register: .ecx, bit: 0)),
        ("xsaveopt", CPUIDBit(leaf: 0xD, subleaf: 1, register: .eax, bit: 0)),
        ("avx_vnni", CPUIDBit(leaf: 7, subleaf: 1, register: .eax, bit: 4)),
        ("kvm_steal_time", CPUIDBit(leaf: 0x4000_0001, register: .eax, bit: 5)),
    ])
    func locations(name: String, location: CPUIDBit) {
        #expect(CPUFeature.named(name)?.location == location)
    }

    @Test("Spellings: case, '-', '.', QEMU's and compilers' names, missing underscores")
    func spellings() {
        #expect(CPUFeature.named("SSE4.2")?.name == "sse4_2")
        #expect(CPUFeature.named("lahf-lm")?.name == "lahf_lm")
        #expect(CPUFeature.named("sse3")?.name == "pni")
        #expect(CPUFeature.named("lzcnt")?.name == "abm")
        #expect(CPUFeature.named("tsc-deadline")?.name == "tsc_deadline_timer")
        #expect(CPUFeature.named("sse42")?.name == "sse4_2")
        #expect(CPUFeature.named("avx512vnni")?.name == "avx512_vnni")
        #expect(CPUFeature.named("avx3") == nil)
    }

    @Test("An unknown name gets the nearest known names")
    func suggestions() {
        #expect(CPUFeature.suggestions(for: "avx3").contains("avx"))
        #expect(CPUFeature.suggestions(for: "avx3").contains("avx2"))
        #expect(CPUFeature.suggestions(for: "sse4_3").starts(with: ["sse4_1", "sse4_2"]))
        #expect(CPUFeature.suggestions(for: "smapp").first == "smap")
        #expect(CPUFeature.suggestions(for: "qqqqqqqqqqqqqq").isEmpty)
    }

    @Test("Prerequisites name known features and form no cycle")
    func prerequisites() {
        for (name, needs) in CPUFeature.prerequisites {
            #expect(CPUFeature.named(name)?.name == name)
            for need in needs { #expect(CPUFeature.named(need)?.name == need) }
            #expect(!CPUFeature.known(name).allPrerequisites.contains(CPUFeature.known(name)))
        }
        for name in CPUFeature.longModeRequirements { #expect(CPUFeature.named(name)?.name == name) }
        for component in XSAVEComponent.all { #expect(CPUFeature.named(component.feature)?.name == component.feature) }
        #expect(Set(CPUFeature.known("xsave").allDependents.map(\.name)).isSuperset(of: ["avx", "avx2", "fma", "f16c", "avx512f", "avx512vl", "xsaveopt", "pku"]))
        #expect(CPUFeature.known("avx512_vnni").allPrerequisites.map(\.name).sorted() == ["avx", "avx512f", "avx512vl", "xsave"])
    }

    @Test("The standard XSAVE layout: components do not overlap and follow the SDM's offsets")
    func xsaveLayout() {
        let sorted = XSAVEComponent.all.sorted { $0.offset < $1.offset }
        var end = XSAVEComponent.legacyAndHeaderSize
        for component in sorted {
            #expect(component.offset >= end, "\(component.name) overlaps the component before it")
            end = component.offset + component.size
        }
        #expect(XSAVEComponent.names(in: 0xE7) == ["x87", "SSE", "AVX", "AVX-512 opmask", "AVX-512 ZMM_Hi256", "AVX-512 Hi16_ZMM"])
    }

    @Test("Leaf words: vendor and brand strings round-trip")
    func words() {
        let vendor = CPUIDTable.words("GenuineIntel", count: 3)
        #expect(vendor == [0x756E_6547, 0x4965_6E69, 0x6C65_746E])
        var table = CPUIDTable([CPUIDEntry(function: 0, ebx: vendor[0], ecx: vendor[2], edx: vendor[1])])
        #expect(table.vendor == "GenuineIntel")
        let brand = CPUIDTable.words("  Swiftlet test CPU", count: 12)
        for (offset, leaf) in (UInt32(0x8000_0002)...0x8000_0004).enumerated() {
            table.update(leaf) {
                $0.eax = brand[offset * 4]; $0.ebx = brand[offset * 4 + 1]; $0.ecx = brand[offset * 4 + 2]; $0.edx = brand[offset * 4 + 3]
            }
        }
        #expect(table.brand == "Swiftlet test CPU")
    }

    @Test("Family, model and stepping encode and decode as the SDM describes", arguments: [
        (UInt32(15), UInt32(6), UInt32(1), UInt32(0x0000_0F61)),
        (6, 26, 3, 0x0001_06A3),
        (6, 60, 1, 0x0003_06C1),
        (6, 85, 4, 0x0005_0654),
        (0x19, 0x11, 1, 0x00A1_0F11), // AMD Zen 4: family 0xF + 0xA
    ])
    func signature(family: UInt32, model: UInt32, stepping: UInt32, eax: UInt32) {
        #expect(CPUBaseline.encodeSignature((family, model, stepping)) == eax)
        let table = CPUIDTable([CPUIDEntry(function: 1, eax: eax)])
        #expect(table.signature.family == family)
        #expect(table.signature.model == model)
        #expect(table.signature.stepping == stepping)
    }
}
