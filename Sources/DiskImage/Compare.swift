/// The outcome of comparing two images' guest-visible contents, as `qemu-img compare` decides it.
public struct CompareResult: Sendable, Equatable {
    public enum Verdict: Sendable, Equatable {
        case identical
        /// The first 512-byte sector (relative to the start of a run) that differs.
        case contentMismatch(offset: UInt64)
        /// Strict mode: the sizes differ.
        case sizeMismatch
        /// Strict mode: the allocation status differs at this offset.
        case statusMismatch(offset: UInt64)
    }

    public var verdict: Verdict
    /// The sizes differ (not strict): the larger image's tail was checked for zeros.
    public var sizesDiffer: Bool

    public var identical: Bool { verdict == .identical }

    /// The lines `qemu-img compare` prints for this result.
    public var lines: [String] {
        var out: [String] = []
        if sizesDiffer { out.append("Warning: Image size mismatch!") }
        switch verdict {
        case .identical: out.append("Images are identical.")
        case let .contentMismatch(offset): out.append("Content mismatch at offset \(offset)!")
        case .sizeMismatch: out.append("Strict mode: Image size mismatch!")
        case let .statusMismatch(offset): out.append("Strict mode: Offset \(offset) block status mismatch!")
        }
        return out
    }
}

/// A failure while comparing, with the stage QEMU's exit status distinguishes.
public struct CompareError: Error, Sendable, CustomStringConvertible {
    public enum Stage: Sendable {
        case metadata  // Allocation status could not be read (qemu-img exit status 3).
        case data      // Guest data could not be read (exit status 4).
    }

    public var stage: Stage
    public var image: String
    public var offset: UInt64
    public var underlying: DiskImageError

    /// The exit status `qemu-img compare` uses for this failure.
    public var exitStatus: Int32 { stage == .metadata ? 3 : 4 }

    public var description: String {
        switch stage {
        case .metadata: return "allocation status of \(image) at offset \(offset) cannot be read: \(underlying)"
        case .data: return "error while reading offset \(offset) of \(image): \(underlying)"
        }
    }
}

/// `qemu-img compare`: are two images the same disk to a guest?
///
/// Ranges that both images know to be zero are skipped; ranges allocated in both are read and
/// compared; a range allocated in only one must read as zeros there. With different sizes, the
/// common part is compared and the rest of the larger image must be zeros (strict mode instead
/// calls any size difference, or any difference in allocation status, a mismatch).
public enum ImageComparison {
    /// Largest range read at once.
    static let chunkSize: UInt64 = 2 * 1024 * 1024

    public static func compare(_ a: any BlockDevice, named nameA: String, _ b: any BlockDevice, named nameB: String,
                               strict: Bool = false) throws -> CompareResult {
        let readerA = BlockStatusReader(a), readerB = BlockStatusReader(b)
        let sizeA = BlockStatusReader.length(of: a), sizeB = BlockStatusReader.length(of: b)
        let common = min(sizeA, sizeB)
        if strict && sizeA != sizeB { return CompareResult(verdict: .sizeMismatch, sizesDiffer: false) }

        let bufA = UnsafeMutableRawBufferPointer.allocate(byteCount: Int(chunkSize), alignment: 4096)
        let bufB = UnsafeMutableRawBufferPointer.allocate(byteCount: Int(chunkSize), alignment: 4096)
        defer { bufA.deallocate(); bufB.deallocate() }

        func status(_ r: BlockStatusReader, _ name: String, _ offset: UInt64, _ length: UInt64) throws -> BlockStatus {
            do { return try r.statusAbove(at: offset, length: length) } catch let e as DiskImageError {
                throw CompareError(stage: .metadata, image: name, offset: offset, underlying: e)
            }
        }
        func read(_ dev: any BlockDevice, _ name: String, _ offset: UInt64, _ n: UInt64,
                  into buf: UnsafeMutableRawBufferPointer) throws -> UnsafeRawBufferPointer {
            let dest = UnsafeMutableRawBufferPointer(rebasing: buf[0..<Int(n)])
            do {
                try readZeroPadded(dev, into: dest, at: offset)
            } catch let e as DiskImageError {
                throw CompareError(stage: .data, image: name, offset: offset, underlying: e)
            }
            return UnsafeRawBufferPointer(dest)
        }

        var offset: UInt64 = 0
        while offset < common {
            let sa = try status(readerA, nameA, offset, sizeA - offset)
            let sb = try status(readerB, nameB, offset, sizeB - offset)
            var chunk = min(sa.length, sb.length)
            guard chunk > 0 else { break }
            if strict && sa.flags != sb.flags {
                return CompareResult(verdict: .statusMismatch(offset: offset), sizesDiffer: false)
            }
            if sa.zero && sb.zero {
                // Both read as zeros.
            } else if sa.allocated == sb.allocated {
                if sa.allocated {
                    chunk = min(chunk, chunkSize)
                    let x = try read(a, nameA, offset, chunk, into: bufA)
                    let y = try read(b, nameB, offset, chunk, into: bufB)
                    if let at = firstDifferentSector(x, y) {
                        return CompareResult(verdict: .contentMismatch(offset: offset + at), sizesDiffer: false)
                    }
                }
            } else {
                chunk = min(chunk, chunkSize)
                let (dev, name) = sa.allocated ? (a, nameA) : (b, nameB)
                if let at = firstNonZeroSector(try read(dev, name, offset, chunk, into: bufA)) {
                    return CompareResult(verdict: .contentMismatch(offset: offset + at), sizesDiffer: false)
                }
            }
            offset += chunk
        }

        guard sizeA != sizeB else { return CompareResult(verdict: .identical, sizesDiffer: false) }
        let (larger, reader, name, end) = sizeA > sizeB ? (a, readerA, nameA, sizeA) : (b, readerB, nameB, sizeB)
        while offset < end {
            let st = try status(reader, name, offset, end - offset)
            var chunk = st.length
            guard chunk > 0 else { break }
            if st.allocated && !st.zero {
                chunk = min(chunk, chunkSize)
                if let at = firstNonZeroSector(try read(larger, name, offset, chunk, into: bufA)) {
                    return CompareResult(verdict: .contentMismatch(offset: offset + at), sizesDiffer: true)
                }
            }
            offset += chunk
        }
        return CompareResult(verdict: .identical, sizesDiffer: true)
    }

    /// Reads `[offset, offset + count)`; bytes past the device's end (QEMU rounds a raw file up to
    /// whole sectors) read as zeros.
    static func readZeroPadded(_ dev: any BlockDevice, into dest: UnsafeMutableRawBufferPointer, at offset: UInt64) throws {
        let size = dev.virtualSize
        let n = offset >= size ? 0 : Int(min(UInt64(dest.count), size - offset))
        if n > 0 { try dev.read(into: UnsafeMutableRawBufferPointer(rebasing: dest[0..<n]), at: offset) }
        if n < dest.count {
            UnsafeMutableRawBufferPointer(rebasing: dest[n...]).initializeMemory(as: UInt8.self, repeating: 0)
        }
    }

    /// Start of the first 512-byte sector (counted from the start of the buffers) that differs.
    static func firstDifferentSector(_ x: UnsafeRawBufferPointer, _ y: UnsafeRawBufferPointer) -> UInt64? {
        guard memcmp(x.baseAddress!, y.baseAddress!, x.count) != 0 else { return nil }
        var i = 0
        while i < x.count {
            let n = min(512, x.count - i)
            if memcmp(x.baseAddress! + i, y.baseAddress! + i, n) != 0 { return UInt64(i) }
            i += n
        }
        return nil
    }

    /// Start of the first 512-byte sector (counted from the start of the buffer) that is not all zeros.
    static func firstNonZeroSector(_ x: UnsafeRawBufferPointer) -> UInt64? {
        guard !RawConverter.isAllZero(x) else { return nil }
        var i = 0
        while i < x.count {
            let n = min(512, x.count - i)
            if !RawConverter.isAllZero(UnsafeRawBufferPointer(rebasing: x[i..<(i + n)])) { return UInt64(i) }
            i += n
        }
        return nil
    }
}

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif
