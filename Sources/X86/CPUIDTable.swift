import KVM

/// One of the four registers a CPUID leaf returns.
public enum CPUIDRegister: String, Sendable, CaseIterable {
    case eax, ebx, ecx, edx
}

/// Where a feature flag lives: leaf (EAX input), sub-leaf (ECX input), register and bit.
public struct CPUIDBit: Hashable, Sendable, CustomStringConvertible {
    public let leaf: UInt32
    public let subleaf: UInt32
    public let register: CPUIDRegister
    public let bit: UInt32

    public init(leaf: UInt32, subleaf: UInt32 = 0, register: CPUIDRegister, bit: UInt32) {
        self.leaf = leaf
        self.subleaf = subleaf
        self.register = register
        self.bit = bit
    }

    public var mask: UInt32 { 1 << bit }

    /// `0x7.0 EBX[5]`, the way the SDM names a bit.
    public var description: String {
        "0x\(String(leaf, radix: 16)).\(subleaf) \(register.rawValue.uppercased())[\(bit)]"
    }
}

/// A list of CPUID leaves with lookup and editing by leaf, sub-leaf and bit: the form in
/// which a CPU model is built, edited and checked before it goes to `KVM_SET_CPUID2`.
///
/// Lookup follows the CPU: an entry whose flags lack `KVM_CPUID_FLAG_SIGNIFCANT_INDEX`
/// answers every sub-leaf of its leaf. Creating a leaf raises the maximum leaf of its
/// range (leaf 0, 0x40000000 or 0x80000000; leaf 7's sub-leaf count in 7.0 EAX) so the
/// guest can reach it.
public struct CPUIDTable: Sendable, Equatable {
    /// `KVM_CPUID_FLAG_SIGNIFCANT_INDEX` (sic, as <linux/kvm.h> spells it).
    public static let significantIndex: UInt32 = 1
    /// Leaves whose sub-leaf (ECX) selects what is returned.
    static let indexedLeaves: Set<UInt32> = [0x4, 0x7, 0xB, 0xD, 0xF, 0x10, 0x12, 0x14, 0x17, 0x18, 0x1D, 0x1E, 0x1F,
                                             0x20, 0x23, 0x24, 0x8000_001D, 0x8000_0020, 0x8000_0026]

    public private(set) var entries: [CPUIDEntry]

    public init(_ entries: [CPUIDEntry]) { self.entries = entries }

    private func position(_ leaf: UInt32, _ subleaf: UInt32) -> Int? {
        entries.firstIndex { $0.function == leaf && ($0.index == subleaf || $0.flags & Self.significantIndex == 0) }
    }

    /// The entry the CPU returns for `leaf`/`subleaf`, if the table has one.
    public func entry(_ leaf: UInt32, _ subleaf: UInt32 = 0) -> CPUIDEntry? {
        position(leaf, subleaf).map { entries[$0] }
    }

    /// A register of a leaf; 0 when the leaf is absent (what KVM returns for it).
    public func value(_ leaf: UInt32, _ subleaf: UInt32 = 0, _ register: CPUIDRegister) -> UInt32 {
        entry(leaf, subleaf).map { Self.read(register, of: $0) } ?? 0
    }

    public func has(_ bit: CPUIDBit) -> Bool {
        value(bit.leaf, bit.subleaf, bit.register) & bit.mask != 0
    }

    /// Sets or clears one bit. Setting a bit of an absent leaf creates the leaf; clearing
    /// one leaves the table alone.
    public mutating func set(_ bit: CPUIDBit, _ on: Bool) {
        if on {
            update(bit.leaf, bit.subleaf) { Self.write(bit.register, of: &$0, Self.read(bit.register, of: $0) | bit.mask) }
        } else if let index = position(bit.leaf, bit.subleaf) {
            Self.write(bit.register, of: &entries[index], Self.read(bit.register, of: entries[index]) & ~bit.mask)
        }
    }

    /// Changes a leaf in place, creating it (all zero) first when absent.
    public mutating func update(_ leaf: UInt32, _ subleaf: UInt32 = 0, _ body: (inout CPUIDEntry) -> Void) {
        if let index = position(leaf, subleaf) {
            body(&entries[index])
            return
        }
        var entry = CPUIDEntry(function: leaf, index: subleaf,
                               flags: Self.indexedLeaves.contains(leaf) ? Self.significantIndex : 0)
        body(&entry)
        entries.append(entry)
        reachLeaf(leaf, subleaf)
    }

    /// Drops one sub-leaf (or a leaf that has no sub-leaves).
    public mutating func remove(_ leaf: UInt32, _ subleaf: UInt32 = 0) {
        entries.removeAll { $0.function == leaf && ($0.index == subleaf || $0.flags & Self.significantIndex == 0) }
    }

    /// Raises the maximum leaf of `leaf`'s range (and leaf 7's sub-leaf count) to reach it.
    private mutating func reachLeaf(_ leaf: UInt32, _ subleaf: UInt32) {
        let base: UInt32 = leaf >= 0x8000_0000 ? 0x8000_0000 : (leaf >= 0x4000_0000 ? 0x4000_0000 : 0)
        if leaf != base, let index = position(base, 0), entries[index].eax < leaf { entries[index].eax = leaf }
        if leaf == 7, subleaf > 0, let index = position(7, 0), entries[index].eax < subleaf { entries[index].eax = subleaf }
    }

    public static func read(_ register: CPUIDRegister, of entry: CPUIDEntry) -> UInt32 {
        switch register {
        case .eax: return entry.eax
        case .ebx: return entry.ebx
        case .ecx: return entry.ecx
        case .edx: return entry.edx
        }
    }

    public static func write(_ register: CPUIDRegister, of entry: inout CPUIDEntry, _ value: UInt32) {
        switch register {
        case .eax: entry.eax = value
        case .ebx: entry.ebx = value
        case .ecx: entry.ecx = value
        case .edx: entry.edx = value
        }
    }
}

// MARK: What the leaves say about the CPU as a whole

extension CPUIDTable {
    /// The vendor string of leaf 0 (EBX, EDX, ECX): "GenuineIntel", "AuthenticAMD".
    public var vendor: String {
        Self.text([value(0, 0, .ebx), value(0, 0, .edx), value(0, 0, .ecx)])
    }

    /// The brand string of leaves 0x80000002-0x80000004, without padding.
    public var brand: String {
        var words: [UInt32] = []
        for leaf: UInt32 in 0x8000_0002...0x8000_0004 {
            words += CPUIDRegister.allCases.map { value(leaf, 0, $0) }
        }
        return Self.text(words).trimmingSpaces()
    }

    /// Family, model and stepping as software reads them from leaf 1 EAX (the extended
    /// family counts only for family 0xF; the extended model for families 6 and 0xF).
    public var signature: (family: UInt32, model: UInt32, stepping: UInt32) {
        let eax = value(1, 0, .eax)
        let baseFamily = (eax >> 8) & 0xF
        let family = baseFamily == 0xF ? baseFamily + ((eax >> 20) & 0xFF) : baseFamily
        let model = (baseFamily == 6 || baseFamily == 0xF) ? ((eax >> 4) & 0xF) | (((eax >> 16) & 0xF) << 4) : (eax >> 4) & 0xF
        return (family, model, eax & 0xF)
    }

    public var maximumBasicLeaf: UInt32 { value(0, 0, .eax) }
    public var maximumExtendedLeaf: UInt32 { value(0x8000_0000, 0, .eax) }

    /// Guest-physical address width (0x80000008 EAX[7:0]); 36 when the leaf is absent, as
    /// the SDM and KVM assume.
    public var physicalAddressBits: UInt32 {
        entry(0x8000_0008).map { $0.eax & 0xFF } ?? 36
    }

    /// Linear address width (0x80000008 EAX[15:8]): 48, or 57 with 5-level paging.
    public var linearAddressBits: UInt32 {
        entry(0x8000_0008).map { ($0.eax >> 8) & 0xFF } ?? 48
    }

    /// The XSAVE components the guest may enable in XCR0 (0xD.0 EDX:EAX).
    public var xsaveMask: UInt64 {
        UInt64(value(0xD, 0, .eax)) | UInt64(value(0xD, 0, .edx)) << 32
    }

    /// Packs ASCII text into CPUID words (little-endian, NUL-padded to `words` words).
    public static func words(_ text: String, count: Int) -> [UInt32] {
        var bytes = Array(text.utf8.prefix(count * 4))
        bytes += [UInt8](repeating: 0, count: count * 4 - bytes.count)
        return (0..<count).map { word in
            (0..<4).reduce(UInt32(0)) { $0 | UInt32(bytes[word * 4 + $1]) << (8 * $1) }
        }
    }

    static func text(_ words: [UInt32]) -> String {
        var bytes: [UInt8] = []
        for word in words {
            for shift in stride(from: 0, to: 32, by: 8) { bytes.append(UInt8(truncatingIfNeeded: word >> UInt32(shift))) }
        }
        if let end = bytes.firstIndex(of: 0) { bytes.removeSubrange(end...) }
        return String(decoding: bytes, as: UTF8.self)
    }
}

extension String {
    func trimmingSpaces() -> String {
        var text = Substring(self)
        while text.first == " " { text = text.dropFirst() }
        while text.last == " " { text = text.dropLast() }
        return String(text)
    }
}
