import Devices
import EventLoop
import Memory
import Synchronization

/// What a transport needs from the machine, which only the machine can do with KVM:
/// queue notifications handled in the kernel (`KVM_IOEVENTFD`) and message-signalled
/// interrupt lines (`KVM_IRQFD` on MSI routes). Device models and transports stay free
/// of KVM; tests provide a version without it.
public protocol VirtioMachineServices: Sendable {
    /// Arranges for guest writes matching the trigger to signal `event` in the kernel,
    /// without an exit to user space. May throw when the host cannot; the transport then
    /// signals the event itself when the write reaches it.
    func watchNotifications(_ event: EventFD, mmioAddress: UInt64, length: UInt32, dataMatch: UInt64?) throws
    /// Undoes ``watchNotifications(_:mmioAddress:length:dataMatch:)``.
    func unwatchNotifications(_ event: EventFD, mmioAddress: UInt64, length: UInt32, dataMatch: UInt64?)
    /// A new message-signalled interrupt line (virtio-pci's MSI-X vectors).
    func makeMSILine() throws -> any MSILine
    /// A level-triggered line on `gsi` (virtio-pci's INTx fallback): ``LevelLine/trigger()``
    /// asserts it; the machine lowers it when the guest acknowledges the interrupt and
    /// asserts it again while `isAsserted` still says so (an irqfd with a resamplefd).
    func makeLevelLine(gsi: UInt32, isAsserted: @escaping @Sendable () -> Bool) throws -> any LevelLine
}

/// A level-triggered interrupt line, raised with one eventfd write.
public protocol LevelLine: AnyObject, Sendable {
    func trigger()
}

/// One message-signalled interrupt: writing its event raises the message the guest
/// programmed (one eventfd write, through an irqfd on a GSI routed to the message).
public protocol MSILine: AnyObject, Sendable {
    /// Points the line at `address`/`data`, or turns it off (`nil`: masked or unset).
    func setMessage(address: UInt64, data: UInt32) throws
    func clearMessage()
    /// Raises the interrupt (one eventfd write).
    func trigger()
}

/// The registers every virtio transport has in some form (virtio 1.2, 4.1.4.3 and
/// 4.2.2): device status, feature negotiation, queue selection and each queue's size,
/// addresses and readiness, and the configuration generation. Both transports keep
/// their register state here and map their own register layouts onto it, so the rules
/// of 2.1-2.7 (status transitions, FEATURES_OK checks, reset, DEVICE_NEEDS_RESET) are
/// written once.
///
/// Called from vCPU threads (register accesses) and device threads (``markNeedsReset(_:)``);
/// the state is behind a lock. Device callbacks (`activate`, `reset`) run outside it.
public final class VirtioTransportCore: Sendable {
    public struct QueueRegisters: Sendable, Equatable {
        public var size: UInt16
        public var ready = false
        public var descriptorTable: UInt64 = 0
        public var driverArea: UInt64 = 0
        public var deviceArea: UInt64 = 0
        /// virtio-pci only: the MSI-X vector of this queue (0xFFFF: none).
        public var msixVector: UInt16 = VirtioTransportCore.noVector
    }

    struct State {
        var status: UInt8 = 0
        var deviceFeatureSelect: UInt32 = 0
        var driverFeatureSelect: UInt32 = 0
        var driverFeatures: UInt64 = 0
        var queueSelect: UInt16 = 0
        var queues: [QueueRegisters]
        var configurationGeneration: UInt32 = 0
        var configurationMSIXVector: UInt16 = VirtioTransportCore.noVector
        var active = false
        var needsResetReason: String?
        /// The queues made at DRIVER_OK (nil for a queue the driver did not enable), kept
        /// so a snapshot can record where the device is in each.
        var virtqueues: [Virtqueue?] = []
    }

    public static let noVector: UInt16 = 0xFFFF

    public let device: any VirtioDevice
    public let memory: GuestMemory
    /// One per queue: what the device waits on for that queue's notifications.
    public let notifications: [EventFD]
    /// The features offered: the device's plus VERSION_1.
    public let offeredFeatures: UInt64
    private let state: Mutex<State>
    /// Set by the transport after init (it owns the interrupt mechanism).
    private let interruptBox = Mutex<(any VirtioInterrupt)?>(nil)

    public init(device: any VirtioDevice, memory: GuestMemory) throws {
        self.device = device
        self.memory = memory
        offeredFeatures = device.offeredFeatures | VirtioFeature.version1
        notifications = try device.queueMaximumSizes.map { _ in try EventFD() }
        state = Mutex(State(queues: device.queueMaximumSizes.map { QueueRegisters(size: $0) }))
    }

    /// The transport's interrupt mechanism (set once, before the guest runs).
    public func setInterrupt(_ interrupt: any VirtioInterrupt) {
        interruptBox.withLock { $0 = interrupt }
    }

    public var queueCount: Int { notifications.count }

    // MARK: Status

    public var status: UInt8 { state.withLock { $0.status } }

    /// A write to the device status register. 0 resets the device; FEATURES_OK is kept
    /// only if the driver's features are acceptable (a subset of the offer, including
    /// VERSION_1); DRIVER_OK activates the device. A transition the specification does
    /// not allow (DRIVER_OK before FEATURES_OK, clearing bits other than by reset) makes
    /// the device need a reset.
    public func writeStatus(_ value: UInt8) {
        if value == 0 {
            reset()
            return
        }
        enum Action { case none, activate(UInt64, [QueueRegisters]), needsReset(String) }
        let action: Action = state.withLock { state in
            let old = state.status
            guard value & old == old else { return .needsReset("the driver cleared status bits without a reset (0x\(String(old, radix: 16)) -> 0x\(String(value, radix: 16)))") }
            var new = value
            if value & VirtioStatus.featuresOK != 0 && old & VirtioStatus.featuresOK == 0 {
                let acceptable = state.driverFeatures & ~offeredFeatures == 0 && state.driverFeatures & VirtioFeature.version1 != 0
                if !acceptable { new &= ~VirtioStatus.featuresOK }
            }
            state.status = new | (old & VirtioStatus.deviceNeedsReset)
            if new & VirtioStatus.driverOK != 0 && old & VirtioStatus.driverOK == 0 {
                guard new & VirtioStatus.featuresOK != 0 else { return .needsReset("DRIVER_OK was set before FEATURES_OK") }
                state.active = true
                return .activate(state.driverFeatures, state.queues)
            }
            return .none
        }
        switch action {
        case .none: break
        case let .needsReset(reason): markNeedsReset(reason)
        case let .activate(features, queues): activate(features: features, queues: queues)
        }
    }

    private func activate(features: UInt64, queues: [QueueRegisters]) {
        guard let interrupt = interruptBox.withLock({ $0 }) else { return markNeedsReset("the transport has no interrupt") }
        let eventIndex = features & VirtioFeature.ringEventIndex != 0
        var made: [Virtqueue?] = []
        for (index, registers) in queues.enumerated() {
            guard registers.ready else { made.append(nil); continue }
            let configuration = VirtqueueConfiguration(size: registers.size, descriptorTable: registers.descriptorTable,
                                                       driverArea: registers.driverArea, deviceArea: registers.deviceArea)
            do {
                made.append(try Virtqueue(memory: memory, configuration: configuration,
                                          maximumSize: device.queueMaximumSizes[index], eventIndex: eventIndex))
            } catch {
                return markNeedsReset("queue \(index): \(error)")
            }
        }
        state.withLock { $0.virtqueues = made }
        do {
            try device.activate(activation(features: features, queues: made, interrupt: interrupt))
        } catch {
            markNeedsReset("the device could not start: \(error)")
        }
    }

    private func activation(features: UInt64, queues: [Virtqueue?], interrupt: any VirtioInterrupt) -> VirtioActivation {
        VirtioActivation(memory: memory, features: features, queues: queues, notifications: notifications,
                         interrupt: interrupt, needsReset: { [weak self] reason in self?.markNeedsReset(reason) })
    }

    /// Sets DEVICE_NEEDS_RESET and tells the driver through a configuration-change
    /// interrupt (4.1.4.5, 4.2.3.4). The device is expected to stop using its queues.
    public func markNeedsReset(_ reason: String) {
        let first = state.withLock { state -> Bool in
            guard state.status & VirtioStatus.deviceNeedsReset == 0 else { return false }
            state.status |= VirtioStatus.deviceNeedsReset
            state.needsResetReason = reason
            state.configurationGeneration &+= 1
            return true
        }
        guard first else { return }
        interruptBox.withLock { $0 }?.signalConfigurationChange()
        reporter.withLock { $0 }?(reason)
    }

    /// Why the device last needed a reset (nil after a reset, or if it never did).
    public var needsResetReason: String? { state.withLock { $0.needsResetReason } }

    private let reporter = Mutex<(@Sendable (String) -> Void)?>(nil)

    /// Called (once per occurrence) with the reason when the device starts needing a
    /// reset: the machine reports it, since it means the guest's driver misbehaved.
    public func onNeedsReset(_ report: @escaping @Sendable (String) -> Void) {
        reporter.withLock { $0 = report }
    }

    /// The machine goes away: the device stops serving its queues (as at a reset), and the
    /// transport forgets its interrupt, which refers back to the transport. Without it the
    /// transport, this core and the device keep each other (and the device's disk or TAP,
    /// with its lock) alive after the machine is gone. The transport must not be used after.
    public func detach() {
        reset()
        interruptBox.withLock { $0 = nil }
        reporter.withLock { $0 = nil }
    }

    /// Status 0: the device forgets everything the driver set, after its queues stopped.
    public func reset() {
        device.reset()
        state.withLock { state in
            let generation = state.configurationGeneration
            state = State(queues: device.queueMaximumSizes.map { QueueRegisters(size: $0) })
            state.configurationGeneration = generation &+ 1
        }
        for event in notifications { event.drain() }
    }

    // MARK: Features

    public func selectDeviceFeatures(_ page: UInt32) { state.withLock { $0.deviceFeatureSelect = page } }

    /// The selected 32-bit page of the offered features (pages past 1 read 0).
    public var deviceFeaturesPage: UInt32 {
        let page = state.withLock { $0.deviceFeatureSelect }
        return page < 2 ? UInt32(truncatingIfNeeded: offeredFeatures >> (32 * UInt64(page))) : 0
    }

    public func selectDriverFeatures(_ page: UInt32) { state.withLock { $0.driverFeatureSelect = page } }

    /// Writes the selected page of the driver's features (ignored once FEATURES_OK is set).
    public func writeDriverFeaturesPage(_ value: UInt32) {
        state.withLock { state in
            guard state.status & VirtioStatus.featuresOK == 0, state.driverFeatureSelect < 2 else { return }
            let shift = 32 * UInt64(state.driverFeatureSelect)
            state.driverFeatures = (state.driverFeatures & ~(0xFFFF_FFFF << shift)) | (UInt64(value) << shift)
        }
    }

    public var driverFeaturesPage: UInt32 {
        state.withLock { state in
            state.driverFeatureSelect < 2 ? UInt32(truncatingIfNeeded: state.driverFeatures >> (32 * UInt64(state.driverFeatureSelect))) : 0
        }
    }

    // MARK: Queues

    public func selectQueue(_ index: UInt16) { state.withLock { $0.queueSelect = index } }
    public var selectedQueue: UInt16 { state.withLock { $0.queueSelect } }

    /// The selected queue's registers, or nil when the selection is past the last queue
    /// (reads then return 0 and writes are ignored, as the specification asks).
    public var selectedQueueRegisters: QueueRegisters? {
        state.withLock { state in
            Int(state.queueSelect) < state.queues.count ? state.queues[Int(state.queueSelect)] : nil
        }
    }

    /// The largest size the device allows for the selected queue (0 past the last queue).
    public var selectedQueueMaximumSize: UInt16 {
        state.withLock { state in
            Int(state.queueSelect) < state.queues.count ? device.queueMaximumSizes[Int(state.queueSelect)] : 0
        }
    }

    /// Changes the selected queue's registers. Ignored while the queue is ready or the
    /// device is running (the driver must not change a live queue), and for a selection
    /// past the last queue.
    public func updateSelectedQueue(_ change: (inout QueueRegisters) -> Void) {
        state.withLock { state in
            let index = Int(state.queueSelect)
            guard index < state.queues.count, !state.active else { return }
            var registers = state.queues[index]
            guard !registers.ready else { return }
            change(&registers)
            state.queues[index] = registers
        }
    }

    /// Sets the selected queue's readiness (before DRIVER_OK).
    public func setSelectedQueueReady(_ ready: Bool) {
        state.withLock { state in
            let index = Int(state.queueSelect)
            guard index < state.queues.count, !state.active else { return }
            state.queues[index].ready = ready
        }
    }

    /// Sets the selected queue's MSI-X vector (virtio-pci), allowed while the device runs.
    public func setSelectedQueueVector(_ vector: UInt16) {
        state.withLock { state in
            let index = Int(state.queueSelect)
            guard index < state.queues.count else { return }
            state.queues[index].msixVector = vector
        }
    }

    public func queueVector(_ index: Int) -> UInt16 {
        state.withLock { index < $0.queues.count ? $0.queues[index].msixVector : Self.noVector }
    }

    public var configurationVector: UInt16 {
        get { state.withLock { $0.configurationMSIXVector } }
        set { state.withLock { $0.configurationMSIXVector = newValue } }
    }

    /// The driver notified queue `index` through a register write that reached user
    /// space (no ioeventfd, or its data did not match): pass it on to the device.
    public func notify(queue index: Int) {
        guard index >= 0, index < notifications.count else { return }
        notifications[index].signal()
    }

    public var configurationGeneration: UInt32 { state.withLock { $0.configurationGeneration } }

    /// Device-specific configuration space: passed to the device.
    public func readConfiguration(offset: UInt64, into data: UnsafeMutableRawBufferPointer) {
        device.readConfiguration(offset: offset, into: data)
    }

    public func writeConfiguration(offset: UInt64, from data: UnsafeRawBufferPointer) {
        device.writeConfiguration(offset: offset, from: data)
    }
}

// MARK: Snapshot

extension VirtioTransportCore: SnapshotDevice {
    /// One queue's registers and, while the device is active, where the device is in its
    /// rings.
    public struct SavedQueue: Codable, Sendable, Equatable {
        public var size: UInt16
        public var ready: Bool
        public var descriptorTable: UInt64
        public var driverArea: UInt64
        public var deviceArea: UInt64
        /// virtio-pci: the queue's MSI-X vector.
        public var msixVector: UInt16
        /// The device's indices in an active queue; nil before DRIVER_OK, for a queue the
        /// driver did not enable, and for a device that needs a reset.
        public var indices: VirtqueueIndices?
    }

    /// The common registers (status, feature selects and the driver's features, queue
    /// select, each queue), the configuration generation and MSI-X vector, why the
    /// device needs a reset (if it does), and the device's own state.
    public struct SavedState: Codable, Sendable, Equatable {
        public var deviceType: VirtioDeviceType
        public var status: UInt8
        public var deviceFeatureSelect: UInt32
        public var driverFeatureSelect: UInt32
        public var driverFeatures: UInt64
        public var queueSelect: UInt16
        public var queues: [SavedQueue]
        public var configurationGeneration: UInt32
        public var configurationVector: UInt16
        /// The driver set DRIVER_OK and the device was activated.
        public var active: Bool
        public var needsResetReason: String?
        public var device: VirtioDeviceState
    }

    static let knownStatusBits = VirtioStatus.acknowledge | VirtioStatus.driver | VirtioStatus.driverOK
        | VirtioStatus.featuresOK | VirtioStatus.deviceNeedsReset | VirtioStatus.failed

    /// The state now. Called while the device is paused, so no queue moves meanwhile.
    public func saveState() -> SavedState {
        let saved = state.withLock { state in
            SavedState(deviceType: device.deviceType, status: state.status, deviceFeatureSelect: state.deviceFeatureSelect,
                       driverFeatureSelect: state.driverFeatureSelect, driverFeatures: state.driverFeatures,
                       queueSelect: state.queueSelect,
                       queues: state.queues.enumerated().map { index, queue in
                           let made = index < state.virtqueues.count ? state.virtqueues[index] : nil
                           let needsReset = state.status & VirtioStatus.deviceNeedsReset != 0
                           return SavedQueue(size: queue.size, ready: queue.ready, descriptorTable: queue.descriptorTable,
                                             driverArea: queue.driverArea, deviceArea: queue.deviceArea, msixVector: queue.msixVector,
                                             indices: state.active && !needsReset ? made?.savedIndices : nil)
                       },
                       configurationGeneration: state.configurationGeneration,
                       configurationVector: state.configurationMSIXVector, active: state.active,
                       needsResetReason: state.needsResetReason, device: .stateless)
        }
        var withDevice = saved
        withDevice.device = device.saveDeviceState()
        return withDevice
    }

    /// Puts `saved` back into this transport, freshly built for the same device, and, when
    /// the driver had the device running, activates the device again with each queue at
    /// its saved indices (checked against the rings in guest memory, which must be
    /// restored first). The device comes back paused, as it was saved: it takes nothing
    /// from its queues until ``VirtioDevice/resume()``.
    ///
    /// Refused (nothing changed): another kind of device, another number of queues,
    /// status bits virtio does not define, FEATURES_OK with features the device did not
    /// offer or without VERSION_1, a status no sequence of driver writes makes, an active
    /// queue without indices or with indices that disagree with its ring, and a device
    /// state the device refuses.
    public func restoreState(_ saved: SavedState) throws(DeviceStateError) {
        let name = "virtio transport"
        func refuse(_ reason: String) -> DeviceStateError { DeviceStateError(device: name, reason) }
        guard saved.deviceType == device.deviceType else {
            throw refuse("saved for a \(saved.deviceType) device, this is a \(device.deviceType) device")
        }
        guard saved.queues.count == queueCount else { throw refuse("\(saved.queues.count) queues saved, the device has \(queueCount)") }
        let status = saved.status
        guard status & ~Self.knownStatusBits == 0 else { throw refuse("status 0x\(String(status, radix: 16)) has bits virtio does not define") }
        let needsReset = status & VirtioStatus.deviceNeedsReset != 0
        guard needsReset == (saved.needsResetReason != nil) else {
            throw refuse("DEVICE_NEEDS_RESET is \(needsReset ? "set" : "clear") but a reason is \(needsReset ? "missing" : "given")")
        }
        if status & VirtioStatus.featuresOK != 0 {
            let unoffered = saved.driverFeatures & ~offeredFeatures
            guard unoffered == 0 else { throw refuse("FEATURES_OK with features 0x\(String(unoffered, radix: 16)) the device does not offer") }
            guard saved.driverFeatures & VirtioFeature.version1 != 0 else { throw refuse("FEATURES_OK without VERSION_1") }
        }
        let driverOK = status & VirtioStatus.driverOK != 0
        if saved.active {
            guard driverOK, status & VirtioStatus.featuresOK != 0 else { throw refuse("active without DRIVER_OK and FEATURES_OK") }
        } else {
            guard !driverOK || needsReset else { throw refuse("DRIVER_OK set on a device that was never activated, without DEVICE_NEEDS_RESET") }
        }
        // An active device that does not need a reset gets its queues back, at their indices.
        let running = saved.active && !needsReset
        var made: [Virtqueue?] = []
        for (index, queue) in saved.queues.enumerated() {
            guard running, queue.ready else {
                guard queue.indices == nil else { throw refuse("queue \(index) has indices but the device was not using it") }
                made.append(nil)
                continue
            }
            guard let indices = queue.indices else { throw refuse("queue \(index) is in use but its indices are missing") }
            let configuration = VirtqueueConfiguration(size: queue.size, descriptorTable: queue.descriptorTable,
                                                       driverArea: queue.driverArea, deviceArea: queue.deviceArea)
            do {
                made.append(try Virtqueue(memory: memory, configuration: configuration, maximumSize: device.queueMaximumSizes[index],
                                          eventIndex: saved.driverFeatures & VirtioFeature.ringEventIndex != 0, resumingAt: indices))
            } catch {
                throw refuse("queue \(index): \(error)")
            }
        }
        do {
            try device.restoreDeviceState(saved.device)
        } catch {
            throw DeviceStateError(device: "device", error.message)
        }
        // A fresh transport is at status 0; any other is reset first, as a driver would.
        if state.withLock({ $0.status != 0 || $0.active }) { reset() }
        device.pause()
        state.withLock { state in
            state.status = status
            state.deviceFeatureSelect = saved.deviceFeatureSelect
            state.driverFeatureSelect = saved.driverFeatureSelect
            state.driverFeatures = saved.driverFeatures
            state.queueSelect = saved.queueSelect
            state.queues = saved.queues.map { queue in
                QueueRegisters(size: queue.size, ready: queue.ready, descriptorTable: queue.descriptorTable,
                               driverArea: queue.driverArea, deviceArea: queue.deviceArea, msixVector: queue.msixVector)
            }
            state.configurationGeneration = saved.configurationGeneration
            state.configurationMSIXVector = saved.configurationVector
            state.active = saved.active
            state.needsResetReason = saved.needsResetReason
            state.virtqueues = made
        }
        guard running else { return }
        guard let interrupt = interruptBox.withLock({ $0 }) else { throw refuse("the transport has no interrupt") }
        do {
            try device.activate(activation(features: saved.driverFeatures, queues: made, interrupt: interrupt))
        } catch {
            throw refuse("the device could not start again: \(error)")
        }
    }
}
