import Memory
import Testing

@Suite("Memory sizes as users write them")
struct MemorySizeTests {
    static let examples: [(String, UInt64)] = [
        ("64M", 64 << 20), ("1G", 1 << 30), ("1536M", 1536 << 20),
        ("512", 512 << 20), ("2g", 2 << 30), ("4096K", 4096 << 10),
        ("1GiB", 1 << 30), ("8MB", 8 << 20), ("1T", 1 << 40), ("4096B", 4096),
        (" 64M ", 64 << 20),
    ]

    @Test("Units are binary multiples; a bare number means MiB", arguments: examples)
    func parses(text: String, bytes: UInt64) throws {
        #expect(try MemorySize.parse(text) == bytes)
    }

    @Test("Text that is not a size is refused with a reason")
    func refusesGarbage() {
        #expect(throws: MemorySize.ParseError.empty) { try MemorySize.parse("") }
        #expect(throws: MemorySize.ParseError.notANumber("M")) { try MemorySize.parse("M") }
        #expect(throws: MemorySize.ParseError.notANumber("-1G")) { try MemorySize.parse("-1G") }
        #expect(throws: MemorySize.ParseError.unknownUnit("64X")) { try MemorySize.parse("64X") }
        #expect(throws: MemorySize.ParseError.unknownUnit("1.5G")) { try MemorySize.parse("1.5G") }
        #expect(throws: MemorySize.ParseError.tooLarge("99999999999999999999")) { try MemorySize.parse("99999999999999999999") }
        #expect(throws: MemorySize.ParseError.tooLarge("17179869184G")) { try MemorySize.parse("17179869184G") }
    }

    @Test("Formatting picks the largest unit that divides the size")
    func formats() {
        #expect(MemorySize.format(1536 << 20) == "1536M")
        #expect(MemorySize.format(2 << 30) == "2G")
        #expect(MemorySize.format(4096) == "4K")
        #expect(MemorySize.format(1000) == "1000B")
    }
}
