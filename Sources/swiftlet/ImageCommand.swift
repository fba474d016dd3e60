import ArgumentParser
import Basics
import DiskImage
import Synchronization

#if canImport(Glibc)
import Glibc
#endif

/// `swiftlet image`: inspect, convert, check and create disk images with the DiskImage module.
struct ImageCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "image",
        abstract: "Inspect, convert, check, create and change disk images (raw and qcow2), like qemu-img.",
        discussion: """
            A raw image is the simplest disk: byte N of the file is byte N of the disk. \
            qcow2 ("QEMU copy-on-write, version 2") stores only the parts of a disk that \
            were written. The disk is cut into clusters (64 KiB by default); a two-level \
            table (L1 -> L2) maps each guest cluster to a place in the file, or marks it \
            as unallocated, all-zero or compressed. Every cluster of the file has a \
            reference count, so clusters can be shared by internal snapshots.

            An unallocated cluster reads from the image's backing file, if it has one. \
            That is how overlays work: a small qcow2 file records your changes on top of \
            a read-only base image, which can itself be raw or qcow2.

            Formats are recognised by content (qcow2 files start with "QFI\\xfb"), never \
            by file name; --format overrides this. Damaged or hostile qcow2 files are \
            refused with a message naming the broken field.
            """,
        subcommands: [Info.self, Convert.self, Check.self, Create.self, Resize.self, Snapshot.self, Rebase.self,
                      Compare.self, Map.self, ReadBench.self]
    )
}

extension ImageFormat: ExpressibleByArgument {}

extension ImageCommand {
    /// `swiftlet image info`: describes an image and its backing chain.
    struct Info: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Show an image's format, sizes, backing chain, snapshots and features.",
            discussion: """
                For qcow2 images this prints the header's version ("compat 0.10" is version 2, \
                "compat 1.1" version 3), cluster size, refcount width, compression type, feature \
                bits by name, internal snapshots, and each image of the backing chain.
                """)

        @Argument(help: "The image file.") var path: String
        @Option(help: "Image format (raw or qcow2); detected from the content when omitted.")
        var format: ImageFormat?
        @Flag(help: "Print JSON instead of text.") var json = false

        func run() throws {
            let info = try imageCommand { try DiskImage.info(path: path, format: format) }
            if json {
                print(jsonText(info))
            } else {
                printInfo(info)
                for b in info.backing ?? [] {
                    print("")
                    printInfo(b)
                }
            }
        }
    }

    /// `swiftlet image convert`: writes the guest-visible contents to a raw file.
    struct Convert: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Convert an image (and its backing chain) to a raw image.",
            discussion: """
                The result has the disk's virtual size and is byte-identical to \
                'qemu-img convert -O raw'. Zero ranges are left as holes (sparse file). \
                Chunks are read and decompressed in parallel (two threads per core). An existing \
                output file is overwritten in place (its blocks reused, zero ranges punched out).

                The output must not be the source or a file of its backing chain, under any \
                name (hard or symbolic link, /proc/self/fd/N). Images are locked as QEMU locks \
                them: the output cannot be one another process (QEMU included) has open, and \
                the source cannot be one another process is writing.

                -p prints qemu-img's progress line, "    (12.34/100%)", redrawn in place on \
                standard error when it is a terminal (nothing otherwise, so logs stay clean).
                """)

        @Argument(help: "The source image.") var source: String
        @Argument(help: "The raw file to write (overwritten if it exists).") var destination: String
        @Option(help: "Source format (raw or qcow2); detected from the content when omitted.")
        var format: ImageFormat?
        @Option(help: "Read this internal snapshot of the source instead of its current state.")
        var snapshot: String?
        @Option(help: "Worker threads (default: two per core, at least 4).") var threads: Int = 0
        @Flag(name: .shortAndLong, inversion: .prefixedNo,
              help: "Show progress as qemu-img -p does, when standard error is a terminal.")
        var progress: Bool = false

        func run() throws {
            let meter = progress && isatty(STDERR_FILENO) != 0 ? ProgressMeter() : nil
            var callback: (@Sendable (UInt64, UInt64) -> Void)?
            if let meter { callback = { done, total in meter.update(done, total) } }
            meter?.start()
            try imageCommand {
                do {
                    let dev = try DiskImage.open(path: source, format: format, readOnly: true, snapshot: snapshot)
                    try RawConverter.convert(dev, to: destination, threads: threads, progress: callback)
                    meter?.finish(complete: true)
                } catch {
                    meter?.finish(complete: false)  // End the progress line before the error's.
                    throw error
                }
            }
        }
    }

    /// `swiftlet image check`: compares refcounts with references, like `qemu-img check`.
    struct Check: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Check a qcow2 image's metadata for consistency.",
            discussion: """
                Walks the L1/L2 tables of the image and its snapshots, counts the references \
                to every cluster of the file and compares them with the stored reference \
                counts, as 'qemu-img check' does. A reference count that is too low, a reference \
                outside the file, a misaligned table or cluster, reserved bits, or a wrong COPIED \
                flag is a corruption (data can be lost); a reference count that is too high is a \
                leak (wasted space only). It also reports everything a read would refuse, such \
                as compressed clusters that do not decompress.

                Each problem is one line on stderr, in qemu-img's words; the summary is on stdout.

                Exit status, as for 'qemu-img check': 0 no problems, 1 the check could not run \
                or complete, 2 corruptions found, 3 only leaks found, 63 the format (raw) has \
                nothing to check.
                """)

        @Argument(help: "The image file.") var path: String
        @Option(help: "Image format (raw or qcow2); detected from the content when omitted.")
        var format: ImageFormat?

        func run() throws {
            guard let result = try imageCommand({ try DiskImage.check(path: path, format: format) }) else {
                FileHandleOutput.standardError("swiftlet: \(path): raw images have no metadata to check")
                throw ExitCode(63)
            }
            for m in result.messages { FileHandleOutput.standardError(m) }
            for line in result.summary { print(line) }
            if result.checkErrors > 0 { FileHandleOutput.standardError("swiftlet: Check failed") }
            if result.exitStatus != 0 { throw ExitCode(result.exitStatus) }
        }
    }

    /// `swiftlet image create`: makes an empty qcow2 image or overlay.
    struct Create: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Create an empty qcow2 image, usually an overlay over a backing image.",
            discussion: """
                With --backing, the new image starts out reading exactly like the backing image \
                and records only what is written to it; the backing file is never modified. A \
                relative backing path is stored as given and resolved against the new image's \
                folder. The backing format is detected and recorded in the image.

                Example: swiftlet image create --backing base.qcow2 overlay.qcow2
                """)

        @Argument(help: "The image to create (must not exist).") var path: String
        @Option(help: "Virtual size, e.g. 10G or 512M (default: the backing image's size).") var size: String?
        @Option(help: "Backing image (raw or qcow2).") var backing: String?
        @Option(help: "Cluster size in bytes, a power of two from 512 to 2M.") var clusterSize: String = "64K"

        func run() throws {
            try imageCommand {
                let bytes = try size.map(parseSize)
                let cs = try parseSize(clusterSize)
                guard cs.nonzeroBitCount == 1 else {
                    throw DiskImageError.invalidArgument("cluster size \(cs) is not a power of two")
                }
                try QCOW2Image.create(path: path, size: bytes, backing: backing,
                                      clusterBits: UInt32(cs.trailingZeroBitCount))
            }
        }
    }
}

extension ImageCommand {
    /// Hidden: the in-process cost of small random reads, used by bench/disk-image.sh.
    struct ReadBench: ParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "read-bench",
            abstract: "Time random reads through the image's L2 cache (for benchmarks).",
            shouldDisplay: false)

        @Argument(help: "The image file.") var path: String
        @Option(help: "Number of reads.") var reads: Int = 200_000
        @Option(help: "Bytes per read.") var size: Int = 4096

        func run() throws {
            let dev = try imageCommand { try DiskImage.open(path: path) }
            guard dev.virtualSize >= UInt64(size), size > 0, reads > 0 else {
                FileHandleOutput.standardError("swiftlet: the disk is smaller than one read")
                throw ExitCode(1)
            }
            let slots = (dev.virtualSize - UInt64(size)) / UInt64(size) + 1
            let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: size, alignment: 4096)
            defer { buffer.deallocate() }
            var state: UInt64 = 0x2545_f491_4f6c_dd1d
            func nextOffset() -> UInt64 {
                state ^= state << 13; state ^= state >> 7; state ^= state << 17
                return (state % slots) * UInt64(size)
            }
            try imageCommand {
                for _ in 0..<reads { try dev.read(into: buffer, at: nextOffset()) }  // Warm the caches.
                let start = MonotonicClock.nanoseconds()
                for _ in 0..<reads { try dev.read(into: buffer, at: nextOffset()) }
                let ns = Double(MonotonicClock.nanoseconds() - start) / Double(reads)
                let cache = (dev as? QCOW2Image).map { " (L2 cache: \($0.cachedL2Tables) of \($0.l2CacheLimit) tables)" } ?? ""
                print("\(reads) random \(size)-byte reads: \(Int(ns)) ns per read\(cache)")
            }
        }
    }
}


/// Runs `body`; a DiskImage error becomes one line on stderr and exit status 1 (or `status`).
func imageCommand<T>(status: Int32 = 1, _ body: () throws -> T) throws -> T {
    do {
        return try body()
    } catch let e as DiskImageError {
        FileHandleOutput.standardError("swiftlet: \(e)")
        throw ExitCode(status)
    } catch let e as ImageEditError {
        FileHandleOutput.standardError("swiftlet: \(e)")
        throw ExitCode(status)
    }
}


/// Parses a size as qemu-img takes one: "4096", "512K", "10G", "2T" or "1GiB"; a bare
/// number is bytes.
func parseSize(_ text: String) throws -> UInt64 {
    do {
        return try ByteSize.parse(text, defaultUnit: .bytes)
    } catch .tooLarge {
        throw DiskImageError.invalidArgument("size '\(text)' is too large")
    } catch {
        throw DiskImageError.invalidArgument("'\(text)' is not a size (try 10G, 512M or 4096)")
    }
}

private func human(_ bytes: UInt64) -> String { ByteSize.human(bytes) }

private func printInfo(_ info: ImageInfo) {
    print("image: \(info.path)")
    print("file format: \(info.format)")
    print("virtual size: \(human(info.virtualSize)) (\(info.virtualSize) bytes)")
    print("file size: \(human(info.fileSize))")
    guard info.format == "qcow2" else { return }
    if let cs = info.clusterSize { print("cluster_size: \(cs)") }
    if let b = info.backingFile { print("backing file: \(b)") }
    if let f = info.backingFormat { print("backing file format: \(f)") }
    if let v = info.version { print("compat: \(v == 2 ? "0.10" : "1.1") (version \(v))") }
    if let c = info.compressionType { print("compression type: \(c)") }
    if let r = info.refcountBits { print("refcount bits: \(r)") }
    if let e = info.extendedL2 { print("extended l2: \(e)") }
    if let c = info.corrupt { print("corrupt: \(c)") }
    func list(_ l: [String]?) -> String { (l ?? []).isEmpty ? "none" : l!.joined(separator: ", ") }
    print("incompatible features: \(list(info.incompatibleFeatures))")
    print("compatible features: \(list(info.compatibleFeatures))")
    print("autoclear features: \(list(info.autoclearFeatures))")
    if let u = info.unknownExtensions, !u.isEmpty { print("unknown header extensions: \(u.joined(separator: ", "))") }
    if let snaps = info.snapshots, !snaps.isEmpty {
        print("Snapshot list:")
        print("ID        TAG                  DISK SIZE      VM STATE")
        for s in snaps {
            let id = s.id.padding(9), tag = s.name.padding(20)
            print("\(id) \(tag) \(human(s.diskSize ?? info.virtualSize).padding(14)) \(human(s.vmStateSize))")
        }
    }
}

private extension String {
    func padding(_ n: Int) -> String { count >= n ? self : self + String(repeating: " ", count: n - count) }
}

/// Renders ImageInfo as JSON without Foundation.
private func jsonText(_ info: ImageInfo, indent: String = "") -> String {
    func str(_ s: String) -> String {
        var out = "\""
        for u in s.unicodeScalars {
            switch u {
            case "\"": out += "\\\""
            case "\\": out += "\\\\"
            case "\n": out += "\\n"
            default:
                if u.value < 0x20 { out += "\\u" + String(repeating: "0", count: 4 - String(u.value, radix: 16).count) + String(u.value, radix: 16) }
                else { out.unicodeScalars.append(u) }
            }
        }
        return out + "\""
    }
    func arr(_ l: [String]) -> String { "[" + l.map(str).joined(separator: ", ") + "]" }
    let inner = indent + "  "
    var fields: [(String, String)] = [
        ("path", str(info.path)), ("format", str(info.format)), ("virtual-size", "\(info.virtualSize)"),
        ("file-size", "\(info.fileSize)"), ("read-only", "\(info.readOnly)"),
    ]
    if let v = info.version { fields.append(("version", "\(v)")) }
    if let v = info.clusterSize { fields.append(("cluster-size", "\(v)")) }
    if let v = info.refcountBits { fields.append(("refcount-bits", "\(v)")) }
    if let v = info.compressionType { fields.append(("compression-type", str(v))) }
    if let v = info.extendedL2 { fields.append(("extended-l2", "\(v)")) }
    if let v = info.backingFile { fields.append(("backing-filename", str(v))) }
    if let v = info.backingFormat { fields.append(("backing-filename-format", str(v))) }
    if let v = info.incompatibleFeatures { fields.append(("incompatible-features", arr(v))) }
    if let v = info.compatibleFeatures { fields.append(("compatible-features", arr(v))) }
    if let v = info.autoclearFeatures { fields.append(("autoclear-features", arr(v))) }
    if let v = info.corrupt { fields.append(("corrupt", "\(v)")) }
    if let v = info.unknownExtensions { fields.append(("unknown-extensions", arr(v))) }
    if let snaps = info.snapshots {
        let items = snaps.map { s in
            "{\"id\": \(str(s.id)), \"name\": \(str(s.name)), \"disk-size\": \(s.diskSize.map { "\($0)" } ?? "null"), "
                + "\"vm-state-size\": \(s.vmStateSize), \"date-sec\": \(s.date)}"
        }
        fields.append(("snapshots", "[" + items.joined(separator: ", ") + "]"))
    }
    if let chain = info.backing {
        let items = chain.map { jsonText($0, indent: inner + "  ") }
        fields.append(("backing-chain", "[\n" + items.map { inner + "  " + $0 }.joined(separator: ",\n") + "\n" + inner + "]"))
    }
    return "{\n" + fields.map { "\(inner)\(str($0.0)): \($0.1)" }.joined(separator: ",\n") + "\n\(indent)}"
}

/// qemu-img's progress line on stderr, "    (12.34/100%)" redrawn in place; safe to update from any thread.
///
/// As in QEMU's `util/qemu-progress.c`: printed at 0%, then whenever the figure has moved by
/// more than 1 point, and at 100%, then a newline when done.
final class ProgressMeter: Sendable {
    private let lastPrinted = Mutex<Double?>(nil)

    func start() { show(0) }

    func update(_ done: UInt64, _ total: UInt64) {
        show(total == 0 ? 100 : min(100, Double(done) * 100 / Double(total)))
    }

    func finish(complete: Bool) {
        if complete { show(100) }
        FileHandleOutput.standardError("")
    }

    private func show(_ current: Double) {
        lastPrinted.withLock { last in
            if let l = last, !(current > l + 1 || current < l - 1 || (current == 100 && l != 100)) { return }
            last = current
            FileHandleOutput.standardError("    (\(Self.format(current))/100%)\r", endLine: false)
        }
    }

    /// `%3.2f`.
    static func format(_ v: Double) -> String {
        let hundredths = Int((v * 100).rounded())
        let fraction = hundredths % 100
        return "\(hundredths / 100)." + (fraction < 10 ? "0" : "") + "\(fraction)"
    }
}
