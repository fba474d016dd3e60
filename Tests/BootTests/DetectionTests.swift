import Boot
import Memory
import Testing

@Suite("Kernel format detection and bad input")
struct DetectionTests {
    @Test func detectsEachFormatFromContent() {
        #expect(KernelImage.detect(Images.bzImage()) == .bzImage)
        let segment = Images.Segment(physical: 0x100000, data: [0xF4])
        #expect(KernelImage.detect(Images.elf(is64: true, entry: 0x100000, segments: [segment])) == .elf64)
        #expect(KernelImage.detect(Images.elf(is64: false, entry: 0x100000, segments: [segment])) == .elf32)
        let multiboot = Images.elf(is64: false, entry: 0x100000, segments: [segment], prefix: Images.multibootHeader())
        #expect(KernelImage.detect(multiboot) == .multiboot)
        #expect(KernelImage.detect(Array("#!/bin/sh\necho hello\n".utf8)) == .unknown)
        #expect(KernelImage.detect([]) == .unknown)
    }

    @Test func refusesAFileThatIsNoKernel() throws {
        let memory = try Images.memory()
        let error = #expect(throws: BootError.self) {
            try KernelImage.load(Array(repeating: 0x41, count: 10_000), into: memory, options: BootOptions())
        }
        guard case .notAKernel = error else { Issue.record("got \(String(describing: error))"); return }
        #expect(error?.description.contains("not a kernel") == true)
        #expect(throws: BootError.emptyKernel) { try KernelImage.load([], into: memory, options: BootOptions()) }
    }

    @Test func multibootHeaderWithBadChecksumIsIgnored() throws {
        var header = Images.multibootHeader()
        header[8] &+= 1
        let image = header + Images.pattern(64)
        #expect(try MultibootHeader.find(in: image) == nil)
        #expect(KernelImage.detect(image) == .unknown)
    }

    @Test func multibootHeaderBeyond8KiBIsNotFound() throws {
        let image = [UInt8](repeating: 0, count: 8192) + Images.multibootHeader()
        #expect(try MultibootHeader.find(in: image) == nil)
    }

    @Test func everyErrorIsOneLine() {
        let errors: [BootError] = [
            .emptyKernel, .notAKernel(reason: "x"), .truncated(what: "a", needed: 2, available: 1),
            .invalidHeader("h"), .unsupportedBootProtocol(version: 0x0205), .no64BitEntry,
            .unsupportedELF("e"), .segmentOutsideMemory(what: "s", address: 1, size: 2),
            .kernelTooLarge(needed: 2, available: 1), .initrdTooLarge(size: 3, available: 2, limit: 0xFFFF),
            .cmdlineTooLong(length: 300, maximum: 255), .cmdlineContainsNUL, .tooManyCPUs(300, maximum: 254),
            .decompressionFailed(format: "gzip", reason: "r"), .memoryTooSmall(needed: 2, available: 1),
        ]
        for error in errors {
            #expect(!error.description.isEmpty)
            #expect(!error.description.contains("\n"))
        }
        #expect(BootError.unsupportedBootProtocol(version: 0x0205).description.contains("2.05"))
    }
}
