import Basics
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

extension VirtualMachine {
    /// The pages of slot `slot` (which has `pageCount` pages and
    /// ``MemorySlotFlags/logDirtyPages``; bit N is the slot's page N, counted in 4 KiB
    /// pages from its guest-physical base) that the guest wrote since the slot was created
    /// or the log last read; KVM clears the log and write-protects those pages again, so
    /// the next read reports only newer writes. Writes Swiftlet makes itself through its
    /// own mapping are not seen. The corresponding ioctl is `KVM_GET_DIRTY_LOG`.
    public func dirtyLog(slot: UInt32, pageCount: Int) throws(KVMError) -> PageBitmap {
        var words = [UInt64](repeating: 0, count: max(1, (pageCount + 63) / 64))
        try words.withUnsafeMutableBufferPointer { (buffer) throws(KVMError) in
            var request = ckvm_dirty_log_request(slot, buffer.baseAddress)
            try fd.ioctl("KVM_GET_DIRTY_LOG", CKVM_GET_DIRTY_LOG, &request)
        }
        return PageBitmap(pageCount: pageCount, words: words)
    }
}
