import Basics
import Testing

@Suite("Sizes as users write them")
struct ByteSizeTests {
    static let memoryExamples: [(String, UInt64)] = [
        ("64M", 64 << 20), ("1G", 1 << 30), ("1536M", 1536 << 20),
        ("512", 512 << 20), ("2g", 2 << 30), ("4096K", 4096 << 10),
        ("1GiB", 1 << 30), ("8MB", 8 << 20), ("1T", 1 << 40), ("4096B", 4096),
        (" 64M ", 64 << 20),
    ]

    @Test("Units are binary multiples; a bare number means the default unit (MiB for RAM)", arguments: memoryExamples)
    func parses(text: String, bytes: UInt64) throws {
        #expect(try ByteSize.parse(text, defaultUnit: .mebibytes) == bytes)
    }

    @Test("A bare number is bytes where the default unit is bytes (disk images, like qemu-img)")
    func bareBytes() throws {
        #expect(try ByteSize.parse("4096", defaultUnit: .bytes) == 4096)
        #expect(try ByteSize.parse("10G", defaultUnit: .bytes) == 10 << 30)
        #expect(try ByteSize.parse("1P", defaultUnit: .bytes) == 1 << 50)
    }

    @Test("Text that is not a size is refused with a reason")
    func refusesGarbage() {
        func parse(_ text: String) throws(ByteSize.ParseError) -> UInt64 { try ByteSize.parse(text, defaultUnit: .mebibytes) }
        #expect(throws: ByteSize.ParseError.empty) { try parse("") }
        #expect(throws: ByteSize.ParseError.notANumber("M")) { try parse("M") }
        #expect(throws: ByteSize.ParseError.notANumber("-1G")) { try parse("-1G") }
        #expect(throws: ByteSize.ParseError.unknownUnit("64X")) { try parse("64X") }
        #expect(throws: ByteSize.ParseError.unknownUnit("1.5G")) { try parse("1.5G") }
        #expect(throws: ByteSize.ParseError.tooLarge("99999999999999999999")) { try parse("99999999999999999999") }
        #expect(throws: ByteSize.ParseError.tooLarge("17179869184G")) { try parse("17179869184G") }
    }

    @Test("Exact formatting picks the largest unit that divides the size")
    func formatsExactly() {
        #expect(ByteSize.exact(1536 << 20) == "1536M")
        #expect(ByteSize.exact(2 << 30) == "2G")
        #expect(ByteSize.exact(4096) == "4K")
        #expect(ByteSize.exact(1000) == "1000B")
    }

    @Test("Human formatting as qemu-img's size_to_str: units keeping the figure under 1000, three significant digits")
    func formatsForHumans() {
        #expect(ByteSize.human(0) == "0 B")
        #expect(ByteSize.human(512) == "512 B")
        #expect(ByteSize.human(999) == "999 B")
        #expect(ByteSize.human(1000) == "0.977 KiB")
        #expect(ByteSize.human(1 << 30) == "1 GiB")
        #expect(ByteSize.human(196_608) == "192 KiB")
        #expect(ByteSize.human(1536 << 10) == "1.5 MiB")
        #expect(ByteSize.human(12_345_678) == "11.8 MiB")
        #expect(ByteSize.human(4_194_304) == "4 MiB")
        #expect(ByteSize.human(10 << 40) == "10 TiB")
    }
}
