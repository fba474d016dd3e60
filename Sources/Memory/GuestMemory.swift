import Layout
import Basics
import CLinux
import Synchronization
#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// A guest-physical address: what the guest puts in its page tables and hands to devices.
public typealias GuestAddress = UInt64

/// Errors raised while creating or accessing guest memory.
public enum GuestMemoryError: Error, Equatable, CustomStringConvertible {
    /// The requested size is zero, not a multiple of the page size, or too large.
    case invalidSize(UInt64, reason: String)
    /// `mmap` refused the allocation (errno attached).
    case mappingFailed(size: UInt64, errno: Int32)
    /// A guest-physical range is not entirely backed by RAM.
    case outOfRange(address: GuestAddress, length: UInt64)
    /// An ordered (atomic) access to an address that is not naturally aligned.
    case misaligned(address: GuestAddress, size: Int)
    /// The memfd backing guest RAM could not be created or sized.
    case memfdFailed(errno: Int32)
    /// Writing or reading a memory file failed.
    case fileFailed(operation: String, errno: Int32)

    public var description: String {
        switch self {
        case let .invalidSize(size, reason):
            return "invalid guest memory size \(size) bytes: \(reason)"
        case let .mappingFailed(size, err):
            return "cannot reserve \(ByteSize.exact(size)) of guest memory: \(String(cString: strerror(err)))"
        case let .outOfRange(address, length):
            return "guest range 0x\(String(address, radix: 16))+0x\(String(length, radix: 16)) is outside guest RAM"
        case let .misaligned(address, size):
            return "guest address 0x\(String(address, radix: 16)) is not aligned for a \(size)-byte ordered access"
        case let .memfdFailed(err):
            return "cannot create a memfd for guest memory: \(String(cString: strerror(err)))"
        case let .fileFailed(operation, err):
            return "memory file: \(operation) failed: \(String(cString: strerror(err)))"
        }
    }
}

/// One contiguous piece of guest RAM: `size` bytes at guest-physical `guestBase`,
/// backed by host memory at `hostAddress`. The machine registers each region with KVM
/// as one memory slot (`KVM_SET_USER_MEMORY_REGION`).
public struct GuestMemoryRegion: Sendable, Equatable {
    public let guestBase: GuestAddress
    public let size: UInt64
    /// Host virtual address of the first byte (an integer so the value is Sendable).
    public let hostAddress: UInt

    public var guestEnd: GuestAddress { guestBase + size }

    public func contains(_ address: GuestAddress) -> Bool {
        address >= guestBase && address - guestBase < size
    }
}

/// Guest RAM: owns one anonymous, `MAP_NORESERVE` mapping and the guest-physical layout
/// laid over it.
///
/// Layout: RAM starts at guest-physical 0. When it is larger than
/// ``GuestMemory/mmioHoleStart`` (3 GiB), the part that would overlap the 32-bit MMIO
/// hole (3 GiB to 4 GiB, where devices, the IOAPIC and the LAPIC live) continues at 4 GiB
/// instead.
///
/// Every translation from a guest-physical range to host memory goes through
/// ``hostBuffer(at:count:)``, which checks bounds and overflow. A guest controls every
/// address it hands us; nothing else in Swiftlet does raw pointer arithmetic on them.
///
/// This type issues no KVM ioctl, so devices and loaders are unit-tested with it directly.
public final class GuestMemory: @unchecked Sendable {
    // @unchecked Sendable: the mapping and the layout are fixed at init and freed in
    // deinit; the bytes themselves are shared with the guest by design, like RAM.

    /// Start of the 32-bit MMIO hole (``AddressMap``): RAM above this address moves to 4 GiB.
    public static let mmioHoleStart: GuestAddress = AddressMap.mmioHoleStart
    /// End of the 32-bit MMIO hole, where high RAM resumes.
    public static let mmioHoleEnd: GuestAddress = AddressMap.mmioHoleEnd
    /// The largest guest RAM we accept (1 TiB): beyond what a small VMM needs, and far
    /// below the 2^52 bytes x86 can address.
    public static let maximumSize: UInt64 = 1 << 40
    public static let pageSize: UInt64 = 4096

    /// The RAM regions in ascending guest-physical order (one or two).
    public let regions: [GuestMemoryRegion]
    /// Total RAM in bytes (not counting the hole).
    public let size: UInt64

    /// RAM in layout order (low region, then high region): byte N is byte N of a memory file.
    let mapping: UnsafeMutableRawPointer
    /// Whether writes through this mapping are logged (see ``startLoggingWrites()``).
    let logging = Atomic<Bool>(false)
    /// One bit per page of RAM in layout order, set by the writes Swiftlet makes while
    /// logging; `nil` until logging first starts. Allocated once, freed in `deinit`.
    let writeLog = Mutex<UnsafeMutablePointer<UInt64>?>(nil)
    /// Pages of RAM (4 KiB each).
    public var pageCount: Int { Int(size / Self.pageSize) }
    /// The memfd behind guest RAM, with ``Backing/memfd``: offset N of the file is byte N
    /// of RAM in layout order (low region, then high region). Closed in `deinit`.
    public let memfd: Int32?

    /// What holds guest RAM on the host.
    public enum Backing: Sendable, Equatable {
        /// Private anonymous memory: the default.
        case anonymous
        /// A memfd mapped shared: the same pages can be mapped again (a snapshot maps the
        /// file) or passed to another process.
        case memfd
        /// A memory file (``writeImage(to:pages:)`` wrote it: byte N is byte N of RAM in
        /// layout order) mapped private: each page is read from the file when first touched
        /// and the guest's writes stay in this process, so the file is never changed. The
        /// caller keeps the descriptor; the mapping holds its own reference.
        case privateFile(descriptor: Int32)
    }

    /// Reserves `size` bytes of guest RAM.
    /// - Parameters:
    ///   - size: bytes of RAM; a positive multiple of 4 KiB, at most ``maximumSize``.
    ///   - transparentHugePages: ask the host kernel (`madvise(MADV_HUGEPAGE)`) to back
    ///     guest RAM with 2 MiB pages, which shortens the host's page walks.
    ///   - backing: anonymous memory, or a memfd.
    public init(size: UInt64, transparentHugePages: Bool = true, backing: Backing = .anonymous) throws(GuestMemoryError) {
        guard size > 0 else { throw .invalidSize(size, reason: "must be larger than zero") }
        guard size % Self.pageSize == 0 else {
            throw .invalidSize(size, reason: "must be a multiple of 4 KiB")
        }
        guard size <= Self.maximumSize else {
            throw .invalidSize(size, reason: "larger than the maximum of \(ByteSize.exact(Self.maximumSize))")
        }
        guard let length = Int(exactly: size) else {
            throw .invalidSize(size, reason: "does not fit in this host's address space")
        }
        var file: Int32?
        let pointer: UnsafeMutableRawPointer?
        switch backing {
        case .anonymous:
            pointer = mmap(nil, length, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0)
        case .memfd:
            let fd = clinux_memfd_create("swiftlet-guest-ram")
            guard fd >= 0 else { throw .memfdFailed(errno: errno) }
            guard ftruncate(fd, off_t(length)) == 0 else {
                let err = errno
                close(fd)
                throw .memfdFailed(errno: err)
            }
            file = fd
            pointer = mmap(nil, length, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_NORESERVE, fd, 0)
        case let .privateFile(descriptor):
            var status = stat()
            guard fstat(descriptor, &status) == 0 else { throw .mappingFailed(size: size, errno: errno) }
            guard UInt64(max(0, status.st_size)) >= size else {
                throw .invalidSize(size, reason: "the memory file holds only \(ByteSize.exact(UInt64(max(0, status.st_size))))")
            }
            pointer = mmap(nil, length, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_NORESERVE, descriptor, 0)
        }
        guard let pointer, pointer != MAP_FAILED else {
            let err = errno
            if let file { close(file) }
            throw .mappingFailed(size: size, errno: err)
        }
        memfd = file
        if transparentHugePages {
            // Advisory only: a kernel without THP simply ignores it.
            _ = madvise(pointer, length, MADV_HUGEPAGE)
        }
        mapping = pointer
        self.size = size
        regions = Self.layout(size: size, host: UInt(bitPattern: pointer))
    }

    deinit {
        writeLog.withLock { $0?.deallocate() }
        munmap(mapping, Int(size))
        if let memfd { close(memfd) }
    }

    /// Splits `size` bytes of RAM around the MMIO hole.
    static func layout(size: UInt64, host: UInt) -> [GuestMemoryRegion] {
        let low = min(size, mmioHoleStart)
        var regions = [GuestMemoryRegion(guestBase: 0, size: low, hostAddress: host)]
        if size > low {
            regions.append(GuestMemoryRegion(guestBase: mmioHoleEnd, size: size - low,
                                             hostAddress: host + UInt(low)))
        }
        return regions
    }

    /// The region holding `address`, if any.
    public func region(containing address: GuestAddress) -> GuestMemoryRegion? {
        regions.first { $0.contains(address) }
    }

    /// The highest guest-physical address of RAM plus one.
    public var end: GuestAddress { regions.last!.guestEnd }

    /// Translates the guest-physical range `[address, address + count)` to host memory.
    /// Returns `nil` when any byte of it is not RAM or the range overflows; a range never
    /// spans two regions (the hole separates them). Internal: callers get the bytes only
    /// inside a closure (``withBytes(at:count:_:)``), so no pointer outlives the access.
    func hostBuffer(at address: GuestAddress, count: UInt64) -> UnsafeMutableRawBufferPointer? {
        // A region matches when the range starts inside it or exactly at its end (the
        // latter only works out for an empty range, by the length check below).
        guard let region = regions.first(where: { address >= $0.guestBase && address - $0.guestBase <= $0.size }) else {
            return nil
        }
        let offset = address - region.guestBase
        // offset <= region.size here, so size - offset cannot underflow.
        guard count <= region.size - offset, let length = Int(exactly: count) else { return nil }
        let base = UnsafeMutableRawPointer(bitPattern: region.hostAddress)! + Int(offset)
        return UnsafeMutableRawBufferPointer(start: base, count: length)
    }

    /// Like ``hostBuffer(at:count:)`` but throws ``GuestMemoryError/outOfRange(address:length:)``.
    func checkedBuffer(at address: GuestAddress, count: UInt64) throws(GuestMemoryError) -> UnsafeMutableRawBufferPointer {
        guard let buffer = hostBuffer(at: address, count: count) else {
            throw .outOfRange(address: address, length: count)
        }
        return buffer
    }

    /// Like ``checkedBuffer(at:count:)`` for a range about to be written. Call
    /// ``noteWritten(_:)`` once the write is done.
    func writableBuffer(at address: GuestAddress, count: UInt64) throws(GuestMemoryError) -> UnsafeMutableRawBufferPointer {
        try checkedBuffer(at: address, count: count)
    }

    /// With the write log on (``startLoggingWrites()``), records the pages of `buffer`.
    /// Called AFTER the write: a reader that takes the log (a migration round copying
    /// pages) and then sees no mark must be sure the page's data was already final when it
    /// copied it, so the mark may come late but never early.
    @inline(__always)
    func noteWritten(_ buffer: UnsafeMutableRawBufferPointer) {
        if logging.load(ordering: .relaxed) { logWrite(buffer) }
    }

    /// Runs `body` with the host bytes behind guest-physical `[address, address + count)`,
    /// or throws ``GuestMemoryError/outOfRange(address:length:)`` when any of it is not
    /// RAM. The buffer is valid only inside `body`: do not let it escape. The guest may
    /// change the bytes at any moment; read each value once and check it.
    public func withBytes<Result>(at address: GuestAddress, count: UInt64,
                                  _ body: (UnsafeMutableRawBufferPointer) throws -> Result) throws -> Result {
        // The body may write (a disk read lands here), so the range counts as written.
        let buffer = try writableBuffer(at: address, count: count)
        defer { noteWritten(buffer) }
        return try body(buffer)
    }

    /// Runs `body` with the host bytes behind each of the guest-physical `ranges`, in
    /// order, or throws ``GuestMemoryError/outOfRange(address:length:)`` for the first one
    /// that is not all RAM: for vectored I/O (`readv`/`writev` straight into or out of
    /// guest memory). The same rules as ``withBytes(at:count:_:)``: the buffers are valid
    /// only inside `body`, and the guest may change the bytes at any moment.
    public func withBytes<Result>(of ranges: some Sequence<(address: GuestAddress, count: UInt64)>,
                                  _ body: ([UnsafeMutableRawBufferPointer]) throws -> Result) throws -> Result {
        var buffers: [UnsafeMutableRawBufferPointer] = []
        buffers.reserveCapacity(ranges.underestimatedCount)
        for range in ranges { buffers.append(try checkedBuffer(at: range.address, count: range.count)) }
        // The body may write (a received frame lands here), so the ranges count as written.
        defer { for buffer in buffers { noteWritten(buffer) } }
        return try body(buffers)
    }

    /// Returns `true` when every byte of the range is RAM.
    public func contains(_ address: GuestAddress, count: UInt64) -> Bool {
        hostBuffer(at: address, count: count) != nil
    }

    // MARK: Copying

    /// Copies `bytes` into guest memory at `address`.
    public func write(_ bytes: some Collection<UInt8>, at address: GuestAddress) throws(GuestMemoryError) {
        let target = try writableBuffer(at: address, count: UInt64(bytes.count))
        _ = target.initializeMemory(as: UInt8.self, from: bytes)
        noteWritten(target)
    }

    /// Copies raw bytes into guest memory at `address`.
    public func write(_ bytes: UnsafeRawBufferPointer, at address: GuestAddress) throws(GuestMemoryError) {
        let target = try writableBuffer(at: address, count: UInt64(bytes.count))
        if let base = bytes.baseAddress { target.baseAddress!.copyMemory(from: base, byteCount: bytes.count) }
        noteWritten(target)
    }

    /// Reads `count` bytes from guest memory at `address`.
    public func read(at address: GuestAddress, count: Int) throws(GuestMemoryError) -> [UInt8] {
        let source = try checkedBuffer(at: address, count: UInt64(max(count, 0)))
        return Array(source)
    }

    /// Copies guest memory at `address` into `buffer`.
    public func read(into buffer: UnsafeMutableRawBufferPointer, at address: GuestAddress) throws(GuestMemoryError) {
        let source = try checkedBuffer(at: address, count: UInt64(buffer.count))
        if let base = buffer.baseAddress { base.copyMemory(from: source.baseAddress!, byteCount: buffer.count) }
    }

    /// Fills `[address, address + count)` with zeros.
    public func zero(at address: GuestAddress, count: UInt64) throws(GuestMemoryError) {
        let target = try writableBuffer(at: address, count: count)
        if let base = target.baseAddress { memset(base, 0, target.count) }
        noteWritten(target)
    }

    // MARK: Little-endian scalars (x86 and virtio are little-endian)

    /// Loads a little-endian integer from guest memory.
    public func load<T: FixedWidthInteger>(_ type: T.Type = T.self, at address: GuestAddress) throws(GuestMemoryError) -> T {
        let source = try checkedBuffer(at: address, count: UInt64(MemoryLayout<T>.size))
        return T(littleEndian: source.loadUnaligned(as: T.self))
    }

    /// Stores a little-endian integer into guest memory.
    public func store<T: FixedWidthInteger>(_ value: T, at address: GuestAddress) throws(GuestMemoryError) {
        let target = try writableBuffer(at: address, count: UInt64(MemoryLayout<T>.size))
        target.storeBytes(of: value.littleEndian, as: T.self)
        noteWritten(target)
    }

    // MARK: Ordered access (virtqueue indices shared with the guest's CPUs)

    /// A naturally aligned location for an ordered access of `size` bytes.
    private func alignedPointer(_ address: GuestAddress, size: Int) throws(GuestMemoryError) -> UnsafeMutableRawPointer {
        guard address % UInt64(size) == 0 else { throw .misaligned(address: address, size: size) }
        return try checkedBuffer(at: address, count: UInt64(size)).baseAddress!
    }

    /// Runs `write` on the naturally aligned location of `size` bytes at `address`, then
    /// records the write in the write log.
    private func writeAligned<Result>(_ address: GuestAddress, size: Int, _ write: (UnsafeMutableRawPointer) -> Result) throws(GuestMemoryError) -> Result {
        let pointer = try alignedPointer(address, size: size)
        let result = write(pointer)
        noteWritten(UnsafeMutableRawBufferPointer(start: pointer, count: size))
        return result
    }

    /// Loads a little-endian 16-bit value with acquire ordering: later loads are not done
    /// before it (a virtqueue's index is read before the entries it covers).
    public func loadAcquire16(at address: GuestAddress) throws(GuestMemoryError) -> UInt16 {
        UInt16(littleEndian: clinux_load_acquire_16(try alignedPointer(address, size: 2)))
    }

    /// Loads a little-endian 32-bit value with acquire ordering.
    public func loadAcquire32(at address: GuestAddress) throws(GuestMemoryError) -> UInt32 {
        UInt32(littleEndian: clinux_load_acquire_32(try alignedPointer(address, size: 4)))
    }

    /// Stores a little-endian 16-bit value with release ordering: earlier stores are
    /// visible before it (used-ring entries before the used index that publishes them).
    public func storeRelease16(_ value: UInt16, at address: GuestAddress) throws(GuestMemoryError) {
        try writeAligned(address, size: 2) { clinux_store_release_16($0, value.littleEndian) }
    }

    /// Stores a little-endian 32-bit value with release ordering.
    public func storeRelease32(_ value: UInt32, at address: GuestAddress) throws(GuestMemoryError) {
        try writeAligned(address, size: 4) { clinux_store_release_32($0, value.littleEndian) }
    }

    /// Atomically replaces the naturally aligned little-endian 4- or 8-byte value at
    /// `address` with `desired` if it is `expected`; returns whether it did. (A page walk
    /// sets accessed and dirty bits this way, as the CPU does, while other vCPUs run.)
    public func compareExchange(at address: GuestAddress, size: Int, expected: UInt64, desired: UInt64) throws(GuestMemoryError) -> Bool {
        guard size == 4 || size == 8 else { throw .misaligned(address: address, size: size) }
        return try writeAligned(address, size: size) { pointer in
            if size == 8 { return clinux_compare_exchange_64(pointer, expected.littleEndian, desired.littleEndian) != 0 }
            return clinux_compare_exchange_32(pointer, UInt32(truncatingIfNeeded: expected).littleEndian,
                                              UInt32(truncatingIfNeeded: desired).littleEndian) != 0
        }
    }

    /// A full memory barrier (the specification's `mb()`): needed between publishing the
    /// used index and reading the driver's event index or flags, which acquire/release
    /// alone do not order (a store followed by a load).
    public static func fence() {
        clinux_fence()
    }
}
