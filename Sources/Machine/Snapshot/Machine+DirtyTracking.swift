import Basics
import KVM
import Memory

/// What the machine knows about written pages: whether it is tracking them, and which
/// snapshot a diff snapshot would build on (the last one taken or restored while tracking).
struct DirtyTracking: Sendable {
    var active = false
    /// The snapshot whose RAM the machine's RAM equals, plus the pages written since.
    var base: (state: String, id: String)?
}

extension Machine {
    /// Starts tracking the pages of guest RAM that change: KVM's dirty log on the RAM slots
    /// (pages the guest writes) and the host write log of ``GuestMemory`` (pages Swiftlet's
    /// devices write: disk reads, received frames, used rings). Pages written before this
    /// call are not reported. Works while the guest runs.
    public func startDirtyTracking() throws(MachineError) {
        do {
            try board.slots.setRAMDirtyLogging(true, regionCount: board.memory.regions.count)
        } catch {
            throw .kvm(error)
        }
        board.memory.startLoggingWrites()
        _ = try? takeDirtyPages(requireTracking: false)
        tracking.withLock { $0.active = true }
    }

    /// Stops tracking; what a diff snapshot would have built on is forgotten.
    public func stopDirtyTracking() {
        let wasActive = tracking.withLock { state in
            defer { state = DirtyTracking() }
            return state.active
        }
        guard wasActive else { return }
        board.memory.stopLoggingWrites()
        _ = board.memory.takeWrittenPages()
        try? board.slots.setRAMDirtyLogging(false, regionCount: board.memory.regions.count)
    }

    /// Whether ``startDirtyTracking()`` is in force.
    public var isTrackingDirtyPages: Bool { tracking.withLock { $0.active } }

    /// The pages of RAM (numbered as in a memory file) written since tracking started or
    /// since the last call, by the guest or by a device; each call clears them. While the
    /// guest runs, a page may be written again right after: the next call reports it.
    public func takeDirtyPages() throws(MachineError) -> PageBitmap {
        try takeDirtyPages(requireTracking: true)
    }

    private func takeDirtyPages(requireTracking: Bool) throws(MachineError) -> PageBitmap {
        if requireTracking, !isTrackingDirtyPages {
            throw .invalidConfiguration("dirty pages are not being tracked (start tracking first)")
        }
        var pages: PageBitmap
        do {
            pages = try board.slots.takeRAMDirtyPages(memory: board.memory)
        } catch {
            throw .kvm(error)
        }
        pages.formUnion(board.memory.takeWrittenPages())
        return pages
    }
}
