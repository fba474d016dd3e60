import Boot
import Memory
import Testing

@Suite("e820 map")
struct E820Tests {
    @Test func smallMemory() throws {
        let map = E820Map.build(for: try Images.memory(64 << 20))
        #expect(map == [
            E820Entry(address: 0, size: 0x9FC00, kind: .ram),
            E820Entry(address: 0x9FC00, size: 0x100000 - 0x9FC00, kind: .reserved),
            E820Entry(address: 0x100000, size: (64 << 20) - 0x100000, kind: .ram),
        ])
    }

    @Test func memoryAboveTheHoleContinuesAt4GiB() throws {
        let memory = try Images.memory(4 << 30)
        let map = E820Map.build(for: memory)
        #expect(map.count == 4)
        #expect(map[2] == E820Entry(address: 0x100000, size: 0xC000_0000 - 0x100000, kind: .ram))
        #expect(map[3] == E820Entry(address: 0x1_0000_0000, size: 1 << 30, kind: .ram))
        // Nothing covers the MMIO hole.
        #expect(!map.contains { $0.address < 0xFEC0_0000 && $0.end > 0xFEC0_0000 })
    }

    @Test func tinyMemory() throws {
        let map = E820Map.build(for: try Images.memory(256 << 10))
        #expect(map == [E820Entry(address: 0, size: 256 << 10, kind: .ram)])
    }

    @Test("Reserved device ranges (the PCI ECAM) are listed as reserved, in address order")
    func reservedRanges() throws {
        let memory = try Images.memory(64 << 20)
        let map = E820Map.build(for: memory, reserving: [0xE000_0000..<0xE010_0000, 0xD000_0000..<0xD000_0000])
        #expect(map == E820Map.build(for: memory) + [E820Entry(address: 0xE000_0000, size: 0x10_0000, kind: .reserved)])
        let unordered = E820Map.build(for: memory, reserving: [0xF000_0000..<0xF000_1000, 0xE000_0000..<0xE010_0000])
        #expect(unordered.map(\.address) == [0, 0x9FC00, 0x100000, 0xE000_0000, 0xF000_0000])
        #expect(unordered.suffix(2).allSatisfy { $0.kind == .reserved })
    }
}
