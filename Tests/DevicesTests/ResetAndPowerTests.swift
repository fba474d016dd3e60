import Devices
import Synchronization
import Testing

@Suite("Reset control register (port 0xCF9)")
struct ResetControlTests {
    @Test func bitTwoStartsTheResetWithTheByteWritten() {
        let resets = ValueRecorder<UInt8>()
        let register = ResetControl { resets.append($0) }
        Port.write8(register, 0, 0x06)
        #expect(resets.values == [0x06])
        Port.write8(register, 0, 0x04)
        Port.write8(register, 0, 0x0E)
        #expect(resets.values == [0x06, 0x04, 0x0E])
    }

    @Test("Linux's reboot=pci: 0x02 first (no reset), read back, then 0x06")
    func linuxSequence() {
        let resets = ValueRecorder<UInt8>()
        let register = ResetControl { resets.append($0) }
        #expect(Port.read8(register, 0) == 0x00)
        Port.write8(register, 0, 0x02)
        #expect(resets.values.isEmpty)
        #expect(Port.read8(register, 0) == 0x02)
        let value = Port.read8(register, 0) & ~0x06
        Port.write8(register, 0, value | 0x06)
        #expect(resets.values == [0x06])
    }

    @Test("Bits 1 and 3 read back; bit 2 and the others read 0")
    func readBack() {
        let register = ResetControl { _ in }
        Port.write8(register, 0, 0x0A)
        #expect(Port.read8(register, 0) == 0x0A)
        Port.write8(register, 0, 0xF1)
        #expect(Port.read8(register, 0) == 0x00)
        Port.write8(register, 0, 0x0E)
        #expect(Port.read8(register, 0) == 0x0A)
    }

    @Test("Only 1-byte accesses reach the register (0xCF8-0xCFF is also PCI configuration)")
    func wideAccessesAreNotTheRegister() {
        let resets = ValueRecorder<UInt8>()
        let register = ResetControl { resets.append($0) }
        Port.write16(register, 0, 0x0606)
        Port.write32(register, 0, 0x0606_0606)
        #expect(resets.values.isEmpty)
        Port.write8(register, 0, 0x02)
        #expect(Port.read16(register, 0) == 0xFFFF)
        #expect(Port.read8(register, 0) == 0x02)
    }

    @Test func resetKinds() {
        #expect(ResetControl.describe(0x04) == "soft reset")
        #expect(ResetControl.describe(0x06) == "hard reset")
        #expect(ResetControl.describe(0x0E) == "full reset")
    }

    @Test("The FADT's reset register is this register, and its value resets")
    func acpiResetRegister() {
        let resets = ValueRecorder<UInt8>()
        let register = ResetControl { resets.append($0) }
        #expect(ACPILayout.resetRegister == 0xCF9)
        Port.write8(register, 0, ACPILayout.resetValue)
        #expect(resets.values == [ACPILayout.resetValue])
    }
}

@Suite("System control port A (port 0x92)")
struct SystemControlPortATests {
    @Test("Starts with A20 enabled, bit 1 reads back what was written")
    func a20ReadsBack() {
        let port = SystemControlPortA {}
        #expect(Port.read8(port, 0) == 0x02)
        Port.write8(port, 0, 0x00)
        #expect(Port.read8(port, 0) == 0x00)
        Port.write8(port, 0, 0x02)
        #expect(Port.read8(port, 0) == 0x02)
    }

    @Test("Bit 0 resets on a rising edge only")
    func fastResetOnRisingEdge() {
        let resets = Counter()
        let port = SystemControlPortA { resets.increment() }
        Port.write8(port, 0, 0x03)
        #expect(resets.count == 1)
        #expect(Port.read8(port, 0) == 0x03)
        Port.write8(port, 0, 0x03)          // still 1: no edge
        #expect(resets.count == 1)
        Port.write8(port, 0, 0x02)
        #expect(resets.count == 1)
        Port.write8(port, 0, 0x01)
        #expect(resets.count == 2)
    }

    @Test func wideAccessesAreIgnored() {
        let resets = Counter()
        let port = SystemControlPortA { resets.increment() }
        Port.write16(port, 0, 0x0101)
        #expect(resets.count == 0)
        #expect(Port.read16(port, 0) == 0xFFFF)
        #expect(Port.read8(port, 0) == 0x02)
    }
}

@Suite("ACPI PM1a registers and PM timer (ports 0x600-0x60B)")
struct ACPIPowerManagementTests {
    /// A clock the test moves by hand.
    final class ManualClock: Sendable {
        let now = Mutex<UInt64>(1_000_000)
        func advance(nanoseconds: UInt64) { now.withLock { $0 += nanoseconds } }
        var reading: @Sendable () -> UInt64 { { [self] in now.withLock { $0 } } }
    }

    func device(clock: ManualClock = ManualClock(), powerOffs: Counter = Counter()) -> ACPIPowerManagement {
        ACPIPowerManagement(clock: clock.reading) { powerOffs.increment() }
    }

    static let control: UInt64 = 4
    static let timer: UInt64 = 8

    @Test("The layout is QEMU's PIIX4 one, and the device covers it")
    func layout() {
        #expect(ACPILayout.pm1aEventBlock == 0x600)
        #expect(ACPILayout.pm1aControlBlock == 0x604)
        #expect(ACPILayout.pmTimerBlock == 0x608)
        #expect(ACPILayout.powerManagementBase + ACPILayout.powerManagementLength
                == ACPILayout.pmTimerBlock + UInt64(ACPILayout.pmTimerLength))
    }

    @Test("SLP_TYP 0 with SLP_EN (S5) powers off; SLP_TYP alone does not")
    func s5PowersOff() {
        let powerOffs = Counter()
        let pm = device(powerOffs: powerOffs)
        // What ACPICA does: SLP_TYP first, then SLP_TYP | SLP_EN.
        Port.write16(pm, Self.control, 0x0001)
        #expect(powerOffs.count == 0)
        Port.write16(pm, Self.control, 0x2001)
        #expect(powerOffs.count == 1)
    }

    @Test("Other sleep types are ignored: the DSDT offers only S5")
    func otherSleepTypesAreIgnored() {
        let powerOffs = Counter()
        let pm = device(powerOffs: powerOffs)
        for sleepType: UInt16 in 1...7 {
            Port.write16(pm, Self.control, 0x2000 | sleepType << 10)
        }
        #expect(powerOffs.count == 0)
        // SLP_TYP is kept, SLP_EN reads 0.
        #expect(Port.read16(pm, Self.control) == 0x1C01)
    }

    @Test("A byte write to PM1_CNT's high byte works (SLP_EN is bit 5 of 0x605)")
    func byteWrites() {
        let powerOffs = Counter()
        let pm = device(powerOffs: powerOffs)
        Port.write8(pm, Self.control + 1, 0x04)      // SLP_TYP 1, no SLP_EN
        #expect(Port.read8(pm, Self.control + 1) == 0x04)
        Port.write8(pm, Self.control, 0x02)          // low byte: BM_RLD; SLP_TYP stays
        #expect(Port.read16(pm, Self.control) == 0x0403)
        Port.write8(pm, Self.control + 1, 0x24)      // SLP_EN with SLP_TYP 1: ignored
        #expect(powerOffs.count == 0)
        Port.write8(pm, Self.control + 1, 0x20)      // SLP_EN with SLP_TYP 0: S5
        #expect(powerOffs.count == 1)
    }

    @Test("A 32-bit write at 0x604 reaches PM1_CNT; the timer ignores writes")
    func wideWrites() {
        let powerOffs = Counter()
        let pm = device(powerOffs: powerOffs)
        Port.write32(pm, Self.control, 0xFFFF_2000)
        #expect(powerOffs.count == 1)
        let before = Port.read32(pm, Self.timer)
        Port.write32(pm, Self.timer, 0x1234_5678)
        #expect(Port.read32(pm, Self.timer) == before)
    }

    @Test("SCI_EN always reads 1: the machine is always in ACPI mode")
    func sciEnable() {
        let pm = device()
        #expect(Port.read16(pm, Self.control) == 0x0001)
        Port.write16(pm, Self.control, 0x0000)
        #expect(Port.read16(pm, Self.control) & 1 == 1)
        // GBL_RLS (bit 2) is write-only.
        Port.write16(pm, Self.control, 0x0004)
        #expect(Port.read16(pm, Self.control) == 0x0001)
    }

    @Test("PM1_EN keeps the defined enable bits, as ACPICA checks")
    func enableBitsStick() {
        let pm = device()
        Port.write16(pm, 2, 0xFFFF)
        #expect(Port.read16(pm, 2) == 0x4721)
        Port.write16(pm, 2, 0x0020)                  // GBL_EN
        #expect(Port.read16(pm, 2) == 0x0020)
        // A 32-bit access at 0x600 reads PM1_STS and PM1_EN together.
        #expect(Port.read32(pm, 0) == 0x0020_0000)
    }

    @Test("The timer counts at 3.579545 MHz, 24 bits, from the clock")
    func timerRate() {
        let clock = ManualClock()
        let pm = device(clock: clock)
        #expect(Port.read32(pm, Self.timer) == 0)
        clock.advance(nanoseconds: 1_000_000)            // 1 ms: 3579.545 ticks
        #expect(Port.read32(pm, Self.timer) == 3579)
        clock.advance(nanoseconds: 999_000_000)          // 1 s in all
        #expect(Port.read32(pm, Self.timer) == 3_579_545)
        clock.advance(nanoseconds: 4_000_000_000)        // 5 s: 17 897 725 ticks, past 2^24
        #expect(Port.read32(pm, Self.timer) == 17_897_725 & 0xFF_FFFF)
        #expect(Port.read8(pm, Self.timer + 3) == 0)
        // Days of uptime: no overflow trap, still 24 bits.
        clock.advance(nanoseconds: 400_000 * 1_000_000_000)
        #expect(Port.read32(pm, Self.timer) <= 0xFF_FFFF)
    }

    @Test("TMR_STS is set when bit 23 of the timer changes, and cleared by writing 1")
    func timerStatus() {
        let clock = ManualClock()
        let pm = device(clock: clock)
        #expect(Port.read16(pm, 0) == 0)
        // 2^23 ticks at 3.579545 MHz is 2.3435 s.
        clock.advance(nanoseconds: 2_300_000_000)
        #expect(Port.read16(pm, 0) == 0)
        clock.advance(nanoseconds: 100_000_000)
        #expect(Port.read16(pm, 0) == 1)
        Port.write16(pm, 0, 0xFFFE)                  // writing 0 to bit 0 leaves it
        #expect(Port.read16(pm, 0) == 1)
        Port.write16(pm, 0, 0x0001)
        #expect(Port.read16(pm, 0) == 0)
        clock.advance(nanoseconds: 2_400_000_000)
        #expect(Port.read16(pm, 0) == 1)
    }

    @Test("Bytes 6-7 and past the end read all ones")
    func holes() {
        let pm = device()
        #expect(Port.read16(pm, 6) == 0xFFFF)
        #expect(Port.read8(pm, 12) == 0xFF)
        #expect(Port.read16(pm, 11) == 0xFF00)
        // A write that runs past the end does nothing past it.
        Port.write16(pm, 11, 0xFFFF)
        Port.write8(pm, UInt64.max, 0xFF)
        #expect(Port.read8(pm, UInt64.max) == 0xFF)
    }
}

/// Values a device callback passed, in order.
final class ValueRecorder<Value: Sendable>: Sendable {
    private let storage = Mutex<[Value]>([])
    func append(_ value: Value) { storage.withLock { $0.append(value) } }
    var values: [Value] { storage.withLock { $0 } }
}
