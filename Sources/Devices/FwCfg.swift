import Basics
import Synchronization

/// QEMU's firmware configuration device, legacy port interface only: a 16-bit selector
/// register at port 0x510 and an 8-bit data port at 0x511 that streams the selected
/// item byte by byte. No DMA, no file directory.
///
/// Owns the item table and the read position. Register it at ``basePort`` with length
/// ``portCount``. It carries what kvm-unit-tests' `lib/x86/fwcfg.c` reads to learn the
/// machine: FW_CFG_NB_CPUS (the CPU count its SMP setup waits for) and FW_CFG_RAM_SIZE,
/// plus the signature and interface ID a probe checks. Unknown selectors, and reads
/// past an item's end, return zeros.
public final class FwCfg: IODevice {
    public static let basePort: UInt64 = 0x510
    public static let portCount: UInt64 = 2

    public static let signature: UInt16 = 0x0000
    public static let id: UInt16 = 0x0001
    public static let ramSize: UInt16 = 0x0003
    public static let nbCPUs: UInt16 = 0x0005
    public static let maxCPUs: UInt16 = 0x000F
    /// Selector bit 14 asks for the write channel (ignored: items are read-only here).
    static let entryMask: UInt16 = 0x3FFF
    /// Selector bit 15 selects the architecture-specific table, which is empty here: such
    /// a selector must not alias a generic item (0x8000 is not the signature).
    static let archLocal: UInt16 = 0x8000

    struct State {
        var selector: UInt16 = 0
        var position = 0
    }

    private let items: [UInt16: [UInt8]]
    private let state = Mutex(State())

    /// - Parameters:
    ///   - cpuCount: vCPUs (FW_CFG_NB_CPUS and FW_CFG_MAX_CPUS, 16-bit).
    ///   - ramSize: total guest RAM in bytes (FW_CFG_RAM_SIZE, 64-bit).
    public init(cpuCount: Int, ramSize: UInt64) {
        func le<T: FixedWidthInteger>(_ value: T) -> [UInt8] { [UInt8].littleEndian(value) }
        items = [
            Self.signature: Array("QEMU".utf8),
            Self.id: le(UInt32(1)),                       // traditional interface, no DMA
            Self.ramSize: le(ramSize),
            Self.nbCPUs: le(UInt16(clamping: cpuCount)),
            Self.maxCPUs: le(UInt16(clamping: cpuCount)),
        ]
    }

    public func read(offset: UInt64, into data: UnsafeMutableRawBufferPointer) {
        guard offset == 1 else {
            for index in data.indices { data[index] = 0 }
            return
        }
        state.withLock { state in
            let item = item(state.selector)
            for index in data.indices {
                data[index] = state.position < item.count ? item[state.position] : 0
                if state.position < item.count { state.position += 1 }
            }
        }
    }

    /// The item `selector` names (empty for an unknown one or the architecture table).
    private func item(_ selector: UInt16) -> [UInt8] {
        selector & Self.archLocal != 0 ? [] : items[selector & Self.entryMask] ?? []
    }

    public func write(offset: UInt64, from data: UnsafeRawBufferPointer) {
        guard offset == 0, !data.isEmpty else { return }   // the data port is read-only here
        var value: UInt16 = 0
        for (shift, byte) in data.prefix(2).enumerated() { value |= UInt16(byte) << (8 * UInt16(shift)) }
        state.withLock { state in
            state.selector = value
            state.position = 0
        }
    }
}

// MARK: Snapshot

extension FwCfg: SnapshotDevice {
    /// The selector and the read position in the selected item. The items themselves come
    /// from the machine's configuration, which a restore builds the same.
    public struct SavedState: Codable, Sendable, Equatable {
        public var selector: UInt16
        public var position: Int
    }

    static let deviceName = "fw_cfg"

    public func saveState() -> SavedState {
        state.withLock { SavedState(selector: $0.selector, position: $0.position) }
    }

    /// Checks that the position lies within the selected item (it stops at the item's end)
    /// and puts the state back.
    public func restoreState(_ saved: SavedState) throws(DeviceStateError) {
        let length = item(saved.selector).count
        guard (0...length).contains(saved.position) else {
            throw DeviceStateError(device: Self.deviceName,
                                   "read position \(saved.position) is outside item 0x\(String(saved.selector, radix: 16)) of \(length) bytes")
        }
        state.withLock { $0 = State(selector: saved.selector, position: saved.position) }
    }
}
