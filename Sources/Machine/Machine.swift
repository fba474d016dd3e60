import Boot
import Devices
import Glibc
import KVM
import Memory

/// What to boot.
public enum Payload: Sendable {
    /// A flat binary, loaded at 0x7C00 and entered in real mode (see ``FlatBinary``).
    case flat([UInt8])
    /// A kernel file whose format is detected from its content: a Linux bzImage or
    /// vmlinux (64-bit or PVH entry), or a Multiboot kernel (see ``KernelImage``).
    case kernel([UInt8], BootOptions)
}

/// Everything `swiftlet run` decided from its command line.
public struct MachineConfiguration: Sendable {
    public var payload: Payload
    public var memorySize: UInt64 = 256 << 20
    public var cpuCount = 1
    public var transparentHugePages = true
    public var serialOutput: any ByteSink = FileDescriptorSink.standardOutput
    /// Forward standard input to the serial port (raw mode when it is a terminal).
    public var forwardStandardInput = true
    /// Seconds before the VM is stopped with status 124.
    public var timeout: Double?
    /// Print a table of VM exits when the VM stops.
    public var traceExits = false
    public var kvmPath = KVMSystem.defaultPath

    public init(payload: Payload) { self.payload = payload }
}

/// A virtual machine, built and ready to run: owns the KVM VM, guest memory, the port
/// and MMIO buses with their devices, and one ``VCPURunner`` per vCPU.
///
/// Building it issues, in order: `KVM_CREATE_VM`, `KVM_SET_USER_MEMORY_REGION` per RAM
/// region, `KVM_SET_TSS_ADDR`, `KVM_SET_IDENTITY_MAP_ADDR`, `KVM_CREATE_IRQCHIP`,
/// `KVM_CREATE_PIT2`, then `KVM_CREATE_VCPU` and the vCPU set-up ioctls.
public final class Machine: Sendable {
    /// Guest-physical addresses VMX needs for its real-mode TSS and identity map: just
    /// below the BIOS area at the top of the 32-bit space, outside RAM and devices.
    static let tssAddress: UInt64 = 0xFFFB_D000
    static let identityMapAddress: UInt64 = 0xFFFB_C000

    /// The most vCPUs a machine may have: xAPIC IDs are 8 bits, 0xFF is the broadcast ID
    /// and the IOAPIC takes the ID after the last vCPU (see ``FirmwareTables``).
    static let maximumCPUs = FirmwareTables.maximumCPUs

    /// COM1: eight registers at 0x3F8, IRQ 4.
    static let com1Port: UInt64 = 0x3F8
    static let com1IRQ: UInt32 = 4

    public let configuration: MachineConfiguration
    public let memory: GuestMemory
    let vm: VirtualMachine
    let portBus = IOBus()
    let mmioBus = IOBus()
    let stop = StopController()
    let serial: Serial16550
    let runners: [VCPURunner]

    /// Builds the VM: memory, interrupt controllers, devices, vCPUs, and the payload
    /// loaded with the boot vCPU's registers set. Nothing runs yet.
    public init(configuration: MachineConfiguration) throws(MachineError) {
        self.configuration = configuration
        guard configuration.cpuCount >= 1 else { throw .invalidConfiguration("--cpus must be at least 1") }
        do {
            let system = try KVMSystem(path: configuration.kvmPath)
            let maximum = min(system.maximumVCPUs, Self.maximumCPUs)
            guard configuration.cpuCount <= maximum else {
                throw MachineError.invalidConfiguration("--cpus \(configuration.cpuCount) is more than Swiftlet supports (\(maximum): "
                    + (maximum == Self.maximumCPUs ? "APIC IDs are 8 bits, 255 is the broadcast ID and the IOAPIC takes one" : "this KVM's limit") + ")")
            }
            vm = try system.createVM()
            do {
                memory = try GuestMemory(size: configuration.memorySize, transparentHugePages: configuration.transparentHugePages)
            } catch {
                throw MachineError.invalidConfiguration(error.description)
            }
            for (slot, region) in memory.regions.enumerated() {
                try vm.setUserMemoryRegion(slot: UInt32(slot), guestAddress: region.guestBase, size: region.size, hostAddress: region.hostAddress)
            }
            try vm.setTSSAddress(Self.tssAddress)
            try vm.setIdentityMapAddress(Self.identityMapAddress)
            try vm.createIRQChip()
            try vm.programPICsLikeFirmware()
            try vm.createPIT2()

            // Load first: a bad kernel is reported before any vCPU exists.
            let (entry, format) = try Self.load(configuration.payload, into: memory)

            serial = Serial16550(output: configuration.serialOutput, interrupt: KVMInterruptLine(vm: vm, gsi: Self.com1IRQ))
            try Self.registerPlatformDevices(portBus: portBus, serial: serial, stop: stop, memory: memory, cpuCount: configuration.cpuCount)
            if format == .multiboot {
                try Self.registerTestDevice(portBus: portBus, mmioBus: mmioBus, vm: vm)
            }

            let supportedCPUID = try system.supportedCPUID()
            var runners: [VCPURunner] = []
            var cpuModel: CPUModel?
            for id in 0..<configuration.cpuCount {
                let vcpu = try vm.createVCPU(id: id)
                // The TSC frequency is a vCPU ioctl: ask the first vCPU, once.
                let model = cpuModel ?? CPUModel(supported: supportedCPUID, cpuCount: configuration.cpuCount, tscKHz: vcpu.tscKHz())
                cpuModel = model
                try VCPUSetup.configure(vcpu, cpuid: model.entries(forAPICID: UInt32(id)))
                runners.append(VCPURunner(vcpu: vcpu, portBus: portBus, mmioBus: mmioBus, stop: stop, traceExits: configuration.traceExits))
            }
            self.runners = runners
            // vCPU 0 is the bootstrap processor; the others wait in the in-kernel local
            // APIC for INIT and Startup IPIs from it, as on a PC.
            try EntryStateApplier.apply(entry, to: runners[0].vcpu)
        } catch let error as MachineError {
            throw error
        } catch let error as KVMError {
            throw .kvm(error)
        } catch {
            throw .invalidConfiguration("\(error)")
        }
    }

    /// The PC devices that live in user space. (The PICs, IOAPIC, local APICs and the
    /// PIT, with port 0x61, are in the kernel.)
    private static func registerPlatformDevices(portBus: IOBus, serial: Serial16550, stop: StopController,
                                                memory: GuestMemory, cpuCount: Int) throws {
        try portBus.register(serial, name: "serial (COM1)", base: com1Port, length: 8)
        try portBus.register(DebugExit { status in stop.stop(.guestExit(status: status)) },
                             name: "debug exit", base: DebugExit.defaultPort, length: DebugExit.width)
        try portBus.register(IgnoredPorts(), name: "POST diagnostic port", base: 0x80, length: 1)
        try portBus.register(I8042 { stop.stop(.guestReset) }, name: "i8042 keyboard controller (reset)",
                             base: I8042.basePort, length: I8042.portCount)
        let below4G = memory.regions[0].size
        try portBus.register(CMOS(ramBelow4G: below4G, ramAbove4G: memory.size - below4G, cpuCount: cpuCount,
                                  now: { Int64(time(nil)) }),
                             name: "CMOS RTC", base: CMOS.basePort, length: CMOS.portCount)
        try portBus.register(FwCfg(cpuCount: cpuCount, ramSize: memory.size), name: "fw_cfg (legacy)",
                             base: FwCfg.basePort, length: FwCfg.portCount)
    }

    /// kvm-unit-tests (Multiboot kernels) expect QEMU's pc-testdev; see ``TestDevice``.
    private static func registerTestDevice(portBus: IOBus, mmioBus: IOBus, vm: VirtualMachine) throws {
        let device = TestDevice { gsi, high in try? vm.setIRQLine(gsi, high: high) }
        try portBus.register(device.register, name: "pc-testdev register", base: TestDevice.ioPort, length: TestDevice.ioPortLength)
        try portBus.register(device.flushPage, name: "pc-testdev flush page", base: TestDevice.flushPagePort, length: 4)
        try portBus.register(device.irqLines, name: "pc-testdev IRQ lines", base: TestDevice.irqPortBase, length: TestDevice.irqLineCount)
        try mmioBus.register(device.ioRAM, name: "pc-testdev I/O RAM", base: TestDevice.ioRAMBase, length: TestDevice.ioRAMLength)
    }

    /// Loads the payload; returns the boot vCPU's entry state and, for a kernel, its format.
    private static func load(_ payload: Payload, into memory: GuestMemory) throws(MachineError) -> (EntryState, KernelFormat?) {
        switch payload {
        case let .flat(bytes):
            do { return (try FlatBinary.load(bytes, into: memory), nil) } catch { throw .load(error.description) }
        case let .kernel(bytes, options):
            do {
                let loaded = try KernelImage.load(bytes, into: memory, options: options)
                return (loaded.entry, loaded.format)
            } catch {
                throw .load(error.description)
            }
        }
    }

    /// Runs the vCPUs until the guest exits, the timeout passes, a signal arrives or the
    /// user quits. Returns why it stopped.
    public func run() -> StopReason {
        SignalSetup.blockProcessSignals()
        SignalSetup.forwardTerminationSignals(to: stop)
        if configuration.forwardStandardInput {
            Console(serial: serial, stop: stop, output: configuration.serialOutput).start()
        }
        for runner in runners { runner.start() }
        let reason = stop.wait(timeout: configuration.timeout)
        for runner in runners { runner.waitUntilFinished(seconds: 2) }
        Console.restoreTerminal()
        return reason
    }

    /// The merged exit table and the time of the first `KVM_RUN`, for `--trace-exits`.
    public func exitReport() -> String {
        var merged = ExitStatistics()
        for runner in runners { merged.merge(runner.statistics) }
        var report = merged.formattedTable()
        if let first = runners.compactMap(\.firstRunAt).min() {
            report += "\nfirst KVM_RUN: monotonic \(first) ns"
        }
        return report
    }
}

/// An interrupt input of the in-kernel irqchip, driven with `KVM_IRQ_LINE`.
struct KVMInterruptLine: InterruptLine {
    let vm: VirtualMachine
    let gsi: UInt32

    func setLevel(_ high: Bool) {
        // Fails only if the irqchip is missing, which Machine.init rules out.
        try? vm.setIRQLine(gsi, high: high)
    }
}
