import Devices
import Testing

@Suite("i8042 keyboard controller")
struct I8042Tests {
    @Test func resetCommandCallsOnReset() {
        let resets = Counter()
        let controller = I8042 { resets.increment() }
        Port.write8(controller, 4, 0xFE)
        #expect(resets.count == 1)
        // Pulse commands that leave bit 0 alone do not reset.
        Port.write8(controller, 4, 0xFF)
        Port.write8(controller, 4, 0xF1)
        #expect(resets.count == 1)
    }

    @Test func outputPortWithResetBitClearResets() {
        let resets = Counter()
        let controller = I8042 { resets.increment() }
        Port.write8(controller, 4, 0xD1)
        Port.write8(controller, 0, 0x03)
        #expect(resets.count == 0)
        Port.write8(controller, 4, 0xD1)
        Port.write8(controller, 0, 0x02)
        #expect(resets.count == 1)
    }

    @Test func statusAndSelfTest() {
        let controller = I8042 {}
        let idle = Port.read8(controller, 4)
        #expect(idle & 0x01 == 0)           // output buffer empty
        #expect(idle & 0x04 != 0)           // system flag
        Port.write8(controller, 4, 0xAA)
        #expect(Port.read8(controller, 4) & 0x01 == 1)
        #expect(Port.read8(controller, 0) == 0x55)
        #expect(Port.read8(controller, 4) & 0x01 == 0)
    }

    @Test func commandByteRoundTrips() {
        let controller = I8042 {}
        Port.write8(controller, 4, 0x60)
        Port.write8(controller, 0, 0x47)
        Port.write8(controller, 4, 0x20)
        #expect(Port.read8(controller, 0) == 0x47)
    }

    @Test func keyboardCommandsAreAcknowledged() {
        let controller = I8042 {}
        Port.write8(controller, 0, 0xFF)
        #expect(Port.read8(controller, 0) == 0xFA)
        #expect(Port.read8(controller, 0) == 0xAA)
        Port.write8(controller, 0, 0xED)   // set LEDs, then the argument
        Port.write8(controller, 0, 0x07)
        #expect(Port.read8(controller, 0) == 0xFA)
        #expect(Port.read8(controller, 0) == 0xFA)
        #expect(Port.read8(controller, 4) & 0x01 == 0)
    }

    @Test func keyboardInterruptFollowsTheOutputBuffer() {
        let irq = LevelRecorder()
        let controller = I8042(irq: irq) {}
        Port.write8(controller, 4, 0xAB)
        _ = Port.read8(controller, 0)
        #expect(irq.history == [true, false])
        // With the interrupt disabled in the command byte, nothing is raised.
        Port.write8(controller, 4, 0x60)
        Port.write8(controller, 0, 0x44)
        Port.write8(controller, 4, 0xAA)
        #expect(irq.history == [true, false])
    }

    @Test func otherPortsReadAllOnes() {
        let controller = I8042 {}
        #expect(Port.read8(controller, 1) == 0xFF)
        Port.write8(controller, 2, 0xFE)
    }

    @Test("IRQ 1 follows the controller state, set under its lock in access order")
    func interruptLineFollowsState() {
        let line = LevelRecorder()
        let controller = I8042(irq: line) {}
        // Interrupts off (command byte 0x44): a byte waits, the line stays low.
        Port.write8(controller, 4, 0x60)
        Port.write8(controller, 0, 0x44)
        Port.write8(controller, 4, 0xAA)
        #expect(line.history == [])
        // Turning the interrupt on while the byte waits raises the line at once.
        Port.write8(controller, 4, 0x60)
        Port.write8(controller, 0, 0x45)
        #expect(line.history == [true])
        // Reading the byte lowers it; a second byte raises it again.
        #expect(Port.read8(controller, 0) == 0x55)
        #expect(line.history == [true, false])
        Port.write8(controller, 4, 0xAB)
        #expect(line.history == [true, false, true])
    }

    @Test("Under concurrent access the last line change always matches the final state")
    func concurrentAccessKeepsLineConsistent() async {
        let line = LevelRecorder()
        let controller = I8042(irq: line) {}
        await withTaskGroup(of: Void.self) { group in
            for worker in 0..<4 {
                group.addTask {
                    for _ in 0..<2000 {
                        if worker % 2 == 0 { Port.write8(controller, 4, 0xAA) } else { _ = Port.read8(controller, 0) }
                    }
                }
            }
        }
        let pending = Port.read8(controller, 4) & 0x01 == 1
        #expect(line.history.last ?? false == pending)
        // Consecutive changes alternate: a line is never raised twice in a row.
        #expect(zip(line.history, line.history.dropFirst()).allSatisfy { $0 != $1 })
    }
}
