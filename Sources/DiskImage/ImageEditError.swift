/// Why `resize`, `snapshot` or `rebase` refused to change an image.
///
/// Each is found before anything is written, and `description` says what to do instead.
public enum ImageEditError: Error, Equatable, Sendable, CustomStringConvertible {
    case sizeNotPositive
    case shrinkNeedsFlag(current: UInt64, requested: UInt64)
    case sizeNotSectorMultiple(UInt64)
    case sizeTooLarge(UInt64)
    case resizeV2WithSnapshots
    case resizeWithBitmaps
    case growV2OverLargerBacking(backingSize: UInt64)
    case snapshotSizeChangeV2
    case notQcow2(operation: String)
    case snapshotNameTooLong(Int)
    case tooManySnapshots
    case refcountsTooNarrow(bits: UInt64)
    case snapshotTableTooLarge
    case backingFormatRequired(String)
    case backingNameTooLong(Int)
    case headerFull(String)

    public var description: String {
        switch self {
        case .sizeNotPositive:
            return "the new image size must be positive"
        case let .shrinkNeedsFlag(current, requested):
            return "the new size \(requested) is smaller than the current \(current): add --shrink to shrink the image, "
                + "which deletes everything past its new end"
        case let .sizeNotSectorMultiple(size):
            return "the new size \(size) of a qcow2 image must be a multiple of 512"
        case let .sizeTooLarge(size):
            return "the new size \(size) is too large"
        case .resizeV2WithSnapshots:
            return "cannot resize a version 2 (compat 0.10) image that has snapshots: its snapshots do not record their size"
        case .resizeWithBitmaps:
            return "cannot resize an image with persistent dirty bitmaps (remove them first: qemu-img bitmap --remove)"
        case let .growV2OverLargerBacking(size):
            return "cannot grow a version 2 (compat 0.10) image over its \(size)-byte backing file: the new area "
                + "would show the backing file's data, and version 2 has no zero clusters to hide it"
        case .snapshotSizeChangeV2:
            return "cannot apply a snapshot of another size to a version 2 (compat 0.10) image"
        case let .notQcow2(operation):
            return "raw images cannot \(operation): only qcow2 images can"
        case let .snapshotNameTooLong(n):
            return "the snapshot name is \(n) bytes long; at most 255 are allowed"
        case let .refcountsTooNarrow(bits):
            return "a cluster would be shared more often than this image's \(bits)-bit refcounts can count "
                + "(convert it with a wider refcount_bits, e.g. qemu-img amend -o refcount_bits=16)"
        case .tooManySnapshots:
            return "the image already has 65536 snapshots, the most qcow2 allows"
        case .snapshotTableTooLarge:
            return "the snapshot table would be larger than 64 MiB, the most qcow2 allows"
        case let .backingFormatRequired(name):
            return "give the format of the new backing file '\(name)' with -F raw or -F qcow2 "
                + "(guessing it from the content is unsafe, so qemu-img requires it too)"
        case let .backingNameTooLong(n):
            return "the backing file name is \(n) bytes long; at most 1023 are allowed"
        case let .headerFull(name):
            return "cannot change the backing file to '\(name)': no space left in the image's header cluster"
        }
    }
}
