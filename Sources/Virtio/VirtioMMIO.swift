import Devices
import EventLoop
import Memory
import Synchronization

/// The virtio-mmio transport, version 2 register layout (virtio 1.2, 4.2): a device's
/// registers in a 0x200-byte window of guest-physical memory, an interrupt line, and the
/// queue-notify register watched by an ioeventfd so a notification never reaches a vCPU
/// thread in user space.
///
/// Linux finds it from `virtio_mmio.device=0x200@0xfeb00000:5` on the kernel command line
/// or from a `LNRO0005` device in the ACPI DSDT; the machine announces it both ways.
///
/// Interrupts: InterruptStatus bit 0 (used buffer) and bit 1 (configuration change) are
/// set, then the line is raised with one write to an eventfd bound to the GSI by
/// `KVM_IRQFD`. The line is edge-triggered, as ISA IRQs announced on the command line
/// are configured by Linux; the driver reads InterruptStatus and acknowledges it.
public final class VirtioMMIOTransport: IODevice, VirtioInterrupt {
    public static let windowSize: UInt64 = 0x200
    static let magic: UInt32 = 0x7472_6976 // "virt"
    static let version: UInt32 = 2
    /// The vendor ID the transport reports ("QEMU", which Linux does not look at).
    static let vendor: UInt32 = 0x554D_4551

    // Register offsets (4.2.2).
    static let magicValue: UInt64 = 0x000, versionRegister: UInt64 = 0x004, deviceID: UInt64 = 0x008, vendorID: UInt64 = 0x00C
    static let deviceFeatures: UInt64 = 0x010, deviceFeaturesSel: UInt64 = 0x014
    static let driverFeatures: UInt64 = 0x020, driverFeaturesSel: UInt64 = 0x024
    static let queueSel: UInt64 = 0x030, queueNumMax: UInt64 = 0x034, queueNum: UInt64 = 0x038
    static let queueReady: UInt64 = 0x044, queueNotify: UInt64 = 0x050
    static let interruptStatus: UInt64 = 0x060, interruptACK: UInt64 = 0x064, status: UInt64 = 0x070
    static let queueDescLow: UInt64 = 0x080, queueDescHigh: UInt64 = 0x084
    static let queueDriverLow: UInt64 = 0x090, queueDriverHigh: UInt64 = 0x094
    static let queueDeviceLow: UInt64 = 0x0A0, queueDeviceHigh: UInt64 = 0x0A4
    static let shmSel: UInt64 = 0x0AC, shmLenLow: UInt64 = 0x0B0, shmLenHigh: UInt64 = 0x0B4
    static let shmBaseLow: UInt64 = 0x0B8, shmBaseHigh: UInt64 = 0x0BC
    static let configGeneration: UInt64 = 0x0FC
    static let configuration: UInt64 = 0x100

    public let core: VirtioTransportCore
    /// The guest-physical address of the window (for the notify ioeventfds).
    public let base: UInt64
    /// Written to raise the interrupt line (bound to the GSI with an irqfd by the machine).
    public let interruptEvent: EventFD
    private let interruptStatusBits = Mutex<UInt32>(0)
    private let services: any VirtioMachineServices
    /// Whether each queue's notifications are handled by an ioeventfd in the kernel.
    private let watched: [Bool]

    /// - Parameters:
    ///   - interruptEvent: an eventfd the machine bound to this device's GSI.
    ///   - services: KVM's ioeventfds for the notify register.
    public init(device: any VirtioDevice, memory: GuestMemory, base: UInt64, interruptEvent: EventFD,
                services: any VirtioMachineServices) throws {
        core = try VirtioTransportCore(device: device, memory: memory)
        self.base = base
        self.interruptEvent = interruptEvent
        self.services = services
        // One ioeventfd per queue, matching the queue index written to QueueNotify.
        var watched: [Bool] = []
        for (index, event) in core.notifications.enumerated() {
            do {
                try services.watchNotifications(event, mmioAddress: base + Self.queueNotify, length: 4, dataMatch: UInt64(index))
                watched.append(true)
            } catch {
                watched.append(false)
            }
        }
        self.watched = watched
        core.setInterrupt(self)
    }

    deinit {
        for (index, event) in core.notifications.enumerated() where watched[index] {
            services.unwatchNotifications(event, mmioAddress: base + Self.queueNotify, length: 4, dataMatch: UInt64(index))
        }
    }

    // MARK: VirtioInterrupt

    public func signalQueue(_ index: Int) {
        interruptStatusBits.withLock { $0 |= 1 }
        interruptEvent.signal()
    }

    public func signalConfigurationChange() {
        interruptStatusBits.withLock { $0 |= 2 }
        interruptEvent.signal()
    }

    /// InterruptStatus as the driver would read it.
    public var interruptStatus: UInt32 { interruptStatusBits.withLock { $0 } }

    // MARK: Registers

    public func read(offset: UInt64, into data: UnsafeMutableRawBufferPointer) {
        if offset >= Self.configuration {
            core.readConfiguration(offset: offset - Self.configuration, into: data)
            return
        }
        // Registers are 32 bits wide and read as a whole (4.2.2.2); anything else reads 0.
        guard data.count == 4, offset % 4 == 0 else {
            for index in data.indices { data[index] = 0 }
            return
        }
        let value: UInt32
        switch offset {
        case Self.magicValue: value = Self.magic
        case Self.versionRegister: value = Self.version
        case Self.deviceID: value = core.device.deviceType.rawValue
        case Self.vendorID: value = Self.vendor
        case Self.deviceFeatures: value = core.deviceFeaturesPage
        case Self.queueNumMax: value = UInt32(core.selectedQueueMaximumSize)
        case Self.queueReady: value = core.selectedQueueRegisters?.ready == true ? 1 : 0
        case Self.interruptStatus: value = interruptStatus
        case Self.status: value = UInt32(core.status)
        case Self.shmLenLow, Self.shmLenHigh: value = 0xFFFF_FFFF // no shared memory region
        case Self.configGeneration: value = core.configurationGeneration
        default: value = 0
        }
        data.storeBytes(of: value.littleEndian, as: UInt32.self)
    }

    public func write(offset: UInt64, from data: UnsafeRawBufferPointer) {
        if offset >= Self.configuration {
            core.writeConfiguration(offset: offset - Self.configuration, from: data)
            return
        }
        guard data.count == 4, offset % 4 == 0 else { return }
        let value = UInt32(littleEndian: data.loadUnaligned(as: UInt32.self))
        switch offset {
        case Self.deviceFeaturesSel: core.selectDeviceFeatures(value)
        case Self.driverFeatures: core.writeDriverFeaturesPage(value)
        case Self.driverFeaturesSel: core.selectDriverFeatures(value)
        case Self.queueSel: core.selectQueue(UInt16(truncatingIfNeeded: value))
        case Self.queueNum: core.updateSelectedQueue { $0.size = UInt16(truncatingIfNeeded: value) }
        case Self.queueReady: core.setSelectedQueueReady(value & 1 == 1)
        case Self.queueNotify:
            // Only reached when no ioeventfd took the write (or its index matched none).
            let index = Int(value & 0xFFFF)
            if index < watched.count, !watched[index] { core.notify(queue: index) }
        case Self.interruptACK: interruptStatusBits.withLock { $0 &= ~value }
        case Self.status: core.writeStatus(UInt8(truncatingIfNeeded: value))
        case Self.queueDescLow: core.updateSelectedQueue { $0.descriptorTable = ($0.descriptorTable & ~0xFFFF_FFFF) | UInt64(value) }
        case Self.queueDescHigh: core.updateSelectedQueue { $0.descriptorTable = ($0.descriptorTable & 0xFFFF_FFFF) | UInt64(value) << 32 }
        case Self.queueDriverLow: core.updateSelectedQueue { $0.driverArea = ($0.driverArea & ~0xFFFF_FFFF) | UInt64(value) }
        case Self.queueDriverHigh: core.updateSelectedQueue { $0.driverArea = ($0.driverArea & 0xFFFF_FFFF) | UInt64(value) << 32 }
        case Self.queueDeviceLow: core.updateSelectedQueue { $0.deviceArea = ($0.deviceArea & ~0xFFFF_FFFF) | UInt64(value) }
        case Self.queueDeviceHigh: core.updateSelectedQueue { $0.deviceArea = ($0.deviceArea & 0xFFFF_FFFF) | UInt64(value) << 32 }
        default: break
        }
        if offset == Self.status && value == 0 { interruptStatusBits.withLock { $0 = 0 } }
    }

    /// The kernel command-line fragment that tells Linux where this device is:
    /// `virtio_mmio.device=<size>@<base>:<irq>`.
    public static func commandLine(base: UInt64, irq: UInt32) -> String {
        "virtio_mmio.device=0x\(String(windowSize, radix: 16))@0x\(String(base, radix: 16)):\(irq)"
    }
}

// MARK: Snapshot

extension VirtioMMIOTransport: SnapshotDevice {
    /// The common registers (with the device's state and its queues' indices) and
    /// InterruptStatus.
    ///
    /// The interrupt line has no level to save: each interrupt is one edge through the
    /// irqfd, and an edge the guest has not handled yet is in the irqchip's state, which
    /// the machine saves. InterruptStatus tells the driver what the edge was for.
    public struct SavedState: Codable, Sendable, Equatable {
        public var transport: VirtioTransportCore.SavedState
        public var interruptStatus: UInt32
    }

    public func saveState() -> SavedState {
        SavedState(transport: core.saveState(), interruptStatus: interruptStatus)
    }

    /// Checks and puts back `saved` (InterruptStatus may hold only the used-buffer and
    /// configuration-change bits); the device comes back paused, see
    /// ``VirtioTransportCore/restoreState(_:)``.
    public func restoreState(_ saved: SavedState) throws(DeviceStateError) {
        guard saved.interruptStatus & ~3 == 0 else {
            throw DeviceStateError(device: "virtio-mmio transport",
                                   "InterruptStatus 0x\(String(saved.interruptStatus, radix: 16)) has bits other than used buffer and configuration change")
        }
        do {
            try core.restoreState(saved.transport)
        } catch {
            throw DeviceStateError(device: "virtio-mmio \(error.device)", error.reason)
        }
        interruptStatusBits.withLock { $0 = saved.interruptStatus }
    }
}
