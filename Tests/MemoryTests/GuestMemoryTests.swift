import Glibc
@testable import Memory
import Testing

@Suite("Guest memory layout and checked translation")
struct GuestMemoryTests {
    @Test("Small RAM is one region at 0")
    func smallLayout() throws {
        let memory = try GuestMemory(size: 2 << 20)
        #expect(memory.regions.count == 1)
        #expect(memory.regions[0].guestBase == 0)
        #expect(memory.regions[0].size == 2 << 20)
        #expect(memory.end == 2 << 20)
    }

    @Test("RAM above 3 GiB continues at 4 GiB, leaving the MMIO hole")
    func layoutAroundHole() {
        let regions = GuestMemory.layout(size: 5 << 30, host: 0x1000_0000)
        #expect(regions.count == 2)
        #expect(regions[0] == GuestMemoryRegion(guestBase: 0, size: 3 << 30, hostAddress: 0x1000_0000))
        #expect(regions[1] == GuestMemoryRegion(guestBase: 4 << 30, size: 2 << 30, hostAddress: 0x1000_0000 + (3 << 30)))
        // Exactly 3 GiB needs no second region.
        #expect(GuestMemory.layout(size: 3 << 30, host: 0).count == 1)
    }

    @Test("A real mapping above 3 GiB translates both sides of the hole")
    func translationAcrossHole() throws {
        let memory = try GuestMemory(size: (3 << 30) + (64 << 20), transparentHugePages: false)
        try memory.store(UInt32(0xDEAD_BEEF), at: (3 << 30) - 4)
        try memory.store(UInt32(0xCAFE_F00D), at: 4 << 30)
        #expect(try memory.load(UInt32.self, at: (3 << 30) - 4) == 0xDEAD_BEEF)
        #expect(try memory.load(UInt32.self, at: 4 << 30) == 0xCAFE_F00D)
        // The hole is not RAM, and no range may span it.
        #expect(memory.buffer(at: 3 << 30, count: 1) == nil)
        #expect(memory.buffer(at: (3 << 30) - 2, count: 4) == nil)
        #expect(memory.buffer(at: (4 << 30) - 1, count: 1) == nil)
        #expect(memory.buffer(at: (4 << 30) + (64 << 20) - 8, count: 8) != nil)
        #expect(memory.buffer(at: (4 << 30) + (64 << 20) - 8, count: 9) == nil)
    }

    @Test("Ranges past the end, or that overflow, are refused")
    func boundsAndOverflow() throws {
        let memory = try GuestMemory(size: 1 << 20)
        #expect(memory.buffer(at: 0, count: 1 << 20) != nil)
        #expect(memory.buffer(at: 0, count: (1 << 20) + 1) == nil)
        #expect(memory.buffer(at: (1 << 20) - 1, count: 2) == nil)
        #expect(memory.buffer(at: 1 << 20, count: 1) == nil)
        #expect(memory.buffer(at: 1 << 20, count: 0) != nil) // empty range at the end
        #expect(memory.buffer(at: UInt64.max, count: 1) == nil)
        #expect(memory.buffer(at: 16, count: UInt64.max) == nil)
        #expect(memory.buffer(at: UInt64.max - 1, count: UInt64.max) == nil)
        #expect(throws: GuestMemoryError.outOfRange(address: 1 << 20, length: 4)) {
            try memory.store(UInt32(1), at: 1 << 20)
        }
        #expect(throws: GuestMemoryError.outOfRange(address: 0xFFFF_FFFF_FFFF_FFF0, length: 32)) {
            _ = try memory.read(at: 0xFFFF_FFFF_FFFF_FFF0, count: 32)
        }
    }

    @Test("Integers are little-endian in guest memory")
    func littleEndian() throws {
        let memory = try GuestMemory(size: 1 << 20)
        try memory.store(UInt32(0x1122_3344), at: 0x100)
        #expect(try memory.read(at: 0x100, count: 4) == [0x44, 0x33, 0x22, 0x11])
        try memory.write([1, 2, 3, 4, 5, 6, 7, 8], at: 0x201) // unaligned
        #expect(try memory.load(UInt64.self, at: 0x201) == 0x0807_0605_0403_0201)
        try memory.zero(at: 0x201, count: 8)
        #expect(try memory.load(UInt64.self, at: 0x201) == 0)
    }

    @Test("Sizes that cannot be guest RAM are refused")
    func invalidSizes() {
        #expect(throws: GuestMemoryError.self) { try GuestMemory(size: 0) }
        #expect(throws: GuestMemoryError.self) { try GuestMemory(size: 4097) }
        #expect(throws: GuestMemoryError.self) { try GuestMemory(size: GuestMemory.maximumSize + 4096) }
    }
}

extension GuestMemory {
    /// Whether `[address, address + count)` is all RAM, as `hostBuffer` would say.
    func buffer(at address: GuestAddress, count: UInt64) -> Bool? {
        contains(address, count: count) ? true : nil
    }
}

@Suite("Ordered access and memfd backing")
struct OrderedAccessTests {
    @Test("Acquire loads and release stores are little-endian and checked for range and alignment")
    func orderedAccess() throws {
        let memory = try GuestMemory(size: 1 << 20, transparentHugePages: false)
        try memory.storeRelease16(0xBEEF, at: 0x1000)
        #expect(try memory.load(UInt16.self, at: 0x1000) == 0xBEEF)
        #expect(try memory.read(at: 0x1000, count: 2) == [0xEF, 0xBE])
        try memory.store(UInt32(0x1234_5678), at: 0x2000)
        #expect(try memory.loadAcquire32(at: 0x2000) == 0x1234_5678)
        #expect(throws: GuestMemoryError.misaligned(address: 0x1001, size: 2)) { try memory.loadAcquire16(at: 0x1001) }
        #expect(throws: GuestMemoryError.outOfRange(address: 1 << 20, length: 4)) { try memory.storeRelease32(1, at: 1 << 20) }
        GuestMemory.fence()
    }

    @Test("withBytes hands out the bytes only inside the closure, and refuses ranges outside RAM")
    func closureScoped() throws {
        let memory = try GuestMemory(size: 1 << 20, transparentHugePages: false)
        try memory.withBytes(at: 0x3000, count: 4) { $0.copyBytes(from: [1, 2, 3, 4]) }
        #expect(try memory.read(at: 0x3000, count: 4) == [1, 2, 3, 4])
        #expect(throws: GuestMemoryError.self) { try memory.withBytes(at: (1 << 20) - 2, count: 4) { _ in } }
    }

    @Test("withBytes(of:) hands out several ranges in order, and refuses the lot when one is outside RAM")
    func severalRanges() throws {
        let memory = try GuestMemory(size: 1 << 20, transparentHugePages: false)
        try memory.withBytes(of: [(address: 0x5000, count: 2), (address: 0x1000, count: 3), (address: 0x9000, count: 0)]) { buffers in
            #expect(buffers.map(\.count) == [2, 3, 0])
            buffers[0].copyBytes(from: [7, 8])
            buffers[1].copyBytes(from: [9, 10, 11])
        }
        #expect(try memory.read(at: 0x5000, count: 2) == [7, 8])
        #expect(try memory.read(at: 0x1000, count: 3) == [9, 10, 11])
        var called = false
        #expect(throws: GuestMemoryError.outOfRange(address: (1 << 20) - 1, length: 2)) {
            try memory.withBytes(of: [(address: 0x1000, count: 1), (address: (1 << 20) - 1, count: 2)]) { _ in called = true }
        }
        #expect(!called)
    }

    @Test("memfd-backed RAM: the file holds what the guest wrote")
    func memfd() throws {
        let memory = try GuestMemory(size: 1 << 20, transparentHugePages: false, backing: .memfd)
        let fd = try #require(memory.memfd)
        try memory.write([0x53, 0x57, 0x49, 0x46, 0x54], at: 0x4000)
        var bytes = [UInt8](repeating: 0, count: 5)
        #expect(bytes.withUnsafeMutableBytes { pread(fd, $0.baseAddress, 5, 0x4000) } == 5)
        #expect(bytes == Array("SWIFT".utf8))
    }
}
