import Synchronization

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

extension BlockDevice {
    /// Default: nothing is known to be zero without reading it.
    public func isKnownZero(at offset: UInt64, length: UInt64) throws -> Bool { false }
}

extension RawImage {
    /// True when the range is a hole in the file (`SEEK_DATA` finds no data in it).
    public func isKnownZero(at offset: UInt64, length: UInt64) throws -> Bool {
        let data = lseek(file.fd, off_t(offset), 3)  // SEEK_DATA (Linux), not exported by Glibc's module.
        if data < 0 { return errno == ENXIO }  // No data after offset at all.
        return UInt64(data) >= offset + length
    }
}

extension QCOW2Image {
    /// True when every guest byte in the range reads as zero without touching data clusters:
    /// zero clusters, and unallocated clusters over a backing image that is zero (or absent) there.
    public func isKnownZero(at offset: UInt64, length: UInt64) throws -> Bool {
        guard length > 0 else { return true }
        var pos = offset
        let end = offset + length
        while pos < end {
            let index = pos >> clusterBits
            let clusterEnd = min(end, (index + 1) << clusterBits)
            let (entry, bitmap) = try l2Entry(guestCluster: index)
            switch try mapping(entry: entry, bitmap: bitmap, guestCluster: index) {
            case .zero: break
            case .unallocated:
                if let backing, pos < backing.virtualSize {
                    let n = min(clusterEnd, backing.virtualSize) - pos
                    guard try backing.isKnownZero(at: pos, length: n) else { return false }
                }
            case let .subclusters(_, allocated, zero):
                let scSize = clusterSize / 32
                var p = pos
                while p < clusterEnd {
                    let sc = Int((p & (clusterSize - 1)) / scSize)
                    let scEnd = min(clusterEnd, (p / scSize + 1) * scSize)
                    if allocated & (1 << sc) != 0 { return false }
                    if zero & (1 << sc) == 0, let backing, p < backing.virtualSize {
                        guard try backing.isKnownZero(at: p, length: min(scEnd, backing.virtualSize) - p) else { return false }
                    }
                    p = scEnd
                }
            case .data, .compressed:
                return false
            }
            pos = clusterEnd
        }
        return true
    }
}

/// Copies a block device's guest contents into a raw file, in parallel.
///
/// Owns nothing beyond one call: worker threads take 2 MiB chunks in order from a shared counter,
/// read them through the device (which decompresses clusters independently on each worker's
/// thread), and write only the chunks that are not all zero, leaving holes like `qemu-img`.
///
/// An existing output file is overwritten in place rather than truncated first: its blocks are
/// reused for data, and ranges that must read as zero are made holes (`FALLOC_FL_PUNCH_HOLE`)
/// unless they already are. Freeing and reallocating every block of a large file costs more than
/// the whole copy (see docs/disk-images.md).
public enum RawConverter {
    public static let chunkSize = 2 * 1024 * 1024

    /// Writes `source` to a raw file at `path` (created, or overwritten) whose size is the virtual size.
    /// Refuses an output that is the source or one of its backing files, and one another process
    /// has open (the output is locked exclusively, as QEMU locks an image it writes).
    /// `progress` is called (from any worker) with bytes done and total.
    public static func convert(_ source: any BlockDevice, to path: String, threads: Int = 0,
                               progress: (@Sendable (UInt64, UInt64) -> Void)? = nil) throws {
        let out = try ImageFile(path: path, writable: true, create: .ifMissing, lock: ImageLock.unlocked)
        let target = try out.identity()
        for file in source.imageFiles() where try file.identity() == target {
            throw DiskImageError.sameFile(source: file.path, destination: path)
        }
        try out.lock(.exclusive)
        let fd = out.fd
        var st = stat()
        guard fstat(fd, &st) == 0 else { throw DiskImageError.io(operation: "fstat", path: path, errno: errno) }
        let regular = st.st_mode & S_IFMT == S_IFREG
        // A new (empty) file reads as zeros everywhere after ftruncate; anything else must be cleared.
        let clearZeros = !regular || st.st_size > 0
        let total = source.virtualSize
        if regular {
            guard ftruncate(fd, off_t(total)) == 0 else {
                throw DiskImageError.io(operation: "ftruncate", path: path, errno: errno)
            }
        }
        let output = Output(fd: fd, path: path, clearZeros: clearZeros)
        let chunks = Int((total + UInt64(chunkSize) - 1) / UInt64(chunkSize))
        // By default twice as many workers as cores, at least 4: a worker waiting for the disk
        // leaves its core to another that is decompressing (qemu-img keeps 8 requests in flight).
        let wanted = threads > 0 ? threads : max(4, 2 * System.activeProcessorCount)
        let workers = max(1, min(wanted, max(chunks, 1)))
        let next = Atomic<Int>(0)
        let done = Atomic<UInt64>(0)
        let failure = Mutex<DiskImageError?>(nil)

        runThreads(workers) { _ in
            let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: chunkSize, alignment: 4096)
            defer { buffer.deallocate() }
            while true {
                let chunk = next.wrappingAdd(1, ordering: .relaxed).oldValue
                guard chunk < chunks, failure.withLock({ $0 == nil }) else { return }
                let offset = UInt64(chunk) * UInt64(chunkSize)
                let n = Int(min(UInt64(chunkSize), total - offset))
                do {
                    try copyChunk(source, offset: offset, count: n, buffer: buffer, output: output)
                } catch let e as DiskImageError {
                    failure.withLock { if $0 == nil { $0 = e } }
                    return
                } catch {
                    failure.withLock { if $0 == nil { $0 = .invalidArgument("\(error)") } }
                    return
                }
                let d = done.wrappingAdd(UInt64(n), ordering: .relaxed).newValue
                progress?(d, total)
            }
        }
        if let e = failure.withLock({ $0 }) { throw e }
    }

    /// Bytes per `isKnownZero` question, and the granularity of holes in the output (like `qemu-img -S 4k`).
    static let pieceSize = 64 * 1024
    static let holeSize = 4096

    /// The output file, shared by the workers.
    final class Output: Sendable {
        let fd: Int32
        let path: String
        /// True when ranges of zeros must be cleared (the file had contents); false when they are holes already.
        let clearZeros: Bool
        /// One writer at a time: concurrent pwrites to one file contend on its inode lock in the
        /// kernel, which spins and burns the cores the other workers need for reading and inflating.
        /// It also guards the last hole found (or punched), so runs of zeros inside it cost nothing.
        let lock = Mutex<Range<UInt64>>(0..<0)

        init(fd: Int32, path: String, clearZeros: Bool) {
            self.fd = fd
            self.path = path
            self.clearZeros = clearZeros
        }

        func write(_ bytes: UnsafeRawBufferPointer, at offset: UInt64) throws {
            try lock.withLock { hole in
                try writeAll(fd: fd, bytes, at: offset, path: path)
                if hole.overlaps(offset..<(offset + UInt64(bytes.count))) { hole = 0..<0 }
            }
        }

        /// Makes `[offset, offset + length)` read as zeros: nothing to do in a new file, else a hole
        /// punched where the file has data there (zeros written where holes cannot be punched).
        func zero(at offset: UInt64, length: UInt64) throws {
            guard clearZeros, length > 0 else { return }
            try lock.withLock { hole in
                if hole.lowerBound <= offset && offset + length <= hole.upperBound { return }
                let data = lseek(fd, off_t(offset), 3)  // SEEK_DATA (Linux), not exported by Glibc's module.
                if data < 0 && errno == ENXIO {  // Nothing but holes after offset.
                    hole = offset..<UInt64.max
                    return
                }
                if data >= 0 && UInt64(data) >= offset + length {  // A hole already.
                    hole = offset..<UInt64(data)
                    return
                }
                if let punch = HolePunch.function,
                   punch(fd, HolePunch.punchHoleKeepSize, off_t(offset), off_t(length)) == 0 {
                    hole = offset..<(offset + length)
                    return
                }
                let zeros = UnsafeMutableRawBufferPointer.allocate(byteCount: min(Int(length), chunkSize), alignment: 4096)
                defer { zeros.deallocate() }
                zeros.initializeMemory(as: UInt8.self, repeating: 0)
                var done: UInt64 = 0
                while done < length {
                    let n = Int(min(UInt64(zeros.count), length - done))
                    try writeAll(fd: fd, UnsafeRawBufferPointer(rebasing: zeros[0..<n]), at: offset + done, path: path)
                    done += UInt64(n)
                }
            }
        }
    }

    /// Copies guest bytes `[offset, offset+count)`: spans not known to be zero are read in one call each,
    /// and only their non-zero 4 KiB blocks are written; the rest is zeroed in the output (a no-op in a new file).
    static func copyChunk(_ source: any BlockDevice, offset: UInt64, count: Int, buffer: UnsafeMutableRawBufferPointer,
                          output: Output) throws {
        var zeroStart = -1  // Start of the run of zeros not yet cleared in the output.
        func zero(_ range: Range<Int>) {
            if zeroStart < 0 { zeroStart = range.lowerBound }
        }
        func data(_ range: Range<Int>) throws {
            if zeroStart >= 0 {
                try output.zero(at: offset + UInt64(zeroStart), length: UInt64(range.lowerBound - zeroStart))
                zeroStart = -1
            }
            try output.write(UnsafeRawBufferPointer(rebasing: buffer[range]), at: offset + UInt64(range.lowerBound))
        }
        func knownZero(_ p: Int) throws -> Bool {
            try source.isKnownZero(at: offset + UInt64(p), length: UInt64(min(pieceSize, count - p)))
        }
        var p = 0
        while p < count {
            if try knownZero(p) {
                zero(p..<min(p + pieceSize, count))
                p += pieceSize
                continue
            }
            var q = p + pieceSize
            while q < count, try !knownZero(q) { q += pieceSize }
            q = min(q, count)
            let span = UnsafeMutableRawBufferPointer(rebasing: buffer[p..<q])
            try source.read(into: span, at: offset + UInt64(p))
            var runStart = -1
            var b = p
            while b < q {
                let e = min(b + holeSize, q)
                let isZero = isAllZero(UnsafeRawBufferPointer(rebasing: buffer[b..<e]))
                if !isZero && runStart < 0 { runStart = b }
                if isZero {
                    if runStart >= 0 {
                        try data(runStart..<b)
                        runStart = -1
                    }
                    zero(b..<e)
                }
                b = e
            }
            if runStart >= 0 { try data(runStart..<q) }
            p = q
        }
        if zeroStart >= 0 {
            try output.zero(at: offset + UInt64(zeroStart), length: UInt64(count - zeroStart))
        }
    }

    static func writeAll(fd: Int32, _ buffer: UnsafeRawBufferPointer, at offset: UInt64, path: String) throws {
        var written = 0
        while written < buffer.count {
            let r = pwrite(fd, buffer.baseAddress! + written, buffer.count - written, off_t(offset) + off_t(written))
            if r < 0 {
                if errno == EINTR { continue }
                throw DiskImageError.io(operation: "write", path: path, errno: errno)
            }
            written += r
        }
    }

    /// True if every byte is zero. The first word is tried alone (data rarely starts with eight
    /// zero bytes, so a block of data costs one load), then 64 bytes at a time with an OR over words
    /// that the compiler vectorizes, stopping at the first group that is not zero.
    public static func isAllZero(_ buffer: UnsafeRawBufferPointer) -> Bool {
        let words = buffer.count / 8
        if words > 0 && buffer.loadUnaligned(fromByteOffset: 0, as: UInt64.self) != 0 { return false }
        var i = 0
        while i + 8 <= words {
            var acc: UInt64 = 0
            for w in i..<(i + 8) { acc |= buffer.loadUnaligned(fromByteOffset: w * 8, as: UInt64.self) }
            if acc != 0 { return false }
            i += 8
        }
        var acc: UInt64 = 0
        for w in i..<words { acc |= buffer.loadUnaligned(fromByteOffset: w * 8, as: UInt64.self) }
        var tail: UInt8 = 0
        for j in (words * 8)..<buffer.count { tail |= buffer[j] }
        return acc == 0 && tail == 0
    }
}

/// Runs `body(0..<count)` on `count` dedicated threads and waits for all of them.
/// (Dispatch's concurrentPerform would cap the parallelism at the core count.)
func runThreads(_ count: Int, _ body: @escaping @Sendable (Int) -> Void) {
    /// What one thread runs; owned by that thread once started.
    final class Work: Sendable {
        let run: @Sendable () -> Void
        init(_ run: @escaping @Sendable () -> Void) { self.run = run }
    }
    var threads: [pthread_t] = []
    for i in 0..<count {
        let work = Unmanaged.passRetained(Work { body(i) })
        var thread = pthread_t()
        let rc = pthread_create(&thread, nil, { arg in
            guard let arg else { return nil }
            Unmanaged<Work>.fromOpaque(arg).takeRetainedValue().run()
            return nil
        }, work.toOpaque())
        if rc == 0 {
            threads.append(thread)
        } else {
            work.release()
            body(i)  // No thread to be had: do this share here.
        }
    }
    for t in threads { pthread_join(t, nil) }
}

/// `fallocate(2)`, looked up at run time: Glibc's Swift module does not export it.
enum HolePunch {
    typealias Fallocate = @convention(c) (Int32, Int32, off_t, off_t) -> Int32
    static let punchHoleKeepSize: Int32 = 0x02 | 0x01  // FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
    static let function: Fallocate? = {
        guard let symbol = dlsym(UnsafeMutableRawPointer(bitPattern: 0), "fallocate64") else { return nil }  // RTLD_DEFAULT
        return unsafeBitCast(symbol, to: Fallocate.self)
    }()
}

extension BlockDevice {
    /// The files this device reads: the image's own, then its backing chain's.
    func imageFiles() -> [ImageFile] {
        switch self {
        case let raw as RawImage: return [raw.file]
        case let q as QCOW2Image: return [q.file] + (q.backing?.imageFiles() ?? [])
        default: return []
        }
    }
}

/// The machine's processor count, without Foundation.
enum System {
    static var activeProcessorCount: Int { max(1, Int(sysconf(Int32(_SC_NPROCESSORS_ONLN)))) }
}
