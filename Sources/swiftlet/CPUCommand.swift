import ArgumentParser
import Basics
import SwiftletKit

/// `swiftlet cpu`: lists the CPU models and feature names, and shows what a model gives a
/// vCPU on this host (a thin layer over ``CPUModels``).
struct CPUCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "cpu",
        abstract: "List the CPU models and feature names, or show what a model gives a vCPU here.",
        discussion: """
            With no option, lists the models 'swiftlet run --cpu' accepts and the feature \
            names edits may use (Linux /proc/cpuinfo names).

            --show MODEL[,+feature,-feature...] resolves the model against this host's KVM \
            (KVM_GET_SUPPORTED_CPUID), then sets it on a real vCPU (KVM_SET_CPUID2) and reads \
            it back (KVM_GET_CPUID2): the vendor, family/model/stepping, features, XSAVE \
            components and every leaf, with what this KVM lacks marked. Exits with status 2 \
            when this host cannot provide the model.

            --supported prints KVM_GET_SUPPORTED_CPUID, one leaf a line (function, sub-leaf, \
            flags, EAX, EBX, ECX, EDX in hex): what 'host' starts from. See docs/booting.md, \
            "The CPU model".
            """
    )

    @Option(name: .long, help: ArgumentHelp("Show what this model gives a vCPU on this host.", valueName: "model"))
    var show: String?

    @Flag(name: .long, help: "Print this host's KVM_GET_SUPPORTED_CPUID.")
    var supported = false

    @Option(name: .long, help: ArgumentHelp("With --show: the machine's vCPU count (it shapes the topology leaves).", valueName: "n"))
    var cpus: Int = 1

    @Option(name: .long, help: ArgumentHelp("With --show: the vCPU to show (its APIC ID).", valueName: "id"))
    var vcpu: Int = 0

    @Option(name: .customLong("kvm-device"), help: ArgumentHelp("The KVM device to open.", valueName: "path"))
    var kvmDevice: String = "/dev/kvm"

    func validate() throws {
        if show != nil && supported { throw ValidationError("--show and --supported cannot be used together") }
        if show == nil && (cpus != 1 || vcpu != 0) { throw ValidationError("--cpus and --vcpu apply only to --show") }
    }

    func run() throws {
        if supported {
            let leaves: [CPUIDLeaf]
            do { leaves = try CPUModels.supportedLeaves(kvmDevice: kvmDevice) } catch { throw SwiftletCommand.fail(error.message) }
            for leaf in leaves {
                print([leaf.function, leaf.index, leaf.flags, leaf.eax, leaf.ebx, leaf.ecx, leaf.edx]
                    .map { Self.hex($0, width: 8) }.joined(separator: " "))
            }
        } else if let show {
            let report: CPUModelReport
            do { report = try CPUModels.describe(show, cpus: cpus, vcpu: vcpu, kvmDevice: kvmDevice) } catch {
                throw SwiftletCommand.fail(error.message)
            }
            print(Self.format(report, vcpu: vcpu), terminator: "")
            if let failure = report.failure { throw SwiftletCommand.fail(failure) }
        } else {
            print(Self.catalog(), terminator: "")
        }
    }

    static func catalog() -> String {
        var text = "CPU models ('swiftlet run --cpu MODEL[,+feature,-feature...]'):\n"
        for model in CPUModels.models {
            text += "  " + model.name.padding(12) + model.summary + "\n"
        }
        text += "\nFeature names for +feature and -feature (as in /proc/cpuinfo):\n"
        for group in CPUModels.featureGroups {
            text += wrap(group.names, label: "  " + group.location.padding(20))
        }
        return text
    }

    static func format(_ report: CPUModelReport, vcpu: Int) -> String {
        var text = ""
        func line(_ label: String, _ value: String) { text += label.padding(13) + value + "\n" }
        line("model", report.model)
        line("vendor", report.vendor)
        line("signature", "family \(report.family), model \(report.modelNumber) (\(hex(UInt32(report.modelNumber)))), stepping \(report.stepping)")
        line("brand", report.brand.isEmpty ? "(none)" : report.brand)
        line("max leaves", "basic \(hex(report.maximumBasicLeaf)), extended \(hex(report.maximumExtendedLeaf))")
        line("addresses", "\(report.physicalAddressBits)-bit physical, \(report.linearAddressBits)-bit linear")
        line("XSAVE", report.xsaveComponents.isEmpty ? "none" : report.xsaveComponents.joined(separator: ", "))
        text += wrap(report.features, label: "features".padding(13))
        if !report.removedWithPrerequisites.isEmpty {
            text += wrap(report.removedWithPrerequisites, label: "also removed (they need a removed feature):")
        }
        if !report.hostFeaturesNotInModel.isEmpty {
            text += wrap(report.hostFeaturesNotInModel, label: "this KVM also offers (not in the model): ")
        }
        if report.isSupported {
            text += "this KVM offers everything the model has\n"
        } else {
            if !report.unsupportedFeatures.isEmpty {
                text += wrap(report.unsupportedFeatures, label: "NOT offered by this KVM: ")
            }
            for problem in report.problems { text += "NOT possible here: \(problem)\n" }
        }
        text += "\n"
        if let readBack = report.readBack {
            text += "vCPU \(vcpu), set with KVM_SET_CPUID2 and read back with KVM_GET_CPUID2"
                + " (* = KVM changed what Swiftlet set):\n"
            for leaf in readBack {
                let set = report.leaves.first { $0.function == leaf.function && $0.index == leaf.index }
                let changed = set.map { $0.eax != leaf.eax || $0.ebx != leaf.ebx || $0.ecx != leaf.ecx || $0.edx != leaf.edx } ?? true
                let name = leaf.description.prefix { $0 != " " }
                text += (changed ? "* " : "  ") + leaf.description + "\n"
                if changed, let set {
                    text += "  " + "(set)".padding(name.count + 1) + " " + set.registers + "\n"
                }
            }
        } else {
            text += "vCPU \(vcpu), what Swiftlet would set (nothing was set: this host cannot provide the model):\n"
            for leaf in report.leaves { text += "  " + leaf.description + "\n" }
        }
        return text
    }

    /// Names wrapped to 100 columns, the first line after `label`, the others aligned under it.
    static func wrap(_ names: [String], label: String) -> String {
        let indent = String(repeating: " ", count: min(label.count, 24))
        var lines: [String] = []
        var current = label
        for name in names {
            if current.count + name.count + 1 > 100 && current.count > indent.count {
                lines.append(current)
                current = indent
            }
            current += (current.last == " " ? "" : " ") + name
        }
        lines.append(current)
        return lines.joined(separator: "\n") + "\n"
    }

    /// `0x`-prefixed without a width, bare digits with one (as the table columns want).
    static func hex(_ value: UInt32, width: Int = 0) -> String {
        width > 0 ? Hex.digits(value, width: width) : Hex.prefixed(value)
    }
}

private extension String {
    func padding(_ width: Int) -> String {
        count >= width ? self + " " : self + String(repeating: " ", count: width - count)
    }
}
