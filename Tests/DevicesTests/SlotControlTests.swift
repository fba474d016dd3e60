import Devices
import Layout
import Synchronization
import Testing

/// The slot device's protocol, against a host that records what it was asked (the real
/// host, with KVM, runs under guests/memory-slots.s in the integration tests).
@Suite("Memory slot device")
struct SlotControlTests {
    final class RecordingHost: MemorySlotHost {
        let asked = Mutex<[SlotControl.SlotKind]>([])
        let dirty: [UInt64]
        let refuse: Bool
        init(dirty: [UInt64] = [], refuse: Bool = false) {
            self.dirty = dirty
            self.refuse = refuse
        }
        func addSlot(_ kind: SlotControl.SlotKind) -> UInt32? {
            asked.withLock { $0.append(kind) }
            return refuse ? nil : (kind == .ram ? 1 : 2)
        }
        func takeDirtyPages() -> [UInt64] { dirty }
    }

    @Test("Offset 0 reads the signature; the answer port reads all ones until there is an answer")
    func signature() {
        let device = SlotControl(host: RecordingHost())
        #expect(Port.read32(device.ports, 0) == 0x544F_4C53)
        #expect(Port.read8(device.ports, 0) == UInt8(ascii: "S"))
        #expect(Port.read32(device.ports, 4) == 0xFFFF_FFFF)
    }

    @Test("Commands 1 and 2 add the RAM and the read-only slot and answer the slot number")
    func addSlots() {
        let host = RecordingHost()
        let device = SlotControl(host: host)
        Port.write8(device.ports, 0, 1)
        #expect(Port.read32(device.ports, 4) == 1)
        #expect(Port.read32(device.ports, 4) == 0xFFFF_FFFF)
        Port.write8(device.ports, 0, 2)
        #expect(Port.read32(device.ports, 4) == 2)
        #expect(host.asked.withLock { $0 } == [.ram, .readOnly])
        let refusing = SlotControl(host: RecordingHost(refuse: true))
        Port.write8(refusing.ports, 0, 1)
        #expect(Port.read32(refusing.ports, 4) == 0xFFFF_FFFF)
    }

    @Test("Command 3 answers the count of written pages, then each address")
    func dirtyLog() {
        let device = SlotControl(host: RecordingHost(dirty: [0xF000_0000, 0xF000_3000]))
        Port.write8(device.ports, 0, 3)
        #expect((0..<4).map { _ in Port.read32(device.ports, 4) } == [2, 0xF000_0000, 0xF000_3000, 0xFFFF_FFFF])
    }

    @Test("Writes to the read-only slot are counted, and command 4 reports them; a new command replaces the answer")
    func writeTrap() {
        let device = SlotControl(host: RecordingHost())
        Port.write8(device.ports, 0, 4)
        #expect(Port.read32(device.ports, 4) == 0)
        Port.write32(device.writeTrap, 0x10, 0xCAFE_F00D)
        Port.write8(device.writeTrap, 0x20, 0x42)
        #expect(Port.read32(device.writeTrap, 0x20) == 0xFFFF_FFFF)
        Port.write8(device.ports, 0, 4)
        #expect((0..<3).map { _ in Port.read32(device.ports, 4) } == [2, UInt32(AddressMap.runtimeSlotReadOnly + 0x20), 0x42])
        Port.write8(device.ports, 0, 9)
        #expect(Port.read32(device.ports, 4) == 0xFFFF_FFFF)
    }
}
