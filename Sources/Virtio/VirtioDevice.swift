import EventLoop
import Memory

/// Device status bits (virtio 1.2, 2.1): what the driver has done so far.
public enum VirtioStatus {
    public static let acknowledge: UInt8 = 1
    public static let driver: UInt8 = 2
    public static let driverOK: UInt8 = 4
    public static let featuresOK: UInt8 = 8
    /// Set by the device: something went wrong and the driver must reset it.
    public static let deviceNeedsReset: UInt8 = 0x40
    public static let failed: UInt8 = 0x80
}

/// Feature bits every transport and queue understand (virtio 1.2, 6). Device-specific
/// bits (0-23) are defined by each device.
public enum VirtioFeature {
    /// Descriptors may point at a table of descriptors (2.7.5.3).
    public static let ringIndirectDescriptors: UInt64 = 1 << 28
    /// `used_event` / `avail_event` notification suppression (2.7.7, 2.7.10).
    public static let ringEventIndex: UInt64 = 1 << 29
    /// The device follows virtio 1.x, not the legacy interface. Always offered; a driver
    /// that does not accept it is refused (FEATURES_OK is not kept).
    public static let version1: UInt64 = 1 << 32
    /// The driver accesses the device through an IOMMU or with restricted memory.
    public static let accessPlatform: UInt64 = 1 << 33
    /// Packed virtqueues (not offered: Swiftlet implements split virtqueues).
    public static let ringPacked: UInt64 = 1 << 34
}

/// Device IDs (virtio 1.2, 5).
public enum VirtioDeviceType: UInt32, Codable, Sendable {
    case network = 1
    case block = 2
}

/// A problem with what the driver set up or put in a queue. The device answers the
/// request with an error status where it can; where it cannot (a broken ring), it is
/// marked `DEVICE_NEEDS_RESET` and stops using the queue.
public struct VirtioError: Error, Equatable, CustomStringConvertible, Sendable {
    public let message: String
    public init(_ message: String) { self.message = message }
    public var description: String { message }
}

/// How a device model tells the driver something happened: the transport turns it into
/// an interrupt (virtio-mmio's interrupt status and its IRQ line, or virtio-pci's ISR
/// and MSI-X vectors), each in the end one `eventfd` write through `KVM_IRQFD`.
public protocol VirtioInterrupt: Sendable {
    /// Queue `index` has new used buffers.
    func signalQueue(_ index: Int)
    /// The device configuration changed (or the device needs a reset).
    func signalConfigurationChange()
}

/// What a device receives when the driver sets DRIVER_OK: everything it needs to serve
/// its queues.
public struct VirtioActivation: Sendable {
    public let memory: GuestMemory
    /// The features both sides agreed on.
    public let features: UInt64
    /// One per queue the device declared, configured by the driver; `nil` for a queue the
    /// driver did not enable.
    public let queues: [Virtqueue?]
    /// One per queue: signalled when the driver notifies that queue (by the kernel through
    /// `KVM_IOEVENTFD`, or by the transport when a notify write reaches it).
    public let notifications: [EventFD]
    public let interrupt: any VirtioInterrupt
    /// Marks the device `DEVICE_NEEDS_RESET` (and tells the driver): for a queue the driver
    /// broke beyond answering with an error status. The device stops using its queues.
    public let needsReset: @Sendable (String) -> Void

    public init(memory: GuestMemory, features: UInt64, queues: [Virtqueue?], notifications: [EventFD],
                interrupt: any VirtioInterrupt, needsReset: @escaping @Sendable (String) -> Void) {
        self.memory = memory
        self.features = features
        self.queues = queues
        self.notifications = notifications
        self.interrupt = interrupt
        self.needsReset = needsReset
    }
}

/// A virtio device model, independent of the transport that presents it (virtio-mmio or
/// virtio-pci). The transport owns the common registers (status, feature and queue
/// selection, queue addresses) and calls the device at the points the specification
/// names; the device owns its configuration space and serves its queues.
///
/// Calls come from vCPU threads (configuration space, activation, reset) while the
/// device serves queues on its own threads; a device keeps its state behind a lock.
public protocol VirtioDevice: AnyObject, Sendable {
    var deviceType: VirtioDeviceType { get }
    /// Features offered to the driver: device-specific bits and the common ones the
    /// device supports (``VirtioFeature``). The transport always adds `VERSION_1`.
    var offeredFeatures: UInt64 { get }
    /// How many queues the device has, and the largest size of each (a power of two).
    var queueMaximumSizes: [UInt16] { get }
    /// Reads the device configuration space (little-endian fields) at `offset`.
    func readConfiguration(offset: UInt64, into data: UnsafeMutableRawBufferPointer)
    /// Writes the device configuration space; most devices ignore writes.
    func writeConfiguration(offset: UInt64, from data: UnsafeRawBufferPointer)
    /// The driver set DRIVER_OK: start serving the queues. A thrown error marks the device
    /// `DEVICE_NEEDS_RESET`.
    func activate(_ activation: VirtioActivation) throws(VirtioError)
    /// The driver wrote 0 to the status register: stop serving the queues and forget
    /// them. Returns once no request is in flight any more, so the driver may reuse the
    /// memory at once.
    func reset()
    /// The machine pauses: stop taking work from the queues (and from the host side: a
    /// network device stops reading its TAP) and return once nothing is in flight, so
    /// the device's state and guest memory stay still until ``resume()``.
    func pause()
    /// The machine resumes: serve the queues again.
    func resume()
    /// What a snapshot records of the device itself, beyond its transport's registers and
    /// its queues' indices (which the transport saves). Called while paused.
    func saveDeviceState() -> VirtioDeviceState
    /// Puts back what ``saveDeviceState()`` recorded, on a device built with the same
    /// configuration, before the transport re-activates it. A state of another kind of
    /// device, or one this device could not have had, is refused.
    func restoreDeviceState(_ state: VirtioDeviceState) throws(VirtioError)
}

extension VirtioDevice {
    /// Devices that only work when the driver notifies them need nothing: with every vCPU
    /// parked, nothing notifies them.
    public func pause() {}
    public func resume() {}

    /// A device whose state is all in its transport and queues saves nothing of its own.
    public func saveDeviceState() -> VirtioDeviceState { .stateless }

    public func restoreDeviceState(_ state: VirtioDeviceState) throws(VirtioError) {
        guard state == .stateless else { throw VirtioError("a saved \(state.kind) state does not fit this device, which saves none") }
    }
}

/// A virtio device's own saved state, one case per kind of device that keeps one.
public enum VirtioDeviceState: Codable, Sendable, Equatable {
    /// Nothing beyond the transport and the queues.
    case stateless
    case block(state: VirtioBlock.SavedState)
    case network(state: VirtioNet.SavedState)

    /// What kind of state it is, for messages.
    public var kind: String {
        switch self {
        case .stateless: return "stateless"
        case .block: return "virtio-blk"
        case .network: return "virtio-net"
        }
    }
}
