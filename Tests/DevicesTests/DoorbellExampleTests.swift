import Devices
import Synchronization
import Testing

// The example device of docs/adding-a-device.md, kept here so that the code the note
// shows compiles and does what the note says.

/// A doorbell: the guest writes a byte to ring it (the interrupt line goes high and the
/// byte is kept); reading the register returns the last byte and acknowledges the ring
/// (the line goes low). One register, so `length` 1 on the bus.
final class Doorbell: IODevice {
    private struct State {
        var lastByte: UInt8 = 0
        var ringing = false
    }

    private let state = Mutex(State())
    private let interrupt: any InterruptLine

    init(interrupt: any InterruptLine) {
        self.interrupt = interrupt
    }

    func read(offset: UInt64, into data: UnsafeMutableRawBufferPointer) {
        let value = state.withLock { state -> UInt8 in
            if state.ringing {
                state.ringing = false
                interrupt.setLevel(false)      // under the lock: see "Interrupts"
            }
            return state.lastByte
        }
        for index in data.indices { data[index] = index == 0 ? value : 0 }
    }

    func write(offset: UInt64, from data: UnsafeRawBufferPointer) {
        guard let byte = data.first else { return }
        state.withLock { state in
            state.lastByte = byte
            if !state.ringing {
                state.ringing = true
                interrupt.setLevel(true)
            }
        }
    }
}

@Suite("The doorbell of docs/adding-a-device.md")
struct DoorbellExampleTests {
    @Test("A write rings (line high), a read returns the byte and acknowledges (line low)")
    func ringAndAcknowledge() {
        let line = LevelRecorder()
        let bell = Doorbell(interrupt: line)
        Port.write8(bell, 0, 0x42)
        Port.write8(bell, 0, 0x43)                  // already ringing: no second edge
        #expect(line.history == [true])
        #expect(Port.read8(bell, 0) == 0x43)
        #expect(line.history == [true, false])
        #expect(Port.read16(bell, 0) == 0x43)       // a wider read: the byte, then zeros
        #expect(line.history == [true, false])
    }

    @Test("On the bus: the device sees offsets from its base; KVM's ports are refused")
    func onTheBus() throws {
        var ports = IOBus.Builder.portBus()
        try ports.register(Doorbell(interrupt: LevelRecorder()), name: "doorbell", base: 0x5B0, length: 1)
        #expect(throws: IOBusError.self) { try ports.register(Doorbell(interrupt: LevelRecorder()), name: "doorbell 2", base: 0x40, length: 1) }
        let bus = ports.build()
        #expect([UInt8(7)].withUnsafeBytes { bus.write(0x5B0, from: $0) }?.name == "doorbell")
    }
}
