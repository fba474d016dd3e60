import DiskImage
import Foundation
import Memory
import Testing
import Virtio

private let ok = VirtioBlockStatus.ok
private let ioError = VirtioBlockStatus.ioError
private let unsupported = VirtioBlockStatus.unsupported
private let diskSize = 1 << 20  // 2048 sectors

/// A raw disk with a known pattern, served by a device, and the file to check it against.
private struct Fixture {
    let folder: ImageFolder
    let path: String
    let disk: ObservedDisk
    let harness: BlockHarness

    init(readOnlyImage: Bool = false, options: VirtioBlockOptions = VirtioBlockOptions(), features: UInt64? = nil,
         queueSize: UInt16 = 128, gateOpen: Bool = true, activate: Bool = true) throws {
        folder = try ImageFolder()
        path = try folder.raw("disk.raw", size: diskSize)
        disk = ObservedDisk(try DiskImage.open(path: path, format: .raw, readOnly: readOnlyImage), gateOpen: gateOpen)
        harness = try BlockHarness(disk: disk, options: options, queueSize: queueSize, features: features, activate: activate)
    }

    var untouched: Bool { get throws { try ImageFolder.contents(path) == ImageFolder.pattern(diskSize) } }

    /// Waits (up to 10 s) for the device to ask for a reset.
    func waitForNeedsReset() -> Bool {
        let deadline = Date().addingTimeInterval(10)
        while harness.interrupt.resets.isEmpty && Date() < deadline { usleep(200) }
        return !harness.interrupt.resets.isEmpty
    }
}

@Suite("virtio-blk: a hostile driver gets an error status or a reset request, never a crash")
struct BlockHostileTests {
    @Test("A header in a device-writable descriptor is IOERR, and its request is not run")
    func headerInWritableDescriptor() throws {
        let fixture = try Fixture()
        let harness = fixture.harness
        let header = try harness.allocate(16)
        try harness.memory.write(BlockHarness.header(type: VirtioBlockRequestType.write, sector: 0), at: header)
        let status = try harness.allocate(1, fill: 0xFF)
        try harness.submitChain([(header, 16, true), (status, 1, true)])
        #expect(try harness.waitForUsed(1))
        #expect(try harness.memory.load(UInt8.self, at: status) == ioError)
        #expect(try harness.usedEntries()[0].1 == 1, "only the status byte was written")
        #expect(try fixture.untouched)
    }

    @Test("A header shorter than 16 bytes (or half of it writable) is IOERR", arguments: [8, 15])
    func shortHeader(readableBytes: Int) throws {
        let fixture = try Fixture()
        let harness = fixture.harness
        let header = try harness.allocate(16)
        try harness.memory.write(BlockHarness.header(type: VirtioBlockRequestType.read, sector: 0), at: header)
        let data = try harness.allocate(512, fill: 0xEE)
        let status = try harness.allocate(1, fill: 0xFF)
        try harness.submitChain([(header, UInt32(readableBytes), false), (header + UInt64(readableBytes), UInt32(16 - readableBytes), true),
                                 (data, 512, true), (status, 1, true)])
        #expect(try harness.waitForUsed(1))
        #expect(try harness.memory.load(UInt8.self, at: status) == ioError)
        #expect(try harness.memory.read(at: data, count: 512) == [UInt8](repeating: 0xEE, count: 512), "no data was read")
    }

    @Test("No device-writable byte for the status: the device asks for a reset and answers nothing more",
          arguments: ["status in a read-only descriptor", "empty writable descriptor"])
    func noStatusByte(kind: String) throws {
        let fixture = try Fixture()
        let harness = fixture.harness
        let header = try harness.allocate(16)
        try harness.memory.write(BlockHarness.header(type: VirtioBlockRequestType.flush, sector: 0), at: header)
        let status = try harness.allocate(1, fill: 0xFF)
        try harness.submitChain([(header, 16, false), (status, kind == "empty writable descriptor" ? 0 : 1, kind != "status in a read-only descriptor")])
        #expect(fixture.waitForNeedsReset())
        #expect(harness.interrupt.resets.count == 1)
        #expect(try harness.memory.load(UInt8.self, at: status) == 0xFF)
        // Until the driver resets the device, a good request is not served either.
        let read = try harness.read(sector: 0, count: 512)
        usleep(100_000)
        #expect(try harness.drivers[0].usedIndex == 0)
        #expect(try harness.status(of: read) == 0xFF)
        #expect(harness.interrupt.resets.count == 1, "one reset request")
        try harness.reinitialize()
        #expect(try harness.complete(try harness.read(sector: 0, count: 512)) == ok)
    }

    @Test("A sector past the end, or a range crossing it, is IOERR and changes nothing", arguments: [
        (UInt64(2048), 512), (UInt64(2047), 1024), (UInt64(4096), 512), (UInt64(0), diskSize + 512),
    ])
    func pastTheEnd(sector: UInt64, length: Int) throws {
        let fixture = try Fixture()
        let harness = fixture.harness
        let read = try harness.read(sector: sector, count: UInt32(length))
        let write = try harness.write(sector: sector, [UInt8](repeating: 0x77, count: length))
        #expect(try harness.complete([read, write]) == [ioError, ioError])
        #expect(try harness.data(of: read) == [UInt8](repeating: 0xEE, count: length), "no data was read")
        #expect(try harness.usedEntries().map { $0.1 } == [1, 1])
        #expect(try fixture.untouched, "no partial write")
    }

    @Test("A length that is not a whole number of sectors is IOERR", arguments: [1, 100, 511, 513, 4097])
    func partialSector(length: Int) throws {
        let fixture = try Fixture()
        let harness = fixture.harness
        let read = try harness.read(sector: 0, count: UInt32(length))
        let write = try harness.write(sector: 0, [UInt8](repeating: 0x77, count: length))
        #expect(try harness.complete([read, write]) == [ioError, ioError])
        #expect(try fixture.untouched)
    }

    @Test("A sector whose byte offset, or end, overflows 64 bits is IOERR", arguments: [
        UInt64.max, UInt64.max / 512 + 1, UInt64.max / 512, (UInt64.max - 511) / 512, UInt64(1) << 55,
    ])
    func overflowingSector(sector: UInt64) throws {
        let fixture = try Fixture()
        let harness = fixture.harness
        let read = try harness.read(sector: sector, count: 1024)
        let write = try harness.write(sector: sector, [UInt8](repeating: 0x77, count: 1024))
        let zeroes = try harness.submit(type: VirtioBlockRequestType.writeZeroes, payload: BlockHarness.range(sector: sector, sectors: 2))
        let discard = try harness.submit(type: VirtioBlockRequestType.discard, payload: BlockHarness.range(sector: sector, sectors: 2))
        #expect(try harness.complete([read, write, zeroes, discard]) == [ioError, ioError, ioError, ioError])
        #expect(try fixture.untouched)
    }

    @Test("A flush on a read-only disk succeeds and touches nothing (there is nothing to make durable)",
          arguments: [true, false])
    func flushReadOnly(readOnlyImage: Bool) throws {
        let fixture = try Fixture(readOnlyImage: readOnlyImage, options: VirtioBlockOptions(readOnly: true))
        let harness = fixture.harness
        #expect(harness.features & VirtioBlockFeature.readOnly != 0)
        #expect(try harness.complete(try harness.submit(type: VirtioBlockRequestType.flush)) == ok)
        #expect(fixture.disk.flushes == 0)
    }

    @Test("On a read-only disk, writes, discards and write-zeroes are IOERR and change nothing; reads work",
          arguments: [true, false])
    func readOnlyDisk(readOnlyImage: Bool) throws {
        // A read-only image, or a writable image presented read-only (`--disk ...,readonly`).
        let fixture = try Fixture(readOnlyImage: readOnlyImage, options: VirtioBlockOptions(readOnly: true))
        let harness = fixture.harness
        let write = try harness.write(sector: 0, [UInt8](repeating: 0x77, count: 512))
        let discard = try harness.submit(type: VirtioBlockRequestType.discard, payload: BlockHarness.range(sector: 0, sectors: 8))
        let zeroes = try harness.submit(type: VirtioBlockRequestType.writeZeroes, payload: BlockHarness.range(sector: 8, sectors: 8, flags: 1))
        let read = try harness.read(sector: 0, count: 512)
        #expect(try harness.complete([write, discard, zeroes, read]) == [ioError, ioError, ioError, ok])
        #expect(try harness.data(of: read) == Array(ImageFolder.pattern(diskSize)[0..<512]))
        #expect(try fixture.untouched)
    }

    @Test("Unknown and unoffered request types are UNSUPP", arguments: [
        UInt32(2), 3, 5, 6, 7, 9, VirtioBlockRequestType.getLifetime, 12, VirtioBlockRequestType.secureErase, 0x8000_0000, UInt32.max,
    ])
    func unknownType(type: UInt32) throws {
        let fixture = try Fixture()
        let harness = fixture.harness
        let request = try harness.submit(type: type, payload: BlockHarness.range(sector: 0, sectors: 8), writableData: 512)
        #expect(try harness.complete(request) == unsupported)
        #expect(try harness.data(of: request) == [UInt8](repeating: 0xEE, count: 512))
        #expect(try fixture.untouched)
    }

    /// Bad discard and write-zeroes payloads: (name, type, payload, expected status).
    static let badRanges: [(String, UInt32, [UInt8], UInt8)] = [
        ("segment past the end", VirtioBlockRequestType.discard, BlockHarness.range(sector: 2048, sectors: 1), ioError),
        ("segment crossing the end", VirtioBlockRequestType.writeZeroes, BlockHarness.range(sector: 2040, sectors: 16), ioError),
        ("reserved flag bit 1", VirtioBlockRequestType.writeZeroes, BlockHarness.range(sector: 0, sectors: 8, flags: 2), unsupported),
        ("reserved flag bit 31", VirtioBlockRequestType.discard, BlockHarness.range(sector: 0, sectors: 8, flags: 1 << 31), unsupported),
        ("discard with unmap", VirtioBlockRequestType.discard, BlockHarness.range(sector: 0, sectors: 8, flags: 1), unsupported),
        ("33 segments", VirtioBlockRequestType.discard,
         (0..<33).flatMap { BlockHarness.range(sector: UInt64($0) * 8, sectors: 8) }, ioError),
        ("payload not a multiple of 16", VirtioBlockRequestType.writeZeroes, BlockHarness.range(sector: 0, sectors: 8) + [0, 0, 0, 0], ioError),
        ("no segment", VirtioBlockRequestType.discard, [], ioError),
        ("a good segment, then a bad one", VirtioBlockRequestType.writeZeroes,
         BlockHarness.range(sector: 0, sectors: 8) + BlockHarness.range(sector: 4096, sectors: 8), ioError),
        ("a good segment, then a reserved flag", VirtioBlockRequestType.discard,
         BlockHarness.range(sector: 0, sectors: 8) + BlockHarness.range(sector: 8, sectors: 8, flags: 4), unsupported),
    ]

    @Test("Bad discard and write-zeroes segments get IOERR or UNSUPP, and no segment is done", arguments: 0..<10)
    func badRange(index: Int) throws {
        let (name, type, payload, expected) = Self.badRanges[index]
        let fixture = try Fixture()
        let harness = fixture.harness
        #expect(try harness.complete(try harness.submit(type: type, payload: payload)) == expected, "\(name)")
        #expect(try fixture.untouched, "\(name)")
    }

    @Test("More sectors in one segment than max_discard_sectors / max_write_zeroes_sectors is IOERR")
    func segmentTooLong() throws {
        let folder = try ImageFolder()
        let path = folder.file("sparse.raw")
        #expect(FileManager.default.createFile(atPath: path, contents: nil))
        #expect(truncate(path, 4 << 30) == 0)
        let harness = try BlockHarness(disk: try DiskImage.open(path: path, format: .raw, readOnly: false))
        let configuration = [UInt8](unsafeUninitializedCapacity: 4) { buffer, count in
            harness.device.readConfiguration(offset: 36, into: UnsafeMutableRawBufferPointer(buffer))
            count = 4
        }
        let maximum = configuration.withUnsafeBytes { UInt32(littleEndian: $0.loadUnaligned(as: UInt32.self)) }
        #expect(maximum == 1 << 22)
        let discard = try harness.submit(type: VirtioBlockRequestType.discard, payload: BlockHarness.range(sector: 0, sectors: maximum + 1))
        let zeroes = try harness.submit(type: VirtioBlockRequestType.writeZeroes, payload: BlockHarness.range(sector: 0, sectors: maximum + 1))
        let fits = try harness.submit(type: VirtioBlockRequestType.writeZeroes, payload: BlockHarness.range(sector: 0, sectors: maximum, flags: 1))
        #expect(try harness.complete([discard, zeroes, fits]) == [ioError, ioError, ok])
    }

    @Test("Discard and write-zeroes the driver did not negotiate are UNSUPP")
    func notNegotiated() throws {
        let folder = try ImageFolder()
        let disk = try DiskImage.open(path: try folder.raw("disk.raw", size: diskSize), format: .raw, readOnly: false)
        let offered = try VirtioBlock(disk: disk).offeredFeatures
        let fixture = try Fixture(features: offered & ~(VirtioBlockFeature.discard | VirtioBlockFeature.writeZeroes))
        let harness = fixture.harness
        let discard = try harness.submit(type: VirtioBlockRequestType.discard, payload: BlockHarness.range(sector: 0, sectors: 8))
        let zeroes = try harness.submit(type: VirtioBlockRequestType.writeZeroes, payload: BlockHarness.range(sector: 0, sectors: 8))
        #expect(try harness.complete([discard, zeroes]) == [unsupported, unsupported])
        #expect(try fixture.untouched)
    }

    @Test("Requests and notifications before DRIVER_OK are not seen; the device looks at the ring once activated")
    func beforeDriverOK() throws {
        let fixture = try Fixture(activate: false)
        let harness = fixture.harness
        let read = try harness.read(sector: 1, count: 512)
        harness.notifiers[0].signal()
        usleep(100_000)
        #expect(try harness.drivers[0].usedIndex == 0)
        #expect(try harness.status(of: read) == 0xFF)
        #expect(fixture.disk.readsStarted == 0)
        try harness.activate()
        #expect(try harness.complete(read) == ok)
    }

    @Test("A broken ring marks the device needing reset; later notifications are harmless; a reset recovers",
          arguments: ["available index jump", "descriptor outside RAM", "descriptor loop"])
    func brokenRing(kind: String) throws {
        let fixture = try Fixture(queueSize: 8)
        let harness = fixture.harness
        switch kind {
        case "available index jump":
            try harness.drivers[0].setAvailableIndex(100)
        case "descriptor outside RAM":
            try harness.drivers[0].add([(BlockHarness.memorySize - 8, 16, false)])
        default:
            try harness.drivers[0].writeDescriptor(0, address: 0x100000, length: 16, flags: 1, next: 1)
            try harness.drivers[0].writeDescriptor(1, address: 0x100000, length: 16, flags: 1, next: 0)
            try harness.drivers[0].makeAvailable(0)
        }
        harness.notifiers[0].signal()
        #expect(fixture.waitForNeedsReset())
        for _ in 0..<100 { harness.notifiers[0].signal() }
        usleep(50_000)
        #expect(harness.interrupt.resets.count == 1)
        #expect(try harness.drivers[0].usedIndex == 0)
        try harness.reinitialize()
        #expect(try harness.complete(try harness.read(sector: 0, count: 512)) == ok)
    }

    @Test("The same head made available again and again: at most queue-size requests are in flight")
    func repeatedHead() throws {
        let fixture = try Fixture(options: VirtioBlockOptions(workersPerQueue: 2), queueSize: 8, gateOpen: false)
        let harness = fixture.harness
        let request = try harness.read(sector: 0, count: 512)
        for _ in 0..<7 { try harness.drivers[0].makeAvailable(request.head) }
        harness.notifiers[0].signal()
        #expect(fixture.disk.waitForReads(2))
        // Eight taken (the queue's size); the driver publishes eight more, which must wait.
        for _ in 0..<8 { try harness.drivers[0].makeAvailable(request.head) }
        harness.notifiers[0].signal()
        usleep(100_000)
        #expect(harness.queues[0].indices.nextAvailable == 8)
        fixture.disk.openGate()
        #expect(try harness.waitForUsed(16))
        #expect(harness.queues[0].indices.nextAvailable == 16)
        #expect(try harness.usedEntries().allSatisfy { $0.0 == UInt32(request.head) })
        #expect(harness.interrupt.resets.isEmpty)
    }

    @Test("Notifications with nothing available do nothing; the next request is served")
    func emptyNotifications() throws {
        let fixture = try Fixture()
        let harness = fixture.harness
        for _ in 0..<1000 { harness.notifiers[0].signal() }
        usleep(50_000)
        #expect(try harness.drivers[0].usedIndex == 0)
        #expect(try harness.complete(try harness.read(sector: 0, count: 512)) == ok)
        #expect(try harness.drivers[0].usedIndex == 1)
        #expect(harness.interrupt.resets.isEmpty)
    }
}
