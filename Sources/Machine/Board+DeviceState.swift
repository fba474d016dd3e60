import Devices
import Virtio

/// A virtio device's transport as the board placed it.
enum AttachedVirtioTransport: Sendable {
    case mmio(VirtioMMIOTransport)
    case pci(VirtioPCIFunction)

    var core: VirtioTransportCore {
        switch self {
        case let .mmio(transport): return transport.core
        case let .pci(function): return function.core
        }
    }

    var kind: VirtioTransportKind {
        switch self {
        case .mmio: return .mmio
        case .pci: return .pci
        }
    }
}

/// The PC platform's user-space devices that keep state.
struct PlatformStatefulDevices: Sendable {
    let serial: Serial16550
    let keyboardController: I8042
    let cmos: CMOS
    let firmwareConfiguration: FwCfg
    let powerManagement: ACPIPowerManagement
    let resetControl: ResetControl
    let systemControlPortA: SystemControlPortA
}

/// Every user-space device whose state a snapshot records, as the board built them (the
/// buses hold the same objects). The debug exit and ignored ports keep no state.
struct StatefulDevices: Sendable {
    let platform: PlatformStatefulDevices
    /// QEMU's pc-testdev, on boards for Multiboot kernels.
    let testDevice: TestDevice?
    /// With the PCI transport.
    let pciHostBridge: PCIHostBridge?
    /// In device order.
    let virtio: [AttachedVirtioTransport]
}

/// A virtio device's saved state, with the transport it was saved from.
enum VirtioTransportState: Codable, Sendable, Equatable {
    case mmio(state: VirtioMMIOTransport.SavedState)
    case pci(state: VirtioPCIFunction.SavedState)

    var kind: VirtioTransportKind {
        switch self {
        case .mmio: return .mmio
        case .pci: return .pci
        }
    }

    var deviceType: VirtioDeviceType {
        switch self {
        case let .mmio(state): return state.transport.deviceType
        case let .pci(state): return state.transport.deviceType
        }
    }
}

/// Every user-space device's state, in one Codable value. (The PICs, IOAPIC, PIT and
/// local APICs are in the kernel: the machine saves them with the vCPUs and the VM.)
struct BoardDeviceState: Codable, Sendable, Equatable {
    var serial: Serial16550.SavedState
    var keyboardController: I8042.SavedState
    var cmos: CMOS.SavedState
    var firmwareConfiguration: FwCfg.SavedState
    var powerManagement: ACPIPowerManagement.SavedState
    var resetControl: ResetControl.SavedState
    var systemControlPortA: SystemControlPortA.SavedState
    /// Present when the board has QEMU's pc-testdev (Multiboot kernels).
    var testDevice: TestDevice.SavedState?
    /// Present with the PCI transport.
    var pciHostBridge: PCIHostBridge.SavedState?
    /// One per virtio device, in device order (the disks first).
    var virtio: [VirtioTransportState]
}

extension VirtioDeviceType {
    /// How messages name the device kind.
    var deviceName: String {
        switch self {
        case .block: return "virtio-blk"
        case .network: return "virtio-net"
        }
    }
}

extension Board {
    /// The state of every user-space device. Called while the machine is paused (every
    /// vCPU parked, virtio devices quiesced), so the value is consistent: no register
    /// access or request is half-done.
    func saveDeviceState() -> BoardDeviceState {
        let platform = stateful.platform
        return BoardDeviceState(
            serial: platform.serial.saveState(), keyboardController: platform.keyboardController.saveState(),
            cmos: platform.cmos.saveState(), firmwareConfiguration: platform.firmwareConfiguration.saveState(),
            powerManagement: platform.powerManagement.saveState(), resetControl: platform.resetControl.saveState(),
            systemControlPortA: platform.systemControlPortA.saveState(), testDevice: stateful.testDevice?.saveState(),
            pciHostBridge: stateful.pciHostBridge?.saveState(),
            virtio: stateful.virtio.map { transport in
                switch transport {
                case let .mmio(transport): return .mmio(state: transport.saveState())
                case let .pci(function): return .pci(state: function.saveState())
                }
            })
    }

    /// Puts `state` back into this board, built with the same configuration as the one it
    /// was saved from, with guest RAM already restored (virtio queues are checked against
    /// their rings in it).
    ///
    /// Call it after the in-kernel irqchip, PIT and local APICs are restored and before any
    /// vCPU runs: it drives interrupt lines to their saved levels (serial, i8042, test
    /// device, virtio-pci INTx) and routes MSI-X vectors again (`KVM_SET_GSI_ROUTING`),
    /// which a later `KVM_SET_IRQCHIP` or `KVM_SET_LAPIC` would overwrite. Virtio devices
    /// the driver had running are activated again, paused while the others are restored,
    /// and resumed once every device took its state: a restored machine starts with
    /// ``Machine/run()``, not ``Machine/resume()``, so nothing else would. They then take
    /// the requests the driver made available before the snapshot (a paused device takes
    /// none) without waiting for a notification that came in the old process; guest RAM,
    /// the irqchip and the MSI-X routes are in place by then, so an answer and its
    /// interrupt reach the guest as soon as a vCPU runs.
    ///
    /// A state whose devices do not match the board (a disk more or less, another virtio
    /// transport, a test device or not, another kind of virtio device) is refused before
    /// anything changes; a device's own state is checked by the device. On an error the
    /// board must not run.
    func restoreDeviceState(_ state: BoardDeviceState) throws(MachineError) {
        func refuse(_ reason: String) -> MachineError { .invalidConfiguration("snapshot: \(reason)") }
        let devices = stateful
        guard state.virtio.count == devices.virtio.count else {
            throw refuse("it has \(state.virtio.count) virtio devices, this machine \(devices.virtio.count) "
                + "(restore with the configuration it was saved with: the same disks and network interfaces)")
        }
        for (index, (saved, attached)) in zip(state.virtio, devices.virtio).enumerated() {
            guard saved.kind == attached.kind else {
                throw refuse("virtio device \(index) was on the \(saved.kind.rawValue) transport, this machine uses \(attached.kind.rawValue)")
            }
            let type = attached.core.device.deviceType
            guard saved.deviceType == type else {
                throw refuse("virtio device \(index) was a \(saved.deviceType.deviceName) device, this machine has a \(type.deviceName) device there")
            }
        }
        guard (state.pciHostBridge != nil) == (devices.pciHostBridge != nil) else {
            throw refuse(state.pciHostBridge != nil ? "it has a PCI host bridge, this machine has none" : "it has no PCI host bridge, this machine has one")
        }
        guard (state.testDevice != nil) == (devices.testDevice != nil) else {
            throw refuse(state.testDevice != nil ? "it has the pc-testdev of a Multiboot kernel, this machine has none"
                         : "it has no pc-testdev, this machine has one (a Multiboot kernel)")
        }
        do throws(DeviceStateError) {
            let platform = devices.platform
            try platform.cmos.restoreState(state.cmos)
            try platform.firmwareConfiguration.restoreState(state.firmwareConfiguration)
            try platform.powerManagement.restoreState(state.powerManagement)
            try platform.resetControl.restoreState(state.resetControl)
            try platform.systemControlPortA.restoreState(state.systemControlPortA)
            try platform.keyboardController.restoreState(state.keyboardController)
            try platform.serial.restoreState(state.serial)
            if let saved = state.testDevice { try devices.testDevice?.restoreState(saved) }
            if let saved = state.pciHostBridge { try devices.pciHostBridge?.restoreState(saved) }
            for (index, (saved, attached)) in zip(state.virtio, devices.virtio).enumerated() {
                do throws(DeviceStateError) {
                    switch (saved, attached) {
                    case let (.mmio(saved), .mmio(transport)): try transport.restoreState(saved)
                    case let (.pci(saved), .pci(function)): try function.restoreState(saved)
                    default: break    // ruled out above
                    }
                } catch {
                    throw error.within("virtio device \(index) (\(attached.core.device.deviceType.deviceName))")
                }
            }
        } catch {
            throw refuse("\(error)")
        }
        for transport in devices.virtio { transport.core.device.resume() }
    }
}
