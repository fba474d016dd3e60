#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

// `qemu-img rebase`: give an image another backing file, or none.
//
// Safe mode (the default) keeps what the guest sees: every range the image does not allocate
// itself is read through the old backing chain and through the new backing file, and where they
// differ the old contents are written into the image (zero clusters where the old chain ended).
// Only then is the header changed. A crash before that leaves the old backing file in place with
// some ranges copied into the image, which reads the same.
//
// Unsafe mode (`-u`) only rewrites the backing file name and format in the header: for a backing
// file that was renamed or moved, whose contents are the same.
extension DiskImage {
    /// Largest range compared at once (QEMU: 2 MiB; larger here, for fewer and longer writes).
    static let rebaseChunk: UInt64 = 16 * 1024 * 1024

    /// Rebases the qcow2 image at `path` onto `backing` (stored as given; a relative name is
    /// relative to the image's folder), or onto nothing when `backing` is nil or empty.
    /// `progress` gets bytes done and the total.
    public static func rebase(path: String, format: ImageFormat? = nil, backing: String?, backingFormat: ImageFormat?,
                              unsafe: Bool, progress: ((UInt64, UInt64) -> Void)? = nil) throws {
        let name = backing.flatMap { $0.isEmpty ? nil : $0 }
        if let name {
            guard backingFormat != nil else { throw ImageEditError.backingFormatRequired(name) }
            guard name.utf8.count <= Int(QCOW2Header.maxBackingNameLength) else {
                throw ImageEditError.backingNameTooLong(name.utf8.count)
            }
        }
        if unsafe {
            let file = try ImageFile(path: path, writable: true)
            let fmt = try format ?? detectFormat(file: file)
            guard fmt == .qcow2 else { throw ImageEditError.notQcow2(operation: "have a backing file") }
            let h = try QCOW2Header.parse(file: file)
            guard !h.isCorrupt else { throw DiskImageError.imageCorrupt(path: path) }
            try rewriteBackingReference(file: file, header: h, name: name, format: name == nil ? nil : backingFormat)
            return
        }

        let q = try openQCOW2ForWriting(path: path, format: format, operation: "have a backing file") {
            _ = try $0.openNewBacking(name, format: backingFormat)
        }
        try q.rebase(onto: name, format: backingFormat, progress: progress)
    }

    /// Rewrites the header cluster with a new backing file name and backing-format extension
    /// (or none), keeping every other header extension as it is, in one write from offset 0,
    /// then syncs. The write stays within the bytes the header already used or needs now.
    static func rewriteBackingReference(file: ImageFile, header h: QCOW2Header, name: String?,
                                        format: ImageFormat?) throws {
        let cs = Int(h.clusterSize)
        var first = [UInt8](repeating: 0, count: cs)
        try first.withUnsafeMutableBytes { try file.readZeroFilled(into: $0, at: 0) }
        let extStart = h.version >= 3 ? Int(h.headerLength) : 72
        let extEnd = h.backingFileOffset != 0 ? Int(h.backingFileOffset) : cs

        // The extensions to keep, as they are; the old backing format goes.
        var kept: [UInt8] = []
        var pos = extStart
        while pos + 8 <= extEnd {
            let type: UInt32 = first.be(pos)
            let length = Int(first.be(pos + 4, as: UInt32.self))
            if type == QCOW2Header.extEnd { pos += 8; break }
            guard pos + 8 + length <= extEnd else { break }
            let total = 8 + (length + 7) / 8 * 8
            if type != QCOW2Header.extBackingFormat {
                kept += first[pos..<(pos + 8 + length)]
                kept += [UInt8](repeating: 0, count: total - 8 - length)
            }
            pos += total
        }
        var oldEnd = min(pos, cs)
        if h.backingFileOffset != 0 { oldEnd = max(oldEnd, Int(h.backingFileOffset) + Int(h.backingFileSize)) }

        var out = Array(first[0..<extStart])
        if name != nil, let format {
            let fmt = Array(format.rawValue.utf8)
            var ext = [UInt8](repeating: 0, count: 8 + (fmt.count + 7) / 8 * 8)
            ext.setBE(QCOW2Header.extBackingFormat, at: 0)
            ext.setBE(UInt32(fmt.count), at: 4)
            ext.replaceSubrange(8..<(8 + fmt.count), with: fmt)
            out += ext
        }
        out += kept
        out += [UInt8](repeating: 0, count: 8)  // End of extensions.
        let nameOffset = out.count
        if let name { out += Array(name.utf8) }
        guard out.count <= cs else { throw ImageEditError.headerFull(name ?? "") }
        out.setBE(UInt64(name == nil ? 0 : nameOffset), at: 8)
        out.setBE(UInt32(name?.utf8.count ?? 0), at: 16)
        if out.count < oldEnd { out += [UInt8](repeating: 0, count: oldEnd - out.count) }
        try file.write(bytes: out, at: 0)
        try file.sync()
    }
}

extension QCOW2Image {
    /// Safe rebase of this image (opened for writing) onto the backing file `name` (nil: none).
    func rebase(onto name: String?, format: ImageFormat?, progress: ((UInt64, UInt64) -> Void)? = nil) throws {
        let newBacking = try openNewBacking(name, format: format)
        try copyDifferences(to: newBacking, progress: progress)
        try flush()
        try DiskImage.rewriteBackingReference(file: file, header: header, name: name, format: name == nil ? nil : format)
    }

    /// Opens the backing file `name` would name (relative to this image's folder), refusing a
    /// chain that leads back to this image.
    func openNewBacking(_ name: String?, format: ImageFormat?) throws -> (any BlockDevice)? {
        guard let name else { return nil }
        let resolved = DiskImage.resolveBackingPath(name, relativeTo: file.path)
        var chain = BackingChainState()
        chain.seen.insert(try file.identity())
        do {
            return try DiskImage.open(path: resolved, format: format, readOnly: true, snapshot: nil, chain: &chain)
        } catch let DiskImageError.io(op, _, err) where op == "open" {
            throw DiskImageError.backingMissing(path: resolved, errno: err)
        }
    }

    /// For every range this image does not allocate, writes the old backing chain's contents
    /// wherever they differ from `newBacking`'s (zeros past either one's end), subcluster by
    /// subcluster, as QEMU's `img_rebase` does; ranges past the old chain's end are written as
    /// zero clusters (version 3) or zeros.
    func copyDifferences(to newBacking: (any BlockDevice)?, progress: ((UInt64, UInt64) -> Void)?) throws {
        let size = BlockStatusReader.length(of: self)
        let reader = BlockStatusReader(self)
        let oldSize = backing.map { BlockStatusReader.length(of: $0) } ?? 0
        let newSize = newBacking.map { BlockStatusReader.length(of: $0) } ?? 0
        let align = extended ? clusterSize / 32 : clusterSize
        let chunk = Int(DiskImage.rebaseChunk)
        let old = UnsafeMutableRawBufferPointer.allocate(byteCount: chunk, alignment: 4096)
        let new = UnsafeMutableRawBufferPointer.allocate(byteCount: chunk, alignment: 4096)
        defer { old.deallocate(); new.deallocate() }

        // Past the end of both backing files, old and new read as zeros alike: nothing to copy.
        let end = min(size, max(oldSize, newSize))
        var offset: UInt64 = 0
        while offset < end {
            let st = try reader.status(of: self, at: offset, length: min(DiskImage.rebaseChunk, end - offset))
            let n = st.length
            guard n > 0 else { break }
            defer { offset += n; progress?(offset, end) }
            if st.allocated { continue }
            let count = Int(n)
            let oldBuf = UnsafeMutableRawBufferPointer(rebasing: old[0..<count])
            let newBuf = UnsafeMutableRawBufferPointer(rebasing: new[0..<count])
            try readBacking(oldBuf, guestOffset: offset)
            if let newBacking {
                try ImageComparison.readZeroPadded(newBacking, into: newBuf, at: offset)
                if offset + n > newSize && offset < newSize {
                    UnsafeMutableRawBufferPointer(rebasing: newBuf[Int(newSize - offset)...])
                        .initializeMemory(as: UInt8.self, repeating: 0)
                }
            } else {
                newBuf.initializeMemory(as: UInt8.self, repeating: 0)
            }
            var oldEOF = offset >= oldSize
            var done = 0
            while done < count {
                // A run of `align`-sized pieces that all differ or all match.
                let differs = piece(oldBuf, newBuf, at: done, align: Int(align)).differs
                var runEnd = done
                while runEnd < count {
                    let p = piece(oldBuf, newBuf, at: runEnd, align: Int(align))
                    guard p.differs == differs else { break }
                    runEnd += p.length
                }
                if differs {
                    let at = offset + UInt64(done)
                    if oldEOF {
                        try writeZeroes(at: at, length: UInt64(runEnd - done), imageEnd: size)
                    } else {
                        try write(UnsafeRawBufferPointer(rebasing: oldBuf[done..<runEnd]), at: at)
                    }
                }
                done = runEnd
                if offset + UInt64(done) >= oldSize { oldEOF = true }
            }
        }
    }

    /// Whether the `align`-sized piece at `at` differs between the buffers, and its length.
    private func piece(_ a: UnsafeMutableRawBufferPointer, _ b: UnsafeMutableRawBufferPointer, at: Int,
                       align: Int) -> (differs: Bool, length: Int) {
        let n = min(align, a.count - at)
        return (memcmp(a.baseAddress! + at, b.baseAddress! + at, n) != 0, n)
    }

    /// Makes `[offset, offset + length)` read as zeros: zero clusters in a version 3 image (zeros
    /// written where a range ends inside a (sub)cluster), written zeros in a version 2 image.
    func writeZeroes(at offset: UInt64, length: UInt64, imageEnd: UInt64) throws {
        if header.version >= 3 {
            try hostIO.shared {
                try zeroRange(from: offset, to: offset + length, imageEnd: imageEnd, deallocate: false, always: true)
            }
            return
        }
        let zeros = [UInt8](repeating: 0, count: Int(length))
        try zeros.withUnsafeBytes { try write($0, at: offset) }
    }
}
