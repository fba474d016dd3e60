import Devices
import Foundation
import Synchronization
import Testing

/// Encodes `value` as JSON and decodes it again, as a snapshot file does.
func jsonRoundTrip<Value: Codable>(_ value: Value) throws -> Value {
    try JSONDecoder().decode(Value.self, from: JSONEncoder().encode(value))
}

/// Restores `state` into `device` and returns the refusal, or nil when it was taken.
func refusal<Device: SnapshotDevice>(_ device: Device, _ state: Device.SavedState) -> DeviceStateError? {
    do {
        try device.restoreState(state)
        return nil
    } catch {
        return error
    }
}

@Suite("Device state: 16550A UART")
struct SerialStateTests {
    /// A UART with FIFOs on, a divisor, every interrupt enabled, 16 bytes in the FIFO and
    /// 22 more waiting, two already read.
    func busyUART(_ recorder: Recorder) -> Serial16550 {
        let uart = Serial16550(output: recorder, interrupt: recorder)
        uart.out(3, 0x83)                    // DLAB
        uart.out(0, 0x03); uart.out(1, 0x00) // 38400 baud
        uart.out(3, 0x1B)                    // 8E1, DLAB off
        uart.out(2, 0xC1)                    // FIFOs, trigger level 14
        uart.out(1, 0x07)                    // received data, THRE, line status
        uart.out(4, 0x0B)
        uart.out(7, 0x5A)
        uart.receive(Array(0..<40))
        _ = uart.inb(0); _ = uart.inb(0)
        return uart
    }

    /// Everything a driver sees reading the UART until it is drained: (IIR, LSR, RBR) per byte.
    func drain(_ uart: Serial16550) -> [[UInt8]] {
        var seen: [[UInt8]] = []
        while seen.count < 100 {
            let iir = uart.inb(2), lsr = uart.inb(5)
            guard lsr & 0x01 != 0 else { seen.append([iir, lsr]); break }
            seen.append([iir, lsr, uart.inb(0)])
        }
        return seen
    }

    @Test("Saved, sent through JSON and restored, a new UART reads the same, drives IRQ 4 the same, and saves the same")
    func roundTrip() throws {
        let original = busyUART(Recorder())
        let saved = original.saveState()
        #expect(saved.receiveFIFO.count == 16 && saved.pendingInput.count == 22 && saved.interruptLineHigh)
        let recorder = Recorder()
        let restored = Serial16550(output: recorder, interrupt: recorder)
        try restored.restoreState(try jsonRoundTrip(saved))
        #expect(recorder.lineLevels == [true], "the line is driven to the saved level")
        #expect(restored.saveState() == saved)
        for register: UInt64 in [1, 3, 4, 6, 7] { #expect(restored.inb(register) == original.inb(register), "register \(register)") }
        restored.out(3, 0x9B); original.out(3, 0x9B)
        #expect(restored.inb(0) == original.inb(0) && restored.inb(1) == original.inb(1), "the divisor")
        restored.out(3, 0x1B); original.out(3, 0x1B)
        let drained = drain(restored)
        #expect(drained == drain(original))
        #expect(drained.compactMap { $0.count == 3 ? $0[2] : nil } == Array(2..<40), "every byte once, in order")
        #expect(drained.last?.first == 0xC2, "then the THRE interrupt that was pending, once")
        #expect(recorder.lineLevels.last == false)
        // Transmission goes on the same way.
        restored.out(0, 0x41)
        #expect(recorder.transmitted == [0x41])
    }

    @Test("An overrun in loopback and a pending THRE interrupt survive")
    func overrunAndTransmitInterrupt() throws {
        let uart = Serial16550(output: Recorder(), interrupt: Recorder())
        uart.out(4, 0x10)                    // loopback, FIFO off: one byte of room
        uart.out(1, 0x06)                    // THRE and line status interrupts
        uart.out(0, 0x31); uart.out(0, 0x32) // the second overruns
        let saved = uart.saveState()
        #expect(saved.lineStatus & 0x02 != 0 && saved.transmitInterruptPending)
        let restored = Serial16550(output: Recorder(), interrupt: Recorder())
        try restored.restoreState(try jsonRoundTrip(saved))
        #expect(restored.inb(2) == 0x06, "line status first")
        #expect(restored.inb(5) & 0x03 == 0x03)
        #expect(restored.inb(2) == 0x02, "then THRE")
        #expect(restored.inb(0) == 0x31)
    }

    static let hostile: [(String, @Sendable (inout Serial16550.SavedState) -> Void)] = [
        ("17 bytes in the 16-byte FIFO", { $0.receiveFIFO = Array(repeating: 1, count: 17) }),
        ("2 bytes with FIFOs off", { $0.fifoControl = 0; $0.receiveFIFO = [1, 2] }),
        ("IER bits above 3", { $0.interruptEnable = 0xF7 }),
        ("MCR bits above 4", { $0.modemControl = 0xEB }),
        ("FCR bits not kept", { $0.fifoControl = 0xC7 }),
        ("LSR without an empty transmitter", { $0.lineStatus = 0x01 }),
        ("LSR data ready with an empty FIFO", { $0.receiveFIFO = []; $0.pendingInput = [] }),
        ("host input over the limit", { $0.pendingInput = Array(repeating: 0, count: Serial16550.pendingInputLimit + 1) }),
        ("THRE pending while disabled", { $0.interruptEnable = 0x01; $0.transmitInterruptPending = true }),
        ("line low while an interrupt is pending", { $0.interruptLineHigh = false }),
    ]

    @Test("A state no UART could have is refused, and the device is left as it was", arguments: 0..<10)
    func hostileState(index: Int) {
        let (name, corrupt) = Self.hostile[index]
        var state = busyUART(Recorder()).saveState()
        corrupt(&state)
        let recorder = Recorder()
        let uart = Serial16550(output: recorder, interrupt: recorder)
        let before = uart.saveState()
        let error = refusal(uart, state)
        #expect(error?.device == "serial (16550)", "\(name)")
        #expect(uart.saveState() == before)
        #expect(recorder.lineLevels.isEmpty)
    }
}

@Suite("Device state: i8042, CMOS, fw_cfg")
struct PlatformStateTests {
    @Test("i8042: the output queue, the command waiting for its byte and IRQ 1 carry over")
    func keyboardController() throws {
        let line = LevelRecorder()
        let controller = I8042(irq: line) {}
        Port.write8(controller, 0, 0xF2)                 // identify: FA AB 83
        #expect(Port.read8(controller, 0) == 0xFA)
        Port.write8(controller, 4, 0x60)                 // write command byte: waits for the data byte
        let saved = controller.saveState()
        #expect(saved.output == [0xAB, 0x83] && saved.pendingWrite == .commandByte && saved.interruptLineHigh)
        let restoredLine = LevelRecorder()
        let restored = I8042(irq: restoredLine) {}
        try restored.restoreState(try jsonRoundTrip(saved))
        #expect(restoredLine.history == [true])
        #expect(Port.read8(restored, 4) == Port.read8(controller, 4))
        Port.write8(restored, 0, 0x44); Port.write8(controller, 0, 0x44)
        for device in [restored, controller] {
            #expect(Port.read8(device, 0) == 0xAB)
            #expect(Port.read8(device, 0) == 0x83)
            Port.write8(device, 4, 0x20)
            #expect(Port.read8(device, 0) == 0x44, "the pending write went to the command byte")
        }
        #expect(restoredLine.history == [true, false], "IRQ 1 off: the new command byte disables it")
    }

    @Test("i8042: an output queue too long, a keyboard command that takes no argument, or a wrong line level is refused")
    func keyboardControllerHostile() {
        let base = I8042 {}.saveState()
        var long = base; long.output = Array(repeating: 0xFA, count: 17)
        var argument = base; argument.keyboardPending = 0xF2
        var line = base; line.interruptLineHigh = true
        for state in [long, argument, line] { #expect(refusal(I8042 {}, state)?.device == "i8042 keyboard controller") }
    }

    func makeCMOS() -> CMOS { CMOS(ramBelow4G: 512 << 20, cpuCount: 2, now: { 1_700_000_000 }) }

    @Test("CMOS: memory, the index and the NMI-disable bit carry over; the time still comes from the clock")
    func cmos() throws {
        let cmos = makeCMOS()
        Port.write8(cmos, 0, 0x40); Port.write8(cmos, 1, 0x99)
        Port.write8(cmos, 0, 0x0B); Port.write8(cmos, 1, 0x06)   // binary, 24-hour
        Port.write8(cmos, 0, 0x80 | 0x04)                        // hours, NMI disabled
        let saved = cmos.saveState()
        #expect(saved.index == 4 && saved.nmiDisabled && saved.memory[0x40] == 0x99)
        let restored = CMOS(ramBelow4G: 512 << 20, cpuCount: 2, now: { 1_700_000_000 + 3600 })
        try restored.restoreState(try jsonRoundTrip(saved))
        #expect(restored.saveState() == saved)
        #expect(Port.read8(restored, 1) == 23, "23:13 UTC an hour later, in binary: the clock is the host's")
        #expect(Port.read8(cmos, 1) == 22)
        Port.write8(restored, 0, 0x40)
        #expect(Port.read8(restored, 1) == 0x99)
    }

    @Test("CMOS: wrong size, index out of range, or read-only registers changed are refused")
    func cmosHostile() {
        let base = makeCMOS().saveState()
        var short = base; short.memory.removeLast()
        var index = base; index.index = 128
        var negative = base; negative.index = -1
        var statusD = base; statusD.memory[0x0D] = 0
        var clock = base; clock.memory[0x00] = 0x59
        var update = base; update.memory[0x0A] |= 0x80
        for state in [short, index, negative, statusD, clock, update] {
            let cmos = makeCMOS()
            #expect(refusal(cmos, state)?.device == "CMOS RTC")
            #expect(cmos.saveState() == base)
        }
    }

    @Test("fw_cfg: the selected item and the read position carry over; a position past the item is refused")
    func firmwareConfiguration() throws {
        let device = FwCfg(cpuCount: 2, ramSize: 1 << 30)
        Port.write16(device, 0, FwCfg.signature)
        #expect(Port.read8(device, 1) == UInt8(ascii: "Q"))
        #expect(Port.read8(device, 1) == UInt8(ascii: "E"))
        let saved = device.saveState()
        let restored = FwCfg(cpuCount: 2, ramSize: 1 << 30)
        try restored.restoreState(try jsonRoundTrip(saved))
        #expect(Port.read8(restored, 1) == UInt8(ascii: "M"))
        #expect(Port.read8(restored, 1) == UInt8(ascii: "U"))
        #expect(Port.read8(restored, 1) == 0)
        var past = saved; past.position = 5
        var negative = saved; negative.position = -1
        var unknown = saved; unknown.selector = 0x1234; unknown.position = 1
        for state in [past, negative, unknown] { #expect(refusal(FwCfg(cpuCount: 2, ramSize: 1 << 30), state) != nil) }
    }
}

@Suite("Device state: ACPI PM, reset control, port A, pc-testdev, PCI host bridge")
struct ChipsetStateTests {
    typealias ManualClock = ACPIPowerManagementTests.ManualClock

    @Test("ACPI PM: the registers carry over and the timer counts on from its saved value, not from the new clock")
    func powerManagement() throws {
        let clock = ManualClock()
        let pm = ACPIPowerManagement(clock: clock.reading) {}
        Port.write16(pm, 2, 0x0121)                         // TMR_EN, GBL_EN, PWRBTN_EN
        Port.write16(pm, 4, 0x1C02)                         // BM_RLD, SLP_TYP 7 (no SLP_EN)
        clock.advance(nanoseconds: 5_000_000_000)           // 17 897 725 ticks: bit 23 has changed
        #expect(Port.read16(pm, 0) & 1 == 1)
        Port.write16(pm, 0, 1)                              // clear TMR_STS
        clock.advance(nanoseconds: 200_000_000)             // 715 909 ticks exactly
        let saved = pm.saveState()
        #expect(saved.timer == 17_897_725 + 715_909)
        let later = ManualClock()
        later.advance(nanoseconds: 86_400 * 1_000_000_000)  // the snapshot sat on disk for a day
        let restored = ACPIPowerManagement(clock: later.reading) {}
        try restored.restoreState(try jsonRoundTrip(saved))
        #expect(Port.read32(restored, 8) == UInt32(saved.timer & 0xFF_FFFF))
        #expect(Port.read16(restored, 2) == 0x0121)
        #expect(Port.read16(restored, 4) == 0x1C03, "SCI_EN reads 1")
        #expect(Port.read16(restored, 0) & 1 == 0, "TMR_STS stays clear")
        later.advance(nanoseconds: 200_000_000)
        clock.advance(nanoseconds: 200_000_000)
        #expect(Port.read32(restored, 8) == Port.read32(pm, 8), "both count the same 200 ms")
    }

    @Test("ACPI PM: bits the registers do not keep, or TMR_STS cleared in the future, are refused")
    func powerManagementHostile() {
        let base = ACPIPowerManagement(clock: ManualClock().reading) {}.saveState()
        var enable = base; enable.enable = 0x0002
        var control = base; control.control = 0x2000
        var future = base; future.timerStatusClearedAt = base.timer + 1
        for state in [enable, control, future] {
            #expect(refusal(ACPIPowerManagement(clock: ManualClock().reading) {}, state)?.device == "ACPI power management")
        }
    }

    @Test("Reset control and port A: their values carry over without starting a reset")
    func resetRegisters() throws {
        let resets = Counter()
        let register = ResetControl { _ in resets.increment() }
        Port.write8(register, 0, 0x0A)
        let restored = ResetControl { _ in resets.increment() }
        try restored.restoreState(try jsonRoundTrip(register.saveState()))
        #expect(Port.read8(restored, 0) == 0x0A)
        var resetting = register.saveState()
        resetting.value = 0x04
        #expect(refusal(ResetControl { _ in }, resetting) != nil, "RST_CPU never sticks")

        let port = SystemControlPortA { resets.increment() }
        Port.write8(port, 0, 0x03)
        #expect(resets.count == 1)
        let restoredPort = SystemControlPortA { resets.increment() }
        try restoredPort.restoreState(try jsonRoundTrip(port.saveState()))
        #expect(Port.read8(restoredPort, 0) == 0x03)
        #expect(resets.count == 1, "restoring bit 0 is no rising edge")
        Port.write8(restoredPort, 0, 0x02); Port.write8(restoredPort, 0, 0x03)
        #expect(resets.count == 2)
    }

    @Test("pc-testdev: the register, I/O RAM and high lines carry over; the restore raises only the lines that were high")
    func testDevice() throws {
        let lines = ValueRecorder<String>()
        let device = TestDevice { gsi, high in lines.append("\(gsi)=\(high)") }
        Port.write32(device.register, 0, 0x1234_5678)
        Port.write8(device.irqLines, 3, 1)
        Port.write8(device.irqLines, 5, 1)
        Port.write8(device.irqLines, 5, 0)
        Port.write8(device.irqLines, 23, 1)
        Port.write32(device.ioRAM, 0xFFFC, 0xCAFE_F00D)
        Port.write8(device.ioRAM, 0, 0x77)
        let saved = device.saveState()
        #expect(saved.irqLevels == (1 << 3 | 1 << 23))
        let restoredLines = ValueRecorder<String>()
        let restored = TestDevice { gsi, high in restoredLines.append("\(gsi)=\(high)") }
        try restored.restoreState(try jsonRoundTrip(saved))
        #expect(restoredLines.values == ["3=true", "23=true"])
        #expect(Port.read32(restored.register, 0) == 0x1234_5678)
        #expect(Port.read32(restored.ioRAM, 0xFFFC) == 0xCAFE_F00D)
        #expect(Port.read8(restored.ioRAM, 0) == 0x77)
        #expect(restored.saveState() == saved)

        var short = saved; short.ioRAM = SavedBytes([0])
        var line = saved; line.irqLevels = 1 << 24
        for state in [short, line] { #expect(refusal(TestDevice { _, _ in }, state)?.device == "pc-testdev") }
    }

    @Test("PCI host bridge: CONFIG_ADDRESS carries over; bits it does not keep are refused")
    func hostBridge() throws {
        let bridge = PCIHostBridge(functions: [:], resetControl: nil)
        Port.write32(bridge.configurationPorts, 0, 0x8000_0000)
        let restored = PCIHostBridge(functions: [:], resetControl: nil)
        try restored.restoreState(try jsonRoundTrip(bridge.saveState()))
        #expect(Port.read32(restored.configurationPorts, 0) == 0x8000_0000)
        #expect(Port.read32(restored.configurationPorts, 4) == 0x0008_1B36, "the host bridge answers at the restored address")
        for address: UInt32 in [0x8000_0001, 0x7F00_0000] {
            var state = bridge.saveState()
            state.configurationAddress = address
            #expect(refusal(restored, state) != nil, "0x\(String(address, radix: 16))")
        }
    }

    func header() -> PCIConfigurationHeader {
        var header = PCIConfigurationHeader(vendor: 0x1AF4, device: 0x1042, revision: 1, classCode: 0x01_80_00,
                                            subsystemVendor: 0x1AF4, subsystem: 0x1100, barSizes: [0x8000], interruptPin: 1)
        header.addCapability(at: 0x40, [0x09, 0, 8, 5, 0, 0, 0, 0], writableRange: 4..<8)
        header.assignBAR(0, base: 0xC000_0000)
        return header
    }

    @Test("A configuration header takes saved bytes a driver could have written, and refuses any other change")
    func headerRestore() {
        var programmed = header()
        let writes: [(Int, [UInt8])] = [(0x04, [0x07, 0x04]), (0x10, [0x00, 0x00, 0x01, 0xC0]), (0x3C, [11]), (0x44, [1, 2, 3, 4])]
        for (offset, bytes) in writes { bytes.withUnsafeBytes { _ = programmed.write(offset: offset, from: $0) } }
        var fresh = header()
        #expect(fresh.restore(programmed.bytes) == nil)
        #expect(fresh.bytes == programmed.bytes && fresh.barBase(0) == 0xC001_0000 && fresh.interruptLine == 11)

        for (offset, value) in [(0x00, UInt8(0x00)), (0x0B, 0x02), (0x10, 0x08), (0x11, 0x10), (0x05, 0x08), (0x34, 0x50), (0x41, 0x44)] {
            var bytes = programmed.bytes
            bytes[offset] = value
            var target = header()
            #expect(target.restore(bytes) != nil, "byte 0x\(String(offset, radix: 16))")
            #expect(target.bytes == header().bytes, "unchanged after a refusal")
        }
        var target = header()
        #expect(target.restore(Array(programmed.bytes.prefix(64))) != nil)
        var withFunctionBits = programmed.bytes
        withFunctionBits[0x42] |= 0xC0
        #expect(target.restore(withFunctionBits) != nil)
        #expect(target.restore(withFunctionBits, functionBits: [0x42: 0xC0]) == nil)
    }
}

@Suite("Saved bytes as base64")
struct SavedBytesTests {
    @Test("RFC 4648 test vectors, through JSON")
    func vectors() throws {
        let vectors = ["": "", "f": "Zg==", "fo": "Zm8=", "foo": "Zm9v", "foob": "Zm9vYg==", "fooba": "Zm9vYmE=", "foobar": "Zm9vYmFy"]
        for (plain, encoded) in vectors {
            let data = try JSONEncoder().encode(SavedBytes(Array(plain.utf8)))
            #expect(String(decoding: data, as: UTF8.self) == "\"\(encoded)\"")
            #expect(try JSONDecoder().decode(SavedBytes.self, from: data).bytes == Array(plain.utf8))
        }
    }

    @Test("Every length and byte value survives")
    func roundTrip() throws {
        var generator = SystemRandomNumberGenerator()
        for count in 0..<70 {
            let bytes = (0..<count).map { _ in UInt8.random(in: 0...255, using: &generator) }
            #expect(try jsonRoundTrip(SavedBytes(bytes)).bytes == bytes)
        }
        let all = SavedBytes((0...255).map { UInt8($0) } + (0...255).reversed().map { UInt8($0) })
        #expect(try jsonRoundTrip(all) == all)
    }

    @Test("Text that is not canonical base64 is a decoding error, not a trap",
          arguments: ["Zg=", "Zg", "Z===", "Zm9v!A==", "Zm=v", "Zh==", "Zm9=", "=Zm9", "Zg==Zg==", "\u{e9}abc", "12345"])
    func corrupt(text: String) throws {
        let json = try JSONEncoder().encode(text)
        #expect(throws: DecodingError.self) { try JSONDecoder().decode(SavedBytes.self, from: json) }
    }
}
