@testable import Devices
import Synchronization
import Testing

/// Records what the UART transmits and how it drives its interrupt line.
final class Recorder: ByteSink, InterruptLine {
    let bytes = Mutex<[UInt8]>([])
    let levels = Mutex<[Bool]>([])
    func write(_ data: UnsafeRawBufferPointer) { bytes.withLock { $0.append(contentsOf: data) } }
    func setLevel(_ high: Bool) { levels.withLock { $0.append(high) } }
    var transmitted: [UInt8] { bytes.withLock { $0 } }
    var lineLevels: [Bool] { levels.withLock { $0 } }
}

extension Serial16550 {
    func out(_ register: UInt64, _ value: UInt8) {
        withUnsafeBytes(of: value) { write(offset: register, from: $0) }
    }
    func inb(_ register: UInt64) -> UInt8 {
        var value: UInt8 = 0
        withUnsafeMutableBytes(of: &value) { read(offset: register, into: $0) }
        return value
    }
}

@Suite("16550A UART")
struct Serial16550Tests {
    let recorder = Recorder()
    var uart: Serial16550 { Serial16550(output: recorder, interrupt: recorder) }

    @Test("THR writes reach the host; the transmitter always reads empty")
    func transmit() {
        let uart = self.uart
        #expect(uart.inb(5) & 0x60 == 0x60)
        for byte in Array("hi\n".utf8) { uart.out(0, byte) }
        #expect(recorder.transmitted == Array("hi\n".utf8))
        #expect(uart.inb(5) & 0x60 == 0x60)
    }

    @Test("The scratch register keeps what is written (the 8250 probe)")
    func scratch() {
        let uart = self.uart
        for value: UInt8 in [0x00, 0x55, 0xAA, 0xFF] {
            uart.out(7, value)
            #expect(uart.inb(7) == value)
        }
    }

    @Test("IIR reports FIFOs enabled in bits 7:6 only after FCR enables them")
    func fifoIdentification() {
        let uart = self.uart
        #expect(uart.inb(2) == 0x01)
        uart.out(2, 0x01)
        #expect(uart.inb(2) == 0xC1)
        uart.out(2, 0x00)
        #expect(uart.inb(2) & 0xC0 == 0)
    }

    @Test("Loopback: transmitted bytes come back, MSR mirrors MCR (Linux checks 0x90)")
    func loopback() {
        let uart = self.uart
        uart.out(4, 0x1A) // LOOP | OUT2 | RTS, as the 8250 driver's probe does
        #expect(uart.inb(6) & 0xF0 == 0x90)
        uart.out(4, 0x1F)
        #expect(uart.inb(6) & 0xF0 == 0xF0)
        uart.out(0, 0x42)
        #expect(recorder.transmitted.isEmpty)
        #expect(uart.inb(5) & 0x01 == 0x01)
        #expect(uart.inb(0) == 0x42)
        #expect(uart.inb(5) & 0x01 == 0x00)
        uart.out(4, 0x08)
        #expect(uart.inb(6) == 0xB0)
    }

    @Test("A full FIFO overruns in loopback; the error bit clears on read")
    func overrun() {
        let uart = self.uart
        uart.out(2, 0x01)
        uart.out(4, 0x10)
        for value in 0..<17 { uart.out(0, UInt8(value)) }
        let lsr = uart.inb(5)
        #expect(lsr & 0x02 == 0x02)
        #expect(uart.inb(5) & 0x02 == 0)
        let received = (0..<16).map { _ in uart.inb(0) }
        #expect(received == (0..<16).map { UInt8($0) })
        #expect(uart.inb(5) & 0x01 == 0)
    }

    @Test("Host input waits for FIFO room instead of overrunning")
    func hostInputBackpressure() {
        let uart = self.uart
        uart.out(2, 0x01)
        let text = Array("the quick brown fox jumps over the lazy dog".utf8)
        #expect(uart.receive(text) == text.count)
        var read: [UInt8] = []
        while uart.inb(5) & 0x01 != 0 { read.append(uart.inb(0)) }
        #expect(read == text)
        #expect(uart.inb(5) & 0x02 == 0)
        #expect(uart.bufferedInputCount == 0)
    }

    @Test("Without FIFOs the receiver holds one byte at a time")
    func noFIFO() {
        let uart = self.uart
        uart.receive([1, 2, 3])
        #expect(uart.bufferedInputCount == 3)
        #expect(uart.inb(0) == 1)
        #expect(uart.inb(0) == 2)
        #expect(uart.inb(0) == 3)
        #expect(uart.inb(5) & 0x01 == 0)
    }

    @Test("Received-data interrupt raises IRQ and IIR 0x04 until the data is read")
    func receiveInterrupt() {
        let uart = self.uart
        uart.out(1, 0x01)
        #expect(recorder.lineLevels.isEmpty)
        uart.receive([0x61])
        #expect(recorder.lineLevels == [true])
        #expect(uart.inb(2) & 0x0F == 0x04)
        #expect(uart.inb(0) == 0x61)
        #expect(recorder.lineLevels == [true, false])
        #expect(uart.inb(2) & 0x0F == 0x01)
    }

    @Test("Enabling the THRE interrupt raises it at once; reading IIR acknowledges it")
    func transmitInterrupt() {
        let uart = self.uart
        uart.out(1, 0x02)
        #expect(recorder.lineLevels == [true])
        #expect(uart.inb(2) & 0x0F == 0x02)
        #expect(recorder.lineLevels == [true, false])
        #expect(uart.inb(2) & 0x0F == 0x01)
        uart.out(0, 0x41) // each transmitted byte empties THR again
        #expect(recorder.lineLevels == [true, false, true])
        uart.out(1, 0x00)
        #expect(recorder.lineLevels == [true, false, true, false])
    }

    @Test("DLAB switches offsets 0 and 1 to the divisor latch")
    func divisorLatch() {
        let uart = self.uart
        uart.out(3, 0x83)
        uart.out(0, 0x01)
        uart.out(1, 0x00)
        #expect(uart.inb(0) == 0x01)
        #expect(uart.inb(1) == 0x00)
        uart.out(3, 0x03)
        #expect(uart.inb(1) == 0x00) // IER again
        #expect(recorder.transmitted.isEmpty) // divisor writes are not data
    }

    @Test("Accesses wider than a byte or outside the registers do not trap")
    func oddAccesses() {
        let uart = self.uart
        var wide: UInt32 = 0xFFFF_FFFF
        withUnsafeMutableBytes(of: &wide) { uart.read(offset: 5, into: $0) }
        #expect(wide == 0x60)
        uart.read(offset: 9, into: UnsafeMutableRawBufferPointer(start: nil, count: 0))
        uart.write(offset: 0, from: UnsafeRawBufferPointer(start: nil, count: 0))
        #expect(uart.inb(8) == 0xFF)
    }
}
