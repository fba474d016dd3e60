import Boot
import Devices
import DiskImage
import EventLoop
import KVM
import Layout
import Memory
import Sandbox
import Virtio

/// A virtio device model to put on the board, and how it presents itself.
struct VirtioAttachment {
    let device: any VirtioDevice
    /// For messages and `--trace-exits`: "virtio-blk (disk 0)".
    let name: String
    /// Its PCI class code with the PCI transport.
    let pciClass: UInt32
}

/// A guest network interface: the TAP and the virtio-net device over it.
public struct NetworkInterface: Sendable {
    /// `net0`, `net1`, ... in the order of the configuration.
    public let name: String
    public let tap: TapDevice
    public let device: VirtioNet

    /// The guest's MAC address.
    public var mac: MACAddress { device.options.mac }

    var attachment: VirtioAttachment {
        VirtioAttachment(device: device, name: "virtio-net (\(name), TAP \(tap.name))", pciClass: 0x02_00_00)
    }
}

/// Where virtio devices live, chosen with `--virtio-transport`.
public enum VirtioTransportKind: String, Sendable, CaseIterable {
    /// virtio-mmio slots in the MMIO hole, announced on the kernel command line and in the
    /// ACPI DSDT.
    case mmio
    /// Functions on a PCI host bridge (configuration ports 0xCF8-0xCFF and ECAM).
    case pci
}

extension Board {
    /// Opens each disk image (an image opened for writing is locked against other
    /// writers, as QEMU locks it) and makes its virtio-blk device.
    static func openDisks(_ disks: [DiskConfiguration], transport: VirtioTransportKind,
                          sandbox: Sandbox) throws(MachineError) -> [VirtioAttachment] {
        guard disks.count <= virtioCapacity(transport) else {
            throw .invalidConfiguration("\(disks.count) disks are more than the \(virtioCapacity(transport)) slots of the \(transport.rawValue) transport")
        }
        var attachments: [VirtioAttachment] = []
        if !disks.isEmpty { SandboxedThreads.prepareProcess(sandbox) }
        for (index, disk) in disks.enumerated() {
            let image: any BlockDevice
            do {
                image = try DiskImage.open(path: disk.path, format: disk.format, readOnly: disk.readOnly)
            } catch {
                throw .cannotOpen(path: disk.path, purpose: "disk", reason: "\(error)")
            }
            var options = VirtioBlockOptions(readOnly: disk.readOnly, serial: disk.serial, diskIndex: index, queueCount: disk.queues,
                                             rateLimiter: disk.rateLimiter)
            options.readOnly = disk.readOnly || image.isReadOnly
            do {
                let names = VirtioBlock.threadNames(options: options)
                let threads = try SandboxedThreads.starter(sandbox, [(names.dispatchers, .blockDispatcher), (names.workers, .blockWorker)])
                let device = try VirtioBlock(disk: image, options: options, threads: threads)
                attachments.append(VirtioAttachment(device: device, name: "virtio-blk (disk \(index), \(disk.path))",
                                                    pciClass: 0x01_80_00))
            } catch {
                throw .invalidConfiguration("disk '\(disk.path)': \(error)")
            }
        }
        return attachments
    }

    /// Opens (or creates) each TAP and makes its virtio-net device; a MAC is generated for
    /// an interface that names none.
    static func openNetworks(_ networks: [NetworkConfiguration], sandbox: Sandbox) throws(MachineError) -> [NetworkInterface] {
        var interfaces: [NetworkInterface] = []
        for (index, network) in networks.enumerated() {
            let name = "net\(index)"
            let tap: TapDevice
            do {
                tap = try TapDevice(name: network.tap)
            } catch {
                throw .invalidConfiguration("\(name): \(error)")
            }
            let mac = network.mac ?? MACAddress.randomLocallyAdministered()
            do {
                let options = VirtioNetOptions(mac: mac, index: index, receiveRateLimiter: network.rxRateLimiter,
                                               transmitRateLimiter: network.txRateLimiter)
                let threads = try SandboxedThreads.starter(sandbox, [([VirtioNet.threadName(options: options)], .netLoop)])
                let device = try VirtioNet(backend: tap, options: options, threads: threads)
                interfaces.append(NetworkInterface(name: name, tap: tap, device: device))
            } catch {
                throw .invalidConfiguration("\(name): \(error)")
            }
        }
        return interfaces
    }

    /// What the firmware tables announce: the virtio-mmio devices in the DSDT, or the PCI
    /// host bridge (MCFG, `PCI0` with its windows and the INTx routing of each slot).
    static func platformDevices(deviceCount: Int, transport: VirtioTransportKind) -> PlatformDevices {
        switch transport {
        case .mmio:
            return PlatformDevices(virtioMMIO: (0..<deviceCount).compactMap { VirtioMMIODevice.slot($0) })
        case .pci:
            return PlatformDevices(pci: .swiftlet(deviceSlots: (0..<deviceCount).map { UInt8(pciPlacement($0).slot) }))
        }
    }

    /// The kernel command-line words that announce virtio-mmio devices to Linux (and to
    /// guests that read them, like guests/virtio-blk): `virtio_mmio.device=<size>@<base>:<irq>`.
    static func virtioCommandLine(deviceCount: Int, transport: VirtioTransportKind) -> [String] {
        guard transport == .mmio else { return [] }
        return (0..<deviceCount).map { index in
            let (base, gsi) = mmioPlacement(index)
            return VirtioMMIOTransport.commandLine(base: base, irq: gsi)
        }
    }

    /// The virtio-mmio slot and GSI of device `index`.
    static func mmioPlacement(_ index: Int) -> (base: UInt64, gsi: UInt32) {
        (AddressMap.virtioMMIOSlot(index), InterruptMap.virtioMMIO[index])
    }

    /// The PCI slot of device `index` (slot 0 is the host bridge), its BAR's base, and the
    /// GSI its INTA is wired to.
    static func pciPlacement(_ index: Int) -> (slot: Int, barBase: UInt64, gsi: UInt32) {
        let slot = index + 1
        return (slot, AddressMap.pciMemoryWindowStart + UInt64(slot) * VirtioPCIFunction.barSize,
                InterruptMap.pciINTxBase + UInt32(slot % 4))
    }

    /// The most virtio devices one machine can have with `transport`.
    static func virtioCapacity(_ transport: VirtioTransportKind) -> Int {
        switch transport {
        case .mmio: return min(AddressMap.virtioMMIOSlotCount, InterruptMap.virtioMMIO.count)
        case .pci: return PCIHostBridge.slotCount - 1
        }
    }

    /// Puts `attachments` on the buses with `transport`. With PCI, the host bridge also
    /// takes ports 0xCF8-0xCFF (answering 1-byte accesses at 0xCF9 with `resetControl`),
    /// the ECAM window and the BAR window. Returns the transports, in device order, and
    /// the host bridge (with PCI).
    static func attachVirtio(_ attachments: [VirtioAttachment], transport: VirtioTransportKind, vm: VirtualMachine,
                             memory: GuestMemory, services: KVMVirtioServices, resetControl: any IODevice,
                             ports: inout IOBus.Builder, mmio: inout IOBus.Builder) throws
        -> (transports: [AttachedVirtioTransport], bridge: PCIHostBridge?) {
        var transports: [AttachedVirtioTransport] = []
        switch transport {
        case .mmio:
            try ports.register(resetControl, name: "reset control register", base: ResetControl.port, length: ResetControl.width)
            for (index, attachment) in attachments.enumerated() {
                let (base, gsi) = mmioPlacement(index)
                let interrupt = try EventFD()
                try vm.assignIRQFD(interrupt.rawValue, gsi: gsi)
                let transport = try VirtioMMIOTransport(device: attachment.device, memory: memory, base: base,
                                                        interruptEvent: interrupt, services: services)
                try mmio.register(transport, name: "\(attachment.name), virtio-mmio", base: base, length: VirtioMMIOTransport.windowSize)
                transports.append(.mmio(transport))
            }
            return (transports, nil)
        case .pci:
            var functions: [Int: any PCIFunction] = [:]
            for (index, attachment) in attachments.enumerated() {
                let (slot, barBase, gsi) = pciPlacement(index)
                let function = try VirtioPCIFunction(device: attachment.device, memory: memory, classCode: attachment.pciClass,
                                                     barBase: barBase, intxGSI: gsi, services: services)
                functions[slot] = function
                transports.append(.pci(function))
            }
            let bridge = PCIHostBridge(functions: functions, resetControl: resetControl)
            try ports.register(bridge.configurationPorts, name: "PCI configuration ports (and reset control at 0xCF9)",
                               base: PCIHostBridge.configurationAddressPort, length: 8)
            try mmio.register(bridge.ecam, name: "PCI ECAM", base: AddressMap.pciECAMStart, length: AddressMap.pciECAMSize)
            try mmio.register(bridge.memoryWindow(base: AddressMap.pciMemoryWindowStart), name: "PCI memory window",
                              base: AddressMap.pciMemoryWindowStart, length: AddressMap.pciMemoryWindowSize)
            return (transports, bridge)
        }
    }
}
