import Basics
import KVM
import Machine
import X86

/// One CPUID leaf and what it returns.
public struct CPUIDLeaf: Sendable, Equatable, CustomStringConvertible {
    public let function: UInt32
    public let index: UInt32
    /// 1 (`KVM_CPUID_FLAG_SIGNIFCANT_INDEX`) when `index` selects the sub-leaf.
    public let flags: UInt32
    public let eax: UInt32
    public let ebx: UInt32
    public let ecx: UInt32
    public let edx: UInt32

    public init(function: UInt32, index: UInt32 = 0, flags: UInt32 = 0, eax: UInt32 = 0, ebx: UInt32 = 0, ecx: UInt32 = 0, edx: UInt32 = 0) {
        self.function = function
        self.index = index
        self.flags = flags
        self.eax = eax
        self.ebx = ebx
        self.ecx = ecx
        self.edx = edx
    }

    init(_ entry: CPUIDEntry) {
        self.init(function: entry.function, index: entry.index, flags: entry.flags, eax: entry.eax, ebx: entry.ebx, ecx: entry.ecx, edx: entry.edx)
    }

    /// `0x00000001.0  eax=000c06f2 ebx=00020800 ecx=81202000 edx=0f8bfbff`.
    public var description: String {
        "0x\(hex(function)).\(String(index, radix: 16))  " + registers
    }

    /// `eax=000c06f2 ebx=00020800 ecx=81202000 edx=0f8bfbff`.
    public var registers: String {
        "eax=\(hex(eax)) ebx=\(hex(ebx)) ecx=\(hex(ecx)) edx=\(hex(edx))"
    }

    private func hex(_ value: UInt32) -> String { Hex.digits(value, width: 8) }
}

/// A CPU model as this host would give it to one vCPU: see ``CPUModels/describe(_:cpus:vcpu:kvmDevice:)``.
public struct CPUModelReport: Sendable {
    /// The model and its edits, canonical (`x86-64-v3,-avx2`).
    public let model: String
    public let vendor: String
    public let family: Int
    public let modelNumber: Int
    public let stepping: Int
    public let brand: String
    public let maximumBasicLeaf: UInt32
    public let maximumExtendedLeaf: UInt32
    public let physicalAddressBits: Int
    public let linearAddressBits: Int
    /// The XSAVE state components the guest may enable ("x87", "SSE", "AVX", ...).
    public let xsaveComponents: [String]
    /// Feature names present, in CPUID order.
    public let features: [String]
    /// Features an edit removed because something they need was removed.
    public let removedWithPrerequisites: [String]
    /// Features the model has that this KVM does not offer.
    public let unsupportedFeatures: [String]
    /// Other reasons this host cannot provide the model (address width, XSAVE layout).
    public let problems: [String]
    /// Features this KVM offers that the model does not have.
    public let hostFeaturesNotInModel: [String]
    /// The leaves Swiftlet sets on the vCPU with `KVM_SET_CPUID2`.
    public let leaves: [CPUIDLeaf]
    /// The leaves read back from the vCPU with `KVM_GET_CPUID2`; `nil` when the host cannot
    /// provide the model (nothing was set).
    public let readBack: [CPUIDLeaf]?

    public var isSupported: Bool { unsupportedFeatures.isEmpty && problems.isEmpty }

    /// The one-line reason the model cannot run here, or `nil`.
    public let failure: String?
}

/// The CPU models and feature names `VMConfiguration.cpu` accepts, and a way to see what a
/// model gives a vCPU on this host without booting a guest.
public enum CPUModels {
    public struct Model: Sendable {
        public let name: String
        public let summary: String
    }

    public static let models: [Model] = [Model(name: "host", summary: "everything this host's KVM offers; not portable between hosts")]
        + CPUBaseline.allCases.map { Model(name: $0.name, summary: $0.summary) }

    /// The feature names, grouped by where they live ("leaf 0x1 ECX").
    public static let featureGroups: [(location: String, names: [String])] = {
        var groups: [(location: String, names: [String])] = []
        for feature in CPUFeature.all where !feature.isManaged {
            let location = feature.location
            let title = "leaf 0x\(String(location.leaf, radix: 16))"
                + (location.leaf == 7 || location.leaf == 0xD ? ".\(location.subleaf)" : "")
                + " \(location.register.rawValue.uppercased())"
            if groups.last?.location == title {
                groups[groups.count - 1].names.append(feature.name)
            } else {
                groups.append((title, [feature.name]))
            }
        }
        return groups
    }()

    /// Checks the syntax and the names of a model specification, without /dev/kvm.
    public static func validate(_ specification: String) throws(SwiftletError) {
        do { _ = try CPUModelSpec(parsing: specification) } catch { throw SwiftletError(message: error.description) }
    }

    /// What `specification` gives vCPU `vcpu` of a machine with `cpus` vCPUs on this host:
    /// the model is checked against `KVM_GET_SUPPORTED_CPUID`, and when this KVM can
    /// provide it, set on a real vCPU (`KVM_SET_CPUID2`) and read back (`KVM_GET_CPUID2`).
    /// Throws for a wrong specification or when `/dev/kvm` cannot be used; a model this
    /// host cannot run is described, with ``CPUModelReport/failure`` saying why.
    public static func describe(_ specification: String, cpus: Int = 1, vcpu: Int = 0,
                                kvmDevice: String = "/dev/kvm") throws(SwiftletError) -> CPUModelReport {
        let inspection: CPUInspection
        do {
            let spec = try CPUModelSpec(parsing: specification)
            inspection = try CPUInspection.inspect(spec, cpuCount: cpus, vcpuID: vcpu, kvmPath: kvmDevice)
        } catch let error as CPUModelError {
            throw SwiftletError(message: error.description)
        } catch let error as MachineError {
            throw SwiftletError(message: error.description)
        } catch {
            throw SwiftletError(message: "\(error)")
        }
        let definition = inspection.definition
        let table = definition.table
        let signature = table.signature
        var failure: String?
        do { try definition.requireSupported() } catch { failure = error.description }
        let present = Set(definition.features)
        return CPUModelReport(
            model: definition.spec.description, vendor: table.vendor, family: Int(signature.family),
            modelNumber: Int(signature.model), stepping: Int(signature.stepping), brand: table.brand,
            maximumBasicLeaf: table.maximumBasicLeaf, maximumExtendedLeaf: table.maximumExtendedLeaf,
            physicalAddressBits: Int(table.physicalAddressBits), linearAddressBits: Int(table.linearAddressBits),
            xsaveComponents: present.contains { $0.name == "xsave" } ? XSAVEComponent.names(in: table.xsaveMask) : [],
            features: definition.features.map(\.name),
            removedWithPrerequisites: definition.removedWithPrerequisites.map(\.name),
            unsupportedFeatures: definition.unsupported.map(\.name), problems: definition.problems,
            hostFeaturesNotInModel: CPUFeature.all.filter {
                !$0.isManaged && definition.supported.has($0.location) && !present.contains($0)
            }.map(\.name),
            leaves: inspection.programmed.map(CPUIDLeaf.init), readBack: inspection.readBack?.map(CPUIDLeaf.init),
            failure: failure)
    }

    /// `KVM_GET_SUPPORTED_CPUID` of this host, one leaf per entry: what `host` starts from.
    public static func supportedLeaves(kvmDevice: String = "/dev/kvm") throws(SwiftletError) -> [CPUIDLeaf] {
        do {
            return try CPUInspection.supportedCPUID(kvmPath: kvmDevice).map(CPUIDLeaf.init)
        } catch {
            throw SwiftletError(message: error.description)
        }
    }
}
