// TEMPORARY (branch migration): a minimal Machine.startDirtyTracking/takeDirtyPages/
// stopDirtyTracking until the lead's version lands in main; delete this file at the merge.
import Basics
import KVM
import Memory

extension Machine {
    /// Turns on dirty logging of guest RAM (`KVM_MEM_LOG_DIRTY_PAGES` on the RAM slots, set
    /// again with `KVM_SET_USER_MEMORY_REGION`) and the host write log; clears what was logged.
    func startDirtyTracking() throws(MachineError) {
        board.memory.startLoggingWrites()
        _ = board.memory.takeWrittenPages()
        do {
            for (index, region) in board.memory.regions.enumerated() {
                try board.vm.setUserMemoryRegion(slot: UInt32(index), guestAddress: region.guestBase, size: region.size,
                                                 hostAddress: region.hostAddress, flags: .logDirtyPages)
                _ = try board.vm.dirtyLog(slot: UInt32(index), pageCount: Int(region.size / GuestMemory.pageSize))
            }
        } catch {
            stopDirtyTracking()
            throw .kvm(error)
        }
    }

    /// The RAM pages written since tracking started or the last call, by the guest
    /// (`KVM_GET_DIRTY_LOG`, which clears KVM's log) or by Swiftlet's devices.
    func takeDirtyPages() throws(MachineError) -> PageBitmap {
        var pages = board.memory.takeWrittenPages()
        do {
            for (index, region) in board.memory.regions.enumerated() {
                let log = try board.vm.dirtyLog(slot: UInt32(index), pageCount: Int(region.size / GuestMemory.pageSize))
                pages.formUnion(PageBitmap(pageCount: log.pageCount, words: log.words), offset: board.memory.pageOffset(ofRegion: index))
            }
        } catch {
            throw .kvm(error)
        }
        return pages
    }

    /// Turns dirty logging off again (unless `--show-memory` keeps it on).
    func stopDirtyTracking() {
        board.memory.stopLoggingWrites()
        guard !board.slots.logDirtyPages else { return }
        for (index, region) in board.memory.regions.enumerated() {
            try? board.vm.setUserMemoryRegion(slot: UInt32(index), guestAddress: region.guestBase, size: region.size,
                                              hostAddress: region.hostAddress, flags: [])
        }
    }
}
