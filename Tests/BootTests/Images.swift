import Boot
import Memory

/// Builders for small synthetic kernel images, so every loader path is tested without
/// real kernels.
enum Images {
    static func put<T: FixedWidthInteger>(_ value: T, _ bytes: inout [UInt8], _ offset: Int) {
        withUnsafeBytes(of: value.littleEndian) { raw in
            for index in 0..<raw.count { bytes[offset + index] = raw[index] }
        }
    }

    static func u32(_ bytes: [UInt8], _ offset: Int) -> UInt32 {
        (0..<4).reduce(UInt32(0)) { $0 | UInt32(bytes[offset + $1]) << (8 * $1) }
    }

    struct BzImageSpec {
        var version: UInt16 = 0x020F
        var setupSects: UInt8 = 1
        var protectedMode: [UInt8] = [UInt8](repeating: 0x90, count: 4096)
        var xloadflags: UInt16 = 0x1
        var loadflags: UInt8 = 0x1
        var cmdlineSize: UInt32 = 255
        var initrdAddrMax: UInt32 = 0x7FFF_FFFF
        var kernelAlignment: UInt32 = 0x20_0000
        var relocatable: UInt8 = 1
        var prefAddress: UInt64 = 0x100_0000
        var initSize: UInt32 = 0x40_0000
        var payloadOffset: UInt32 = 0
        var payloadLength: UInt32 = 0
    }

    /// A bzImage: boot sector + setup sectors with the header, then the protected-mode part.
    static func bzImage(_ spec: BzImageSpec = BzImageSpec()) -> [UInt8] {
        let setupSize = (Int(spec.setupSects == 0 ? 4 : spec.setupSects) + 1) * 512
        var paragraphs = spec.protectedMode
        while paragraphs.count % 16 != 0 { paragraphs.append(0) }
        var bytes = [UInt8](repeating: 0, count: setupSize) + paragraphs
        bytes[0x1F1] = spec.setupSects
        put(UInt32(paragraphs.count / 16), &bytes, 0x1F4)
        put(UInt16(0xAA55), &bytes, 0x1FE)
        bytes[0x200] = 0xEB
        bytes[0x201] = 0x6A          // header ends at 0x26C
        put(UInt32(0x5372_6448), &bytes, 0x202)
        put(spec.version, &bytes, 0x206)
        bytes[0x211] = spec.loadflags
        put(UInt32(0x100000), &bytes, 0x214)
        put(spec.initrdAddrMax, &bytes, 0x22C)
        put(spec.kernelAlignment, &bytes, 0x230)
        bytes[0x234] = spec.relocatable
        put(spec.xloadflags, &bytes, 0x236)
        put(spec.cmdlineSize, &bytes, 0x238)
        put(spec.payloadOffset, &bytes, 0x248)
        put(spec.payloadLength, &bytes, 0x24C)
        put(spec.prefAddress, &bytes, 0x258)
        put(spec.initSize, &bytes, 0x260)
        return bytes
    }

    struct Segment {
        var physical: UInt64
        var virtual: UInt64
        var data: [UInt8]
        var memorySize: UInt64
        init(physical: UInt64, virtual: UInt64? = nil, data: [UInt8], memorySize: UInt64? = nil) {
            self.physical = physical; self.virtual = virtual ?? physical
            self.data = data; self.memorySize = memorySize ?? UInt64(data.count)
        }
    }

    /// An ELF note (name padded to 4, descriptor padded to 4).
    static func note(name: String, type: UInt32, desc: [UInt8]) -> [UInt8] {
        var bytes = [UInt8](repeating: 0, count: 12)
        let nameBytes = Array(name.utf8) + [0]
        put(UInt32(nameBytes.count), &bytes, 0)
        put(UInt32(desc.count), &bytes, 4)
        put(type, &bytes, 8)
        bytes += nameBytes
        while bytes.count % 4 != 0 { bytes.append(0) }
        bytes += desc
        while bytes.count % 4 != 0 { bytes.append(0) }
        return bytes
    }

    static func pvhNote(_ entry: UInt32) -> [UInt8] {
        var desc = [UInt8](repeating: 0, count: 8)
        put(UInt64(entry), &desc, 0)
        return note(name: "Linux", type: 1, desc: [1, 2, 3, 4]) + note(name: "Xen", type: 18, desc: desc)
    }

    /// An ELF executable with PT_LOAD segments, an optional PT_NOTE, and `prefix` bytes
    /// (e.g. a multiboot header) right after the program headers.
    static func elf(is64: Bool, machine: UInt16? = nil, entry: UInt64, segments: [Segment],
                    notes: [UInt8]? = nil, prefix: [UInt8] = []) -> [UInt8] {
        let headerSize = is64 ? 64 : 52
        let phentsize = is64 ? 56 : 32
        let phnum = segments.count + (notes == nil ? 0 : 1)
        var bytes = [UInt8](repeating: 0, count: headerSize + phentsize * phnum)
        bytes += prefix
        var dataOffsets: [Int] = []
        for segment in segments {
            while bytes.count % 16 != 0 { bytes.append(0) }
            dataOffsets.append(bytes.count)
            bytes += segment.data
        }
        var noteOffset = 0
        if let notes {
            while bytes.count % 4 != 0 { bytes.append(0) }
            noteOffset = bytes.count
            bytes += notes
        }
        bytes[0] = 0x7F; bytes[1] = 0x45; bytes[2] = 0x4C; bytes[3] = 0x46
        bytes[4] = is64 ? 2 : 1
        bytes[5] = 1
        bytes[6] = 1
        put(UInt16(2), &bytes, 16)
        put(machine ?? (is64 ? 62 : 3), &bytes, 18)
        put(UInt32(1), &bytes, 20)
        if is64 {
            put(entry, &bytes, 24)
            put(UInt64(64), &bytes, 32)
            put(UInt16(64), &bytes, 52)
            put(UInt16(phentsize), &bytes, 54)
            put(UInt16(phnum), &bytes, 56)
        } else {
            put(UInt32(entry), &bytes, 24)
            put(UInt32(52), &bytes, 28)
            put(UInt16(52), &bytes, 40)
            put(UInt16(phentsize), &bytes, 42)
            put(UInt16(phnum), &bytes, 44)
        }
        func programHeader(_ index: Int, type: UInt32, offset: Int, virtual: UInt64, physical: UInt64,
                           fileSize: Int, memorySize: UInt64) {
            let base = headerSize + index * phentsize
            if is64 {
                put(type, &bytes, base); put(UInt32(7), &bytes, base + 4)
                put(UInt64(offset), &bytes, base + 8); put(virtual, &bytes, base + 16)
                put(physical, &bytes, base + 24); put(UInt64(fileSize), &bytes, base + 32)
                put(memorySize, &bytes, base + 40); put(UInt64(16), &bytes, base + 48)
            } else {
                put(type, &bytes, base); put(UInt32(offset), &bytes, base + 4)
                put(UInt32(truncatingIfNeeded: virtual), &bytes, base + 8)
                put(UInt32(truncatingIfNeeded: physical), &bytes, base + 12)
                put(UInt32(fileSize), &bytes, base + 16); put(UInt32(truncatingIfNeeded: memorySize), &bytes, base + 20)
                put(UInt32(7), &bytes, base + 24); put(UInt32(16), &bytes, base + 28)
            }
        }
        for (index, segment) in segments.enumerated() {
            programHeader(index, type: 1, offset: dataOffsets[index], virtual: segment.virtual,
                          physical: segment.physical, fileSize: segment.data.count, memorySize: segment.memorySize)
        }
        if let notes {
            programHeader(segments.count, type: 4, offset: noteOffset, virtual: 0, physical: 0,
                          fileSize: notes.count, memorySize: UInt64(notes.count))
        }
        return bytes
    }

    /// A multiboot v1 header; with `addresses` the a.out kludge fields follow.
    static func multibootHeader(flags: UInt32 = 0, addresses: (header: UInt32, load: UInt32, loadEnd: UInt32,
                                                                bssEnd: UInt32, entry: UInt32)? = nil) -> [UInt8] {
        var flags = flags
        if addresses != nil { flags |= 1 << 16 }
        var bytes = [UInt8](repeating: 0, count: addresses == nil ? 12 : 32)
        put(UInt32(0x1BAD_B002), &bytes, 0)
        put(flags, &bytes, 4)
        put(0 &- (UInt32(0x1BAD_B002) &+ flags), &bytes, 8)
        if let addresses {
            put(addresses.header, &bytes, 12); put(addresses.load, &bytes, 16)
            put(addresses.loadEnd, &bytes, 20); put(addresses.bssEnd, &bytes, 24)
            put(addresses.entry, &bytes, 28)
        }
        return bytes
    }

    static func memory(_ size: UInt64 = 64 << 20) throws -> GuestMemory {
        try GuestMemory(size: size, transparentHugePages: false)
    }

    static func pattern(_ count: Int, seed: UInt8 = 1) -> [UInt8] {
        (0..<count).map { UInt8(truncatingIfNeeded: $0 &* 7 &+ Int(seed)) }
    }
}
