import Basics
import CLinux
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// Pages by number: page N is bytes `N * 4096 ..< (N + 1) * 4096` of RAM in layout order
/// (the low region, then the high region), which is also where it sits in a memory file.
/// KVM's dirty log counts pages per memory slot; ``GuestMemory/pageOffset(ofRegion:)`` turns
/// a slot's page N into this numbering.
extension GuestMemory {
    /// The page number of region `index`'s first page.
    public func pageOffset(ofRegion index: Int) -> Int {
        Int(regions[..<index].reduce(0) { $0 + $1.size } / Self.pageSize)
    }

    // MARK: The log of Swiftlet's own writes

    /// Starts recording the pages Swiftlet itself writes into guest RAM (a device filling
    /// a read buffer, a used ring). KVM's dirty log sees only the guest's own writes; a
    /// snapshot or a migration needs both. Writes before this call are not recorded.
    public func startLoggingWrites() {
        writeLog.withLock { log in
            if log == nil {
                let words = (pageCount + 63) / 64
                let memory = UnsafeMutablePointer<UInt64>.allocate(capacity: max(1, words))
                memory.initialize(repeating: 0, count: max(1, words))
                log = memory
            }
        }
        logging.store(true, ordering: .sequentiallyConsistent)
    }

    /// Stops recording; what was recorded stays until ``takeWrittenPages()``.
    public func stopLoggingWrites() {
        logging.store(false, ordering: .sequentiallyConsistent)
    }

    /// The pages written since logging started or since the last call, and clears them.
    public func takeWrittenPages() -> PageBitmap {
        writeLog.withLock { log in
            guard let log else { return PageBitmap(pageCount: pageCount) }
            let count = (pageCount + 63) / 64
            let words = (0..<count).map { clinux_atomic_exchange_64(log + $0, 0) }
            return PageBitmap(pageCount: pageCount, words: words)
        }
    }

    /// Marks the pages under `buffer` (a range inside ``mapping``) as written.
    func logWrite(_ buffer: UnsafeMutableRawBufferPointer) {
        guard buffer.count > 0, let base = buffer.baseAddress, let log = writeLog.withLock({ $0 }) else { return }
        let offset: Int = UnsafeRawPointer(base) - UnsafeRawPointer(mapping)
        let pageSize = Int(Self.pageSize)
        let start = offset / pageSize
        let end = (offset + buffer.count - 1) / pageSize
        for page in start...end {
            let bit: UInt64 = 1 << UInt64(page % 64)
            clinux_atomic_or_64(log + page / 64, bit)
        }
    }

    // MARK: Memory files

    /// What ``writeImage(to:pages:)`` wrote.
    public struct ImageWriteSummary: Sendable, Equatable {
        /// Pages written with data.
        public var pagesWritten = 0
        /// Pages left as holes because they hold only zeros.
        public var zeroPagesSkipped = 0
    }

    /// Writes RAM to `descriptor` as a memory file: byte N of the file is byte N of RAM in
    /// layout order, and the file is ``size`` bytes long. With `pages`, only those pages are
    /// written, each one whatever it holds (a diff over an older file; the rest of the file
    /// is a hole). Without, every page is considered and pages of zeros become holes, so a
    /// mostly empty guest leaves a small file. The file should be empty when it starts.
    /// Nothing may write RAM meanwhile (the vCPUs are paused).
    public func writeImage(to descriptor: Int32, pages: PageBitmap? = nil) throws(GuestMemoryError) -> ImageWriteSummary {
        guard ftruncate(descriptor, off_t(size)) == 0 else { throw .fileFailed(operation: "ftruncate", errno: errno) }
        var summary = ImageWriteSummary()
        let pageSize = Int(Self.pageSize)
        func writeRun(_ run: Range<Int>) throws(GuestMemoryError) {
            var offset = run.lowerBound * pageSize
            let end = run.upperBound * pageSize
            while offset < end {
                let written = pwrite(descriptor, mapping + offset, end - offset, off_t(offset))
                if written < 0, errno == EINTR { continue }
                guard written > 0 else { throw .fileFailed(operation: "write", errno: written < 0 ? errno : EIO) }
                offset += written
            }
            summary.pagesWritten += run.count
        }
        if let pages {
            for run in pages.runs where run.upperBound <= pageCount { try writeRun(run) }
            return summary
        }
        // Gather runs of pages that are not all zeros; a run is written with one call.
        var runStart: Int?
        for page in 0...pageCount {
            let data = page < pageCount && !Self.isZeroPage(mapping + page * pageSize)
            if data, runStart == nil { runStart = page }
            if !data {
                if let start = runStart { try writeRun(start..<page); runStart = nil }
                if page < pageCount { summary.zeroPagesSkipped += 1 }
            }
        }
        return summary
    }

    /// Reads pages `run` of a memory file at `descriptor` into RAM (applying a diff file
    /// over RAM mapped from an older one).
    public func readPages(_ run: Range<Int>, from descriptor: Int32) throws(GuestMemoryError) {
        guard run.lowerBound >= 0, run.upperBound <= pageCount else {
            throw .outOfRange(address: UInt64(max(0, run.lowerBound)) * Self.pageSize, length: UInt64(run.count) * Self.pageSize)
        }
        let pageSize = Int(Self.pageSize)
        var offset = run.lowerBound * pageSize
        let end = run.upperBound * pageSize
        while offset < end {
            let read = pread(descriptor, mapping + offset, end - offset, off_t(offset))
            if read < 0, errno == EINTR { continue }
            guard read > 0 else { throw .fileFailed(operation: "read", errno: read < 0 ? errno : EIO) }
            offset += read
        }
    }

    /// Runs `body` with the bytes of pages `run` (layout order), for sending them
    /// elsewhere (a migration stream).
    public func withPages<Result>(_ run: Range<Int>, _ body: (UnsafeRawBufferPointer) throws -> Result) throws -> Result {
        guard run.lowerBound >= 0, run.upperBound <= pageCount else {
            throw GuestMemoryError.outOfRange(address: UInt64(max(0, run.lowerBound)) * Self.pageSize,
                                              length: UInt64(run.count) * Self.pageSize)
        }
        let pageSize = Int(Self.pageSize)
        return try body(UnsafeRawBufferPointer(start: mapping + run.lowerBound * pageSize, count: run.count * pageSize))
    }

    /// Copies `bytes` over pages starting at page `first` (layout order): the receiving
    /// side of ``withPages(_:_:)``.
    public func storePages(_ bytes: UnsafeRawBufferPointer, at first: Int) throws(GuestMemoryError) {
        let pageSize = Int(Self.pageSize)
        guard first >= 0, bytes.count % pageSize == 0, first + bytes.count / pageSize <= pageCount else {
            throw .outOfRange(address: UInt64(max(0, first)) * Self.pageSize, length: UInt64(bytes.count))
        }
        if let source = bytes.baseAddress { (mapping + first * pageSize).copyMemory(from: source, byteCount: bytes.count) }
    }

    /// Whether the 4 KiB page at `page` holds only zeros.
    static func isZeroPage(_ page: UnsafeRawPointer) -> Bool {
        let words = page.assumingMemoryBound(to: UInt64.self)
        var accumulated: UInt64 = 0
        // Eight words per step; a page of data is told apart in the first line it differs.
        var index = 0
        while index < 512 {
            accumulated |= words[index] | words[index + 1] | words[index + 2] | words[index + 3]
                | words[index + 4] | words[index + 5] | words[index + 6] | words[index + 7]
            if accumulated != 0 { return false }
            index += 8
        }
        return true
    }
}
