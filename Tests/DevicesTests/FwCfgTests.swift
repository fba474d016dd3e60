import Devices
import Testing

@Suite("fw_cfg legacy interface")
struct FwCfgTests {
    /// What kvm-unit-tests' fwcfg_get_u does: 16-bit selector write, then byte reads.
    func item(_ device: FwCfg, _ selector: UInt16, bytes: Int) -> UInt64 {
        Port.write16(device, 0, selector)
        var value: UInt64 = 0
        for index in 0..<bytes { value |= UInt64(Port.read8(device, 1)) << (8 * UInt64(index)) }
        return value
    }

    @Test func signatureAndID() {
        let device = FwCfg(cpuCount: 2, ramSize: 128 << 20)
        Port.write16(device, 0, FwCfg.signature)
        #expect((0..<4).map { _ in Port.read8(device, 1) } == Array("QEMU".utf8))
        #expect(item(device, FwCfg.id, bytes: 4) == 1)
    }

    @Test func cpuCountAndRAMSize() {
        let device = FwCfg(cpuCount: 3, ramSize: 5 << 30)
        #expect(item(device, 0x05, bytes: 2) == 3)
        #expect(item(device, 0x0F, bytes: 2) == 3)
        #expect(item(device, 0x03, bytes: 8) == 5 << 30)
        // Reselecting restarts the item.
        #expect(item(device, 0x05, bytes: 2) == 3)
    }

    @Test func unknownSelectorsAndReadsPastTheEndAreZero() {
        let device = FwCfg(cpuCount: 2, ramSize: 1 << 20)
        #expect(item(device, 0x11, bytes: 8) == 0)        // FW_CFG_MAX_RAM: not provided
        #expect(item(device, 0x05, bytes: 8) == 2)
        #expect(item(device, 0x1234, bytes: 4) == 0)
    }

    @Test func archLocalSelectorsDoNotAliasGenericItems() {
        let device = FwCfg(cpuCount: 2, ramSize: 1 << 20)
        #expect(item(device, 0x8000, bytes: 4) == 0)        // not "QEMU"
        #expect(item(device, 0x8005, bytes: 2) == 0)        // not the CPU count
        #expect(item(device, 0x4005, bytes: 2) == 2)        // the write bit is ignored
    }
}
