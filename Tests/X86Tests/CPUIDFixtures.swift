import Foundation
import KVM
@testable import X86

/// CPUID tables captured on real hosts (see Fixtures/README.md), read back into entries.
enum CPUIDFixtures {
    static let directory = URL(fileURLWithPath: #filePath).deletingLastPathComponent().appendingPathComponent("Fixtures")

    /// KVM_GET_SUPPORTED_CPUID of the build machines' nested KVM: only x86-64-v1 fits.
    static var nestedKVM: [CPUIDEntry] { get throws { try load("nested-kvm-supported") } }
    /// A Sapphire Rapids-class CPU's own CPUID: a stand-in for a hardware KVM with AVX-512.
    static var sapphireRapids: [CPUIDEntry] { get throws { try load("sapphire-rapids-native-cpuid") } }

    struct FormatError: Error, CustomStringConvertible {
        let description: String
    }

    static func load(_ name: String) throws -> [CPUIDEntry] {
        let text = try String(contentsOf: directory.appendingPathComponent(name + ".txt"), encoding: .utf8)
        return try parse(text)
    }

    /// One leaf a line: function, sub-leaf, flags, EAX, EBX, ECX, EDX in hex; `#` comments.
    static func parse(_ text: String) throws -> [CPUIDEntry] {
        try text.split(separator: "\n").filter { !$0.hasPrefix("#") && !$0.allSatisfy(\.isWhitespace) }.map { line in
            let fields = line.split(separator: " ").compactMap { UInt32($0, radix: 16) }
            guard fields.count == 7 else { throw FormatError(description: "bad fixture line: \(line)") }
            return CPUIDEntry(function: fields[0], index: fields[1], flags: fields[2],
                              eax: fields[3], ebx: fields[4], ecx: fields[5], edx: fields[6])
        }
    }
}

extension CPUIDTable {
    func has(_ name: String) -> Bool { has(CPUFeature.known(name).location) }
}

extension CPUDefinition {
    var featureNames: Set<String> { Set(features.map(\.name)) }
}

/// A copy of `entries` with one leaf changed (to make a host that differs in one detail).
func modified(_ entries: [CPUIDEntry], leaf: UInt32, subleaf: UInt32 = 0, _ change: (inout CPUIDEntry) -> Void) -> [CPUIDEntry] {
    var table = CPUIDTable(entries)
    table.update(leaf, subleaf, change)
    return table.entries
}
