import ArgumentParser
import DiskImage

#if canImport(Glibc)
import Glibc
#endif

// `swiftlet image resize|snapshot|rebase|compare|map`: thin wrappers over DiskImage, with the
// options, output and exit statuses of the qemu-img subcommands of the same names.

extension ImageCommand {
    /// `swiftlet image resize`: grows or shrinks the virtual disk.
    struct Resize: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Grow or shrink an image's virtual disk, like 'qemu-img resize'.",
            discussion: """
                SIZE is the new size (10G, 512M, 4096...), or +SIZE to grow by that much, or \
                -SIZE to shrink by that much. Growing adds space that reads as zeros; the guest's \
                partitions and file systems do not grow by themselves. Shrinking deletes \
                everything past the new end, so it needs --shrink; shrink the file system inside \
                the guest first.

                A qcow2 image's size must be a multiple of 512. Images with persistent dirty \
                bitmaps, and version 2 (compat 0.10) images with snapshots, cannot be resized.

                Examples:
                  swiftlet image resize disk.qcow2 +10G
                  swiftlet image resize --shrink disk.qcow2 -1G
                """)

        @Option(name: [.customShort("f"), .long], help: "Image format (raw or qcow2); detected from the content when omitted.")
        var format: ImageFormat?
        @Flag(help: "Allow a new size smaller than the current one.") var shrink = false
        @Flag(name: [.customShort("q"), .long], help: "Print nothing when it worked.") var quiet = false
        @Argument(help: "The image file.") var path: String
        @Argument(help: ArgumentHelp("The new size, or +SIZE to grow, or -SIZE to shrink by that much.", valueName: "size"))
        var size: String

        /// qemu-img takes "resize FILE -1G" without "--"; the argument parser would read "-1G" as an
        /// option. This moves such a size behind a "--" before parsing.
        static func movingNegativeSize(_ arguments: [String]) -> [String] {
            guard let image = arguments.firstIndex(of: "image"), image + 1 < arguments.count,
                  arguments[image + 1] == "resize", !arguments.contains("--"),
                  let i = arguments[(image + 2)...].firstIndex(where: { $0.count > 1 && $0.hasPrefix("-")
                      && $0.dropFirst().first!.isNumber }) else { return arguments }
            var out = arguments
            let size = out.remove(at: i)
            return out + ["--", size]
        }

        func run() throws {
            try imageCommand {
                var text = size
                let target: ResizeTarget
                if text.hasPrefix("+") {
                    text.removeFirst()
                    target = .grow(by: try parseSize(text))
                } else if text.hasPrefix("-") {
                    text.removeFirst()
                    target = .shrink(by: try parseSize(text))
                } else {
                    target = .absolute(try parseSize(text))
                }
                try DiskImage.resize(path: path, format: format, to: target, allowShrink: shrink)
            }
            if !quiet { print("Image resized.") }
        }
    }

    /// `swiftlet image snapshot`: lists, creates, applies and deletes internal snapshots.
    struct Snapshot: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "List, create, apply or delete a qcow2 image's internal snapshots, like 'qemu-img snapshot'.",
            discussion: """
                An internal snapshot saves the disk's state inside the qcow2 file itself. Taking \
                one is cheap: it copies the L1 table and raises the reference count of every \
                cluster, so the snapshot and the disk share them until the disk is written, when \
                the written cluster is copied. Applying a snapshot reverts the disk to it (the \
                snapshot is kept); deleting one frees the clusters only it used.

                -a finds the snapshot by ID first, then by name; -d by name, as qemu-img does. \
                With no action, the snapshots are listed. Do not change snapshots of an image a \
                running VM is using.

                Examples:
                  swiftlet image snapshot -c before-upgrade disk.qcow2
                  swiftlet image snapshot -l disk.qcow2
                  swiftlet image snapshot -a before-upgrade disk.qcow2
                """)

        @Flag(name: [.customShort("l"), .customLong("list")], help: "List the snapshots (the default).") var list = false
        @Option(name: [.customShort("c"), .customLong("create")], help: ArgumentHelp("Create a snapshot with this name.", valueName: "name"))
        var create: String?
        @Option(name: [.customShort("a"), .customLong("apply")],
                help: ArgumentHelp("Revert the disk to this snapshot (ID or name).", valueName: "name"))
        var apply: String?
        @Option(name: [.customShort("d"), .customLong("delete")], help: ArgumentHelp("Delete the snapshot with this name.", valueName: "name"))
        var delete: String?
        @Option(name: [.customShort("f"), .long], help: "Image format (raw or qcow2); detected from the content when omitted.")
        var format: ImageFormat?
        @Flag(name: [.customShort("q"), .long], help: "Print nothing when it worked.") var quiet = false
        @Argument(help: "The image file.") var path: String

        func validate() throws {
            let actions = [list, create != nil, apply != nil, delete != nil].filter { $0 }.count
            guard actions <= 1 else { throw ValidationError("cannot mix '-l', '-a', '-c', '-d'") }
        }

        func run() throws {
            try imageCommand {
                if let name = create {
                    try DiskImage.createSnapshot(path: path, format: format, name: name)
                } else if let name = apply {
                    try DiskImage.applySnapshot(path: path, format: format, name: name)
                } else if let name = delete {
                    try DiskImage.deleteSnapshot(path: path, format: format, name: name)
                } else {
                    let records = try DiskImage.snapshots(path: path, format: format)
                    guard !records.isEmpty, !quiet else { return }
                    print("Snapshot list:")
                    print(SnapshotRecord.listHeader)
                    for r in records { print(r.listLine) }
                }
            }
        }
    }

    /// `swiftlet image rebase`: changes the backing file.
    struct Rebase: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Change a qcow2 image's backing file, like 'qemu-img rebase'.",
            discussion: """
                Safe mode (the default) keeps what the guest sees: wherever the image does not \
                hold its own data, the old backing chain and the new backing file are compared, \
                and the old contents are copied into the image where they differ. Then the \
                header names the new backing file. -b "" removes the backing file: the image \
                then holds everything itself.

                Unsafe mode (-u) only rewrites the name and format in the header, for a backing \
                file that was renamed or moved and has the same contents; the old backing file \
                need not exist.

                A relative backing name is stored as given and resolved against the image's \
                folder. The new backing file's format must be given with -F, as qemu-img asks.

                Examples:
                  swiftlet image rebase -b new-base.qcow2 -F qcow2 overlay.qcow2
                  swiftlet image rebase -b "" overlay.qcow2
                  swiftlet image rebase -u -b /images/moved-base.raw -F raw overlay.qcow2
                """)

        @Option(name: [.customShort("b"), .customLong("backing")], help: ArgumentHelp("The new backing file (\"\" for none).", valueName: "file"))
        var backing: String?
        @Option(name: [.customShort("F"), .customLong("backing-format")], help: ArgumentHelp("The new backing file's format.", valueName: "format"))
        var backingFormat: ImageFormat?
        @Flag(name: [.customShort("u"), .customLong("unsafe")], help: "Only change the name in the header.")
        var unsafe = false
        @Option(name: [.customShort("f"), .long], help: "Image format (raw or qcow2); detected from the content when omitted.")
        var format: ImageFormat?
        @Flag(name: [.customShort("p"), .customLong("progress")], help: "Show progress on a terminal, as qemu-img -p: '    (12.34/100%)'.") var progress = false
        @Flag(name: [.customShort("q"), .long], help: "No progress.") var quiet = false
        @Argument(help: "The image file.") var path: String

        func validate() throws {
            guard unsafe || backing != nil else { throw ValidationError("give a backing file (-b) or use unsafe mode (-u)") }
        }

        func run() throws {
            let meter = progress && !quiet && isatty(STDERR_FILENO) != 0 ? ProgressMeter() : nil
            meter?.start()
            var complete = false
            defer { meter?.finish(complete: complete) }
            try imageCommand {
                try DiskImage.rebase(path: path, format: format, backing: backing, backingFormat: backingFormat,
                                     unsafe: unsafe, progress: meter.map { m in { done, total in m.update(done, total) } })
            }
            complete = true
        }
    }

    /// `swiftlet image compare`: are two images the same disk?
    struct Compare: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Check whether two images have the same contents, like 'qemu-img compare'.",
            discussion: """
                Compares what a guest would read from each image (through their backing chains), \
                whatever their formats. Ranges both images know to be zero are not read. If the \
                sizes differ, the extra part of the larger image must read as zeros; --strict \
                instead calls a size difference, or a difference in how ranges are allocated, a \
                mismatch. The first difference is reported as the offset of its 512-byte sector.

                Exit status: 0 the images are identical, 1 they differ, 2 an image could not be \
                opened, 3 its allocation could not be read, 4 its data could not be read.

                Example:
                  swiftlet image compare disk.qcow2 disk.raw
                """)

        @Option(name: [.customShort("f"), .customLong("a-format")], help: ArgumentHelp("The first image's format.", valueName: "format"))
        var firstFormat: ImageFormat?
        @Option(name: [.customShort("F"), .customLong("b-format")], help: ArgumentHelp("The second image's format.", valueName: "format"))
        var secondFormat: ImageFormat?
        @Flag(name: [.customShort("s"), .long], help: "Different sizes or allocation are a mismatch.") var strict = false
        @Flag(name: [.customShort("q"), .long], help: "Print nothing; only the exit status tells.") var quiet = false
        @Argument(help: "The first image.") var first: String
        @Argument(help: "The second image.") var second: String

        func run() throws {
            let a = try imageCommand(status: 2) { try DiskImage.open(path: first, format: firstFormat) }
            let b = try imageCommand(status: 2) { try DiskImage.open(path: second, format: secondFormat) }
            let result: CompareResult
            do {
                result = try ImageComparison.compare(a, named: first, b, named: second, strict: strict)
            } catch let e as CompareError {
                FileHandleOutput.standardError("swiftlet: \(e)")
                throw ExitCode(e.exitStatus)
            }
            if !quiet { for line in result.lines { print(line) } }
            if !result.identical { throw ExitCode(1) }
        }
    }

    /// `swiftlet image map`: where the data of each range lives.
    struct Map: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Show which ranges of an image hold data, zeros or nothing, and where, like 'qemu-img map'.",
            discussion: """
                The human format lists the ranges that hold data: their offset and length in the \
                virtual disk, the offset in the file where they are stored ("Mapped to") and that \
                file, which may be a backing file. Compressed data has no such place, so images \
                with compressed clusters need --output=json.

                --output=json lists every range: "depth" counts the backing files passed before \
                one had the range (0: the image itself), "present" says some image of the chain \
                decides the contents, "zero" that they read as zeros, "data" that they are stored \
                data, and "offset" where they are stored. The output is the same as qemu-img 7.2's.

                Examples:
                  swiftlet image map overlay.qcow2
                  swiftlet image map --output=json disk.qcow2
                """)

        enum Output: String, ExpressibleByArgument {
            case human, json
        }

        @Option(name: [.customShort("f"), .long], help: "Image format (raw or qcow2); detected from the content when omitted.")
        var format: ImageFormat?
        @Option(help: "human or json.") var output: Output = .human
        @Option(name: [.customShort("s"), .customLong("start-offset")], help: ArgumentHelp("Start at this offset.", valueName: "offset"))
        var startOffset: String?
        @Option(name: [.customShort("l"), .customLong("max-length")], help: ArgumentHelp("Map at most this many bytes.", valueName: "length"))
        var maxLength: String?
        @Argument(help: "The image file.") var path: String

        func run() throws {
            let dev = try imageCommand { try DiskImage.open(path: path, format: format) }
            let start = try imageCommand { try startOffset.map(parseSize) ?? 0 }
            let limit = try imageCommand { try maxLength.map(parseSize) }
            if output == .human { print(ImageMap.humanHeader) } else { print("[", terminator: "") }
            try imageCommand {
                try ImageMap.forEachEntry(dev, start: start, maxLength: limit) { entry, isLast in
                    switch output {
                    case .json:
                        print(ImageMap.jsonLine(entry), terminator: isLast ? "" : ",\n")
                    case .human:
                        if let line = try ImageMap.humanLine(entry) { print(line) }
                    }
                }
            }
            if output == .json { print("]") }
        }
    }
}
