extension QCOW2Image {
    /// Creates an empty qcow2 version 3 image, usually an overlay over `backing`.
    ///
    /// Layout: cluster 0 header, extensions and backing name; cluster 1 refcount table;
    /// cluster 2 the first refcount block (16-bit); then the L1 table. Everything is
    /// written and synced before the call returns. The file must not exist.
    ///
    /// - Parameters:
    ///   - size: virtual size, rounded up to a multiple of 512 as by qemu-img; defaults to the backing image's.
    ///   - backing: the backing file name as stored (relative names are relative to `path`'s folder).
    ///   - backingFormat: stored in the backing format extension; detected when nil.
    public static func create(path: String, size: UInt64? = nil, backing: String? = nil,
                              backingFormat: ImageFormat? = nil, clusterBits: UInt32 = 16) throws {
        guard (9...21).contains(clusterBits) else { throw DiskImageError.clusterBitsOutOfRange(clusterBits) }
        let cs = UInt64(1) << UInt64(clusterBits)
        var virtualSize = size
        var format = backingFormat
        if let backing {
            guard backing.utf8.count <= Int(QCOW2Header.maxBackingNameLength) else {
                throw DiskImageError.backingNameTooLong(UInt32(clamping: backing.utf8.count))
            }
            let backingPath = DiskImage.resolveBackingPath(backing, relativeTo: path)
            let dev: any BlockDevice
            do {
                dev = try DiskImage.open(path: backingPath, format: backingFormat)
            } catch let DiskImageError.io(op, _, err) where op == "open" {
                throw DiskImageError.backingMissing(path: backingPath, errno: err)
            }
            if virtualSize == nil { virtualSize = dev.virtualSize }
            if format == nil { format = dev is QCOW2Image ? .qcow2 : .raw }
        }
        guard let requested = virtualSize else {
            throw DiskImageError.invalidArgument("a size is needed when there is no backing image")
        }
        guard requested <= UInt64(Int64.max) - 511 else { throw DiskImageError.virtualSizeTooLarge(requested) }
        // Like `qemu-img create`: the size is rounded up to whole 512-byte sectors.
        let size = (requested + 511) & ~511
        let perL1 = cs * (cs / 8)
        let l1Entries = size / perL1 + (size % perL1 == 0 ? 0 : 1)
        guard l1Entries <= QCOW2Header.maxL1Entries else { throw DiskImageError.virtualSizeTooLarge(size) }
        let l1Clusters = max(1, (l1Entries * 8 + cs - 1) / cs)
        let metadataClusters = 3 + l1Clusters
        let refsPerBlock = cs * 8 / 16
        guard metadataClusters <= refsPerBlock else { throw DiskImageError.virtualSizeTooLarge(size) }

        var image = [UInt8](repeating: 0, count: Int(metadataClusters * cs))
        image.setBE(QCOW2Header.magic, at: 0)
        image.setBE(UInt32(3), at: 4)
        image.setBE(clusterBits, at: 20)
        image.setBE(size, at: 24)
        image.setBE(UInt32(l1Entries), at: 36)
        image.setBE(3 * cs, at: 40)                   // L1 table.
        image.setBE(cs, at: 48)                       // Refcount table.
        image.setBE(UInt32(1), at: 56)
        image.setBE(UInt32(4), at: 96)                // refcount_order: 16-bit.
        image.setBE(UInt32(112), at: 100)             // header_length; compression_type 0 (zlib).
        var ext = 112
        if let backing {
            let fmt = Array((format ?? .raw).rawValue.utf8)
            image.setBE(QCOW2Header.extBackingFormat, at: ext)
            image.setBE(UInt32(fmt.count), at: ext + 4)
            image.replaceSubrange((ext + 8)..<(ext + 8 + fmt.count), with: fmt)
            ext += 8 + (fmt.count + 7) / 8 * 8
            ext += 8  // End-of-extensions marker (zeros).
            let name = Array(backing.utf8)
            guard UInt64(ext + name.count) <= cs else { throw DiskImageError.backingNameTooLong(UInt32(name.count)) }
            image.setBE(UInt64(ext), at: 8)
            image.setBE(UInt32(name.count), at: 16)
            image.replaceSubrange(ext..<(ext + name.count), with: name)
        }
        image.setBE(2 * cs, at: Int(cs))              // Refcount table[0] -> block.
        for c in 0..<Int(metadataClusters) {
            image.setBE(UInt16(1), at: Int(2 * cs) + 2 * c)
        }
        let file = try ImageFile(path: path, writable: true, create: .new)
        try file.write(bytes: image, at: 0)
        try file.sync()
    }
}
