@testable import Boot
import Foundation
import Testing

/// The AML builder against the bytes `iasl -oa` (ACPICA 20200925, optimizations off, so
/// names keep their root prefix) produced for the same ASL. The expected bytes are
/// written out here, so these tests need no iasl; ``IASLCrossCheckTests`` compiles with
/// the real tool when it is installed.
@Suite("AML encoding")
struct AMLTests {
    @Test("Name (\\_S5, Package (0x04) { Zero, Zero, Zero, Zero })")
    func sleepPackage() {
        let s5 = AML.name("\\_S5", .package([.integer(0), .integer(0), .integer(0), .integer(0)]))
        #expect(s5.encoded == [0x08, 0x5C, 0x5F, 0x53, 0x35, 0x5F, 0x12, 0x06, 0x04, 0x00, 0x00, 0x00, 0x00])
    }

    @Test("Integers take the shortest encoding")
    func integers() {
        #expect(AML.name("BYT", .integer(0x7F)).encoded == [0x08, 0x42, 0x59, 0x54, 0x5F, 0x0A, 0x7F])
        #expect(AML.name("WRD", .integer(0x1234)).encoded == [0x08, 0x57, 0x52, 0x44, 0x5F, 0x0B, 0x34, 0x12])
        #expect(AML.name("DWD", .integer(0x1234_5678)).encoded == [0x08, 0x44, 0x57, 0x44, 0x5F, 0x0C, 0x78, 0x56, 0x34, 0x12])
        #expect(AML.name("QWD", .integer(0x1234_5678_9ABC_DEF0)).encoded
                == [0x08, 0x51, 0x57, 0x44, 0x5F, 0x0E, 0xF0, 0xDE, 0xBC, 0x9A, 0x78, 0x56, 0x34, 0x12])
        #expect(AML.name("ON1", .integer(1)).encoded == [0x08, 0x4F, 0x4E, 0x31, 0x5F, 0x01])
        #expect(AML.name("ONS", .integer(.max)).encoded == [0x08, 0x4F, 0x4E, 0x53, 0x5F, 0xFF])
        #expect(AML.integer(0).encoded == [0x00])
        #expect(AML.integer(0xFF).encoded == [0x0A, 0xFF])
        #expect(AML.integer(0x100).encoded == [0x0B, 0x00, 0x01])
        #expect(AML.integer(0x1_0000).encoded == [0x0C, 0x00, 0x00, 0x01, 0x00])
        #expect(AML.integer(0x1_0000_0000).encoded == [0x0E, 0, 0, 0, 0, 1, 0, 0, 0])
    }

    @Test("Strings end with NUL")
    func string() {
        #expect(AML.name("STR", .string("Swiftlet")).encoded
                == [0x08, 0x53, 0x54, 0x52, 0x5F, 0x0D] + Array("Swiftlet".utf8) + [0x00])
    }

    @Test("Scope (\\_SB) { Name (\\_SB.PCI0, 0x05) }: a dual name path")
    func scopeAndDualName() {
        let scope = AML.scope("\\_SB", [.name("\\_SB.PCI0", .integer(5))])
        #expect(scope.encoded == [0x10, 0x13, 0x5C, 0x5F, 0x53, 0x42, 0x5F,
                                  0x08, 0x5C, 0x2E, 0x5F, 0x53, 0x42, 0x5F, 0x50, 0x43, 0x49, 0x30, 0x0A, 0x05])
    }

    @Test("Nested packages")
    func nestedPackage() {
        let package = AML.name("PKG", .package([.integer(0x0A), .package([.string("x")])]))
        #expect(package.encoded == [0x08, 0x50, 0x4B, 0x47, 0x5F, 0x12, 0x0A, 0x02, 0x0A, 0x0A, 0x12, 0x05, 0x01, 0x0D, 0x78, 0x00])
    }

    @Test("PkgLength: one byte up to 63, then two and three bytes (as iasl encodes them)")
    func packageLengths() {
        // 30 elements of 0x7F: 61 bytes follow, 62 with the length byte.
        let thirty = AML.package(Array(repeating: .integer(0x7F), count: 30)).encoded
        #expect(Array(thirty.prefix(3)) == [0x12, 0x3E, 0x1E])
        // 100 elements: 201 bytes follow, 203 with two length bytes = 0xCB.
        let hundred = AML.package(Array(repeating: .integer(0x7F), count: 100)).encoded
        #expect(Array(hundred.prefix(4)) == [0x12, 0x4B, 0x0C, 0x64])
        #expect(hundred.count == 1 + 2 + 201)
        // Scope (\_SB) { Name (BIG, "a" x 4200) }: 4212 bytes, 4215 with three length bytes.
        let big = AML.scope("\\_SB", [.name("BIG", .string(String(repeating: "a", count: 4200)))]).encoded
        #expect(Array(big.prefix(9)) == [0x10, 0x87, 0x07, 0x01, 0x5C, 0x5F, 0x53, 0x42, 0x5F])
        // The edges between the sizes.
        #expect(AML.packageLength(62) == [0x3F])
        #expect(AML.packageLength(63) == [0x41, 0x04])
        #expect(AML.packageLength(0xFFF - 2) == [0x4F, 0xFF])
        #expect(AML.packageLength(0xFFF - 1) == [0x81, 0x00, 0x01])
        #expect(AML.packageLength(0xF_FFFF - 3) == [0x8F, 0xFF, 0xFF])
        #expect(AML.packageLength(0xF_FFFF - 2) == [0xC1, 0x00, 0x00, 0x01])
    }

    @Test("Name strings: root and parent prefixes, padding, three segments")
    func nameStrings() {
        #expect(AML.nameString("\\") == [0x5C, 0x00])
        #expect(AML.nameString("^^AB") == [0x5E, 0x5E, 0x41, 0x42, 0x5F, 0x5F])
        #expect(AML.nameString("\\_SB.PCI0.S08") == [0x5C, 0x2F, 0x03] + Array("_SB_PCI0S08_".utf8))
        #expect(AML.isNameSegment(ArraySlice("_S5".utf8)))
        #expect(!AML.isNameSegment(ArraySlice("5S".utf8)))
        #expect(!AML.isNameSegment(ArraySlice("ABCDE".utf8)))
        #expect(!AML.isNameSegment(ArraySlice("ab".utf8)))
        #expect(!AML.isNameSegment(ArraySlice("".utf8)))
    }
}
