import Basics
import Devices
import EventLoop
import Memory
import Synchronization

/// The virtio-pci transport, modern interface (virtio 1.2, 4.1): a PCI function with one
/// 32-bit memory BAR holding the common configuration, the ISR, the device
/// configuration, the queue notify registers and the MSI-X table and PBA, each found by
/// the driver through a vendor-specific capability in configuration space.
///
/// BAR 0 (32 KiB):
///
/// | offset | structure | capability |
/// | --- | --- | --- |
/// | 0x0000 | common configuration (0x3C bytes) | `VIRTIO_PCI_CAP_COMMON_CFG` at 0x40 |
/// | 0x1000 | ISR status (read to clear) | `VIRTIO_PCI_CAP_ISR_CFG` at 0x64 |
/// | 0x2000 | device configuration | `VIRTIO_PCI_CAP_DEVICE_CFG` at 0x74 |
/// | 0x3000 | queue N notifies at 0x3000 + 4N | `VIRTIO_PCI_CAP_NOTIFY_CFG` at 0x50 (multiplier 4) |
/// | 0x4000 | MSI-X table, one entry per queue plus one for configuration changes | MSI-X at 0x98 |
/// | 0x5000 | MSI-X pending bits | |
///
/// plus `VIRTIO_PCI_CAP_PCI_CFG` at 0x84, the window into the BAR through configuration
/// space that the specification requires.
///
/// Notifications: each queue's notify address has an ioeventfd, moved when the guest
/// moves the BAR. Interrupts: with MSI-X enabled, a queue's vector is one MSI line (an
/// irqfd on a GSI routed to the message the guest programmed); with MSI-X off, the ISR
/// bit is set and INTA is asserted as a level through an irqfd with resampling.
public final class VirtioPCIFunction: PCIFunction, VirtioInterrupt {
    public static let barSize: UInt64 = 0x8000
    static let commonOffset: UInt64 = 0x0000, commonLength: UInt64 = 0x3C
    static let isrOffset: UInt64 = 0x1000
    static let deviceOffset: UInt64 = 0x2000, deviceLength: UInt64 = 0x1000
    static let notifyOffset: UInt64 = 0x3000, notifyMultiplier: UInt64 = 4
    static let tableOffset: UInt64 = 0x4000
    static let pbaOffset: UInt64 = 0x5000
    static let capabilityPCIConfiguration = 0x84
    static let capabilityMSIX = 0x98
    static let vendor: UInt16 = 0x1AF4

    public let core: VirtioTransportCore
    private let services: any VirtioMachineServices
    private let msiLines: [any MSILine]
    private var intx: (any LevelLine)? { intxBox.withLock { $0 } }
    private let intxBox = Mutex<(any LevelLine)?>(nil)

    /// One MSI-X table entry: the message address and data, and the vector's mask bit.
    public struct MSIXEntry: Codable, Sendable, Equatable {
        public var address: UInt64 = 0
        public var data: UInt32 = 0
        public var masked = true
    }

    struct State {
        var header: PCIConfigurationHeader
        var isr: UInt8 = 0
        var msixEnabled = false
        var msixFunctionMask = false
        var table: [MSIXEntry]
        var pending: [Bool]
        /// Where the notify ioeventfds are registered now (nil: not registered).
        var notifyBase: UInt64?
    }

    private let state: Mutex<State>

    /// - Parameters:
    ///   - classCode: the PCI class (0x018000 storage/other for block, 0x020000 network).
    ///   - barBase: where the machine places BAR 0.
    ///   - intxGSI: the GSI INTA is wired to.
    public init(device: any VirtioDevice, memory: GuestMemory, classCode: UInt32, barBase: UInt64, intxGSI: UInt32,
                services: any VirtioMachineServices) throws {
        core = try VirtioTransportCore(device: device, memory: memory)
        self.services = services
        let vectors = core.queueCount + 1
        msiLines = try (0..<vectors).map { _ in try services.makeMSILine() }
        var header = PCIConfigurationHeader(vendor: Self.vendor, device: 0x1040 + UInt16(device.deviceType.rawValue), revision: 1,
                                            classCode: classCode, subsystemVendor: Self.vendor, subsystem: 0x1100,
                                            barSizes: [Self.barSize], interruptPin: 1)
        func virtioCapability(_ type: UInt8, offset: UInt64, length: UInt64, extra: [UInt8] = []) -> [UInt8] {
            var bytes: [UInt8] = [0x09, 0, UInt8(16 + extra.count), type, 0, 0, 0, 0]
            bytes += [UInt8].littleEndian(UInt32(offset)) + [UInt8].littleEndian(UInt32(length)) + extra
            return bytes
        }
        header.addCapability(at: 0x40, virtioCapability(1, offset: Self.commonOffset, length: Self.commonLength))
        header.addCapability(at: 0x50, virtioCapability(2, offset: Self.notifyOffset, length: Self.notifyMultiplier * UInt64(core.queueCount),
                                                         extra: [UInt8].littleEndian(UInt32(Self.notifyMultiplier))))
        header.addCapability(at: 0x64, virtioCapability(3, offset: Self.isrOffset, length: 4))
        header.addCapability(at: 0x74, virtioCapability(4, offset: Self.deviceOffset, length: Self.deviceLength))
        // VIRTIO_PCI_CAP_PCI_CFG: bar (byte 4), offset (8), length (12) and data (16) are the driver's.
        var window = virtioCapability(5, offset: 0, length: 0, extra: [0, 0, 0, 0])
        window[2] = 20
        header.addCapability(at: Self.capabilityPCIConfiguration, window, writableRange: 4..<20)
        var msix: [UInt8] = [0x11, 0]
        msix += [UInt8].littleEndian(UInt16(vectors - 1))
        msix += [UInt8].littleEndian(UInt32(Self.tableOffset)) + [UInt8].littleEndian(UInt32(Self.pbaOffset))
        header.addCapability(at: Self.capabilityMSIX, msix)
        header.writeInterruptLine(UInt8(truncatingIfNeeded: intxGSI))
        header.assignBAR(0, base: barBase)
        state = Mutex(State(header: header, table: [MSIXEntry](repeating: MSIXEntry(), count: vectors),
                            pending: [Bool](repeating: false, count: vectors)))
        let isr: @Sendable () -> Bool = { [weak self] in self?.state.withLock { $0.isr != 0 } ?? false }
        intxBox.withLock { $0 = try? services.makeLevelLine(gsi: intxGSI, isAsserted: isr) }
        core.setInterrupt(self)
        moveNotifications(to: barBase)
    }

    deinit { moveNotifications(to: nil) }

    // MARK: Notifications

    private func moveNotifications(to base: UInt64?) {
        let old = state.withLock { state -> UInt64? in
            defer { state.notifyBase = base }
            return state.notifyBase
        }
        guard old != base else { return }
        for (index, event) in core.notifications.enumerated() {
            let offset = Self.notifyOffset + Self.notifyMultiplier * UInt64(index)
            if let old { services.unwatchNotifications(event, mmioAddress: old + offset, length: 2, dataMatch: nil) }
            if let base { try? services.watchNotifications(event, mmioAddress: base + offset, length: 2, dataMatch: nil) }
        }
    }

    // MARK: VirtioInterrupt

    public func signalQueue(_ index: Int) {
        deliver(vector: core.queueVector(index), isrBit: 1)
    }

    public func signalConfigurationChange() {
        deliver(vector: core.configurationVector, isrBit: 2)
    }

    private func deliver(vector: UInt16, isrBit: UInt8) {
        enum Route { case none, msi(Int), intx }
        let route: Route = state.withLock { state in
            if state.msixEnabled {
                guard vector != VirtioTransportCore.noVector, Int(vector) < state.table.count else { return .none }
                if state.msixFunctionMask || state.table[Int(vector)].masked {
                    state.pending[Int(vector)] = true
                    return .none
                }
                return .msi(Int(vector))
            }
            state.isr |= isrBit
            guard !state.header.interruptDisabled else { return .none }
            state.header.setInterruptStatus(true)
            return .intx
        }
        switch route {
        case .none: break
        case let .msi(vector): msiLines[vector].trigger()
        case .intx: intx?.trigger()
        }
    }

    // MARK: Configuration space

    public func readConfiguration(offset: Int, into data: UnsafeMutableRawBufferPointer) {
        if let target = windowTarget(offset: offset, count: data.count) {
            // VIRTIO_PCI_CAP_PCI_CFG data: a read of the BAR through configuration space.
            if let start = target { return readBAR(0, offset: start, into: data) }
        }
        state.withLock { $0.header.read(offset: offset, into: data) }
    }

    public func writeConfiguration(offset: Int, from data: UnsafeRawBufferPointer) {
        if let target = windowTarget(offset: offset, count: data.count) {
            if let start = target { writeBAR(0, offset: start, from: data) }
            return
        }
        let control = Self.capabilityMSIX + 3
        var unmasked: [Int] = []
        let moved: (old: UInt64, new: UInt64)? = state.withLock { state in
            let wasDecoding = state.header.memoryDecoding
            let oldBase = state.header.barBase(0)
            state.header.write(offset: offset, from: data)
            // MSI-X message control, high byte: bit 7 enable, bit 6 function mask.
            if offset <= control && control < offset + data.count {
                let byte = data[control - offset]
                state.msixEnabled = byte & 0x80 != 0
                state.msixFunctionMask = byte & 0x40 != 0
                var updated = state.header
                updated.setCapabilityByte(control, byte & 0xC0 | (UInt8(truncatingIfNeeded: (state.table.count - 1) >> 8) & 0x07))
                state.header = updated
                unmasked = Self.takeDeliverable(&state)
            }
            let decoding = state.header.memoryDecoding
            let newBase = state.header.barBase(0)
            if decoding && (newBase != oldBase || !wasDecoding) { return (oldBase, newBase) }
            return nil
        }
        if let moved { moveNotifications(to: moved.new) }
        for vector in unmasked { msiLines[vector].trigger() }
    }

    /// For an access to the PCI_CFG capability's data bytes: the BAR offset its bar,
    /// offset and length fields name (`.some(nil)` when they name nothing valid: wrong
    /// BAR, a length other than the access's, misaligned or outside the BAR). `nil` for any
    /// other configuration access.
    private func windowTarget(offset: Int, count: Int) -> UInt64?? {
        let data = Self.capabilityPCIConfiguration + 16
        guard offset >= data && offset + count <= data + 4 else { return nil }
        let (bar, start, length) = state.withLock { state -> (UInt8, UInt64, Int) in
            let base = Self.capabilityPCIConfiguration
            let bytes = state.header.bytes
            return (bytes[base + 4], UInt64(bytes.le(UInt32.self, at: base + 8) ?? 0), Int(bytes.le(UInt32.self, at: base + 12) ?? 0))
        }
        guard bar == 0, length == count, start % UInt64(length) == 0, start + UInt64(length) <= Self.barSize else { return .some(nil) }
        return .some(start)
    }

    /// Vectors with a pending interrupt that may now be delivered; their pending bits clear.
    private static func takeDeliverable(_ state: inout State) -> [Int] {
        guard state.msixEnabled, !state.msixFunctionMask else { return [] }
        var ready: [Int] = []
        for vector in state.pending.indices where state.pending[vector] && !state.table[vector].masked {
            state.pending[vector] = false
            ready.append(vector)
        }
        return ready
    }

    public var memoryRegions: [PCIBARRegion] { state.withLock { $0.header.memoryRegions } }

    // MARK: BAR 0

    public func readBAR(_ index: Int, offset: UInt64, into data: UnsafeMutableRawBufferPointer) {
        guard index == 0 else { return fill(data) }
        switch offset {
        case Self.commonOffset..<(Self.commonOffset + Self.commonLength):
            readCommon(offset - Self.commonOffset, into: data)
        case Self.isrOffset..<(Self.isrOffset + 4):
            // Reading the ISR returns it and clears it (4.1.4.5), lowering INTx.
            let value: UInt8 = state.withLock { state in
                let value = state.isr
                state.isr = 0
                state.header.setInterruptStatus(false)
                return value
            }
            for index in data.indices { data[index] = index == 0 && offset == Self.isrOffset ? value : 0 }
        case Self.deviceOffset..<(Self.deviceOffset + Self.deviceLength):
            core.readConfiguration(offset: offset - Self.deviceOffset, into: data)
        case Self.tableOffset..<Self.pbaOffset:
            readTable(offset - Self.tableOffset, into: data)
        case Self.pbaOffset..<(Self.pbaOffset + 0x1000):
            let pending = state.withLock { $0.pending }
            for index in data.indices {
                let bit = (Int(offset - Self.pbaOffset) + index) * 8
                var byte: UInt8 = 0
                for position in 0..<8 where bit + position < pending.count && pending[bit + position] { byte |= 1 << position }
                data[index] = byte
            }
        default:
            fill(data)
        }
    }

    public func writeBAR(_ index: Int, offset: UInt64, from data: UnsafeRawBufferPointer) {
        guard index == 0 else { return }
        switch offset {
        case Self.commonOffset..<(Self.commonOffset + Self.commonLength):
            writeCommon(offset - Self.commonOffset, from: data)
        case Self.deviceOffset..<(Self.deviceOffset + Self.deviceLength):
            core.writeConfiguration(offset: offset - Self.deviceOffset, from: data)
        case Self.notifyOffset..<(Self.notifyOffset + Self.notifyMultiplier * UInt64(core.queueCount)):
            // Reached only when no ioeventfd took the write.
            core.notify(queue: Int((offset - Self.notifyOffset) / Self.notifyMultiplier))
        case Self.tableOffset..<Self.pbaOffset:
            writeTable(offset - Self.tableOffset, from: data)
        default:
            break
        }
    }

    private func fill(_ data: UnsafeMutableRawBufferPointer) {
        for index in data.indices { data[index] = 0xFF }
    }

    // MARK: Common configuration (4.1.4.3)

    /// The common configuration structure's fields: (offset, width).
    private func commonValue(_ field: UInt64) -> UInt64 {
        let queue = core.selectedQueueRegisters
        switch field {
        case 0x00: return 0 // device_feature_select reads back as written: kept in core
        case 0x04: return UInt64(core.deviceFeaturesPage)
        case 0x0C: return UInt64(core.driverFeaturesPage)
        case 0x10: return UInt64(core.configurationVector)
        case 0x12: return UInt64(core.queueCount)
        case 0x14: return UInt64(core.status)
        case 0x15: return UInt64(core.configurationGeneration & 0xFF)
        case 0x16: return UInt64(core.selectedQueue)
        case 0x18: return UInt64(queue?.size ?? 0)
        case 0x1A: return UInt64(queue?.msixVector ?? VirtioTransportCore.noVector)
        case 0x1C: return queue?.ready == true ? 1 : 0
        case 0x1E: return queue == nil ? 0 : UInt64(core.selectedQueue) // queue_notify_off = index
        case 0x20: return queue?.descriptorTable ?? 0
        case 0x28: return queue?.driverArea ?? 0
        case 0x30: return queue?.deviceArea ?? 0
        default: return 0
        }
    }

    private static let fields: [(offset: UInt64, width: Int)] = [
        (0x00, 4), (0x04, 4), (0x08, 4), (0x0C, 4), (0x10, 2), (0x12, 2), (0x14, 1), (0x15, 1), (0x16, 2), (0x18, 2),
        (0x1A, 2), (0x1C, 2), (0x1E, 2), (0x20, 8), (0x28, 8), (0x30, 8), (0x38, 2), (0x3A, 2),
    ]

    /// The field holding `offset`: drivers access each field at its own offset and width
    /// (64-bit fields as two 32-bit halves).
    private static func field(at offset: UInt64, count: Int) -> (offset: UInt64, width: Int)? {
        guard let field = fields.last(where: { $0.offset <= offset }), offset + UInt64(count) <= field.offset + UInt64(field.width) else {
            return nil
        }
        return field
    }

    private func readCommon(_ offset: UInt64, into data: UnsafeMutableRawBufferPointer) {
        guard let field = Self.field(at: offset, count: data.count) else { return fill(data) }
        let value = field.offset == 0x00 ? UInt64(selectedFeaturePage.withLock { $0 }) : field.offset == 0x08
            ? UInt64(selectedDriverFeaturePage.withLock { $0 }) : commonValue(field.offset)
        let shift = 8 * (offset - field.offset)
        for index in data.indices { data[index] = UInt8(truncatingIfNeeded: value >> (shift + 8 * UInt64(index))) }
    }

    private let selectedFeaturePage = Mutex<UInt32>(0)
    private let selectedDriverFeaturePage = Mutex<UInt32>(0)

    private func writeCommon(_ offset: UInt64, from data: UnsafeRawBufferPointer) {
        guard let field = Self.field(at: offset, count: data.count) else { return }
        var value: UInt64 = 0
        for (index, byte) in data.enumerated() { value |= UInt64(byte) << (8 * UInt64(index)) }
        let shift = 8 * (offset - field.offset)
        switch field.offset {
        case 0x00:
            selectedFeaturePage.withLock { $0 = UInt32(truncatingIfNeeded: value) }
            core.selectDeviceFeatures(UInt32(truncatingIfNeeded: value))
        case 0x08:
            selectedDriverFeaturePage.withLock { $0 = UInt32(truncatingIfNeeded: value) }
            core.selectDriverFeatures(UInt32(truncatingIfNeeded: value))
        case 0x0C: core.writeDriverFeaturesPage(UInt32(truncatingIfNeeded: value))
        case 0x10: core.configurationVector = UInt16(truncatingIfNeeded: value)
        case 0x14:
            let status = UInt8(truncatingIfNeeded: value)
            core.writeStatus(status)
            if status == 0 { resetTransport() }
        case 0x16: core.selectQueue(UInt16(truncatingIfNeeded: value))
        case 0x18: core.updateSelectedQueue { $0.size = UInt16(truncatingIfNeeded: value) }
        case 0x1A: core.setSelectedQueueVector(UInt16(truncatingIfNeeded: value))
        case 0x1C: core.setSelectedQueueReady(value & 1 == 1)
        case 0x20: core.updateSelectedQueue { $0.descriptorTable = Self.merge($0.descriptorTable, value, shift: shift, bytes: data.count) }
        case 0x28: core.updateSelectedQueue { $0.driverArea = Self.merge($0.driverArea, value, shift: shift, bytes: data.count) }
        case 0x30: core.updateSelectedQueue { $0.deviceArea = Self.merge($0.deviceArea, value, shift: shift, bytes: data.count) }
        default: break
        }
    }

    private static func merge(_ old: UInt64, _ value: UInt64, shift: UInt64, bytes: Int) -> UInt64 {
        let mask: UInt64 = bytes >= 8 ? .max : ((1 << (8 * UInt64(bytes))) - 1) << shift
        return (old & ~mask) | ((value << shift) & mask)
    }

    private func resetTransport() {
        state.withLock { state in
            state.isr = 0
            state.header.setInterruptStatus(false)
            for index in state.pending.indices { state.pending[index] = false }
        }
        selectedFeaturePage.withLock { $0 = 0 }
        selectedDriverFeaturePage.withLock { $0 = 0 }
    }

    // MARK: MSI-X table (PCI Local Bus 3.0, 6.8.2)

    private func readTable(_ offset: UInt64, into data: UnsafeMutableRawBufferPointer) {
        let entry = Int(offset / 16)
        let table = state.withLock { $0.table }
        guard entry < table.count, offset % 4 == 0, data.count == 4 || data.count == 8 else { return fill(data) }
        let words: [UInt32] = [UInt32(truncatingIfNeeded: table[entry].address), UInt32(truncatingIfNeeded: table[entry].address >> 32),
                               table[entry].data, table[entry].masked ? 1 : 0]
        let word = Int(offset % 16) / 4
        var value = UInt64(words[word])
        if data.count == 8 && word < 3 { value |= UInt64(words[word + 1]) << 32 }
        for index in data.indices { data[index] = UInt8(truncatingIfNeeded: value >> (8 * UInt64(index))) }
    }

    private func writeTable(_ offset: UInt64, from data: UnsafeRawBufferPointer) {
        let entry = Int(offset / 16)
        guard offset % 4 == 0, data.count == 4 || data.count == 8 else { return }
        var value: UInt64 = 0
        for (index, byte) in data.enumerated() { value |= UInt64(byte) << (8 * UInt64(index)) }
        var deliver: [Int] = []
        let message: (UInt64, UInt32)? = state.withLock { state in
            guard entry < state.table.count else { return nil }
            var word = Int(offset % 16) / 4
            var remaining = value
            for _ in 0..<(data.count / 4) where word < 4 {
                let part = UInt32(truncatingIfNeeded: remaining)
                switch word {
                case 0: state.table[entry].address = (state.table[entry].address & ~0xFFFF_FFFF) | UInt64(part)
                case 1: state.table[entry].address = (state.table[entry].address & 0xFFFF_FFFF) | UInt64(part) << 32
                case 2: state.table[entry].data = part
                default: state.table[entry].masked = part & 1 != 0
                }
                word += 1
                remaining >>= 32
            }
            deliver = Self.takeDeliverable(&state)
            return (state.table[entry].address, state.table[entry].data)
        }
        if let (address, data) = message {
            if address == 0 { msiLines[entry].clearMessage() } else { try? msiLines[entry].setMessage(address: address, data: data) }
        }
        for vector in deliver { msiLines[vector].trigger() }
    }
}

// MARK: Snapshot

extension VirtioPCIFunction: SnapshotDevice {
    /// The common registers (with the device's state and its queues' indices), the PCI
    /// configuration header as the guest programmed it (command, BAR, interrupt line,
    /// MSI-X enable and function mask, the PCI_CFG window), the ISR, the MSI-X table and
    /// pending bits, and where the notify ioeventfds are registered.
    public struct SavedState: Codable, Sendable, Equatable {
        public var transport: VirtioTransportCore.SavedState
        public var header: [UInt8]
        public var isr: UInt8
        public var msixTable: [MSIXEntry]
        public var msixPending: [Bool]
        /// The BAR base the notify ioeventfds are registered at (it lags the BAR while
        /// memory decoding is off).
        public var notifyBase: UInt64?
    }

    public func saveState() -> SavedState {
        let transport = core.saveState()
        return state.withLock { state in
            SavedState(transport: transport, header: state.header.bytes, isr: state.isr, msixTable: state.table,
                       msixPending: state.pending, notifyBase: state.notifyBase)
        }
    }

    /// Checks `saved` against this function (built for the same device, so identity, BAR
    /// size and capabilities must be unchanged: only bits a guest can write may differ),
    /// then puts it back: the transport and device (paused, see
    /// ``VirtioTransportCore/restoreState(_:)``), the notify ioeventfds at the saved BAR
    /// base, the GSI route of every MSI-X vector with a message (as the guest's table
    /// write made it), and INTA asserted again when the ISR is set and INTx is in use.
    public func restoreState(_ saved: SavedState) throws(DeviceStateError) {
        let name = "virtio-pci function"
        func refuse(_ reason: String) -> DeviceStateError { DeviceStateError(device: name, reason) }
        guard saved.isr & ~3 == 0 else { throw refuse("ISR 0x\(String(saved.isr, radix: 16)) has bits other than queue and configuration") }
        let vectors = msiLines.count
        guard saved.msixTable.count == vectors, saved.msixPending.count == vectors else {
            throw refuse("\(saved.msixTable.count) MSI-X entries and \(saved.msixPending.count) pending bits saved, the function has \(vectors) vectors")
        }
        var header = state.withLock { $0.header }
        let control = Self.capabilityMSIX + 3
        if let reason = header.restore(saved.header, functionBits: [control: 0xC0]) { throw refuse(reason) }
        let enabled = header.bytes[control] & 0x80 != 0
        let functionMask = header.bytes[control] & 0x40 != 0
        if enabled && !functionMask,
           let vector = saved.msixPending.indices.first(where: { saved.msixPending[$0] && !saved.msixTable[$0].masked }) {
            throw refuse("MSI-X vector \(vector) is pending although nothing masks it")
        }
        if let base = saved.notifyBase {
            guard base % Self.barSize == 0, base <= UInt64(UInt32.max) - Self.barSize + 1 else {
                throw refuse("notifications at 0x\(String(base, radix: 16)), where BAR 0 cannot be")
            }
        }
        if header.memoryDecoding && saved.notifyBase != header.barBase(0) {
            throw refuse("notifications saved at \(saved.notifyBase.map { "0x" + String($0, radix: 16) } ?? "no address") while BAR 0 decodes at 0x\(String(header.barBase(0), radix: 16))")
        }
        do {
            try core.restoreState(saved.transport)
        } catch {
            throw DeviceStateError(device: "virtio-pci \(error.device)", error.reason)
        }
        state.withLock { state in
            state.header = header
            state.isr = saved.isr
            state.msixEnabled = enabled
            state.msixFunctionMask = functionMask
            state.table = saved.msixTable
            state.pending = saved.msixPending
        }
        selectedFeaturePage.withLock { $0 = saved.transport.deviceFeatureSelect }
        selectedDriverFeaturePage.withLock { $0 = saved.transport.driverFeatureSelect }
        moveNotifications(to: saved.notifyBase)
        for (vector, entry) in saved.msixTable.enumerated() where entry.address != 0 {
            do {
                try msiLines[vector].setMessage(address: entry.address, data: entry.data)
            } catch {
                throw refuse("MSI-X vector \(vector) cannot be routed again: \(error)")
            }
        }
        if saved.isr != 0 && !enabled && !header.interruptDisabled { intx?.trigger() }
    }
}

extension PCIConfigurationHeader {
    /// Sets the interrupt line register (firmware's job: the GSI INTA is wired to).
    mutating func writeInterruptLine(_ line: UInt8) {
        _ = withUnsafeBytes(of: line) { write(offset: 0x3C, from: $0) }
    }
}
