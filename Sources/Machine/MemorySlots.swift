import Basics
import Devices
import Glibc
import KVM
import Layout
import Memory
import Synchronization

/// Guest-physical memory as KVM sees it: the memory slots, each a range of guest-physical
/// addresses backed by host memory (`KVM_SET_USER_MEMORY_REGION`), from which KVM builds
/// the second-level page tables (EPT/NPT). Owns the table of slots, the host memory of the
/// slots added while the guest runs (the ``SlotControl`` device asks for them), and, with
/// dirty logging, the pages the guest wrote in each slot (`KVM_GET_DIRTY_LOG`).
///
/// Guest RAM is slots 0 and 1 (below and above the MMIO hole). Slots added at run time are
/// not guest RAM for Swiftlet's devices: ``GuestMemory`` does not know them, so no device
/// reads or writes them on the guest's behalf.
final class MemorySlots: MemorySlotHost {
    struct Slot: Sendable {
        let number: UInt32
        let guestBase: UInt64
        let size: UInt64
        let hostAddress: UInt
        let flags: MemorySlotFlags
        /// "RAM", "RAM added at run time", ...
        let purpose: String

        var pageCount: Int { Int(size / PageBitmap.pageSize) }
        var range: String { "\(Hex.prefixed(guestBase, width: 16))-\(Hex.prefixed(guestBase + size - 1, width: 16))" }
    }

    private struct State {
        var slots: [Slot] = []
        /// Pages written so far, per slot: every read of the dirty log is added here.
        var written: [UInt32: PageBitmap] = [:]
        /// Host mappings this object made (address, length), unmapped in deinit.
        var mappings: [(address: UInt, length: Int)] = []
    }

    private let vm: VirtualMachine
    /// Whether every slot logs the pages the guest writes.
    let logDirtyPages: Bool
    private let state = Mutex(State())
    /// Held while a slot is added at run time, so that the check "is it there already"
    /// and the addition are one step.
    private let adding = Mutex(())

    /// Registers guest RAM with KVM, one slot per region of `memory`.
    init(vm: VirtualMachine, memory: GuestMemory, logDirtyPages: Bool) throws(KVMError) {
        self.vm = vm
        self.logDirtyPages = logDirtyPages
        for (index, region) in memory.regions.enumerated() {
            try register(Slot(number: UInt32(index), guestBase: region.guestBase, size: region.size, hostAddress: region.hostAddress,
                              flags: logDirtyPages ? .logDirtyPages : [], purpose: index == 0 ? "RAM" : "RAM above the MMIO hole"))
        }
    }

    deinit {
        for mapping in state.withLock({ $0.mappings }) {
            munmap(UnsafeMutableRawPointer(bitPattern: mapping.address), mapping.length)
        }
    }

    private func register(_ slot: Slot) throws(KVMError) {
        try vm.setUserMemoryRegion(slot: slot.number, guestAddress: slot.guestBase, size: slot.size, hostAddress: slot.hostAddress,
                                   flags: slot.flags)
        state.withLock { state in
            state.slots.append(slot)
            if slot.flags.contains(.logDirtyPages) { state.written[slot.number] = PageBitmap(pageCount: slot.pageCount) }
        }
    }

    /// The slots, in slot order.
    var slots: [Slot] { state.withLock { $0.slots } }

    // MARK: Dirty tracking of guest RAM (diff snapshots, migration)

    /// Turns dirty logging of the guest RAM slots on or off while the guest runs: each RAM
    /// slot is registered again with its flags changed (`KVM_SET_USER_MEMORY_REGION`; KVM
    /// keeps the memory mapped and starts the slot's log empty). With `--show-memory` the
    /// slots log from the start and keep logging.
    func setRAMDirtyLogging(_ on: Bool, regionCount: Int) throws(KVMError) {
        try adding.withLock { (_) throws(KVMError) in
            for number in 0..<UInt32(regionCount) {
                guard let slot = slots.first(where: { $0.number == number }) else { continue }
                let flags = on || logDirtyPages ? slot.flags.union(.logDirtyPages) : slot.flags.subtracting(.logDirtyPages)
                guard flags != slot.flags else { continue }
                try vm.setUserMemoryRegion(slot: slot.number, guestAddress: slot.guestBase, size: slot.size,
                                           hostAddress: slot.hostAddress, flags: flags)
                let changed = Slot(number: slot.number, guestBase: slot.guestBase, size: slot.size, hostAddress: slot.hostAddress,
                                   flags: flags, purpose: slot.purpose)
                state.withLock { state in
                    if let index = state.slots.firstIndex(where: { $0.number == number }) { state.slots[index] = changed }
                    if on, state.written[number] == nil { state.written[number] = PageBitmap(pageCount: changed.pageCount) }
                }
            }
        }
    }

    /// The pages of guest RAM the guest wrote since the last call (or since logging
    /// started), numbered as ``GuestMemory`` numbers them: slot N is region N of `memory`.
    /// Reads and clears KVM's log of each RAM slot; the pages also count for the
    /// `--show-memory` report.
    func takeRAMDirtyPages(memory: GuestMemory) throws(KVMError) -> PageBitmap {
        var pages = PageBitmap(pageCount: memory.pageCount)
        for index in memory.regions.indices {
            guard let slot = slots.first(where: { $0.number == UInt32(index) }), slot.flags.contains(.logDirtyPages) else { continue }
            pages.formUnion(try readDirtyLog(slot), offset: memory.pageOffset(ofRegion: index))
        }
        return pages
    }

    // MARK: Slots added while the guest runs

    /// Adds `size` bytes of new host memory at `guestBase` as the next slot, holding
    /// `contents` at its start. Called on a vCPU thread while the guest runs (callers
    /// serialize: ``addSlot(_:)``); KVM makes the slot visible to every vCPU at once. The
    /// memory is unmapped again if KVM refuses the slot.
    func add(at guestBase: UInt64, size: UInt64, flags: MemorySlotFlags, purpose: String, contents: [UInt8]) throws -> Slot {
        guard let length = Int(exactly: size), size % PageBitmap.pageSize == 0, contents.count <= length else {
            throw MachineError.invalidConfiguration("a memory slot of \(size) bytes cannot hold its \(contents.count) bytes")
        }
        let pointer = mmap(nil, length, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0)
        guard let pointer, pointer != MAP_FAILED else { throw KVMError.mmapFailed(errno: errno) }
        contents.withUnsafeBytes { pointer.copyMemory(from: $0.baseAddress!, byteCount: $0.count) }
        let address = UInt(bitPattern: pointer)
        let number = (slots.map(\.number).max() ?? 0) + 1
        let slot = Slot(number: number, guestBase: guestBase, size: size, hostAddress: address,
                        flags: flags.union(logDirtyPages && !flags.contains(.readOnly) ? .logDirtyPages : []), purpose: purpose)
        do {
            try register(slot)
        } catch {
            munmap(pointer, length)
            throw error
        }
        state.withLock { $0.mappings.append((address, length)) }
        return slot
    }

    /// The texts the slots added at run time start with, for the guest to read.
    static func greeting(_ kind: SlotControl.SlotKind) -> String {
        switch kind {
        case .ram: return "RAM that Swiftlet added while the guest runs"
        case .readOnly: return "read-only memory: the guest reads it, a write leaves the guest"
        }
    }

    func addSlot(_ kind: SlotControl.SlotKind) -> UInt32? {
        // One at a time: two vCPUs asking at once get the same slot.
        adding.withLock { _ in addSlotOnce(kind) }
    }

    private func addSlotOnce(_ kind: SlotControl.SlotKind) -> UInt32? {
        let base = kind == .ram ? AddressMap.runtimeSlotRAM : AddressMap.runtimeSlotReadOnly
        if let existing = slots.first(where: { $0.guestBase == base }) { return existing.number }
        let purpose = kind == .ram ? "RAM added at run time" : "read-only, added at run time"
        return try? add(at: base, size: AddressMap.runtimeSlotSize, flags: kind == .ram ? [] : .readOnly, purpose: purpose,
                        contents: Array(Self.greeting(kind).utf8) + [0]).number
    }

    func takeDirtyPages() -> [UInt64] {
        guard let slot = slots.first(where: { $0.guestBase == AddressMap.runtimeSlotRAM }),
              let bitmap = try? readDirtyLog(slot) else { return [] }
        return bitmap.runs.flatMap { $0 }.map { slot.guestBase + UInt64($0) * PageBitmap.pageSize }
    }

    /// Reads the dirty log of `slot` (clearing KVM's copy), adds it to what was written so
    /// far, and returns the new pages. Empty for a slot without dirty logging.
    @discardableResult
    private func readDirtyLog(_ slot: Slot) throws(KVMError) -> PageBitmap {
        guard slot.flags.contains(.logDirtyPages) else { return PageBitmap(pageCount: 0) }
        let bitmap = try vm.dirtyLog(slot: slot.number, pageCount: slot.pageCount)
        state.withLock { $0.written[slot.number, default: PageBitmap(pageCount: slot.pageCount)].formUnion(bitmap) }
        return bitmap
    }

    // MARK: Reports (`swiftlet run --show-memory`)

    /// At most this many runs of written pages are listed per slot.
    static let runsShown = 24

    /// The slots, one line each: guest-physical range, size, host address, purpose.
    func slotTable(withSlotDevice: Bool) -> String {
        var lines = ["memory slots (KVM_SET_USER_MEMORY_REGION): guest-physical range -> host address"]
        for slot in slots { lines.append(Self.describe(slot)) }
        if withSlotDevice {
            lines.append("  the slot device at port \(Hex.prefixed(SlotControl.basePort)) adds \(ByteSize.exact(AddressMap.runtimeSlotSize)) "
                + "of RAM at \(Hex.prefixed(AddressMap.runtimeSlotRAM)) and of read-only memory at "
                + "\(Hex.prefixed(AddressMap.runtimeSlotReadOnly)) when the guest asks")
        }
        return lines.joined(separator: "\n")
    }

    /// Every slot with the guest pages written in it during the whole run, as runs of
    /// addresses (reads the logs one last time: call it once the vCPUs have stopped).
    func writtenPagesReport() -> String {
        var lines = ["memory slots at the end, and the guest pages written in each (KVM_GET_DIRTY_LOG):"]
        for slot in slots {
            var line = Self.describe(slot)
            if slot.flags.contains(.readOnly) {
                line += ": the guest cannot write here (each write was an MMIO exit)"
            } else if slot.flags.contains(.logDirtyPages) {
                _ = try? readDirtyLog(slot)
                let written = state.withLock { $0.written[slot.number] } ?? PageBitmap(pageCount: 0)
                line += ": " + Self.describeWritten(written, base: slot.guestBase)
            }
            lines.append(line)
        }
        return lines.joined(separator: "\n")
    }

    static func describe(_ slot: Slot) -> String {
        var flags: [String] = []
        if slot.flags.contains(.readOnly) { flags.append("KVM_MEM_READONLY") }
        if slot.flags.contains(.logDirtyPages) { flags.append("KVM_MEM_LOG_DIRTY_PAGES") }
        return "  slot \(slot.number): \(slot.range) (\(ByteSize.exact(slot.size))) -> host \(Hex.prefixed(slot.hostAddress, width: 12)), "
            + slot.purpose + (flags.isEmpty ? "" : ", " + flags.joined(separator: " | "))
    }

    /// "3 pages written: 0x1000-0x2fff, 0x5000-0x5fff" (at most ``runsShown`` runs).
    static func describeWritten(_ bitmap: PageBitmap, base: UInt64) -> String {
        let count = bitmap.count
        guard count > 0 else { return "no page written" }
        let runs = bitmap.runs
        let shown = runs.prefix(runsShown).map { run in
            "\(Hex.prefixed(base + UInt64(run.lowerBound) * PageBitmap.pageSize))-"
                + Hex.prefixed(base + UInt64(run.upperBound) * PageBitmap.pageSize - 1)
        }
        let more = runs.count > runsShown ? ", and \(runs.count - runsShown) more runs" : ""
        return "\(count) page\(count == 1 ? "" : "s") written: " + shown.joined(separator: ", ") + more
    }
}
