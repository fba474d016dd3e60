import Layout
import Basics
import Boot
import Devices
import EventLoop
import Glibc
import KVM
import Memory
import Synchronization
import Virtio

/// The PC the guest runs on: owns the KVM VM, guest RAM, the in-kernel interrupt
/// controllers and timer, and the port and MMIO buses with the devices that live in
/// user space. It runs nothing: ``Machine`` adds the vCPUs and runs them.
///
/// Building it issues, in order: `KVM_CREATE_VM`, `KVM_SET_USER_MEMORY_REGION` per RAM
/// region, `KVM_SET_TSS_ADDR`, `KVM_SET_IDENTITY_MAP_ADDR`, `KVM_CREATE_IRQCHIP`,
/// `KVM_GET_IRQCHIP`/`KVM_SET_IRQCHIP` (the PICs as firmware leaves them) and
/// `KVM_CREATE_PIT2`.
final class Board: Sendable {
    /// COM1: eight registers at 0x3F8, IRQ 4.
    static let com1Port: UInt64 = 0x3F8

    let system: KVMSystem
    let vm: VirtualMachine
    let memory: GuestMemory
    /// The memory slots KVM maps: guest RAM, and with `--show-memory` the slots the guest
    /// asks for while it runs.
    let slots: MemorySlots
    let serial: Serial16550
    /// The interrupt lines Swiftlet drives with `KVM_IRQ_LINE`, with how often it did.
    let interruptLines: [InterruptLineActivity]
    let portBus: IOBus
    let mmioBus: IOBus
    /// The transports of the virtio devices, in device order: the disks, then the
    /// network interfaces.
    let virtioTransports: [VirtioTransportCore]
    /// The network interfaces, in order.
    let networkInterfaces: [NetworkInterface]
    /// Every user-space device whose state a snapshot records (see Board+DeviceState.swift).
    let stateful: StatefulDevices
    /// KVM's side of the virtio transports (ioeventfds, irqfds, MSI routes).
    private let virtioServices: KVMVirtioServices

    /// Builds the VM with `memorySize` bytes of RAM and the PC devices. `withTestDevice`
    /// adds QEMU's pc-testdev (kvm-unit-tests expect it next to Multiboot kernels).
    /// `memory` is RAM made beforehand (a snapshot's memory file mapped); without it, fresh
    /// RAM of the configured size.
    init(configuration: MachineConfiguration, stop: StopController, loop: EventLoop, withTestDevice: Bool,
         memory existing: GuestMemory? = nil) throws(MachineError) {
        do {
            system = try KVMSystem(path: configuration.kvmPath)
            vm = try system.createVM()
        } catch {
            throw .kvm(error)
        }
        if let existing {
            memory = existing
        } else {
            do {
                memory = try GuestMemory(size: configuration.memorySize, transparentHugePages: configuration.transparentHugePages)
            } catch {
                throw .invalidConfiguration(error.description)
            }
        }
        do {
            slots = try MemorySlots(vm: vm, memory: memory, logDirtyPages: configuration.showMemory)
            try vm.setTSSAddress(AddressMap.realModeTSS)
            try vm.setIdentityMapAddress(AddressMap.identityMapPage)
            try vm.createIRQChip()
            try vm.programPICsLikeFirmware()
            try vm.createPIT2()
        } catch {
            throw .kvm(error)
        }

        let capacity = Self.virtioCapacity(configuration.virtioTransport)
        guard configuration.networks.isEmpty || configuration.disks.count + configuration.networks.count <= capacity else {
            throw .invalidConfiguration("\(configuration.disks.count) disks and \(configuration.networks.count) network interfaces are "
                + "more than the \(capacity) slots of the \(configuration.virtioTransport.rawValue) transport")
        }
        let disks = try Self.openDisks(configuration.disks, transport: configuration.virtioTransport, sandbox: configuration.sandbox)
        networkInterfaces = try Self.openNetworks(configuration.networks, sandbox: configuration.sandbox)
        let attachments = disks + networkInterfaces.map(\.attachment)
        let serialLine = InterruptLineActivity(gsi: InterruptMap.com1, name: "serial (COM1)")
        interruptLines = [serialLine]
        serial = Serial16550(output: configuration.serialOutput, interrupt: KVMInterruptLine(vm: vm, gsi: InterruptMap.com1, activity: serialLine))
        var ports = IOBus.Builder.portBus()
        var mmio = IOBus.Builder.mmioBus()
        do {
            let platform = try Self.registerPlatformDevices(&ports, serial: serial, stop: stop, memory: memory,
                                                            cpuCount: configuration.cpuCount)
            let testDevice = withTestDevice ? try Self.registerTestDevice(&ports, &mmio, vm: vm) : nil
            if configuration.showMemory { try Self.registerSlotControl(&ports, &mmio, slots: slots) }
            let services = KVMVirtioServices(vm: vm, loop: loop)
            virtioServices = services
            let virtio = try Self.attachVirtio(attachments, transport: configuration.virtioTransport, vm: vm, memory: memory,
                                               services: services, resetControl: platform.resetControl, ports: &ports, mmio: &mmio)
            virtioTransports = virtio.transports.map(\.core)
            stateful = StatefulDevices(platform: platform, testDevice: testDevice, pciHostBridge: virtio.bridge, virtio: virtio.transports)
            for (core, attachment) in zip(virtioTransports, attachments) {
                let name = attachment.name
                let warn = configuration.onWarning
                core.onNeedsReset { reason in warn?("\(name): \(reason); the device needs a reset") }
            }
        } catch {
            throw .invalidConfiguration("\(error)")
        }
        portBus = ports.build()
        mmioBus = mmio.build()
    }

    /// Stops the virtio devices and breaks the references between each transport and its
    /// device, so they, and the disk images and TAPs they hold (with their locks), go away
    /// with the board: a machine restored in the same process can open them again.
    deinit { detachDevices() }

    /// Whether ``detachDevices()`` ran.
    private let detached = Atomic<Bool>(false)

    /// Resets every virtio device (its threads end) and releases what the devices hold in
    /// KVM (ioeventfds, irqfds) and in the event loop. ``Machine/run()`` calls it on its
    /// own thread once the VM stopped, so that the teardown's system calls come from the
    /// thread whose seccomp filter allows them, not from whichever device thread happens
    /// to drop the last reference; the call in `deinit` is then a no-op.
    func detachDevices() {
        guard !detached.exchange(true, ordering: .sequentiallyConsistent) else { return }
        for transport in virtioTransports { transport.detach() }
        virtioServices.detach()
    }

    /// The PC devices that live in user space. (The PICs, IOAPIC, local APICs and the
    /// PIT, with port 0x61, are in the kernel.)
    /// Returns them; the reset control register is not registered yet: the PCI host bridge
    /// shares ports with it.
    private static func registerPlatformDevices(_ ports: inout IOBus.Builder, serial: Serial16550, stop: StopController,
                                                memory: GuestMemory, cpuCount: Int) throws(IOBusError) -> PlatformStatefulDevices {
        try ports.register(serial, name: "serial (COM1)", base: com1Port, length: 8)
        try ports.register(DebugExit { value in stop.stop(.guestExit(value: value)) },
                           name: "debug exit", base: DebugExit.defaultPort, length: DebugExit.width)
        try ports.register(IgnoredPorts(), name: "POST diagnostic port", base: 0x80, length: 1)
        let (keyboardController, portA, resetControl, powerManagement) = try registerResetAndPowerOff(&ports, stop: stop)
        let below4G = memory.regions[0].size
        let cmos = CMOS(ramBelow4G: below4G, ramAbove4G: memory.size - below4G, cpuCount: cpuCount, now: { Int64(time(nil)) })
        try ports.register(cmos, name: "CMOS RTC", base: CMOS.basePort, length: CMOS.portCount)
        let firmwareConfiguration = FwCfg(cpuCount: cpuCount, ramSize: memory.size)
        try ports.register(firmwareConfiguration, name: "fw_cfg", base: FwCfg.basePort, length: FwCfg.portCount)
        return PlatformStatefulDevices(serial: serial, keyboardController: keyboardController, cmos: cmos,
                                       firmwareConfiguration: firmwareConfiguration, powerManagement: powerManagement,
                                       resetControl: resetControl, systemControlPortA: portA)
    }

    /// Every way a PC guest resets or powers off the machine, each ending the VM with its
    /// own message (the line `swiftlet run` prints) and the status of its ``StopReason``.
    /// The ports come from the devices and ``ACPILayout``, which the FADT describes too.
    /// (A triple fault is the fifth path: ``VCPURunner`` handles it, as `--triple-fault` says.)
    ///
    /// The reset control register takes the single byte at 0xCF9 inside PCI configuration
    /// mechanism #1's ports (0xCF8-0xCFF), so it is returned, not registered: the virtio
    /// wiring places it alone or inside the PCI host bridge's ports (``attachVirtio``).
    private static func registerResetAndPowerOff(_ ports: inout IOBus.Builder, stop: StopController) throws(IOBusError)
        -> (I8042, SystemControlPortA, ResetControl, ACPIPowerManagement) {
        let keyboardController = I8042 { stop.stop(.reset(how: "i8042 keyboard controller reset line")) }
        let portA = SystemControlPortA { stop.stop(.reset(how: "system control port A at port 0x92: fast reset, bit 0")) }
        let resetControl = ResetControl { value in
            let written = "\(Hex.prefixed(value, width: 2)), \(ResetControl.describe(value))"
            stop.stop(.reset(how: "reset control register at port 0xCF9, the FADT's RESET_REG: wrote \(written)"))
        }
        let s5 = "ACPI sleep state S5: SLP_TYP \(ACPILayout.s5SleepType) with SLP_EN written to PM1a_CNT "
            + "at port \(Hex.prefixed(ACPILayout.pm1aControlBlock))"
        let powerManagement = ACPIPowerManagement(clock: { MonotonicClock.nanoseconds() }) { stop.stop(.powerOff(how: s5)) }

        // Data port 0x60 and status/command port 0x64: 0x61 between them is KVM's (the PIT's speaker bits).
        try ports.register(keyboardController, name: "i8042 keyboard controller", base: I8042.basePort, length: 1)
        try ports.register(RegisterWindow(keyboardController, offset: I8042.commandOffset), name: "i8042 keyboard controller",
                           base: I8042.basePort + I8042.commandOffset, length: 1)
        try ports.register(portA, name: "system control port A", base: SystemControlPortA.port, length: SystemControlPortA.width)
        try ports.register(powerManagement, name: "ACPI PM1a registers and PM timer", base: ACPILayout.powerManagementBase,
                           length: ACPILayout.powerManagementLength)
        return (keyboardController, portA, resetControl, powerManagement)
    }

    /// kvm-unit-tests (Multiboot kernels) expect QEMU's pc-testdev; see ``TestDevice``.
    private static func registerTestDevice(_ ports: inout IOBus.Builder, _ mmio: inout IOBus.Builder,
                                           vm: VirtualMachine) throws(IOBusError) -> TestDevice {
        let device = TestDevice { gsi, high in try? vm.setIRQLine(gsi, high: high) }
        try ports.register(device.register, name: "pc-testdev register", base: TestDevice.ioPort, length: TestDevice.ioPortLength)
        try ports.register(device.flushPage, name: "pc-testdev flush page", base: TestDevice.flushPagePort, length: 4)
        try ports.register(device.irqLines, name: "pc-testdev IRQ lines", base: TestDevice.irqPortBase, length: TestDevice.irqLineCount)
        try mmio.register(device.ioRAM, name: "pc-testdev I/O RAM", base: AddressMap.testDeviceRAM, length: AddressMap.testDeviceRAMSize)
        return device
    }
}

extension Board {
    /// `--show-memory`'s teaching device: the guest asks for memory slots while it runs
    /// (ports 0x5A0-0x5A7), and its writes to the read-only slot arrive at the write trap.
    static func registerSlotControl(_ ports: inout IOBus.Builder, _ mmio: inout IOBus.Builder, slots: MemorySlots) throws(IOBusError) {
        let device = SlotControl(host: slots)
        try ports.register(device.ports, name: "memory slot device", base: SlotControl.basePort, length: SlotControl.portCount)
        try mmio.register(device.writeTrap, name: "read-only slot (writes trap here)", base: AddressMap.runtimeSlotReadOnly,
                          length: AddressMap.runtimeSlotSize)
    }
}

/// An interrupt input of the in-kernel irqchip, driven with `KVM_IRQ_LINE`.
struct KVMInterruptLine: InterruptLine {
    let vm: VirtualMachine
    let gsi: UInt32
    /// Counts the changes, for `--trace-exits`.
    var activity: InterruptLineActivity?

    func setLevel(_ high: Bool) {
        activity?.record(high)
        // Fails only if the irqchip is missing, which Board.init rules out.
        try? vm.setIRQLine(gsi, high: high)
    }
}

/// How often Swiftlet raised and lowered one irqchip input (`KVM_IRQ_LINE`), from any
/// thread: what `--trace-exits` reports next to the exits.
final class InterruptLineActivity: Sendable {
    let gsi: UInt32
    let name: String
    private let raised = Atomic<UInt64>(0)
    private let lowered = Atomic<UInt64>(0)

    init(gsi: UInt32, name: String) {
        self.gsi = gsi
        self.name = name
    }

    func record(_ high: Bool) {
        if high { raised.add(1, ordering: .relaxed) } else { lowered.add(1, ordering: .relaxed) }
    }

    /// "GSI 4 serial (COM1): raised 3 times, lowered 3 times".
    var summary: String {
        "GSI \(gsi) \(name): raised \(raised.load(ordering: .relaxed)) times, lowered \(lowered.load(ordering: .relaxed)) times"
    }
}
