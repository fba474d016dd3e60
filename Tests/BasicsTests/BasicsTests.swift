import Basics
import Glibc
import Synchronization
import Testing

@Suite("Hex, endian reads and threads")
struct BasicsTests {
    @Test("Hex pads to a width and never truncates")
    func hex() {
        #expect(Hex.digits(0x3F8, width: 4) == "03f8")
        #expect(Hex.digits(0x12345, width: 2) == "12345")
        #expect(Hex.prefixed(UInt8(255)) == "0xff")
    }

    @Test("Endian reads return nil past the end instead of trapping")
    func endianReads() {
        let bytes: [UInt8] = [0x01, 0x02, 0x03, 0x04]
        #expect(bytes.le(UInt32.self, at: 0) == 0x0403_0201)
        #expect(bytes.be(UInt32.self, at: 0) == 0x0102_0304)
        #expect(bytes.le(UInt16.self, at: 2) == 0x0403)
        #expect(bytes.le(UInt32.self, at: 1) == nil)
        #expect(bytes.le(UInt8.self, at: -1) == nil)
        #expect(bytes.le(UInt64.self, at: UInt64.max) == nil)
        #expect(bytes.contains(offset: UInt64.max, length: 2) == false)
        #expect(alignUp(UInt64.max, 4096) == nil)
        #expect(alignUp(4097, 4096) == 8192)
    }

    @Test("A named thread runs, can be signalled after its body returned, and joins")
    func thread() throws {
        let ran = Mutex(false)
        let thread = try NamedThread(name: "basics-test") { ran.withLock { $0 = true } }
        thread.join()
        #expect(ran.withLock { $0 })
        thread.signal(0) // after join: ignored, no crash
    }
}
