import Layout
import Boot
import CLz4
import CLzma
import CZlib
import CZstd
import Memory
import Testing

/// Compressors for the tests, with the kernel build's conventions (`size_append`: the
/// uncompressed size as 4 little-endian bytes after lz4 and zstd data).
enum Compress {
    static func sizeTrailer(_ count: Int) -> [UInt8] {
        withUnsafeBytes(of: UInt32(count).littleEndian) { Array($0) }
    }

    static func gzip(_ input: [UInt8]) -> [UInt8] {
        var stream = z_stream()
        _ = deflateInit2_(&stream, 9, Z_DEFLATED, 31, 8, Z_DEFAULT_STRATEGY, zlibVersion(), Int32(MemoryLayout<z_stream>.size))
        var output = [UInt8](repeating: 0, count: Int(deflateBound(&stream, UInt(input.count))) + 64)
        var input = input
        let produced = input.withUnsafeMutableBufferPointer { inBuffer in
            output.withUnsafeMutableBufferPointer { outBuffer in
                stream.next_in = inBuffer.baseAddress; stream.avail_in = UInt32(inBuffer.count)
                stream.next_out = outBuffer.baseAddress; stream.avail_out = UInt32(outBuffer.count)
                _ = deflate(&stream, Z_FINISH)
                return outBuffer.count - Int(stream.avail_out)
            }
        }
        deflateEnd(&stream)
        return Array(output.prefix(produced))
    }

    static func xz(_ input: [UInt8]) -> [UInt8] {
        var output = [UInt8](repeating: 0, count: input.count + input.count / 2 + 4096)
        var position = 0
        let capacity = output.count
        _ = lzma_easy_buffer_encode(6, LZMA_CHECK_CRC32, nil, input, input.count, &output, &position, capacity)
        return Array(output.prefix(position))
    }

    static func zstd(_ input: [UInt8]) -> [UInt8] {
        var output = [UInt8](repeating: 0, count: ZSTD_compressBound(input.count))
        let capacity = output.count
        let size = ZSTD_compress(&output, capacity, input, input.count, 19)
        return Array(output.prefix(size)) + sizeTrailer(input.count)
    }

    /// The legacy LZ4 frame: magic, then (size, block) per 8 MiB of input.
    static func lz4Legacy(_ input: [UInt8]) -> [UInt8] {
        var output: [UInt8] = [0x02, 0x21, 0x4C, 0x18]
        var start = 0
        while start < input.count {
            let chunk = Array(input[start..<min(start + (8 << 20), input.count)])
            var block = [UInt8](repeating: 0, count: Int(LZ4_compressBound(Int32(chunk.count))))
            let capacity = Int32(block.count)
            let size = chunk.withUnsafeBufferPointer { source in
                block.withUnsafeMutableBufferPointer { target in
                    source.withMemoryRebound(to: CChar.self) { src in
                        target.withMemoryRebound(to: CChar.self) { dst in
                            LZ4_compress_default(src.baseAddress, dst.baseAddress, Int32(chunk.count), capacity)
                        }
                    }
                }
            }
            output += sizeTrailer(Int(size)) + block.prefix(Int(size))
            start += chunk.count
        }
        return output + sizeTrailer(input.count)
    }
}

@Suite("Host-side decompression of bzImage payloads")
struct DecompressionTests {
    static let vmlinux = Images.elf(is64: true, entry: 0x100_0000, segments: [
        .init(physical: 0x100_0000, virtual: 0xFFFF_FFFF_8100_0000, data: Images.pattern(300_000)),
    ], notes: Images.pvhNote(0x100_0040))

    static func compressors() -> [(PayloadDecompressor.Format, ([UInt8]) -> [UInt8])] {
        [(.gzip, Compress.gzip), (.xz, Compress.xz), (.zstd, Compress.zstd), (.lz4, Compress.lz4Legacy)]
    }

    /// A bzImage whose protected-mode part is a small stub followed by `payload`.
    static func bzImage(payload: [UInt8]) -> [UInt8] {
        var spec = Images.BzImageSpec()
        spec.protectedMode = [UInt8](repeating: 0x90, count: 512) + payload + [UInt8](repeating: 0, count: 64)
        spec.payloadOffset = 512
        spec.payloadLength = UInt32(payload.count)
        return Images.bzImage(spec)
    }

    @Test(arguments: ["gzip", "xz", "zstd", "lz4"])
    func roundTrips(name: String) throws {
        let (format, compress) = try #require(Self.compressors().first { $0.0.rawValue == name })
        let compressed = compress(Self.vmlinux)
        #expect(PayloadDecompressor.detect(compressed[...]) == format)
        let (detected, output) = try PayloadDecompressor.decompress(compressed[...], limit: 1 << 20)
        #expect(detected == format)
        #expect(output == Self.vmlinux)
        let error = #expect(throws: BootError.self) {
            try PayloadDecompressor.decompress(compressed[...], limit: 100_000)
        }
        guard case .decompressionFailed = error else { Issue.record("got \(String(describing: error))"); return }
    }

    @Test(arguments: ["gzip", "xz", "zstd", "lz4"])
    func truncatedOrCorruptPayloadIsAnError(name: String) throws {
        let (_, compress) = try #require(Self.compressors().first { $0.0.rawValue == name })
        let compressed = compress(Self.vmlinux)
        let truncated = compressed.prefix(compressed.count / 2)
        #expect(throws: BootError.self) { try PayloadDecompressor.decompress(truncated, limit: 1 << 20) }
        var corrupt = compressed
        for index in stride(from: 16, to: min(corrupt.count - 8, 400), by: 3) { corrupt[index] ^= 0x5A }
        // Corrupt data either fails or (lz4 has no checksum) yields something else; never traps.
        if let (_, output) = try? PayloadDecompressor.decompress(corrupt[...], limit: 1 << 20) {
            #expect(output != Self.vmlinux)
        }
    }

    @Test(arguments: ["gzip", "xz", "zstd", "lz4"])
    func bzImageIsEnteredAsItsVmlinux(name: String) throws {
        let (format, compress) = try #require(Self.compressors().first { $0.0.rawValue == name })
        let image = Self.bzImage(payload: compress(Self.vmlinux))
        let memory = try Images.memory()
        let loaded = try KernelImage.load(image, into: memory, options: BootOptions(cmdline: "console=ttyS0"))
        #expect(loaded.format == .bzImage)
        #expect(loaded.decompressedOnHost == format)
        #expect(loaded.bootProtocol == .pvh)
        #expect(loaded.entry.rip == 0x100_0040)
        #expect(try memory.read(at: 0x100_0000, count: 300_000) == Images.pattern(300_000))

        // Forcing the 64-bit entry: zero page carries the bzImage's own setup header.
        let forced = try KernelImage.load(image, into: memory, options: BootOptions(linuxEntry: .linux64))
        #expect(forced.bootProtocol == .linux64)
        #expect(forced.entry.rip == 0x100_0000)
        #expect(try memory.load(UInt32.self, at: BootLayout.zeroPage + 0x238) == 255)
        #expect(try memory.load(UInt32.self, at: BootLayout.zeroPage + 0x24C) == UInt32(compress(Self.vmlinux).count))
    }

    @Test func headerLimitsStillApplyAfterHostDecompression() throws {
        let image = Self.bzImage(payload: Compress.gzip(Self.vmlinux))
        let memory = try Images.memory()
        #expect(throws: BootError.cmdlineTooLong(length: 300, maximum: 255)) {
            try KernelImage.load(image, into: memory, options: BootOptions(cmdline: String(repeating: "c", count: 300)))
        }
    }

    @Test func unsupportedCompressionFallsBackToTheGuestDecompressor() throws {
        let image = Self.bzImage(payload: Array("BZh91AY&SY".utf8) + Images.pattern(100))
        let loaded = try KernelImage.load(image, into: try Images.memory(), options: BootOptions())
        #expect(loaded.decompressedOnHost == nil)
        #expect(loaded.bootProtocol == .linux64)
        #expect(loaded.entry.rip == 0x100_0200)
    }

    @Test func aPayloadThatIsNoELFIsAnError() throws {
        let image = Self.bzImage(payload: Compress.gzip(Images.pattern(5000)))
        let error = #expect(throws: BootError.self) {
            try KernelImage.load(image, into: try Images.memory(), options: BootOptions())
        }
        guard case .decompressionFailed = error else { Issue.record("got \(String(describing: error))"); return }
    }
}
