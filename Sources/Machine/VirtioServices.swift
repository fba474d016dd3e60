import EventLoop
import KVM
import Layout
import Synchronization
import Virtio

/// What virtio transports need from KVM, done by the machine: notify registers watched by
/// ioeventfds (`KVM_IOEVENTFD`), MSI lines (an irqfd on a GSI from 24 up, routed to the
/// guest's message with `KVM_SET_GSI_ROUTING`) and level lines for INTx (an irqfd with a
/// resamplefd the event loop watches).
final class KVMVirtioServices: VirtioMachineServices {
    private let vm: VirtualMachine
    private let loop: EventLoop

    private struct Routing {
        var nextGSI = InterruptMap.firstMSI
        var messages: [UInt32: (address: UInt64, data: UInt32)] = [:]
    }

    private let routing = Mutex(Routing())
    /// The event loop registrations made for level lines (their closures refer to the
    /// transports), dropped by ``detach()``.
    private let registrations = Mutex<[EventLoop.Registration]>([])

    init(vm: VirtualMachine, loop: EventLoop) {
        self.vm = vm
        self.loop = loop
    }

    func watchNotifications(_ event: EventFD, mmioAddress: UInt64, length: UInt32, dataMatch: UInt64?) throws {
        try vm.assignIOEventFD(event.rawValue, IOEventTrigger(space: .mmio, address: mmioAddress, length: length, dataMatch: dataMatch))
    }

    func unwatchNotifications(_ event: EventFD, mmioAddress: UInt64, length: UInt32, dataMatch: UInt64?) {
        try? vm.deassignIOEventFD(event.rawValue, IOEventTrigger(space: .mmio, address: mmioAddress, length: length, dataMatch: dataMatch))
    }

    func makeMSILine() throws -> any MSILine {
        let gsi = routing.withLock { routing -> UInt32 in
            defer { routing.nextGSI += 1 }
            return routing.nextGSI
        }
        let event = try EventFD()
        try vm.assignIRQFD(event.rawValue, gsi: gsi)
        return KVMMSILine(gsi: gsi, event: event, services: self)
    }

    func makeLevelLine(gsi: UInt32, isAsserted: @escaping @Sendable () -> Bool) throws -> any LevelLine {
        let trigger = try EventFD()
        let resample = try EventFD()
        try vm.assignIRQFD(trigger.rawValue, gsi: gsi, resampleFD: resample.rawValue)
        // KVM lowers the line when the guest acknowledges the interrupt and says so on the
        // resamplefd; while the device still has something pending, raise it again.
        let registration = try loop.register(resample.rawValue, for: .readable, owner: resample) { _ in
            resample.drain()
            if isAsserted() { trigger.signal() }
        }
        registrations.withLock { $0.append(registration) }
        return KVMLevelLine(trigger: trigger)
    }

    /// The machine goes away: drops the loop's registrations, whose closures would keep
    /// the transports (and their devices) alive.
    func detach() {
        for registration in registrations.withLock({ $0 }) { loop.unregister(registration) }
        registrations.withLock { $0 = [] }
    }

    /// Installs the routing table: KVM's default irqchip routes plus one route per MSI
    /// line with a message.
    fileprivate func route(gsi: UInt32, message: (address: UInt64, data: UInt32)?) throws {
        let routes = routing.withLock { routing -> [GSIRoute] in
            routing.messages[gsi] = message
            return GSIRoute.defaultIRQChip + routing.messages.sorted { $0.key < $1.key }
                .map { GSIRoute.msi(gsi: $0.key, address: $0.value.address, data: $0.value.data) }
        }
        try vm.setGSIRouting(routes)
    }
}

/// An MSI line: an eventfd bound by an irqfd to a GSI whose route is the guest's message.
final class KVMMSILine: MSILine {
    let gsi: UInt32
    let event: EventFD
    private let services: KVMVirtioServices

    init(gsi: UInt32, event: EventFD, services: KVMVirtioServices) {
        self.gsi = gsi
        self.event = event
        self.services = services
    }

    func setMessage(address: UInt64, data: UInt32) throws {
        try services.route(gsi: gsi, message: (address, data))
    }

    func clearMessage() {
        try? services.route(gsi: gsi, message: nil)
    }

    func trigger() { event.signal() }
}

/// A level-triggered line raised through an irqfd with a resamplefd.
final class KVMLevelLine: LevelLine {
    let event: EventFD
    init(trigger: EventFD) { event = trigger }
    func trigger() { event.signal() }
}
