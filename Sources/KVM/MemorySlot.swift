import CKVM

/// The flags of a memory slot (`kvm_userspace_memory_region.flags`).
public struct MemorySlotFlags: OptionSet, Sendable, Hashable {
    public let rawValue: UInt32
    public init(rawValue: UInt32) { self.rawValue = rawValue }

    /// `KVM_MEM_LOG_DIRTY_PAGES`: KVM records every page the guest writes, for
    /// ``VirtualMachine/dirtyLog(slot:pageCount:)``. KVM then maps the slot with 4 KiB
    /// pages, and write-protects them or has the processor log the writes (Intel PML):
    /// logging costs guest time in KVM, never an exit to user space.
    public static let logDirtyPages = MemorySlotFlags(rawValue: CKVM_MEM_LOG_DIRTY_PAGES)
    /// `KVM_MEM_READONLY`: the guest reads the memory directly, and each write leaves the
    /// guest as a `KVM_EXIT_MMIO` exit instead of changing it (ROM, flash). Needs
    /// ``KVMCapability/readOnlyMemory``.
    public static let readOnly = MemorySlotFlags(rawValue: CKVM_MEM_READONLY)
}

/// Which pages of a memory slot the guest wrote: bit N (of 64-bit word N / 64) is page N
/// of the slot, counted in 4 KiB pages from the slot's guest-physical base.
public struct DirtyPageBitmap: Sendable, Equatable {
    public static let pageSize: UInt64 = 4096

    /// Pages in the slot.
    public let pageCount: Int
    /// The bitmap as KVM fills it: `(pageCount + 63) / 64` words.
    public private(set) var words: [UInt64]

    /// An empty bitmap for a slot of `pageCount` pages.
    public init(pageCount: Int) {
        self.pageCount = max(0, pageCount)
        words = [UInt64](repeating: 0, count: (self.pageCount + 63) / 64)
    }

    /// A bitmap from KVM's words; bits past `pageCount` are ignored.
    public init(pageCount: Int, words: [UInt64]) {
        self.init(pageCount: pageCount)
        for index in self.words.indices where index < words.count { self.words[index] = words[index] }
        let spare = self.words.count * 64 - self.pageCount
        if spare > 0, let last = self.words.indices.last { self.words[last] &= UInt64.max >> UInt64(spare) }
    }

    /// Whether page `page` was written (`false` outside the slot).
    public func isDirty(_ page: Int) -> Bool {
        guard page >= 0, page < pageCount else { return false }
        return words[page / 64] & (1 << UInt64(page % 64)) != 0
    }

    /// How many pages were written.
    public var dirtyCount: Int { words.reduce(0) { $0 + $1.nonzeroBitCount } }

    /// The written pages as runs of consecutive page numbers, in order. Words with no
    /// page written are skipped whole, so a large, mostly clean slot is quick.
    public var dirtyRuns: [Range<Int>] {
        var runs: [Range<Int>] = []
        var start: Int?
        for (index, word) in words.enumerated() {
            if word == 0 && start == nil { continue }
            if word == UInt64.max && start != nil { continue }
            for bit in 0..<64 {
                let page = index * 64 + bit
                guard page < pageCount else { break }
                let dirty = word & (1 << UInt64(bit)) != 0
                if dirty, start == nil { start = page }
                if !dirty, let first = start {
                    runs.append(first..<page)
                    start = nil
                }
            }
        }
        if let first = start { runs.append(first..<pageCount) }
        return runs
    }

    /// Adds the pages `other` marks (a later read of the log: KVM clears it on each read).
    public mutating func formUnion(_ other: DirtyPageBitmap) {
        for index in words.indices where index < other.words.count { words[index] |= other.words[index] }
    }
}

extension VirtualMachine {
    /// The pages of slot `slot` (which has `pageCount` pages and
    /// ``MemorySlotFlags/logDirtyPages``) that the guest wrote since the slot was created
    /// or the log last read; KVM clears the log and write-protects those pages again, so
    /// the next read reports only newer writes. Writes Swiftlet makes itself through its
    /// own mapping are not seen. The corresponding ioctl is `KVM_GET_DIRTY_LOG`.
    public func dirtyLog(slot: UInt32, pageCount: Int) throws(KVMError) -> DirtyPageBitmap {
        var words = [UInt64](repeating: 0, count: max(1, (pageCount + 63) / 64))
        try words.withUnsafeMutableBufferPointer { (buffer) throws(KVMError) in
            var request = ckvm_dirty_log_request(slot, buffer.baseAddress)
            try fd.ioctl("KVM_GET_DIRTY_LOG", CKVM_GET_DIRTY_LOG, &request)
        }
        return DirtyPageBitmap(pageCount: pageCount, words: words)
    }
}
