import Devices
import Testing

@Suite("CMOS real-time clock")
struct CMOSTests {
    /// 2026-11-22 05:07:09 UTC, a Sunday.
    static let instant: Int64 = 1_795_324_029

    func read(_ cmos: CMOS, _ index: UInt8) -> UInt8 {
        Port.write8(cmos, 0, index)
        return Port.read8(cmos, 1)
    }

    @Test func timeIsBCDFromTheClock() {
        let cmos = CMOS(ramBelow4G: 64 << 20, now: { Self.instant })
        #expect(read(cmos, 0x00) == 0x09)
        #expect(read(cmos, 0x02) == 0x07)
        #expect(read(cmos, 0x04) == 0x05)
        #expect(read(cmos, 0x07) == 0x22)
        #expect(read(cmos, 0x08) == 0x11)
        #expect(read(cmos, 0x09) == 0x26)
        #expect(read(cmos, 0x32) == 0x20)
        #expect(read(cmos, 0x06) == 0x01)     // Sunday
        // The NMI-disable bit in the index does not change the register.
        #expect(read(cmos, 0x80 | 0x09) == 0x26)
    }

    @Test func binaryAnd12HourModes() {
        let cmos = CMOS(ramBelow4G: 64 << 20, now: { Self.instant + 10 * 3600 })   // 15:07:09
        Port.write8(cmos, 0, 0x0B)
        Port.write8(cmos, 1, 0x04)            // binary, 12-hour
        #expect(read(cmos, 0x00) == 9)
        #expect(read(cmos, 0x04) == 0x80 | 3)
        #expect(read(cmos, 0x09) == 26)
    }

    @Test func statusRegisters() {
        let cmos = CMOS(ramBelow4G: 64 << 20, now: { 0 })
        #expect(read(cmos, 0x0A) & 0x80 == 0)   // no update in progress
        #expect(read(cmos, 0x0B) & 0x02 != 0)   // 24-hour
        #expect(read(cmos, 0x0C) == 0)
        #expect(read(cmos, 0x0D) == 0x80)
        Port.write8(cmos, 0, 0x0D)
        Port.write8(cmos, 1, 0)
        #expect(read(cmos, 0x0D) == 0x80)
    }

    @Test func memorySizeBytes() {
        let cmos = CMOS(ramBelow4G: 0xC000_0000, ramAbove4G: 1 << 30, cpuCount: 4, now: { 0 })
        #expect(UInt16(read(cmos, 0x15)) | UInt16(read(cmos, 0x16)) << 8 == 640)
        #expect(UInt16(read(cmos, 0x30)) | UInt16(read(cmos, 0x31)) << 8 == 0xFFFF)
        #expect(UInt16(read(cmos, 0x34)) | UInt16(read(cmos, 0x35)) << 8 == UInt16((0xC000_0000 - 0x100_0000) / 65536))
        #expect(UInt32(read(cmos, 0x5B)) | UInt32(read(cmos, 0x5C)) << 8 | UInt32(read(cmos, 0x5D)) << 16 == (1 << 30) / 65536)
        #expect(read(cmos, 0x5F) == 3)
        let small = CMOS(ramBelow4G: 32 << 20, now: { 0 })
        #expect(UInt16(read(small, 0x30)) | UInt16(read(small, 0x31)) << 8 == 31 * 1024)
        #expect(UInt16(read(small, 0x34)) | UInt16(read(small, 0x35)) << 8 == 256)
    }

    @Test func plainMemoryIsWritable() {
        let cmos = CMOS(ramBelow4G: 64 << 20, now: { 0 })
        Port.write8(cmos, 0, 0x40)
        Port.write8(cmos, 1, 0xA5)
        #expect(read(cmos, 0x40) == 0xA5)
        Port.write8(cmos, 0, 0x00)
        Port.write8(cmos, 1, 0x59)            // clock writes are ignored
        #expect(read(cmos, 0x00) == 0x00)
    }

    @Test func epochAndLeapDays() {
        let epoch = CMOS(ramBelow4G: 64 << 20, now: { 0 })
        #expect(read(epoch, 0x09) == 0x70 && read(epoch, 0x32) == 0x19 && read(epoch, 0x07) == 0x01)
        #expect(read(epoch, 0x06) == 0x05)   // Thursday
        let leap = CMOS(ramBelow4G: 64 << 20, now: { 951_782_400 })   // 2000-02-29 00:00:00
        #expect(read(leap, 0x08) == 0x02 && read(leap, 0x07) == 0x29 && read(leap, 0x09) == 0x00)
    }
}
