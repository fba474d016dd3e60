import KVM

/// A CPU model resolved against this host's KVM: the leaves every vCPU starts from
/// (before ``CPUModel`` adds APIC IDs and topology), and what KVM cannot provide.
///
/// Resolving takes the model's leaves (KVM's supported list for `host`, the fixed leaves of
/// a ``CPUBaseline`` otherwise), applies the edits in order, keeps dependent state
/// consistent, then checks the result against `KVM_GET_SUPPORTED_CPUID`:
/// - `-feature` also removes every feature that needs it (`-xsave` removes the AVX family);
///   `+feature` whose prerequisites are missing is refused, and so is removing what
///   x86-64 requires while `lm` is on (see ``CPUFeature/longModeRequirements``);
/// - leaf 0xD follows the flags: XCR0's allowed mask holds the components of the features
///   present, and the XSAVE area sizes shrink or grow with it; 0x80000008 reports 57-bit
///   linear addresses exactly when `la57` is on;
/// - every feature must be in KVM's supported leaves, the guest-physical address width
///   must not exceed the host's, and each XSAVE component must have the host's size and
///   offset (XSAVE runs natively: the layout is the hardware's).
///
/// Resolving throws for a wrong edit; what the host lacks is recorded (``unsupported``,
/// ``problems``) so that `swiftlet cpu --show` can display it, and ``requireSupported()``
/// turns it into an error before a VM is built.
public struct CPUDefinition: Sendable {
    public let spec: CPUModelSpec
    public let table: CPUIDTable
    /// Features the model has that this KVM does not offer.
    public let unsupported: [CPUFeature]
    /// Other reasons this host cannot provide the model, one sentence each.
    public let problems: [String]
    /// Features removed because an edit removed something they need.
    public let removedWithPrerequisites: [CPUFeature]
    /// What this host's KVM supports, as resolved against.
    public let supported: CPUIDTable

    public var isSupported: Bool { unsupported.isEmpty && problems.isEmpty }

    /// Whether the model has x86-64 long mode (`lm`), which a 64-bit entry needs.
    public var hasLongMode: Bool { table.has(CPUFeature.known("lm").location) }

    /// The features present, in CPUID order.
    public var features: [CPUFeature] { CPUFeature.all.filter { table.has($0.location) } }

    public static func resolve(_ spec: CPUModelSpec, supported: [CPUIDEntry]) throws(CPUModelError) -> CPUDefinition {
        let supportedTable = CPUIDTable(supported)
        var table: CPUIDTable
        switch spec.base {
        case .host: table = supportedTable
        case let .baseline(baseline): table = baseline.table()
        }
        let xsaveRelated = Set(["xsave", "xsaves"] + XSAVEComponent.all.map(\.feature)).map(CPUFeature.known)
        let before = Set(xsaveRelated.filter { table.has($0.location) })
        let la57 = CPUFeature.known("la57")
        let hadLA57 = table.has(la57.location)

        var added: [CPUFeature] = []
        var cascaded: [CPUFeature] = []
        for edit in spec.edits {
            if edit.enable {
                table.set(edit.feature.location, true)
                added.append(edit.feature)
                cascaded.removeAll { $0 == edit.feature }
            } else {
                table.set(edit.feature.location, false)
                added.removeAll { $0 == edit.feature }
                for dependent in edit.feature.allDependents where table.has(dependent.location) {
                    table.set(dependent.location, false)
                    added.removeAll { $0 == dependent }
                    if !cascaded.contains(dependent) { cascaded.append(dependent) }
                }
            }
        }
        for feature in added {
            let missing = feature.allPrerequisites.filter { !table.has($0.location) }
            if !missing.isEmpty {
                throw .missingPrerequisites(feature: feature.name, missing: missing.map(\.name).sorted())
            }
        }
        if table.has(CPUFeature.known("lm").location) {
            let missing = CPUFeature.longModeRequirements.filter { !table.has(CPUFeature.known($0).location) }
            if !missing.isEmpty { throw .requiredByLongMode(missing: missing) }
        }

        // Dependent state: only where the edits changed something, so `host` stays exactly
        // what KVM reported unless asked otherwise.
        if Set(xsaveRelated.filter { table.has($0.location) }) != before {
            XSAVELayout.apply(to: &table)
        }
        if table.has(la57.location) != hadLA57, table.entry(0x8000_0008) != nil {
            let bits: UInt32 = table.has(la57.location) ? 57 : 48
            table.update(0x8000_0008) { $0.eax = ($0.eax & ~0xFF00) | bits << 8 }
        }

        let unsupported = CPUFeature.all.filter { !$0.isManaged && table.has($0.location) && !supportedTable.has($0.location) }
        let problems = Self.layoutProblems(table, supported: supportedTable)
        return CPUDefinition(spec: spec, table: table, unsupported: unsupported, problems: problems,
                             removedWithPrerequisites: cascaded.sorted { $0.name < $1.name }, supported: supportedTable)
    }

    /// Address width and XSAVE layout: what must match the host beyond feature flags.
    static func layoutProblems(_ table: CPUIDTable, supported: CPUIDTable) -> [String] {
        var problems: [String] = []
        if table.physicalAddressBits > supported.physicalAddressBits {
            problems.append("it has \(table.physicalAddressBits)-bit physical addresses, this host \(supported.physicalAddressBits)")
        }
        let mask = table.xsaveMask
        let supportedMask = supported.xsaveMask
        for component in XSAVEComponent.all where mask & (1 << UInt64(component.index)) != 0 {
            guard supportedMask & (1 << UInt64(component.index)) != 0, let host = supported.entry(0xD, component.index) else {
                problems.append("this KVM does not offer XSAVE component \(component.index) (\(component.name))")
                continue
            }
            let mine = table.entry(0xD, component.index)
            if host.eax != mine?.eax || host.ebx != mine?.ebx || host.ecx & 0b11 != (mine?.ecx ?? 0) & 0b11 {
                problems.append("XSAVE component \(component.index) (\(component.name)) is \(host.eax) bytes at offset "
                    + "\(host.ebx) on this host, \(mine?.eax ?? 0) bytes at \(mine?.ebx ?? 0) in the model")
            }
        }
        return problems
    }

    /// Throws ``CPUModelError/unsupported(model:features:problems:)`` unless this host can
    /// provide the model.
    public func requireSupported() throws(CPUModelError) {
        guard isSupported else {
            throw .unsupported(model: spec.description, features: unsupported.map(\.name), problems: problems)
        }
    }
}
