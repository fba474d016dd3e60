import Foundation
import Testing

/// `--cpu` and `swiftlet cpu` through the real binary, on real /dev/kvm.
@Suite("CPU model from the command line", .serialized)
struct CPUModelCommandTests {
    @Test("swiftlet cpu lists the models and the feature names")
    func catalog() throws {
        let result = try Swiftlet.run(["cpu"])
        #expect(result.status == 0)
        for text in ["host ", "x86-64-v1", "x86-64-v2", "x86-64-v3", "x86-64-v4", "sse4_2", "avx512vl", "pdpe1gb",
                     "kvm_steal_time", "xsaveopt", "leaf 0x7.0 EBX"] {
            #expect(result.stdout.contains(text), "missing \(text)")
        }
        #expect(!result.stdout.contains("hypervisor"))
    }

    @Test("--show reads the model back from a vCPU: identity, features, leaves")
    func show() throws {
        let result = try Swiftlet.run(["cpu", "--show", "x86-64-v1,-nx", "--cpus", "2", "--vcpu", "1"])
        #expect(result.status == 0, "\(result.stderr)")
        #expect(result.stdout.contains("model        x86-64-v1,-nx\n"))
        #expect(result.stdout.contains("vendor       GenuineIntel\n"))
        #expect(result.stdout.contains("signature    family 15, model 6 (0x6), stepping 1\n"))
        #expect(result.stdout.contains("brand        Swiftlet x86-64-v1 CPU\n"))
        #expect(result.stdout.contains("addresses    36-bit physical, 48-bit linear\n"))
        #expect(result.stdout.contains("XSAVE        none\n"))
        #expect(result.stdout.contains("this KVM offers everything the model has"))
        #expect(result.stdout.contains("vCPU 1, set with KVM_SET_CPUID2 and read back with KVM_GET_CPUID2"))
        // Leaves that every KVM reports as set: vendor, signature, brand, 0x80000001 (-nx).
        #expect(result.stdout.contains("  0x00000000.0  eax=0000000d ebx=756e6547 ecx=6c65746e edx=49656e69\n"))
        #expect(result.stdout.contains("  0x80000001.0  eax=00000000 ebx=00000000 ecx=00000000 edx=20000800\n"))
        #expect(result.stdout.contains("  0x80000002.0  eax=66697753 ebx=74656c74 ecx=36387820 edx=2d34362d\n"))
        let leaf1 = try #require(result.stdout.split(separator: "\n").first { $0.contains("0x00000001.0") })
        #expect(leaf1.contains("eax=00000f61 ebx=01")) // APIC ID 1 in EBX[31:24]
    }

    @Test("A model this KVM cannot provide: --show and run agree, one line, status 2", arguments: [
        "x86-64-v1", "x86-64-v2", "x86-64-v3", "x86-64-v4", "host,+est,+smx",
    ])
    func verdicts(model: String) throws {
        let show = try Swiftlet.run(["cpu", "--show", model])
        let run = try Swiftlet.run(["run", "--cpu", model, "--flat", Swiftlet.guest("hello-real"), "--timeout", "30"])
        if show.status == 0 {
            #expect(run.status == 1, "\(run.stderr)")
        } else {
            #expect(show.status == 2)
            #expect(show.stdout.contains("NOT "))
            #expect(run.status == 2)
            #expect(run.stderr.hasPrefix("swiftlet: CPU model \(model) cannot run on this host: "))
            #expect(run.stderr.split(separator: "\n").count == 1)
            #expect(run.stderr == show.stderr)
            #expect(run.stdout.isEmpty)
        }
        if model == "host,+est,+smx" {
            // KVM never offers Enhanced SpeedStep or Safer Mode Extensions to a guest.
            #expect(run.status == 2)
            #expect(run.stderr.contains("features this KVM does not offer: smx est "))
        }
    }

    @Test("Unknown or wrong edits: one line naming the problem, status 2", arguments: [
        (["--cpu", "host,+sse4_3"], "unknown CPU feature 'sse4_3' (did you mean sse4_1, sse4_2"),
        (["--cpu", "x86-64-v5"], "unknown CPU model 'x86-64-v5' (models: host, x86-64-v1"),
        (["--cpu", "host,avx2"], "invalid CPU model 'host,avx2'"),
        (["--cpu", "x86-64-v1,-hypervisor"], "'hypervisor' is set by Swiftlet"),
        (["--cpu", "x86-64-v1,-sse2"], "x86-64 (lm) requires sse2"),
        (["--cpu", "x86-64-v1,+fma"], "+fma needs avx, xsave, which the model lacks"),
        (["--cpu", "x86-64-v1", "--memory", "65G"], "beyond the 36-bit physical addresses of CPU model x86-64-v1"),
    ])
    func wrongEdits(arguments: [String], message: String) throws {
        let result = try Swiftlet.run(["run"] + arguments + ["--timeout", "30"])
        #expect(result.status == 2)
        #expect(result.stderr.hasPrefix("swiftlet: "))
        #expect(result.stderr.contains(message), "\(result.stderr)")
        #expect(result.stdout.isEmpty)
    }

    @Test("A 64-bit entry needs lm in the model", .enabled(if: debianKernelPresent, "Debian's kernel is not cached: run guests/linux/fetch-debian-kernel.sh"))
    func longModeEntry() throws {
        let result = try Swiftlet.run(["run", "--cpu", "x86-64-v1,-lm", "--kernel", debianKernelCache + "/vmlinux",
                                       "--linux-entry", "linux64", "--timeout", "30"])
        #expect(result.status == 2)
        #expect(result.stderr == "swiftlet: the kernel is entered in 64-bit mode, but CPU model x86-64-v1,-lm has no long mode (lm); "
            + "use a 32-bit entry or keep lm\n")
    }

    @Test("The cpuid guest boots with a baseline and reads its identity and an edit at CPL 3")
    func guest() throws {
        let result = try Swiftlet.run(["run", "--cpu", "x86-64-v1,-nx", "--flat", Swiftlet.guest("cpuid"), "--timeout", "60"])
        #expect(result.status == 1, "\(result.stderr)")
        #expect(result.stdout.contains("signature  family 15, model 6, stepping 1"))
        #expect(result.stdout.contains("brand      Swiftlet x86-64-v1 CPU"))
        // Leaf 0x80000001 (nx, lm) as the model says; leaves 1 and 7 are not checked: a
        // nested KVM that ignores CPUID masks shows the guest the host's bits there.
        let features = try #require(result.stdout.split(separator: "\n").first { $0.hasPrefix("features") })
        #expect(features.split(separator: " ").contains("lm"))
        #expect(!features.split(separator: " ").contains("nx"))
    }

    @Test("--supported prints KVM_GET_SUPPORTED_CPUID in the fixtures' format")
    func supported() throws {
        let result = try Swiftlet.run(["cpu", "--supported"])
        #expect(result.status == 0)
        let lines = result.stdout.split(separator: "\n")
        #expect(lines.count > 10)
        #expect(lines.allSatisfy { $0.split(separator: " ").count == 7 && $0.split(separator: " ").allSatisfy { $0.count == 8 } })
        #expect(lines.first?.hasPrefix("00000000 00000000 ") == true)
    }

    @Test("--help documents --cpu and the models")
    func help() throws {
        let result = try Swiftlet.run(["run", "--help"])
        #expect(result.stdout.contains("CPU MODEL"))
        #expect(result.stdout.contains("--cpu <model>"))
        #expect(result.stdout.contains("x86-64-v3"))
        #expect(result.stdout.contains("swiftlet cpu --show MODEL"))
    }
}
