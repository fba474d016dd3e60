import Basics
/// What `swiftlet image info` reports about one image of a chain. Plain values, Codable for `--json`.
public struct ImageInfo: Sendable, Codable, Equatable {
    public var path: String
    public var format: String
    public var virtualSize: UInt64
    public var fileSize: UInt64
    public var readOnly: Bool
    public var version: UInt32?
    public var clusterSize: UInt64?
    public var refcountBits: UInt64?
    public var compressionType: String?
    public var extendedL2: Bool?
    public var backingFile: String?
    public var backingFormat: String?
    public var incompatibleFeatures: [String]?
    public var compatibleFeatures: [String]?
    public var autoclearFeatures: [String]?
    public var corrupt: Bool?
    public var unknownExtensions: [String]?
    public var snapshots: [SnapshotInfo]?
    /// The backing image's own info, then its backing's, and so on.
    public var backing: [ImageInfo]?

    /// One internal snapshot as listed by `info`.
    public struct SnapshotInfo: Sendable, Codable, Equatable {
        public var id: String
        public var name: String
        public var diskSize: UInt64?
        public var vmStateSize: UInt64
        public var date: UInt32
    }
}

extension DiskImage {
    /// Describes `path` and its backing chain.
    public static func info(path: String, format: ImageFormat? = nil) throws -> ImageInfo {
        let dev = try open(path: path, format: format, readOnly: true)
        return try info(of: dev, path: path)
    }

    static func info(of dev: any BlockDevice, path: String) throws -> ImageInfo {
        if let raw = dev as? RawImage {
            return ImageInfo(path: raw.file.path, format: "raw", virtualSize: raw.virtualSize,
                             fileSize: try raw.file.size(), readOnly: raw.isReadOnly)
        }
        guard let q = dev as? QCOW2Image else {
            return ImageInfo(path: path, format: "unknown", virtualSize: dev.virtualSize, fileSize: 0, readOnly: true)
        }
        let h = q.header
        func names(_ bits: UInt64, type: UInt8) -> [String] {
            (0..<64).filter { bits & (1 << UInt64($0)) != 0 }.map { h.featureName(type: type, bit: UInt8($0)) }
        }
        var info = ImageInfo(
            path: q.file.path, format: "qcow2", virtualSize: q.virtualSize, fileSize: try q.file.size(),
            readOnly: q.isReadOnly)
        info.version = h.version
        info.clusterSize = h.clusterSize
        info.refcountBits = h.refcountBits
        info.compressionType = h.compressionName
        info.extendedL2 = h.extendedL2
        info.backingFile = h.backingFile
        info.backingFormat = h.backingFormat
        info.incompatibleFeatures = names(h.incompatibleFeatures, type: 0)
        info.compatibleFeatures = names(h.compatibleFeatures, type: 1)
        info.autoclearFeatures = names(h.autoclearFeatures, type: 2)
        info.corrupt = h.isCorrupt
        info.unknownExtensions = h.unknownExtensions.map { "0x" + Hex.digits(UInt64($0)) }
        info.snapshots = h.snapshots.map {
            ImageInfo.SnapshotInfo(id: $0.id, name: $0.name, diskSize: $0.diskSize, vmStateSize: $0.vmStateSize,
                                   date: $0.dateSeconds)
        }
        if let b = q.backing {
            let bi = try DiskImage.info(of: b, path: h.backingFile ?? "")
            info.backing = [bi] + (bi.backing ?? [])
            info.backing![0].backing = nil
        }
        return info
    }
}
