import Foundation
import Testing

/// Several vCPUs: the BSP starts the APs with INIT and Startup IPIs through the in-kernel
/// local APIC, and each checks in (guests/smp.s).
@Suite("SMP")
struct SMPTests {
    @Test("Every AP starts, prints its APIC ID and checks in", arguments: [1, 2, 4, 32])
    func allProcessorsCheckIn(cpus: Int) throws {
        let result = try Swiftlet.run(["run", "--flat", Swiftlet.guest("smp"), "--cpus", "\(cpus)", "--timeout", "120"])
        #expect(result.status == 1)
        #expect(result.stdout.contains("smp: \(cpus) CPUs reported by fw_cfg"))
        #expect(result.stdout.contains("smp: all \(cpus) CPUs checked in"))
        let ids = result.stdout.matches(of: /AP with APIC ID (\d+) checked in/).map { Int($0.1)! }
        #expect(ids.sorted() == Array(1..<cpus), "each AP once, with its own APIC ID")
    }

    @Test("A guest that exits while 200 vCPU threads are still starting ends cleanly")
    func exitDuringStartup() throws {
        for _ in 0..<3 {
            let result = try Swiftlet.run(["run", "--cpus", "200"])
            #expect(result.status == 1)
            #expect(result.stderr.isEmpty)
        }
    }

    @Test("More vCPUs than 8-bit APIC IDs allow is refused")
    func tooManyCPUs() throws {
        let result = try Swiftlet.run(["run", "--cpus", "255"])
        #expect(result.status == 2)
        #expect(result.stderr.hasPrefix("swiftlet: 255 vCPUs are more than Swiftlet supports (254"))
    }
}
