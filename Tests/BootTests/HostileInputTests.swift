import Boot
import Memory
import Testing

/// Loaders must turn any file into either a load or a typed error, never a trap.
@Suite("Hostile input")
struct HostileInputTests {
    /// A small deterministic generator (xorshift64*), so failures reproduce.
    struct Generator {
        var state: UInt64
        mutating func next() -> UInt64 {
            state ^= state >> 12; state ^= state << 25; state ^= state >> 27
            return state &* 0x2545_F491_4F6C_DD1D
        }
        mutating func below(_ bound: Int) -> Int { Int(next() % UInt64(bound)) }
    }

    static func seeds() -> [[UInt8]] {
        var bz = Images.BzImageSpec()
        bz.protectedMode = [UInt8](repeating: 0x90, count: 512) + Compress.gzip(DecompressionTests.vmlinux)
        bz.payloadOffset = 512
        bz.payloadLength = UInt32(bz.protectedMode.count - 512)
        return [
            Images.bzImage(),
            Images.bzImage(bz),
            VmlinuxTests.vmlinux(pvh: 0x100_0850),
            MultibootTests.flat(),
            Images.multibootHeader(addresses: (header: 0x10_0000, load: 0x10_0000, loadEnd: 0, bssEnd: 0x10_2000,
                                               entry: 0x10_0000)) + Images.pattern(200),
        ]
    }

    /// Offsets worth hitting: the setup header, ELF and program headers, notes, the
    /// multiboot header; plus anywhere.
    static let hotRanges: [Range<Int>] = [0x1F0..<0x270, 0..<0x100, 0x100..<0x200]

    @Test(arguments: 0..<5)
    func mutatedImagesNeverTrap(seedIndex: Int) throws {
        let memory = try Images.memory(64 << 20)
        var generator = Generator(state: 0x9E37_79B9_7F4A_7C15 &+ UInt64(seedIndex))
        let seed = Self.seeds()[seedIndex]
        var loaded = 0, refused = 0
        for _ in 0..<300 {
            var image = seed
            for _ in 0..<(1 + generator.below(6)) {
                let range = Self.hotRanges[generator.below(Self.hotRanges.count)]
                let index = generator.below(4) == 0 ? generator.below(image.count)
                                                     : min(range.lowerBound + generator.below(range.count), image.count - 1)
                switch generator.below(4) {
                case 0: image[index] = UInt8(truncatingIfNeeded: generator.next())
                case 1: image[index] = 0xFF
                case 2: image[index] = 0
                default: image[index] ^= UInt8(1 << generator.below(8))
                }
            }
            if generator.below(8) == 0 { image = Array(image.prefix(generator.below(image.count) + 1)) }
            _ = KernelImage.detect(image)
            do {
                _ = try KernelImage.load(image, into: memory, options: BootOptions(initrd: [1, 2, 3], cpuCount: 2))
                loaded += 1
            } catch {
                #expect(!error.description.isEmpty && !error.description.contains("\n"))
                refused += 1
            }
        }
        #expect(loaded + refused == 300)
    }

    @Test func hugePrefAddressAndInitSizeDoNotWrap() throws {
        var spec = Images.BzImageSpec()
        spec.prefAddress = 0xFFFF_FFFF_FFE0_0000
        spec.initSize = 0x40_0000
        let error = #expect(throws: BootError.self) {
            try KernelImage.load(Images.bzImage(spec), into: try Images.memory(), options: BootOptions(decompressOnHost: false))
        }
        guard case .kernelTooLarge = error else { Issue.record("got \(String(describing: error))"); return }
    }
}
