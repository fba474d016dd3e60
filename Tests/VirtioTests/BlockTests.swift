import DiskImage
import EventLoop
import Foundation
import Memory
import Synchronization
import Testing
import Virtio

private let ok = VirtioBlockStatus.ok
private let sector = 512

/// Little-endian field of a configuration-space dump.
private func field<T: FixedWidthInteger>(_ bytes: [UInt8], _ offset: Int, as: T.Type) -> T {
    bytes.withUnsafeBytes { T(littleEndian: $0.loadUnaligned(fromByteOffset: offset, as: T.self)) }
}

private func configuration(of device: VirtioBlock, offset: UInt64 = 0, count: Int = VirtioBlock.configurationSize) -> [UInt8] {
    var bytes = [UInt8](repeating: 0xAA, count: count)
    bytes.withUnsafeMutableBytes { device.readConfiguration(offset: offset, into: $0) }
    return bytes
}

private func openRaw(_ path: String, readOnly: Bool = false) throws -> any BlockDevice {
    try DiskImage.open(path: path, format: .raw, readOnly: readOnly)
}

/// `voluntary_ctxt_switches` of this process's threads whose names start with `prefix`,
/// by thread id: how often each went to sleep.
private func voluntarySwitches(ofThreadsNamed prefix: String) -> [String: Int] {
    var result: [String: Int] = [:]
    let tasks = (try? FileManager.default.contentsOfDirectory(atPath: "/proc/self/task")) ?? []
    for task in tasks {
        guard let name = try? String(contentsOfFile: "/proc/self/task/\(task)/comm", encoding: .utf8),
              name.hasPrefix(prefix),
              let status = try? String(contentsOfFile: "/proc/self/task/\(task)/status", encoding: .utf8),
              let line = status.split(separator: "\n").first(where: { $0.hasPrefix("voluntary_ctxt_switches:") }),
              let count = Int(line.split(separator: ":")[1].trimmingCharacters(in: .whitespaces)) else { continue }
        result[task] = count
    }
    return result
}

@Suite("virtio-blk: requests on raw and qcow2 images")
struct BlockTests {
    @Test("The configuration space follows virtio 1.2, 5.2.4, and the features match the disk")
    func configurationSpace() throws {
        let folder = try ImageFolder()
        let path = try folder.raw("disk.raw", size: 8 << 20)
        let device = try VirtioBlock(disk: try openRaw(path), options: VirtioBlockOptions(queueSize: 128))
        let bytes = configuration(of: device)
        #expect(bytes.count == 72)
        #expect(field(bytes, 0, as: UInt64.self) == 16384, "capacity in 512-byte sectors")
        #expect(field(bytes, 8, as: UInt32.self) == 1 << 20, "size_max")
        #expect(field(bytes, 12, as: UInt32.self) == 126, "seg_max: queue size less header and status")
        #expect(field(bytes, 16, as: UInt32.self) == 0, "no geometry")
        #expect(field(bytes, 20, as: UInt32.self) == 512, "blk_size")
        #expect(Array(bytes[24..<34]) == [UInt8](repeating: 0, count: 10), "no topology, writeback 0")
        #expect(field(bytes, 34, as: UInt16.self) == 1, "num_queues")
        var st = stat()
        #expect(stat(path, &st) == 0)
        #expect(field(bytes, 36, as: UInt32.self) == 1 << 22, "max_discard_sectors")
        #expect(field(bytes, 40, as: UInt32.self) == 32, "max_discard_seg")
        #expect(field(bytes, 44, as: UInt32.self) == UInt32(st.st_blksize / 512), "discard_sector_alignment: the file system block")
        #expect(field(bytes, 48, as: UInt32.self) == 1 << 22, "max_write_zeroes_sectors")
        #expect(field(bytes, 52, as: UInt32.self) == 32, "max_write_zeroes_seg")
        #expect(bytes[56] == 1, "write_zeroes_may_unmap: raw files punch holes")
        #expect(Array(bytes[57..<72]) == [UInt8](repeating: 0, count: 15))

        // Any offset and size, as a transport may read: a slice, and zeros past the end.
        #expect(configuration(of: device, offset: 2, count: 4) == Array(bytes[2..<6]))
        #expect(configuration(of: device, offset: 70, count: 8) == [0, 0, 0, 0, 0, 0, 0, 0])
        #expect(configuration(of: device, offset: UInt64.max - 1, count: 4) == [0, 0, 0, 0])
        // Writes change nothing.
        [UInt8](repeating: 0xFF, count: 72).withUnsafeBytes { device.writeConfiguration(offset: 0, from: $0) }
        #expect(configuration(of: device) == bytes)

        let offered = device.offeredFeatures
        let expected: [UInt64] = [VirtioFeature.version1, VirtioFeature.ringIndirectDescriptors, VirtioFeature.ringEventIndex,
                                  VirtioBlockFeature.sizeMaximum, VirtioBlockFeature.segmentMaximum, VirtioBlockFeature.blockSize,
                                  VirtioBlockFeature.flush, VirtioBlockFeature.discard, VirtioBlockFeature.writeZeroes]
        #expect(offered == expected.reduce(0, |))
        #expect(device.queueMaximumSizes == [128])
        #expect(device.deviceType == .block)
    }

    @Test("A read-only disk offers VIRTIO_BLK_F_RO and may not unmap; several queues offer MQ")
    func readOnlyAndMultiQueueFeatures() throws {
        let folder = try ImageFolder()
        let path = try folder.raw("disk.raw", size: 1 << 20)
        // One image at a time: a writer and any other opener of one image exclude each other
        // (image locks), so each device is dropped before the next opens the file.
        do {
            let readOnlyImage = try VirtioBlock(disk: try openRaw(path, readOnly: true))
            #expect(readOnlyImage.offeredFeatures & VirtioBlockFeature.readOnly != 0)
            #expect(configuration(of: readOnlyImage)[56] == 0)
        }
        do {
            let readOnlyOption = try VirtioBlock(disk: try openRaw(path), options: VirtioBlockOptions(readOnly: true))
            #expect(readOnlyOption.isReadOnly && readOnlyOption.offeredFeatures & VirtioBlockFeature.readOnly != 0)
        }
        do {
            let writable = try VirtioBlock(disk: try openRaw(path))
            #expect(writable.offeredFeatures & (VirtioBlockFeature.readOnly | VirtioBlockFeature.multiQueue) == 0)
        }
        do {
            let multi = try VirtioBlock(disk: try openRaw(path), options: VirtioBlockOptions(queueCount: 4, queueSize: 64))
            #expect(multi.offeredFeatures & VirtioBlockFeature.multiQueue != 0)
            #expect(field(configuration(of: multi), 34, as: UInt16.self) == 4)
            #expect(multi.queueMaximumSizes == [64, 64, 64, 64])
        }
    }

    @Test("Options out of range and bad serials are refused with a message", arguments: [
        VirtioBlockOptions(serial: "this serial is longer than 20"), VirtioBlockOptions(serial: "tab\there"),
        VirtioBlockOptions(serial: "naïve"), VirtioBlockOptions(queueCount: 0), VirtioBlockOptions(queueCount: 17),
        VirtioBlockOptions(queueSize: 100), VirtioBlockOptions(queueSize: 2), VirtioBlockOptions(workersPerQueue: 0),
    ])
    func badOptions(options: VirtioBlockOptions) throws {
        let folder = try ImageFolder()
        let disk = try openRaw(try folder.raw("disk.raw", size: 4096))
        #expect(throws: VirtioError.self) { try VirtioBlock(disk: disk, options: options) }
    }

    @Test("Writes reach the file, reads return it; the used ring counts data and status")
    func readWriteRaw() throws {
        let folder = try ImageFolder()
        let path = try folder.raw("disk.raw", size: 1 << 20)
        let harness = try BlockHarness(disk: try openRaw(path))
        let data = ImageFolder.pattern(3 * sector, seed: 0x5A)
        let write = try harness.write(sector: 5, data)
        #expect(try harness.complete(write) == ok)
        let read = try harness.read(sector: 4, count: UInt32(5 * sector))
        #expect(try harness.complete(read) == ok)

        var expected = ImageFolder.pattern(1 << 20)
        expected.replaceSubrange(5 * sector..<8 * sector, with: data)
        #expect(try harness.data(of: read) == Array(expected[4 * sector..<9 * sector]))
        #expect(try harness.usedEntries().map { $0.1 } == [1, UInt32(5 * sector + 1)])
        #expect(try ImageFolder.contents(path) == expected)

        // The last sector, and an empty read at the very end, are in range.
        let last = try harness.read(sector: 2047, count: 512)
        let empty = try harness.read(sector: 2048, count: 0)
        #expect(try harness.complete([last, empty]) == [ok, ok])
        #expect(try harness.data(of: last) == Array(expected[(2047 * sector)...]))
    }

    @Test("Any framing works: a header split over descriptors, data in the header's descriptor, status after the data in one buffer")
    func framing() throws {
        let folder = try ImageFolder()
        let path = try folder.raw("disk.raw", size: 1 << 20)
        let harness = try BlockHarness(disk: try openRaw(path))
        let data = ImageFolder.pattern(2 * sector, seed: 0x33)

        // Write: 8 header bytes, then 8 header bytes and the first 100 data bytes, then the rest.
        let header = BlockHarness.header(type: VirtioBlockRequestType.write, sector: 10)
        let first = try harness.allocate(8)
        try harness.memory.write(header[0..<8], at: first)
        let second = try harness.allocate(108)
        try harness.memory.write(Array(header[8..<16]) + data[0..<100], at: second)
        let rest = try harness.allocate(data.count - 100)
        try harness.memory.write(data[100...], at: rest)
        let status = try harness.allocate(1, fill: 0xFF)
        try harness.submitChain([(first, 8, false), (second, 108, false), (rest, UInt32(data.count - 100), false), (status, 1, true)])
        #expect(try harness.waitForUsed(1))
        #expect(try harness.memory.load(UInt8.self, at: status) == ok)

        // Read: the header in one descriptor, data and status in one writable buffer of 1025 bytes.
        let readHeader = try harness.allocate(16)
        try harness.memory.write(BlockHarness.header(type: VirtioBlockRequestType.read, sector: 10), at: readHeader)
        let answer = try harness.allocate(2 * sector + 1, fill: 0xFF)
        try harness.submitChain([(readHeader, 16, false), (answer, UInt32(2 * sector + 1), true)])
        #expect(try harness.waitForUsed(2))
        #expect(try harness.memory.read(at: answer, count: 2 * sector) == data)
        #expect(try harness.memory.load(UInt8.self, at: answer + UInt64(2 * sector)) == ok)
        #expect(try harness.usedEntries().map { $0.1 } == [1, UInt32(2 * sector + 1)])
        #expect(Array(try ImageFolder.contents(path)[(10 * sector)..<(12 * sector)]) == data)
    }

    @Test("Indirect descriptors and event indices work with the device")
    func indirectAndEventIndex() throws {
        let folder = try ImageFolder()
        let path = try folder.raw("disk.raw", size: 1 << 20)
        let harness = try BlockHarness(disk: try openRaw(path))
        #expect(harness.features & VirtioFeature.ringEventIndex != 0)
        let header = try harness.allocate(16)
        try harness.memory.write(BlockHarness.header(type: VirtioBlockRequestType.read, sector: 1), at: header)
        let data = try harness.allocate(sector)
        let status = try harness.allocate(1, fill: 0xFF)
        let table = try harness.allocate(48)
        try harness.drivers[0].writeDescriptor(0, address: header, length: 16, flags: 1, next: 1, table: table)
        try harness.drivers[0].writeDescriptor(1, address: data, length: 512, flags: 2 | 1, next: 2, table: table)
        try harness.drivers[0].writeDescriptor(2, address: status, length: 1, flags: 2, table: table)
        try harness.drivers[0].writeDescriptor(0, address: table, length: 48, flags: 4)
        try harness.drivers[0].makeAvailable(0)
        harness.notifiers[0].signal()
        #expect(try harness.waitForUsed(1))
        #expect(try harness.memory.load(UInt8.self, at: status) == ok)
        #expect(try harness.memory.read(at: data, count: sector) == Array(ImageFolder.pattern(1 << 20)[sector..<(2 * sector)]))
        // used_event was 0: the first completion crossed it and interrupted the driver.
        #expect(harness.interrupt.interrupts(queue: 0) == 1)
    }

    @Test("GET_ID returns the serial NUL-padded to 20 bytes, or as much as fits")
    func getID() throws {
        let folder = try ImageFolder()
        let path = try folder.raw("disk.raw", size: 4096)
        do {
            let byDefault = try BlockHarness(disk: try openRaw(path), options: VirtioBlockOptions(diskIndex: 3))
            let request = try byDefault.submit(type: VirtioBlockRequestType.getID, writableData: 20)
            #expect(try byDefault.complete(request) == ok)
            #expect(try byDefault.data(of: request) == Array("swiftlet-3".utf8) + [UInt8](repeating: 0, count: 10))
            #expect(try byDefault.usedEntries()[0].1 == 21)
        }

        let twenty = "ABCDEFGHIJKLMNOPQRST"
        let named = try BlockHarness(disk: try openRaw(path), options: VirtioBlockOptions(serial: twenty))
        let full = try named.submit(type: VirtioBlockRequestType.getID, writableData: 20)
        let short = try named.submit(type: VirtioBlockRequestType.getID, writableData: 8)
        let long = try named.submit(type: VirtioBlockRequestType.getID, writableData: 32)
        #expect(try named.complete([full, short, long]) == [ok, ok, ok])
        #expect(try named.data(of: full) == Array(twenty.utf8), "20 characters: no NUL")
        #expect(try named.data(of: short) == Array(twenty.utf8.prefix(8)))
        #expect(try named.data(of: long) == Array(twenty.utf8) + [UInt8](repeating: 0xEE, count: 12), "nothing past 20 bytes")
    }

    @Test("A flush reaches the image's flush (fdatasync); with FLUSH negotiated a write alone does not")
    func flushReachesTheDisk() throws {
        let folder = try ImageFolder()
        let path = try folder.raw("disk.raw", size: 1 << 20)
        let disk = ObservedDisk(try openRaw(path))
        let harness = try BlockHarness(disk: disk)
        #expect(harness.features & VirtioBlockFeature.flush != 0)
        let data = ImageFolder.pattern(sector, seed: 9)
        #expect(try harness.complete(try harness.write(sector: 100, data)) == ok)
        #expect(disk.flushes == 0, "a write is volatile until the driver flushes")
        #expect(try harness.complete(try harness.submit(type: VirtioBlockRequestType.flush)) == ok)
        #expect(disk.flushes == 1)
        // Another descriptor of the same file sees the flushed write.
        #expect(Array(try ImageFolder.contents(path)[(100 * sector)..<(101 * sector)]) == data)
    }

    @Test("Without FLUSH negotiated, every write is made durable before it completes (write-through)")
    func writeThrough() throws {
        let folder = try ImageFolder()
        let path = try folder.raw("disk.raw", size: 1 << 20)
        let disk = ObservedDisk(try openRaw(path))
        let device = try VirtioBlock(disk: disk)
        let harness = try BlockHarness(disk: disk, features: device.offeredFeatures & ~VirtioBlockFeature.flush)
        #expect(try harness.complete(try harness.write(sector: 1, ImageFolder.pattern(sector))) == ok)
        #expect(disk.flushes == 1)
        let zeroes = try harness.submit(type: VirtioBlockRequestType.writeZeroes, payload: BlockHarness.range(sector: 1, sectors: 1))
        #expect(try harness.complete(zeroes) == ok)
        #expect(disk.flushes == 2)
        #expect(try harness.complete(try harness.read(sector: 1, count: 512)) == ok)
        #expect(disk.flushes == 2, "reads flush nothing")
    }

    @Test("Discard punches holes in a raw file: the blocks are freed and read as zeros")
    func discardRaw() throws {
        let folder = try ImageFolder()
        let path = try folder.raw("disk.raw", size: 4 << 20)
        let harness = try BlockHarness(disk: try openRaw(path))
        let before = ImageFolder.allocatedBytes(path)
        // Two segments: 1 MiB at 1 MiB, 512 KiB at 3 MiB.
        let payload = BlockHarness.range(sector: 2048, sectors: 2048) + BlockHarness.range(sector: 6144, sectors: 1024)
        #expect(try harness.complete(try harness.submit(type: VirtioBlockRequestType.discard, payload: payload)) == ok)
        #expect(ImageFolder.allocatedBytes(path) <= before - (1536 << 10))
        var expected = ImageFolder.pattern(4 << 20)
        expected.replaceSubrange((1 << 20)..<(2 << 20), with: [UInt8](repeating: 0, count: 1 << 20))
        expected.replaceSubrange((3 << 20)..<(7 << 19), with: [UInt8](repeating: 0, count: 1 << 19))
        #expect(try ImageFolder.contents(path) == expected)
        let read = try harness.read(sector: 2047, count: 2 * 512)
        #expect(try harness.complete(read) == ok)
        #expect(try harness.data(of: read) == Array(expected[(2047 * sector)..<(2049 * sector)]))
    }

    @Test("Write-zeroes on a raw file: with unmap a hole, without it zeros that stay allocated")
    func writeZeroesRaw() throws {
        let folder = try ImageFolder()
        let path = try folder.raw("disk.raw", size: 4 << 20)
        let harness = try BlockHarness(disk: try openRaw(path))
        let before = ImageFolder.allocatedBytes(path)
        let keep = BlockHarness.range(sector: 0, sectors: 2048)
        #expect(try harness.complete(try harness.submit(type: VirtioBlockRequestType.writeZeroes, payload: keep)) == ok)
        #expect(ImageFolder.allocatedBytes(path) == before, "ZERO_RANGE keeps the blocks")
        let unmap = BlockHarness.range(sector: 4096, sectors: 2048, flags: 1)
        #expect(try harness.complete(try harness.submit(type: VirtioBlockRequestType.writeZeroes, payload: unmap)) == ok)
        #expect(ImageFolder.allocatedBytes(path) <= before - (1 << 20), "unmap punches a hole")
        var expected = ImageFolder.pattern(4 << 20)
        expected.replaceSubrange(0..<(1 << 20), with: [UInt8](repeating: 0, count: 1 << 20))
        expected.replaceSubrange((2 << 20)..<(3 << 20), with: [UInt8](repeating: 0, count: 1 << 20))
        #expect(try ImageFolder.contents(path) == expected)
    }

    @Test("qcow2: read, write, flush, get-id, discard and write-zeroes; qemu-img check is clean and compare matches",
          .enabled(if: ImageFolder.hasQemuImg))
    func qcow2Requests() throws {
        let folder = try ImageFolder()
        let path = folder.file("disk.qcow2")
        #expect(try ImageFolder.qemuImg("create", "-q", "-f", "qcow2", path, "4M").status == 0)
        var expected = [UInt8](repeating: 0, count: 4 << 20)
        do {
            let harness = try BlockHarness(disk: try DiskImage.open(path: path, format: .qcow2, readOnly: false))
            // Writes: 192 KiB across cluster boundaries, and one sector far away.
            let big = ImageFolder.pattern(192 << 10, seed: 0x11)
            let one = ImageFolder.pattern(sector, seed: 0x22)
            let writes = [try harness.write(sector: 100, big), try harness.write(sector: 8000, one)]
            #expect(try harness.complete(writes) == [ok, ok])
            expected.replaceSubrange((100 * sector)..<(100 * sector + big.count), with: big)
            expected.replaceSubrange((8000 * sector)..<(8001 * sector), with: one)
            // Zero 8 KiB inside the written data (no unmap), and 4 KiB with unmap.
            let zeroes = try harness.submit(type: VirtioBlockRequestType.writeZeroes,
                                            payload: BlockHarness.range(sector: 120, sectors: 16))
            let unmapped = try harness.submit(type: VirtioBlockRequestType.writeZeroes,
                                              payload: BlockHarness.range(sector: 300, sectors: 8, flags: 1))
            // A discard of part of a cluster is a hint qcow2 leaves alone: the data stays.
            let discard = try harness.submit(type: VirtioBlockRequestType.discard,
                                             payload: BlockHarness.range(sector: 200, sectors: 16))
            // Write-zeroes over never-written space allocates nothing.
            let nothing = try harness.submit(type: VirtioBlockRequestType.writeZeroes,
                                             payload: BlockHarness.range(sector: 6000, sectors: 128))
            #expect(try harness.complete([zeroes, unmapped, discard, nothing]) == [ok, ok, ok, ok])
            expected.replaceSubrange((120 * sector)..<(136 * sector), with: [UInt8](repeating: 0, count: 16 * sector))
            expected.replaceSubrange((300 * sector)..<(308 * sector), with: [UInt8](repeating: 0, count: 8 * sector))
            #expect(try harness.complete(try harness.submit(type: VirtioBlockRequestType.flush)) == ok)

            let reads = [try harness.read(sector: 90, count: 256 << 10), try harness.read(sector: 7990, count: 20 * 512)]
            #expect(try harness.complete(reads) == [ok, ok])
            #expect(try harness.data(of: reads[0]) == Array(expected[(90 * sector)..<(90 * sector + (256 << 10))]))
            #expect(try harness.data(of: reads[1]) == Array(expected[(7990 * sector)..<(8010 * sector)]))
            let id = try harness.submit(type: VirtioBlockRequestType.getID, writableData: 20)
            #expect(try harness.complete(id) == ok)
            harness.device.reset()
        }
        let check = try ImageFolder.qemuImg("check", path)
        #expect(check.status == 0, "\(check.output)")
        let reference = folder.file("expected.raw")
        try ImageFolder.write(expected, to: reference)
        let compare = try ImageFolder.qemuImg("compare", "-f", "raw", "-F", "qcow2", reference, path)
        #expect(compare.status == 0, "\(compare.output)")
        // Write-zeroes over never-written space allocated no data cluster there.
        let map = try ImageFolder.qemuImg("map", "--output=json", path)
        let entries = try #require(try JSONSerialization.jsonObject(with: Data(map.output.utf8)) as? [[String: Any]])
        let untouched = (6000 * sector)..<(6128 * sector)
        for entry in entries where entry["data"] as? Bool == true {
            let start = try #require(entry["start"] as? Int), length = try #require(entry["length"] as? Int)
            #expect(!(start..<(start + length)).overlaps(untouched), "data at \(start)+\(length)")
        }
    }

    @Test("qcow2 over a backing file: write-zeroes hides the backing data, and so does a discard of whole clusters (zero clusters)",
          .enabled(if: ImageFolder.hasQemuImg))
    func qcow2WithBacking() throws {
        let folder = try ImageFolder()
        let base = try folder.raw("base.raw", size: 2 << 20, seed: 0x44)
        let path = folder.file("overlay.qcow2")
        #expect(try ImageFolder.qemuImg("create", "-q", "-f", "qcow2", "-b", base, "-F", "raw", path).status == 0)
        var expected = try ImageFolder.contents(base)
        do {
            let harness = try BlockHarness(disk: try DiskImage.open(path: path, format: .qcow2, readOnly: false))
            let zeroes = try harness.submit(type: VirtioBlockRequestType.writeZeroes,
                                            payload: BlockHarness.range(sector: 64, sectors: 256, flags: 1))
            let discard = try harness.submit(type: VirtioBlockRequestType.discard,
                                             payload: BlockHarness.range(sector: 1024, sectors: 128))
            #expect(try harness.complete([zeroes, discard]) == [ok, ok])
            expected.replaceSubrange((64 * sector)..<(320 * sector), with: [UInt8](repeating: 0, count: 256 * sector))
            // 64 KiB clusters: sectors 1024..<1152 are whole clusters, which must not let the backing file show through.
            expected.replaceSubrange((1024 * sector)..<(1152 * sector), with: [UInt8](repeating: 0, count: 128 * sector))
            #expect(try harness.complete(try harness.submit(type: VirtioBlockRequestType.flush)) == ok)
            let read = try harness.read(sector: 0, count: UInt32(2 << 20))
            #expect(try harness.complete(read) == ok)
            #expect(try harness.data(of: read) == expected)
        }
        #expect(try ImageFolder.qemuImg("check", path).status == 0)
        let reference = folder.file("expected.raw")
        try ImageFolder.write(expected, to: reference)
        let compare = try ImageFolder.qemuImg("compare", "-f", "raw", "-F", "qcow2", reference, path)
        #expect(compare.status == 0, "\(compare.output)")
        #expect(try ImageFolder.contents(base) == ImageFolder.pattern(2 << 20, seed: 0x44), "the backing file is untouched")
    }

    @Test("Requests in flight reach the disk in parallel, one per worker", arguments: [1, 4, 8])
    func parallelRequests(workers: Int) throws {
        let folder = try ImageFolder()
        let path = try folder.raw("disk.raw", size: 1 << 20)
        let disk = ObservedDisk(try openRaw(path), gateOpen: false)
        let harness = try BlockHarness(disk: disk, options: VirtioBlockOptions(workersPerQueue: workers))
        let reads = try (0..<16).map { try harness.read(sector: UInt64($0 * 8), count: 4096) }
        #expect(disk.waitForReads(workers))
        usleep(50_000)  // room for a wrong extra read to start
        #expect(disk.readsStarted == workers, "each worker holds one request while the disk is busy")
        disk.openGate()
        #expect(try harness.complete(reads) == [UInt8](repeating: ok, count: 16))
        #expect(disk.mostConcurrentReads == workers)
        let image = ImageFolder.pattern(1 << 20)
        for (index, read) in reads.enumerated() {
            #expect(try harness.data(of: read) == Array(image[(index * 4096)..<(index * 4096 + 4096)]))
        }
    }

    @Test("A request wakes one idle worker, not every worker of the queue")
    func oneWorkerWokenPerRequest() throws {
        let folder = try ImageFolder()
        let path = try folder.raw("disk.raw", size: 1 << 20)
        // A disk index no other test uses: the threads are found by name ("blk77q0w0"...).
        let harness = try BlockHarness(disk: try openRaw(path), options: VirtioBlockOptions(diskIndex: 77, workersPerQueue: 4))
        #expect(try harness.complete(try harness.read(sector: 0, count: 512)) == ok)
        usleep(50_000)  // every worker asleep
        let before = voluntarySwitches(ofThreadsNamed: "blk77q0w")
        #expect(before.count == 4)
        let requests = 40
        for index in 1...requests {
            // Writes: cached reads of a raw image never reach a worker (next test).
            #expect(try harness.complete(try harness.write(sector: UInt64(index), ImageFolder.pattern(sector))) == ok)
        }
        let after = voluntarySwitches(ofThreadsNamed: "blk77q0w")
        let sleeps = after.values.reduce(0, +) - before.values.reduce(0, +)
        // Each request wakes one worker, which serves it and sleeps again: one switch per
        // request. Waking every worker (one eventfd they all read) would give four.
        #expect(sleeps >= requests)
        #expect(sleeps < 2 * requests, "\(sleeps) times a worker went to sleep for \(requests) requests")
    }

    @Test("Reads of a raw image that the page cache holds are answered without waking a worker")
    func cachedReadsServedAtOnce() throws {
        let folder = try ImageFolder()
        let path = try folder.raw("disk.raw", size: 1 << 20)
        let harness = try BlockHarness(disk: try openRaw(path), options: VirtioBlockOptions(diskIndex: 78, workersPerQueue: 4))
        #expect(try harness.complete(try harness.write(sector: 0, ImageFolder.pattern(sector))) == ok)
        usleep(50_000)  // every worker asleep
        let before = voluntarySwitches(ofThreadsNamed: "blk78q0w")
        let image = ImageFolder.pattern(1 << 20)
        // 4 KiB and 16 KiB reads, the largest answered at once, in one batch.
        var reads: [SubmittedRequest] = []
        for index in 0..<8 {
            let count: UInt32 = index % 2 == 0 ? 4096 : 16384
            reads.append(try harness.read(sector: UInt64(8 + index * 128), count: count))
        }
        #expect(try harness.complete(reads) == [UInt8](repeating: ok, count: 8))
        for (index, read) in reads.enumerated() {
            let start = (8 + index * 128) * sector
            #expect(try harness.data(of: read) == Array(image[start..<(start + Int(read.dataLength))]))
        }
        let lengths: [UInt32] = try harness.usedEntries().suffix(8).map { $0.1 }.sorted()
        let expected: [UInt32] = [4097, 4097, 4097, 4097, 16385, 16385, 16385, 16385]
        #expect(lengths == expected)
        let after = voluntarySwitches(ofThreadsNamed: "blk78q0w")
        #expect(after.values.reduce(0, +) == before.values.reduce(0, +), "no worker woke")
        // Bigger than 16 KiB: a worker's.
        let large = try harness.read(sector: 0, count: 16384 + 4096)
        #expect(try harness.complete(large) == ok)
        #expect(try harness.data(of: large) == Array(image[0..<(16384 + 4096)]))
        #expect(voluntarySwitches(ofThreadsNamed: "blk78q0w").values.reduce(0, +) > after.values.reduce(0, +))
    }

    @Test("A read whose data is not in the page cache goes to a worker and returns the right data")
    func uncachedReadGoesToWorker() throws {
        let folder = try ImageFolder()
        let path = try folder.raw("disk.raw", size: 1 << 20)
        let harness = try BlockHarness(disk: try openRaw(path), options: VirtioBlockOptions(diskIndex: 79, workersPerQueue: 2))
        #expect(try harness.complete(try harness.write(sector: 0, ImageFolder.pattern(sector))) == ok)
        usleep(50_000)
        // Drop the file's pages from the page cache (clean once synced).
        let fd = open(path, O_RDONLY)
        #expect(fd >= 0)
        defer { close(fd) }
        #expect(fsync(fd) == 0)
        #expect(posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED) == 0)
        let before = voluntarySwitches(ofThreadsNamed: "blk79q0w")
        let read = try harness.read(sector: 256, count: 4096)
        #expect(try harness.complete(read) == ok)
        let image = ImageFolder.pattern(1 << 20)
        #expect(try harness.data(of: read) == Array(image[(256 * sector)..<(256 * sector + 4096)]))
        #expect(voluntarySwitches(ofThreadsNamed: "blk79q0w").values.reduce(0, +) > before.values.reduce(0, +),
                "a worker served it")
    }

    @Test("pause() returns only once no request is being answered, also a cached read the dispatcher answers itself")
    func pauseWaitsForReadsAnsweredInline() throws {
        let folder = try ImageFolder()
        let path = try folder.raw("disk.raw", size: 1 << 20)  // just written: in the page cache
        let harness = try BlockHarness(disk: try openRaw(path), options: VirtioBlockOptions(diskIndex: 80, workersPerQueue: 1),
                                         queueSize: 256)
        // 80 reads of 16 KiB (the most answered inline), 3 descriptors each, fill 240 of the
        // 256 entries; their buffers are reused every round.
        let batch = 80, bytes: UInt32 = 16384
        var buffers: [(header: UInt64, data: UInt64, status: UInt64)] = []
        for _ in 0..<batch { buffers.append((try harness.allocate(16), try harness.allocate(Int(bytes)), try harness.allocate(1))) }
        var late = 0, caught = 0
        for _ in 0..<300 {
            let start = harness.drivers[0].usedSeen
            for (index, buffer) in buffers.enumerated() {
                try harness.memory.write(BlockHarness.header(type: VirtioBlockRequestType.read, sector: UInt64(index * 32)), at: buffer.header)
                try harness.submitChain([(buffer.header, 16, false), (buffer.data, bytes, true), (buffer.status, 1, true)], notify: false)
            }
            harness.notifiers[0].signal()
            // Pause while the dispatcher is answering the batch: once the first answer shows.
            while try harness.drivers[0].usedIndex == start {}
            harness.device.pause()
            let atPause = try harness.drivers[0].usedIndex
            if atPause != start &+ UInt16(batch) { caught += 1 }
            usleep(1000)
            // Paused: nothing more is answered, not even the chain the dispatcher had in hand.
            if try harness.drivers[0].usedIndex != atPause { late += 1 }
            harness.device.resume()
            #expect(try harness.waitForUsed(start &+ UInt16(batch)))
            harness.drivers[0].usedSeen = start &+ UInt16(batch)
        }
        #expect(late == 0, "in \(late) of \(caught) rounds paused mid-batch, a request was answered after pause() returned")
        #expect(harness.interrupt.resets.isEmpty)
    }

    @Test("Reset while requests are in flight returns only once they are done, and returns none of them")
    func resetWithRequestsInFlight() throws {
        let folder = try ImageFolder()
        let path = try folder.raw("disk.raw", size: 1 << 20)
        let disk = ObservedDisk(try openRaw(path), gateOpen: false)
        let harness = try BlockHarness(disk: disk, options: VirtioBlockOptions(workersPerQueue: 4))
        let reads = try (0..<8).map { try harness.read(sector: UInt64($0), count: 512) }
        #expect(disk.waitForReads(4))

        let events = EventLog()
        let device = harness.device
        let resetter = Thread { device.reset(); events.append("reset returned") }
        resetter.start()
        usleep(100_000)  // a reset that did not wait would return now
        events.append("disk released")
        disk.openGate()
        let deadline = Date().addingTimeInterval(10)
        while events.all.count < 2 && Date() < deadline { usleep(1000) }
        #expect(events.all == ["disk released", "reset returned"])
        #expect(disk.readsStarted == 4, "requests not yet started are dropped")
        #expect(try harness.drivers[0].usedIndex == 0, "nothing is returned to a driver that reset the device")
        #expect(try reads.map { try harness.status(of: $0) } == [UInt8](repeating: 0xFF, count: 8))

        // The driver sets the device up again: it serves as new.
        try harness.reinitialize()
        let read = try harness.read(sector: 3, count: 512)
        #expect(try harness.complete(read) == ok)
        #expect(try harness.data(of: read) == Array(ImageFolder.pattern(1 << 20)[(3 * sector)..<(4 * sector)]))
    }

    @Test("Activation twice is refused; reset without activation is harmless")
    func lifecycle() throws {
        let folder = try ImageFolder()
        let harness = try BlockHarness(disk: try openRaw(try folder.raw("disk.raw", size: 4096)), activate: false)
        harness.device.reset()
        try harness.activate()
        #expect(throws: VirtioError.self) { try harness.activate() }
        #expect(try harness.complete(try harness.read(sector: 0, count: 512)) == ok)
        harness.device.reset()
        harness.device.reset()
    }

    @Test("Activation with the wrong number of queues is refused")
    func wrongQueueCount() throws {
        let folder = try ImageFolder()
        let device = try VirtioBlock(disk: try openRaw(try folder.raw("disk.raw", size: 4096)))
        let memory = try makeMemory()
        let interrupt = RecordingInterrupt()
        let activation = VirtioActivation(memory: memory, features: device.offeredFeatures, queues: [nil, nil],
                                          notifications: [try EventFD(), try EventFD()], interrupt: interrupt,
                                          needsReset: { interrupt.needsReset($0) })
        #expect(throws: VirtioError.self) { try device.activate(activation) }
    }

    @Test("Several queues: each serves its own requests and interrupts with its own index")
    func multiQueue() throws {
        let folder = try ImageFolder()
        let path = try folder.raw("disk.raw", size: 1 << 20)
        let harness = try BlockHarness(disk: try openRaw(path), options: VirtioBlockOptions(queueCount: 2))
        let write = try harness.write(sector: 7, ImageFolder.pattern(sector, seed: 3), queue: 1)
        #expect(try harness.complete(write) == ok)
        let read = try harness.read(sector: 7, count: 512, queue: 0)
        #expect(try harness.complete(read) == ok)
        #expect(try harness.data(of: read) == ImageFolder.pattern(sector, seed: 3))
        #expect(harness.interrupt.interrupts(queue: 0) == 1)
        #expect(harness.interrupt.interrupts(queue: 1) == 1)
    }

    @Test("A queue the driver did not enable is not served")
    func disabledQueue() throws {
        let folder = try ImageFolder()
        let harness = try BlockHarness(disk: try openRaw(try folder.raw("disk.raw", size: 4096)),
                                       options: VirtioBlockOptions(queueCount: 2), activate: false)
        let interrupt = harness.interrupt
        try harness.device.activate(VirtioActivation(memory: harness.memory, features: harness.features,
                                                     queues: [harness.queues[0], nil], notifications: harness.notifiers,
                                                     interrupt: interrupt, needsReset: { interrupt.needsReset($0) }))
        #expect(try harness.complete(try harness.read(sector: 0, count: 512)) == ok)
    }

    @Test("The driver's NO_INTERRUPT flag suppresses interrupts; without it each completion interrupts")
    func interruptSuppression() throws {
        let folder = try ImageFolder()
        let disk = try openRaw(try folder.raw("disk.raw", size: 4096))
        let device = try VirtioBlock(disk: disk)
        let features = device.offeredFeatures & ~VirtioFeature.ringEventIndex
        let harness = try BlockHarness(disk: disk, features: features)
        #expect(try harness.complete(try harness.read(sector: 0, count: 512)) == ok)
        #expect(try harness.complete(try harness.read(sector: 1, count: 512)) == ok)
        #expect(harness.interrupt.interrupts(queue: 0) == 2)
        try harness.drivers[0].setAvailableFlags(1)
        #expect(try harness.complete(try harness.read(sector: 2, count: 512)) == ok)
        #expect(harness.interrupt.interrupts(queue: 0) == 2)
    }
}
