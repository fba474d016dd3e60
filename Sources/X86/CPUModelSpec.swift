/// What `--cpu` asks for: a model and the feature edits applied after it, in order.
///
/// Syntax, as QEMU's `-cpu`: `MODEL[,+feature|-feature|feature=on|feature=off]...`, for
/// example `x86-64-v3,-avx2,+pcid`. Model names are `host` and the ``CPUBaseline`` names;
/// feature names are those of ``CPUFeature`` (case, `-` and `.` do not matter:
/// `sse4.2` is `sse4_2`). Parsing checks the names only; whether this host's KVM can
/// provide the result is ``CPUDefinition``'s job.
public struct CPUModelSpec: Sendable, Equatable, CustomStringConvertible {
    public enum Base: Sendable, Equatable {
        /// What this host's KVM offers (`KVM_GET_SUPPORTED_CPUID`).
        case host
        case baseline(CPUBaseline)

        public var name: String {
            switch self {
            case .host: return "host"
            case let .baseline(baseline): return baseline.name
            }
        }
    }

    public struct Edit: Sendable, Equatable, CustomStringConvertible {
        public let feature: CPUFeature
        public let enable: Bool

        public init(_ feature: CPUFeature, enable: Bool) {
            self.feature = feature
            self.enable = enable
        }

        public var description: String { (enable ? "+" : "-") + feature.name }
    }

    public var base: Base
    public var edits: [Edit]

    public static let host = CPUModelSpec(base: .host, edits: [])

    public init(base: Base, edits: [Edit] = []) {
        self.base = base
        self.edits = edits
    }

    /// Every model name, `host` first.
    public static var modelNames: [String] { ["host"] + CPUBaseline.allCases.map(\.name) }

    public init(parsing text: String) throws(CPUModelError) {
        let items = text.split(separator: ",", omittingEmptySubsequences: false).map { String($0).trimmingSpaces() }
        guard let modelName = items.first, !modelName.isEmpty else { throw .syntax(text, "it names no model") }
        if modelName.lowercased() == "host" {
            base = .host
        } else if let baseline = CPUBaseline.allCases.first(where: { $0.name == modelName.lowercased() }) {
            base = .baseline(baseline)
        } else {
            throw .unknownModel(modelName)
        }
        edits = []
        for item in items.dropFirst() {
            let (name, enable) = try Self.parseEdit(item, in: text)
            guard let feature = CPUFeature.named(name) else {
                throw .unknownFeature(name, suggestions: CPUFeature.suggestions(for: name))
            }
            guard !feature.isManaged else { throw .managedFeature(feature.name) }
            edits.append(Edit(feature, enable: enable))
        }
    }

    private static func parseEdit(_ item: String, in text: String) throws(CPUModelError) -> (String, Bool) {
        if item.hasPrefix("+") || item.hasPrefix("-") {
            let name = String(item.dropFirst())
            guard !name.isEmpty else { throw .syntax(text, "'\(item)' names no feature") }
            return (name, item.hasPrefix("+"))
        }
        if let equals = item.firstIndex(of: "=") {
            let name = String(item[..<equals])
            switch item[item.index(after: equals)...].lowercased() {
            case "on": return (name, true)
            case "off": return (name, false)
            default: break
            }
        }
        throw .syntax(text, "'\(item)' is not +feature, -feature, feature=on or feature=off")
    }

    /// The canonical text: the model, then the edits by their table names.
    public var description: String {
        ([base.name] + edits.map(\.description)).joined(separator: ",")
    }
}

/// Why a `--cpu` value cannot be used. Each prints as one line for a user.
public enum CPUModelError: Error, Equatable, CustomStringConvertible {
    case syntax(String, String)
    case unknownModel(String)
    case unknownFeature(String, suggestions: [String])
    case managedFeature(String)
    /// `+feature` whose prerequisites the model lacks.
    case missingPrerequisites(feature: String, missing: [String])
    /// The edits would remove what x86-64 requires while `lm` stays on.
    case requiredByLongMode(missing: [String])
    /// This KVM cannot provide the model: features it does not offer, and other problems
    /// (address width, XSAVE layout).
    case unsupported(model: String, features: [String], problems: [String])

    public var description: String {
        switch self {
        case let .syntax(text, reason):
            return "invalid CPU model '\(text)': \(reason); the form is MODEL[,+feature,-feature...]"
        case let .unknownModel(name):
            return "unknown CPU model '\(name)' (models: \(CPUModelSpec.modelNames.joined(separator: ", ")))"
        case let .unknownFeature(name, suggestions):
            let hint = suggestions.isEmpty ? "" : "did you mean \(suggestions.joined(separator: ", "))? "
            return "unknown CPU feature '\(name)' (\(hint)'swiftlet cpu' lists the feature names)"
        case let .managedFeature(name):
            return "CPU feature '\(name)' is set by Swiftlet itself and cannot be edited"
        case let .missingPrerequisites(feature, missing):
            return "+\(feature) needs \(missing.joined(separator: ", ")), which the model lacks: add "
                + missing.map { "+" + $0 }.joined(separator: ",")
        case let .requiredByLongMode(missing):
            return "x86-64 (lm) requires \(missing.joined(separator: ", ")): keep \(missing.count == 1 ? "it" : "them"), "
                + "or add -lm for a CPU without 64-bit mode"
        case let .unsupported(model, features, problems):
            var parts: [String] = []
            if !features.isEmpty { parts.append("features this KVM does not offer: \(features.joined(separator: " "))") }
            parts += problems
            return "CPU model \(model) cannot run on this host: \(parts.joined(separator: "; "))"
                + " (see 'swiftlet cpu --show \(model)')"
        }
    }
}
