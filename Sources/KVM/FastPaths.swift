import CKVM
import Glibc

/// Where an ioeventfd listens: a port or an MMIO address, and optionally only for one
/// value written.
public struct IOEventTrigger: Sendable, Equatable {
    public enum Space: Sendable, Equatable { case port, mmio }
    public var space: Space
    public var address: UInt64
    /// Access width in bytes (1, 2, 4 or 8); 0 matches any width (MMIO only).
    public var length: UInt32
    /// Only writes of exactly this value signal the eventfd.
    public var dataMatch: UInt64?

    public init(space: Space, address: UInt64, length: UInt32, dataMatch: UInt64? = nil) {
        self.space = space
        self.address = address
        self.length = length
        self.dataMatch = dataMatch
    }
}

/// Where a GSI goes (one entry of the routing table `KVM_SET_GSI_ROUTING` installs).
public enum GSIRoute: Sendable, Equatable {
    /// A pin of an in-kernel interrupt controller.
    case irqchip(gsi: UInt32, chip: UInt32, pin: UInt32)
    /// A message-signalled interrupt: the write a device would make to the APIC.
    case msi(gsi: UInt32, address: UInt64, data: UInt32)

    var gsi: UInt32 {
        switch self {
        case let .irqchip(gsi, _, _), let .msi(gsi, _, _): return gsi
        }
    }

    /// The routing KVM sets up by itself with `KVM_CREATE_IRQCHIP`: GSI 0-15 to both
    /// 8259 PICs (pin GSI % 8 of the master or slave) and the IOAPIC pin of the same
    /// number, GSI 16-23 to the IOAPIC only. Installing a table replaces all of it, so a
    /// table that adds MSI routes starts from these.
    public static let defaultIRQChip: [GSIRoute] = (UInt32(0)..<24).flatMap { gsi -> [GSIRoute] in
        let ioapic = GSIRoute.irqchip(gsi: gsi, chip: CKVM_IRQCHIP_IOAPIC, pin: gsi)
        guard gsi < 16 else { return [ioapic] }
        let pic = GSIRoute.irqchip(gsi: gsi, chip: gsi < 8 ? CKVM_IRQCHIP_PIC_MASTER : CKVM_IRQCHIP_PIC_SLAVE, pin: gsi % 8)
        return [pic, ioapic]
    }
}

/// The fast paths between devices and KVM, which spare a device the round trip through a
/// vCPU thread in user space: a guest's write to a notify register signals an eventfd in
/// the kernel, and a device raises an interrupt by writing an eventfd.
extension VirtualMachine {
    /// Makes guest writes matching `trigger` signal `eventFD` inside KVM: the vCPU goes on
    /// at once, with no exit to user space, and whoever waits on the eventfd wakes up.
    /// The corresponding ioctl is `KVM_IOEVENTFD`.
    public func assignIOEventFD(_ eventFD: Int32, _ trigger: IOEventTrigger) throws(KVMError) {
        var request = ioeventfdRequest(eventFD, trigger)
        try fd.ioctl("KVM_IOEVENTFD", CKVM_IOEVENTFD, &request)
    }

    /// Removes what ``assignIOEventFD(_:_:)`` set up (same `trigger`).
    public func deassignIOEventFD(_ eventFD: Int32, _ trigger: IOEventTrigger) throws(KVMError) {
        var request = ioeventfdRequest(eventFD, trigger)
        request.flags |= CKVM_IOEVENTFD_FLAG_DEASSIGN
        try fd.ioctl("KVM_IOEVENTFD (deassign)", CKVM_IOEVENTFD, &request)
    }

    private func ioeventfdRequest(_ eventFD: Int32, _ trigger: IOEventTrigger) -> kvm_ioeventfd {
        var request = kvm_ioeventfd()
        request.fd = eventFD
        request.addr = trigger.address
        request.len = trigger.length
        if trigger.space == .port { request.flags |= CKVM_IOEVENTFD_FLAG_PIO }
        if let value = trigger.dataMatch {
            request.flags |= CKVM_IOEVENTFD_FLAG_DATAMATCH
            request.datamatch = value
        }
        return request
    }

    /// Makes a write to `eventFD` raise `gsi`: for an irqchip pin an edge (or, with
    /// `resampleFD`, a level that KVM lowers at the guest's end-of-interrupt, then signals
    /// `resampleFD` so the device can raise it again if still pending); for an MSI route,
    /// the message. The corresponding ioctl is `KVM_IRQFD`.
    public func assignIRQFD(_ eventFD: Int32, gsi: UInt32, resampleFD: Int32? = nil) throws(KVMError) {
        var request = kvm_irqfd()
        request.fd = UInt32(bitPattern: eventFD)
        request.gsi = gsi
        if let resampleFD {
            request.flags = CKVM_IRQFD_FLAG_RESAMPLE
            request.resamplefd = UInt32(bitPattern: resampleFD)
        }
        try fd.ioctl("KVM_IRQFD", CKVM_IRQFD, &request)
    }

    /// Removes an irqfd. The corresponding ioctl is `KVM_IRQFD` with the deassign flag.
    public func deassignIRQFD(_ eventFD: Int32, gsi: UInt32) throws(KVMError) {
        var request = kvm_irqfd()
        request.fd = UInt32(bitPattern: eventFD)
        request.gsi = gsi
        request.flags = CKVM_IRQFD_FLAG_DEASSIGN
        try fd.ioctl("KVM_IRQFD (deassign)", CKVM_IRQFD, &request)
    }

    /// Installs the whole GSI routing table (it replaces the previous one, default routes
    /// included: start from ``GSIRoute/defaultIRQChip``). The corresponding ioctl is
    /// `KVM_SET_GSI_ROUTING`.
    public func setGSIRouting(_ routes: [GSIRoute]) throws(KVMError) {
        try withZeroedBuffer(size: ckvm_irq_routing_size(UInt32(routes.count))) { (buffer) throws(KVMError) in
            let routing = buffer.assumingMemoryBound(to: kvm_irq_routing.self)
            routing.pointee.nr = UInt32(routes.count)
            for (index, route) in routes.enumerated() {
                switch route {
                case let .irqchip(gsi, chip, pin):
                    ckvm_irq_routing_set_irqchip(routing, UInt32(index), gsi, chip, pin)
                case let .msi(gsi, address, data):
                    ckvm_irq_routing_set_msi(routing, UInt32(index), gsi, address, data)
                }
            }
            try fd.ioctl("KVM_SET_GSI_ROUTING", CKVM_SET_GSI_ROUTING, buffer: buffer)
        }
    }

    /// Delivers one message-signalled interrupt now. Returns `false` when the guest
    /// blocked it (no vCPU accepted it). The corresponding ioctl is `KVM_SIGNAL_MSI`.
    @discardableResult
    public func signalMSI(address: UInt64, data: UInt32) throws(KVMError) -> Bool {
        var message = kvm_msi()
        message.address_lo = UInt32(truncatingIfNeeded: address)
        message.address_hi = UInt32(truncatingIfNeeded: address >> 32)
        message.data = data
        return try fd.ioctl("KVM_SIGNAL_MSI", CKVM_SIGNAL_MSI, &message) > 0
    }
}
