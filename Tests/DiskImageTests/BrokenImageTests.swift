import DiskImage
import Foundation
import Testing

/// What QEMU 7.2 does with the same bytes (checked by a test when qemu-img is installed).
enum QemuVerdict: Sendable {
    /// `qemu-img info` refuses to open it.
    case refusesAtOpen
    /// `qemu-img info` opens it (without reading data or backing files), but
    /// `qemu-img convert` fails: when it opens with I/O, follows the backing file, or reads data.
    case refusesToConvert
    /// QEMU opens and converts it; Swiftlet is stricter, for the reason given.
    case accepts(String)
    /// `qemu-img info` opens it; convert is not run, for the reason given.
    case infoOnly(String)
}

/// One broken image: how to break the valid `TestImage`, the exact error expected, and QEMU's verdict.
struct BrokenCase: Sendable, CustomTestStringConvertible {
    var name: String
    var mutate: @Sendable (inout TestImage) -> Void
    /// The expected error, given the image's path.
    var expected: @Sendable (String) -> DiskImageError
    var qemu: QemuVerdict = .refusesAtOpen
    var testDescription: String { name }
}

/// A valid bitmap entry changed by `change`.
private func bitmap(_ change: (inout TestImage.Bitmap) -> Void = { _ in }) -> TestImage.Bitmap {
    var b = TestImage.Bitmap()
    change(&b)
    return b
}

private let cs = UInt64(TestImage.clusterSize)

/// The corpus: every case breaks one thing QEMU (or the spec) guards against.
let brokenCorpus: [BrokenCase] = [
    BrokenCase(name: "version 1", mutate: { $0.put32(1, at: TestImage.version) },
               expected: { _ in .unsupportedVersion(1) }),
    BrokenCase(name: "version 4", mutate: { $0.put32(4, at: TestImage.version) },
               expected: { _ in .unsupportedVersion(4) }),
    BrokenCase(name: "cluster_bits 8", mutate: { $0.put32(8, at: TestImage.clusterBits) },
               expected: { _ in .clusterBitsOutOfRange(8) }),
    BrokenCase(name: "cluster_bits 40", mutate: { $0.put32(40, at: TestImage.clusterBits) },
               expected: { _ in .clusterBitsOutOfRange(40) }),
    BrokenCase(name: "header_length below 104", mutate: { $0.put32(100, at: TestImage.headerLength) },
               expected: { _ in .headerTooShort(100) }),
    BrokenCase(name: "header_length not a multiple of 8", mutate: { $0.put32(108, at: TestImage.headerLength) },
               expected: { _ in .headerLengthMisaligned(108) }, qemu: .accepts("the spec asks for a multiple of 8; QEMU does not check")),
    BrokenCase(name: "header_length beyond the cluster", mutate: { $0.put32(8192, at: TestImage.headerLength) },
               expected: { _ in .headerExceedsCluster(headerLength: 8192, clusterSize: cs) }),
    BrokenCase(name: "refcount_order 7", mutate: { $0.put32(7, at: TestImage.refcountOrder) },
               expected: { _ in .refcountOrderTooLarge(7) }),
    BrokenCase(name: "L1 table misaligned", mutate: { $0.put64(3 * cs + 8, at: TestImage.l1Offset) },
               expected: { _ in .tableMisaligned(table: "L1 table", offset: 3 * cs + 8) }),
    BrokenCase(name: "L1 table beyond end of file", mutate: { $0.put64(1 << 40, at: TestImage.l1Offset) },
               expected: { _ in .tableOutsideFile(table: "L1 table", offset: 1 << 40, length: 8, fileSize: 8 * cs) }, qemu: .accepts("QEMU reads zeros past the end of the file; qemu-img check reports the reference past the end")),
    BrokenCase(name: "L1 table offset near 2^64", mutate: { $0.put64(0xffff_ffff_ffff_f000, at: TestImage.l1Offset) },
               expected: { _ in .tableOutsideFile(table: "L1 table", offset: 0xffff_ffff_ffff_f000, length: 8,
                                                  fileSize: 8 * cs) }),
    BrokenCase(name: "L1 table at offset 0", mutate: { $0.put64(0, at: TestImage.l1Offset) },
               expected: { _ in .tableOverlapsHeader(table: "L1 table") }, qemu: .accepts("QEMU reads the header cluster as the L1 table")),
    BrokenCase(name: "L1 table too large", mutate: { $0.put32(0x0100_0000, at: TestImage.l1Size) },
               expected: { _ in .tableTooLarge(table: "L1 table", entries: 0x0100_0000, limit: 4 * 1024 * 1024) }),
    BrokenCase(name: "L1 table too small for the virtual size", mutate: { $0.put64(1 << 40, at: TestImage.size) },
               expected: { _ in .l1TooSmall(entries: 1, needed: 512 * 1024) }),
    BrokenCase(name: "virtual size above INT64_MAX", mutate: { $0.put64(1 << 63, at: TestImage.size) },
               expected: { _ in .virtualSizeTooLarge(1 << 63) }),
    BrokenCase(name: "refcount table too large", mutate: { $0.put32(100_000, at: TestImage.refcountTableClusters) },
               expected: { _ in .tableTooLarge(table: "refcount table", entries: 100_000 * cs / 8, limit: 1024 * 1024) }),
    BrokenCase(name: "refcount table misaligned", mutate: { $0.put64(cs + 512, at: TestImage.refcountTableOffset) },
               expected: { _ in .tableMisaligned(table: "refcount table", offset: cs + 512) }),
    BrokenCase(name: "no refcount table", mutate: { $0.put32(0, at: TestImage.refcountTableClusters) },
               expected: { _ in .noRefcountTable }),
    BrokenCase(name: "empty L1 table, misaligned", mutate: { img in
                   img.put64(0, at: TestImage.size)
                   img.put32(0, at: TestImage.l1Size)
                   img.put64(3 * cs + 8, at: TestImage.l1Offset)
               }, expected: { _ in .tableMisaligned(table: "L1 table", offset: 3 * cs + 8) }),
    BrokenCase(name: "empty L1 table beyond 2^63", mutate: { img in
                   img.put64(0, at: TestImage.size)
                   img.put32(0, at: TestImage.l1Size)
                   img.put64(1 << 63, at: TestImage.l1Offset)
               }, expected: { _ in .tableOffsetTooLarge(table: "L1 table", offset: 1 << 63) }),
    BrokenCase(name: "no snapshots, misaligned snapshot table offset", mutate: { $0.put64(7, at: TestImage.snapshotsOffset) },
               expected: { _ in .tableMisaligned(table: "snapshot table", offset: 7) }),
    BrokenCase(name: "no snapshots, snapshot table offset beyond 2^63",
               mutate: { $0.put64(1 << 63 | 1 << 12, at: TestImage.snapshotsOffset) },
               expected: { _ in .tableOffsetTooLarge(table: "snapshot table", offset: 1 << 63 | 1 << 12) }),
    BrokenCase(name: "raw external data bit without a data file", mutate: { $0.put64(1 << 1, at: TestImage.autoclear) },
               expected: { _ in .rawDataFileWithoutDataFile }, qemu: .refusesToConvert),
    BrokenCase(name: "backing name too long", mutate: { img in
                   img.setBacking("base.raw", format: nil)
                   img.put32(2000, at: TestImage.backingSize)
               }, expected: { _ in .backingNameTooLong(2000) }),
    BrokenCase(name: "backing name offset beyond the first cluster", mutate: { img in
                   img.setBacking("base.raw", format: nil)
                   img.put64(2 * cs, at: TestImage.backingOffset)
               }, expected: { _ in .backingOffsetInvalid(offset: 2 * cs, clusterSize: cs) }),
    BrokenCase(name: "header extension longer than the header area", mutate: { img in
                   img.put32(0x1234_5678, at: 112)
                   img.put32(0x7fff_0000, at: 116)
               }, expected: { _ in .extensionTooLarge(type: 0x1234_5678, length: 0x7fff_0000) }),
    BrokenCase(name: "backing format extension too long", mutate: { img in
                   img.setExtensions([(0xe279_2aca, Array("qcow2-but-much-too-long".utf8))])
               }, expected: { _ in .badExtension(name: "backing format", reason: "length 23 is too long") }),
    BrokenCase(name: "backing format extension twice", mutate: { img in
                   img.setExtensions([(0xe279_2aca, Array("raw".utf8)), (0xe279_2aca, Array("raw".utf8))])
               }, expected: { _ in .badExtension(name: "backing format", reason: "appears more than once") }, qemu: .accepts("the spec allows each extension once; QEMU keeps the last")),
    BrokenCase(name: "bitmaps extension with a bad length", mutate: { img in
                   img.setExtensions([(0x2385_2875, [UInt8](repeating: 0, count: 16))])
               }, expected: { _ in .badExtension(name: "bitmaps", reason: "length 16 is not 24") }),
    BrokenCase(name: "bitmaps extension: too many bitmaps", mutate: { img in
                   img.put64(1, at: TestImage.autoclear)
                   var ext = [UInt8](repeating: 0, count: 24)
                   ext[0] = 0x00; ext[1] = 0x01; ext[2] = 0x00; ext[3] = 0x00  // nb_bitmaps = 65536
                   img.setExtensions([(0x2385_2875, ext)])
               }, expected: { _ in .badExtension(name: "bitmaps", reason: "65536 bitmaps is more than 65535") }),
    BrokenCase(name: "bitmaps extension: directory outside the file", mutate: { img in
                   img.put64(1, at: TestImage.autoclear)
                   var ext = [UInt8](repeating: 0, count: 24)
                   ext[3] = 1                       // One bitmap,
                   ext[15] = 64                     // a 64-byte directory,
                   ext[21] = 0x10                   // at 0x100000, past the end of the file.
                   img.setExtensions([(0x2385_2875, ext)])
               }, expected: { _ in .badExtension(name: "bitmaps",
                                                reason: "directory at 0x100000 runs past the end of the file") }),
    BrokenCase(name: "bitmaps extension: reserved field set", mutate: { $0.setBitmaps([bitmap()], reserved: 5) },
               expected: { _ in .badExtension(name: "bitmaps", reason: "reserved field is 5, not 0") }),
    BrokenCase(name: "bitmaps extension: zero bitmaps", mutate: { $0.setBitmaps([], announced: 0) },
               expected: { _ in .badExtension(name: "bitmaps", reason: "it announces zero bitmaps") }),
    BrokenCase(name: "bitmaps extension: directory offset misaligned",
               mutate: { $0.setBitmaps([bitmap()], directoryOffset: 8 * cs + 16) },
               expected: { _ in .badExtension(name: "bitmaps", reason: "directory offset 0x8010 is not cluster-aligned") }),
    BrokenCase(name: "bitmaps extension: directory larger than QEMU's limit",
               mutate: { $0.setBitmaps([bitmap()], directorySize: 65535 * 1024 + 8) },
               expected: { _ in .badExtension(name: "bitmaps", reason: "directory size 67107848 is more than 67107840 bytes") }),
    BrokenCase(name: "bitmaps extension: empty directory", mutate: { $0.setBitmaps([bitmap()], directorySize: 0) },
               expected: { _ in .badExtension(name: "bitmaps", reason: "directory size is 0") }),
    BrokenCase(name: "bitmap directory: entry cut short", mutate: { $0.setBitmaps([bitmap()], directorySize: 16) },
               expected: { _ in .badBitmapDirectory("entry 0 runs past the end of the directory") }),
    BrokenCase(name: "bitmap directory: name runs past the directory",
               mutate: { $0.setBitmaps([bitmap { $0.nameSize = 100 }]) },
               expected: { _ in .badBitmapDirectory("entry 0 runs past the end of the directory") }),
    BrokenCase(name: "bitmap directory: more entries than announced",
               mutate: { $0.setBitmaps([bitmap(), bitmap { $0.name = Array("b1".utf8) }], announced: 1) },
               expected: { _ in .badBitmapDirectory("it holds more entries than the 1 the header extension announces") }),
    BrokenCase(name: "bitmap directory: fewer entries than announced", mutate: { $0.setBitmaps([bitmap()], announced: 2) },
               expected: { _ in .badBitmapDirectory("it holds 1 entries, fewer than the 2 the header extension announces") }),
    BrokenCase(name: "bitmap: extra data", mutate: { $0.setBitmaps([bitmap { $0.extra = [0, 0, 0, 0, 0, 0, 0, 0] }]) },
               expected: { _ in .badBitmap(index: 0, name: "b0",
                                           reason: "it has 8 bytes of extra data, which QEMU does not support") }),
    BrokenCase(name: "bitmap: empty table", mutate: { $0.setBitmaps([bitmap { $0.tableEntries = 0 }]) },
               expected: { _ in .badBitmap(index: 0, name: "b0", reason: "its bitmap table has no entries") }),
    BrokenCase(name: "bitmap: table at offset 0", mutate: { $0.setBitmaps([bitmap { $0.tableOffset = 0 }]) },
               expected: { _ in .badBitmap(index: 0, name: "b0", reason: "its bitmap table is at offset 0") }),
    BrokenCase(name: "bitmap: table misaligned", mutate: { $0.setBitmaps([bitmap { $0.tableOffset = 9 * cs + 512 }]) },
               expected: { _ in .badBitmap(index: 0, name: "b0", reason: "its bitmap table at 0x9200 is not cluster-aligned") }),
    BrokenCase(name: "bitmap: table larger than QEMU's limit",
               mutate: { $0.setBitmaps([bitmap { $0.tableEntries = 0x800_0001; $0.flags = 1 }]) },
               expected: { _ in .badBitmap(index: 0, name: "b0",
                                           reason: "its bitmap table has 134217729 entries, more than 134217728") }),
    BrokenCase(name: "bitmap: granularity below 512 bytes", mutate: { $0.setBitmaps([bitmap { $0.granularityBits = 8 }]) },
               expected: { _ in .badBitmap(index: 0, name: "b0", reason: "granularity 2^8 is outside 2^9...2^31") }),
    BrokenCase(name: "bitmap: granularity above 2 GiB", mutate: { $0.setBitmaps([bitmap { $0.granularityBits = 32 }]) },
               expected: { _ in .badBitmap(index: 0, name: "b0", reason: "granularity 2^32 is outside 2^9...2^31") }),
    BrokenCase(name: "bitmap: reserved flags", mutate: { $0.setBitmaps([bitmap { $0.flags = 4 }]) },
               expected: { _ in .badBitmap(index: 0, name: "b0", reason: "reserved flag bits 0x4 are set") }),
    BrokenCase(name: "bitmap: name longer than 1023 bytes",
               mutate: { $0.setBitmaps([bitmap { $0.name = [UInt8](repeating: 0x61, count: 1024) }]) },
               expected: { _ in .badBitmap(index: 0, name: String(repeating: "a", count: 1024),
                                           reason: "its name is 1024 bytes, more than 1023") }),
    BrokenCase(name: "bitmap: unknown type", mutate: { $0.setBitmaps([bitmap { $0.type = 2 }]) },
               expected: { _ in .badBitmap(index: 0, name: "b0", reason: "type 2 is not 1 (dirty tracking)") }),
    BrokenCase(name: "bitmap: more than 512 MiB of bitmap",
               mutate: { $0.setBitmaps([bitmap { $0.tableEntries = 131_073; $0.flags = 1 }]) },
               expected: { _ in .badBitmap(index: 0, name: "b0",
                                           reason: "its bitmap table of 131073 clusters is more than 512 MiB of bitmap") }),
    BrokenCase(name: "bitmap: table too small to cover the disk", mutate: { img in
                   img.put64(32 << 20, at: TestImage.size)  // 32 MiB: 16 L1 entries (zeros past the first).
                   img.put32(16, at: TestImage.l1Size)
                   img.setBitmaps([bitmap { $0.granularityBits = 9 }])  // One cluster of bits covers 16 MiB.
               }, expected: { _ in .badBitmap(index: 0, name: "b0",
                                              reason: "its bitmap table of 1 clusters cannot cover the 33554432-byte disk") }),
    BrokenCase(name: "bitmap: table larger than the disk needs", mutate: { $0.setBitmaps([bitmap { $0.tableEntries = 2 }]) },
               expected: { _ in .badBitmap(index: 0, name: "b0",
                                           reason: "its bitmap table has 2 entries but the disk needs exactly 1") }),
    BrokenCase(name: "bitmap: two bitmaps with one name", mutate: { $0.setBitmaps([bitmap(), bitmap()]) },
               expected: { _ in .badBitmap(index: 1, name: "b0", reason: "another bitmap has the same name") }),
    BrokenCase(name: "bitmap table entry: reserved bits", mutate: { img in
                   img.setBitmaps([bitmap()])
                   img.put64(2, at: 9 * Int(cs))
               }, expected: { _ in .badBitmap(index: 0, name: "b0",
                                              reason: "bitmap table entry 0 (0x2) has reserved bits set") }),
    BrokenCase(name: "bitmap table entry: offset and all-ones flag", mutate: { img in
                   img.setBitmaps([bitmap()])
                   img.put64(5 * cs | 1, at: 9 * Int(cs))
               }, expected: { _ in .badBitmap(index: 0, name: "b0",
                                              reason: "bitmap table entry 0 (0x5001) has both a data offset and the all-ones flag") }),
    BrokenCase(name: "bitmap table entry: misaligned data cluster", mutate: { img in
                   img.setBitmaps([bitmap()])
                   img.put64(5 * cs + 512, at: 9 * Int(cs))
               }, expected: { _ in .badBitmap(index: 0, name: "b0",
                                              reason: "bitmap table entry 0 (0x5200) points at 0x5200, which is not cluster-aligned") }),
    BrokenCase(name: "bitmap: table past the end of the file",
               mutate: { $0.setBitmaps([bitmap { $0.tableOffset = 100 * cs }]) },
               expected: { _ in .badBitmap(index: 0, name: "b0", reason: "its bitmap table at 0x64000 runs past the end of the file") }, qemu: .accepts("QEMU reads zeros past the end of the file; qemu-img check reports the reference past the end")),
    BrokenCase(name: "AES encryption", mutate: { $0.put32(1, at: TestImage.cryptMethod) },
               expected: { _ in .unsupportedFeature("encryption (AES, crypt_method 1)") }, qemu: .refusesToConvert),
    BrokenCase(name: "LUKS encryption", mutate: { $0.put32(2, at: TestImage.cryptMethod) },
               expected: { _ in .unsupportedFeature("encryption (LUKS, crypt_method 2)") }),
    BrokenCase(name: "full disk encryption extension", mutate: { img in
                   img.setExtensions([(0x0537_be77, [UInt8](repeating: 0, count: 16))])
               }, expected: { _ in .unsupportedFeature("full disk encryption header extension (LUKS)") }),
    BrokenCase(name: "external data file bit", mutate: { $0.put64(1 << 2, at: TestImage.incompatible) },
               expected: { _ in .unsupportedFeature("external data file (incompatible bit 2)") }, qemu: .refusesToConvert),
    BrokenCase(name: "unknown incompatible bit, named by the feature table", mutate: { img in
                   img.put64(1 << 10, at: TestImage.incompatible)
                   img.setExtensions([(0x6803_f857, TestImage.featureEntry(type: 0, bit: 10, name: "frobnicate"))])
               }, expected: { _ in .unsupportedFeature("incompatible feature 'frobnicate' (bit 10)") }),
    BrokenCase(name: "unknown incompatible bit, unnamed", mutate: { $0.put64(1 << 33, at: TestImage.incompatible) },
               expected: { _ in .unsupportedFeature("incompatible feature 'bit 33' (bit 33)") }),
    BrokenCase(name: "unknown compression type", mutate: { img in
                   img.put8(2, at: TestImage.compressionType)
                   img.put64(1 << 3, at: TestImage.incompatible)
               }, expected: { _ in .unknownCompressionType(2) }),
    BrokenCase(name: "zstd without the compression type bit", mutate: { $0.put8(1, at: TestImage.compressionType) },
               expected: { _ in .compressionBitMismatch(
                   "compression_type is 1 (zstd) but the compression type feature bit is not set") }),
    BrokenCase(name: "compression type bit with zlib", mutate: { $0.put64(1 << 3, at: TestImage.incompatible) },
               expected: { _ in .compressionBitMismatch("compression type bit is set but compression_type is 0 (zlib)") }),
    BrokenCase(name: "extended L2 with 4 KiB clusters", mutate: { $0.put64(1 << 4, at: TestImage.incompatible) },
               expected: { _ in .extendedL2NeedsLargerClusters(clusterBits: 12) }),
    BrokenCase(name: "too many snapshots", mutate: { img in
                   img.put32(70_000, at: TestImage.snapshotCount)
                   img.put64(7 * cs, at: TestImage.snapshotsOffset)
               }, expected: { _ in .tooManySnapshots(70_000) }),
    BrokenCase(name: "snapshot table outside the file", mutate: { img in
                   img.put32(1, at: TestImage.snapshotCount)
                   img.put64(1 << 30, at: TestImage.snapshotsOffset)
               }, expected: { _ in .tableOutsideFile(table: "snapshot table", offset: 1 << 30, length: 40, fileSize: 8 * cs) }, qemu: .accepts("QEMU reads zeros past the end of the file")),
    BrokenCase(name: "snapshot with too much extra data", mutate: { img in
                   img.put32(1, at: TestImage.snapshotCount)
                   img.put64(7 * cs, at: TestImage.snapshotsOffset)
                   img.put32(2000, at: 7 * Int(cs) + 36)
               }, expected: { _ in .badSnapshot(index: 0, reason: "extra data size 2000 is more than 1024") }),
    BrokenCase(name: "snapshot table larger than 64 MiB", mutate: { img in
                   // 512 snapshots with 65535-byte ids and names: 131112 bytes each, 67 MB in all.
                   let entry = 40 + 65535 + 65535 + 2
                   img.bytes += [UInt8](repeating: 0, count: 512 * entry)
                   img.put32(512, at: TestImage.snapshotCount)
                   img.put64(8 * cs, at: TestImage.snapshotsOffset)
                   for k in 0..<512 {
                       img.put16(0xffff, at: 8 * Int(cs) + k * entry + 12)
                       img.put16(0xffff, at: 8 * Int(cs) + k * entry + 14)
                   }
               }, expected: { _ in .snapshotTableTooLarge(entries: 512, bytes: 511 * 131_112 + 131_110) }),
    BrokenCase(name: "snapshot L1 table misaligned", mutate: { img in
                   img.put32(1, at: TestImage.snapshotCount)
                   img.put64(7 * cs, at: TestImage.snapshotsOffset)
                   img.put64(3 * cs + 1, at: 7 * Int(cs))
                   img.put32(1, at: 7 * Int(cs) + 8)
               }, expected: { _ in .badSnapshot(index: 0, reason: "qcow2 header: snapshot L1 table offset 0x3001 is not cluster-aligned") }, qemu: .accepts("QEMU checks a snapshot's L1 table only when the snapshot is used; qemu-img check reports it")),
    BrokenCase(name: "snapshot L1 tables too large all together", mutate: { img in
                   // 33 snapshots, each with the largest L1 table allowed (4 Mi entries), all at one offset.
                   img.bytes += [UInt8](repeating: 0, count: 33 << 20)
                   img.put32(33, at: TestImage.snapshotCount)
                   img.put64(7 * cs, at: TestImage.snapshotsOffset)
                   for k in 0..<33 {
                       let e = 7 * Int(cs) + k * 48
                       img.put64(8 * cs, at: e)
                       img.put32(4 << 20, at: e + 8)
                       img.put16(1, at: e + 12)
                       img.put16(1, at: e + 14)
                       img.put8(0x31, at: e + 40)
                       img.put8(0x73, at: e + 41)
                   }
               }, expected: { _ in .tableTooLarge(table: "snapshot L1 tables (all together)", entries: 33 << 22, limit: 1 << 27) }, qemu: .accepts("Swiftlet's own bound on the work of walking every snapshot's tables")),
    BrokenCase(name: "L2 table misaligned", mutate: { $0.put64(4 * cs + 512 | 1 << 63, at: 3 * Int(cs)) },
               expected: { _ in .corruptMetadata("L2 table offset 0x4200 in L1 entry 0 is not cluster-aligned") }, qemu: .refusesToConvert),
    BrokenCase(name: "L2 table beyond end of file", mutate: { $0.put64(1 << 40 | 1 << 63, at: 3 * Int(cs)) },
               expected: { _ in .corruptMetadata("L2 table offset 0x10000000000 in L1 entry 0 is outside the file") }, qemu: .accepts("QEMU reads zeros past the end of the file; qemu-img check reports the reference past the end")),
    BrokenCase(name: "L2 table in the header cluster", mutate: { $0.put64(0 | 1 << 9 | 1 << 63, at: 3 * Int(cs)) },
               expected: { _ in .corruptMetadata("L2 table offset 0x200 in L1 entry 0 is not cluster-aligned") }, qemu: .refusesToConvert),
    BrokenCase(name: "L1 entry reserved bits", mutate: { $0.put64(4 * cs | 1 << 63 | 1 << 60, at: 3 * Int(cs)) },
               expected: { _ in .corruptMetadata("L1 entry 0 (0x9000000000004000) has reserved bits set") }, qemu: .accepts("QEMU's read path ignores reserved bits; qemu-img check reports them")),
    BrokenCase(name: "data cluster misaligned", mutate: { $0.put64(5 * cs + 512 | 1 << 63, at: TestImage.l2EntryOffset) },
               expected: { _ in .corruptMetadata("data cluster offset 0x5200 for guest cluster 0 is not cluster-aligned") }, qemu: .refusesToConvert),
    BrokenCase(name: "data cluster beyond end of file", mutate: { $0.put64(1 << 44 | 1 << 63, at: TestImage.l2EntryOffset) },
               expected: { _ in .corruptMetadata("data cluster offset 0x100000000000 for guest cluster 0 is outside the file") }, qemu: .accepts("QEMU reads zeros past the end of the file; qemu-img check reports the reference past the end")),
    BrokenCase(name: "L2 entry reserved bits", mutate: { $0.put64(5 * cs | 1 << 63 | 1 << 57, at: TestImage.l2EntryOffset) },
               expected: { _ in .corruptMetadata("L2 entry 0x8200000000005000 for guest cluster 0 has reserved bits set") }, qemu: .accepts("QEMU's read path ignores reserved bits; qemu-img check reports them")),
    BrokenCase(name: "compressed cluster beyond end of file", mutate: { img in
                   img.put64(1 << 62 | 1 << 58 | 1 << 40, at: TestImage.l2EntryOffset + 8)
               }, expected: { _ in .corruptMetadata("compressed data for guest cluster 1 at 0x10000000000 is outside the file") }, qemu: .refusesToConvert),
    BrokenCase(name: "compressed cluster with garbage", mutate: { img in
                   img.put8(0x07, at: Int(TestImage.compressedOffset))  // BTYPE=11 is invalid deflate.
               }, expected: { _ in .decompressionFailed(hostOffset: TestImage.compressedOffset,
                                                      reason: "invalid deflate data (zlib error -3)") }, qemu: .refusesToConvert),
    BrokenCase(name: "compressed cluster that inflates short", mutate: { img in
                   img.put8(0x00, at: Int(TestImage.compressedOffset) + 1)  // LEN low byte.
                   img.put8(0x08, at: Int(TestImage.compressedOffset) + 2)  // LEN = 0x0800 (2048).
                   img.put8(0xf7, at: Int(TestImage.compressedOffset) + 4)  // NLEN = ~0x0800.
               }, expected: { _ in .decompressionFailed(hostOffset: TestImage.compressedOffset,
                                                      reason: "deflate data ends after 2048 of 4096 bytes") }, qemu: .refusesToConvert),
    BrokenCase(name: "missing backing file", mutate: { $0.setBacking("no-such-base.raw", format: "raw") },
               expected: { path in .backingMissing(
                   path: DiskImage.resolveBackingPath("no-such-base.raw", relativeTo: path), errno: ENOENT) }, qemu: .refusesToConvert),
    BrokenCase(name: "backing file is the image itself", mutate: { $0.setBacking("broken.qcow2", format: "qcow2") },
               expected: { path in .backingLoop(path: path) }, qemu: .infoOnly("qemu-img convert follows the loop until it runs out of memory")),
    BrokenCase(name: "unknown backing format", mutate: { $0.setBacking("broken.qcow2", format: "vmdk") },
               expected: { _ in .unknownBackingFormat("vmdk") }, qemu: .refusesToConvert),
]

@Suite("Broken and hostile qcow2 images")
struct BrokenImageTests {
    @Test("the unbroken test image is valid and reads as built")
    func validBaseline() throws {
        let dir = try Support.TempDir()
        let path = dir.file("valid.qcow2")
        try TestImage().write(to: path)
        let dev = try DiskImage.open(path: path)
        #expect(try Support.readAll(dev) == TestImage.expectedContents)
        if Support.hasQemuImg {
            let check = try Support.qemuImg("check", path)
            #expect(check.status == 0, "qemu-img check of the test image: \(check.stdout) \(check.stderr)")
            #expect(try Support.qemuRaw(path, in: dir) == TestImage.expectedContents)
        }
    }

    @Test("corpus has at least 25 images")
    func corpusSize() {
        #expect(brokenCorpus.count >= 25)
    }

    @Test("each broken image is refused with its specific error", arguments: brokenCorpus)
    func refused(_ c: BrokenCase) throws {
        let dir = try Support.TempDir()
        let path = dir.file("broken.qcow2")
        var img = TestImage()
        c.mutate(&img)
        try img.write(to: path)
        let expected = c.expected(path)
        #expect(throws: expected) {
            let dev = try DiskImage.open(path: path)
            _ = try Support.readAll(dev)
        }
        #expect(!expected.description.isEmpty && !expected.description.contains("\n"))
    }

    @Test("every corpus image that opens but cannot be read fails check with corruptions")
    func checkFindsWhatReadsRefuse() throws {
        var opened = 0
        for c in brokenCorpus {
            let dir = try Support.TempDir()
            let path = dir.file("broken.qcow2")
            var img = TestImage()
            c.mutate(&img)
            try img.write(to: path)
            guard let dev = try? DiskImage.open(path: path) as? QCOW2Image else { continue }
            opened += 1
            #expect(throws: DiskImageError.self, "\(c.name)") { _ = try Support.readAll(dev) }
            let result = try #require(try DiskImage.check(path: path))
            #expect(result.exitStatus == 2, "\(c.name): \(result.messages)")
        }
        #expect(opened >= 10)
    }

    @Test("QEMU refuses each broken image too, or accepts it where Swiftlet is stricter, as recorded",
          .enabled(if: Support.hasQemuImg, Comment(rawValue: Support.noQemu)), arguments: brokenCorpus)
    func qemuVerdict(_ c: BrokenCase) throws {
        let dir = try Support.TempDir()
        let path = dir.file("broken.qcow2")
        var img = TestImage()
        c.mutate(&img)
        try img.write(to: path)
        let info = try Support.qemuImg("info", path)
        if case .infoOnly = c.qemu {
            #expect(info.status == 0, "qemu-img info refuses it: \(info.stderr)")
            return
        }
        let convert = try Support.qemuImg("convert", "-O", "raw", path, dir.file("out.raw"))
        switch c.qemu {
        case .refusesAtOpen:
            #expect(info.status != 0, "qemu-img info accepts it: \(info.stdout)")
            #expect(convert.status != 0)
        case .refusesToConvert:
            #expect(info.status == 0, "qemu-img info refuses it: \(info.stderr)")
            #expect(convert.status != 0, "qemu-img convert accepts it")
        case .accepts:
            #expect(info.status == 0, "qemu-img info refuses it: \(info.stderr)")
            #expect(convert.status == 0, "qemu-img convert refuses it: \(convert.stderr)")
        case .infoOnly:
            break
        }
    }

    /// Images that look odd but that QEMU opens: Swiftlet opens them too and reads what qemu-img reads.
    static let acceptedOddities: [(String, @Sendable (inout TestImage) -> Void)] = [
        ("a valid persistent bitmap", { $0.setBitmaps([TestImage.Bitmap()]) }),
        ("bitmap in use, with a table of the wrong size", { img in
            var b = TestImage.Bitmap(); b.flags = 1; b.tableEntries = 2
            img.setBitmaps([b])
        }),
        ("an in-use bitmap with the name of an earlier one", { img in
            var b = TestImage.Bitmap(); b.flags = 1
            img.setBitmaps([TestImage.Bitmap(), b])
        }),
        ("bitmaps extension without the autoclear bit (bitmaps left stale by another program)", { img in
            img.setBitmaps([TestImage.Bitmap()], reserved: 7, directorySize: 0)
            img.put64(0, at: TestImage.autoclear)
        }),
        ("a data file name without the data file bit", { img in
            img.setExtensions([(0x4441_5441, Array("data.raw".utf8))])
        }),
        ("an empty backing file name", { img in
            img.put64(2048, at: TestImage.backingOffset)
            img.put32(0, at: TestImage.backingSize)
        }),
        ("a virtual size that is not a multiple of 512", { img in
            img.put64(TestImage.virtualSize + 1, at: TestImage.size)
        }),
    ]

    @Test("images QEMU accepts are accepted, and read as qemu-img reads them",
          .enabled(if: Support.hasQemuImg, Comment(rawValue: Support.noQemu)),
          arguments: acceptedOddities.map(\.0))
    func acceptedLikeQemu(_ name: String) throws {
        let dir = try Support.TempDir()
        let path = dir.file("odd.qcow2")
        var img = TestImage()
        try #require(Self.acceptedOddities.first { $0.0 == name }).1(&img)
        try img.write(to: path)
        #expect(try Support.qemuImg("info", path).status == 0)
        let expected = try Support.qemuRaw(path, in: dir)
        let dev = try DiskImage.open(path: path)
        #expect(dev.virtualSize == UInt64(expected.count))
        #expect(try Support.readAll(dev) == expected)
        let q = try #require(dev as? QCOW2Image)
        #expect(try q.check().exitStatus == (try Support.qemuImg("check", path).status))
    }

    @Test("a file shorter than a header is refused")
    func shortFile() throws {
        let dir = try Support.TempDir()
        let path = dir.file("short.qcow2")
        try Data([0x51, 0x46, 0x49, 0xfb, 0, 0, 0, 3]).write(to: URL(fileURLWithPath: path))
        #expect(throws: DiskImageError.shortFile(path: path, needed: 72, size: 8)) {
            _ = try DiskImage.open(path: path)
        }
    }

    @Test("the corrupt bit opens read-only, refuses read-write")
    func corruptBit() throws {
        let dir = try Support.TempDir()
        let path = dir.file("corrupt.qcow2")
        var img = TestImage()
        img.put64(1 << 1, at: TestImage.incompatible)
        try img.write(to: path)
        #expect(throws: DiskImageError.imageCorrupt(path: path)) { _ = try Support.open(path, readOnly: false) }
        let dev = try DiskImage.open(path: path)
        #expect(dev.isReadOnly)
        #expect(try Support.readAll(dev) == TestImage.expectedContents)
    }

    @Test("a dirty image reads as is, and is repaired when opened for writing")
    func dirtyBit() throws {
        let dir = try Support.TempDir()
        let path = dir.file("dirty.qcow2")
        var img = TestImage()
        img.put64(1 << 0, at: TestImage.incompatible)
        img.put16(0, at: 2 * TestImage.clusterSize + 10)  // Data cluster 5: refcount 0 (a lazy refcount).
        try img.write(to: path)
        #expect(try Support.readAll(try DiskImage.open(path: path)) == TestImage.expectedContents)
        do {
            let dev = try #require(try Support.open(path, readOnly: false) as? QCOW2Image)
            #expect(try dev.check().exitStatus == 0)
            #expect(try QCOW2Header.parse(file: dev.file).isDirty == false)
            #expect(try Support.readAll(dev) == TestImage.expectedContents)
        }
        if Support.hasQemuImg { #expect(try Support.qemuImg("check", path).status == 0) }
    }

    @Test("a backing chain deeper than the limit is refused")
    func chainTooDeep() throws {
        let dir = try Support.TempDir()
        try Data(count: 4096).write(to: URL(fileURLWithPath: dir.file("l0.raw")))
        var previous = "l0.raw", format = "raw"
        for i in 1...(DiskImage.maxBackingDepth + 1) {
            var img = TestImage()
            img.setBacking(previous, format: format)
            previous = "l\(i).qcow2"
            format = "qcow2"
            try img.write(to: dir.file(previous))
        }
        #expect(throws: DiskImageError.backingChainTooDeep(limit: DiskImage.maxBackingDepth)) {
            _ = try DiskImage.open(path: dir.file(previous))
        }
        // One image fewer is fine.
        _ = try DiskImage.open(path: dir.file("l\(DiskImage.maxBackingDepth).qcow2"))
    }

    @Test("a two-image backing loop is detected")
    func twoImageLoop() throws {
        let dir = try Support.TempDir()
        var a = TestImage(), b = TestImage()
        a.setBacking("b.qcow2", format: "qcow2")
        b.setBacking("a.qcow2", format: "qcow2")
        try a.write(to: dir.file("a.qcow2"))
        try b.write(to: dir.file("b.qcow2"))
        #expect(throws: DiskImageError.backingLoop(path: dir.file("a.qcow2"))) {
            _ = try DiskImage.open(path: dir.file("a.qcow2"))
        }
    }

    @Test("an unknown snapshot name is refused")
    func unknownSnapshot() throws {
        #expect(throws: DiskImageError.snapshotNotFound("nope")) {
            _ = try DiskImage.open(path: Support.fixture("snapshots.qcow2"), snapshot: "nope")
        }
    }
}
