import Synchronization

/// The PC keyboard controller (Intel 8042) at ports 0x60-0x64, reduced to what a kernel
/// probes and the one thing a VMM needs from it: the CPU reset line.
///
/// Owns the controller's output buffer queue, its command byte and the pending
/// two-byte command. Offset 0 is the data port (0x60), offset ``commandOffset`` (4) the
/// status (read) and command (write) port (0x64). The machine places the two separately
/// (the second through a ``RegisterWindow``): port 0x61 between them is the PC speaker/NMI
/// port that KVM's in-kernel PIT claims, which no bus may take. Offsets 1-3 read all ones
/// and ignore writes.
///
/// Command 0xFE ("pulse output line 0", the reset line) and any other pulse command
/// with bit 0 clear, or writing an output port value with bit 0 clear (0xD1), call
/// `onReset`: Linux's `reboot=k` ends there, and the machine ends the VM as the guest's
/// reset (exit status 6). There is no keyboard and no mouse: keyboard commands are
/// acknowledged, the auxiliary port does not answer, so Linux registers no AUX device.
public final class I8042: IODevice {
    public static let basePort: UInt64 = 0x60
    public static let portCount: UInt64 = 5
    public static let dataOffset: UInt64 = 0
    public static let commandOffset: UInt64 = 4

    // Status register bits.
    static let statusOutputFull: UInt8 = 0x01
    static let statusSystem: UInt8 = 0x04
    static let statusCommand: UInt8 = 0x08
    static let statusUnlocked: UInt8 = 0x10
    // Command byte bits.
    static let configKeyboardInterrupt: UInt8 = 0x01

    /// Controller commands that take a parameter byte on the data port.
    public enum PendingWrite: String, Codable, Sendable { case commandByte, outputPort, keyboardOutput, auxOutput, auxDevice }

    struct State {
        var output: [UInt8] = []
        var commandByte: UInt8 = 0x45    // keyboard interrupt, system flag, scancode translation
        var pending: PendingWrite?
        var lastWasCommand = false
        var keyboardPending: UInt8?       // a keyboard command waiting for its argument (0xED, 0xF3)
        var interruptLineHigh = false

        /// IRQ 1 is high while a byte waits and the command byte enables the interrupt.
        var interruptLevel: Bool { commandByte & I8042.configKeyboardInterrupt != 0 && !output.isEmpty }
    }

    /// Longest output queue kept; further bytes are dropped, like a full buffer.
    static let outputLimit = 16

    private let state = Mutex(State())
    private let onReset: @Sendable () -> Void
    private let irq: (any InterruptLine)?

    /// - Parameters:
    ///   - onReset: called (from a vCPU thread) when the guest pulses the reset line.
    ///   - irq: the keyboard interrupt (ISA IRQ 1), raised while output is waiting and
    ///     the command byte enables it.
    public init(irq: (any InterruptLine)? = nil, onReset: @escaping @Sendable () -> Void) {
        self.irq = irq
        self.onReset = onReset
    }

    public func read(offset: UInt64, into data: UnsafeMutableRawBufferPointer) {
        var value: UInt8 = 0xFF
        switch offset {
        case Self.dataOffset:
            value = withState { state in
                state.output.isEmpty ? 0 : state.output.removeFirst()
            }
        case Self.commandOffset:
            value = withState { state in
                var status = Self.statusSystem | Self.statusUnlocked
                if !state.output.isEmpty { status |= Self.statusOutputFull }
                if state.lastWasCommand { status |= Self.statusCommand }
                return status
            }
        default:
            break
        }
        for index in data.indices { data[index] = index == 0 ? value : 0xFF }
    }

    public func write(offset: UInt64, from data: UnsafeRawBufferPointer) {
        guard let value = data.first else { return }
        switch offset {
        case Self.commandOffset: command(value)
        case Self.dataOffset: dataWrite(value)
        default: break
        }
    }

    /// Runs `body` on the controller state, then drives IRQ 1 if its level changed. Both
    /// happen under one lock, so line changes reach the irqchip in access order.
    private func withState<Result>(_ body: (inout State) -> Result) -> Result {
        state.withLock { state in
            let result = body(&state)
            let high = state.interruptLevel
            if high != state.interruptLineHigh {
                state.interruptLineHigh = high
                irq?.setLevel(high)
            }
            return result
        }
    }

    private func command(_ command: UInt8) {
        var reset = false
        withState { state in
            state.lastWasCommand = true
            state.pending = nil
            switch command {
            case 0x20: return state.enqueue([state.commandByte])      // read command byte
            case 0x60: state.pending = .commandByte                    // write command byte
            case 0xA7: state.commandByte |= 0x20                       // disable aux
            case 0xA8: state.commandByte &= ~0x20                      // enable aux
            case 0xA9: return state.enqueue([0xFF])                    // test aux port: no aux clock line
            case 0xAA: return state.enqueue([0x55])                    // self test passed
            case 0xAB: return state.enqueue([0x00])                    // keyboard interface test passed
            case 0xAD: state.commandByte |= 0x10                       // disable keyboard
            case 0xAE: state.commandByte &= ~0x10                      // enable keyboard
            case 0xC0: return state.enqueue([0x00])                    // read input port
            case 0xD0: return state.enqueue([0x01])                    // read output port: reset line high
            case 0xD1: state.pending = .outputPort
            case 0xD2: state.pending = .keyboardOutput
            case 0xD3: state.pending = .auxOutput
            case 0xD4: state.pending = .auxDevice
            case 0xF0...0xFF:
                // Pulse output lines for the bits that are 0; bit 0 is the CPU reset.
                if command & 0x01 == 0 { reset = true }
            default: break
            }
        }
        if reset { onReset() }
    }

    private func dataWrite(_ value: UInt8) {
        var reset = false
        withState { state in
            state.lastWasCommand = false
            let pending = state.pending
            state.pending = nil
            switch pending {
            case .commandByte:
                state.commandByte = value
            case .outputPort:
                if value & 0x01 == 0 { reset = true }
            case .keyboardOutput:
                state.enqueue([value])
            case .auxOutput, .auxDevice:
                break    // no auxiliary device
            case nil:
                state.keyboardCommand(value)
            }
        }
        if reset { onReset() }
    }
}

extension I8042.State {
    /// Queues bytes for the guest to read from the data port.
    mutating func enqueue(_ bytes: [UInt8]) {
        for byte in bytes where output.count < I8042.outputLimit { output.append(byte) }
    }

    /// A byte for the keyboard itself: acknowledge, answering reset and identify.
    mutating func keyboardCommand(_ value: UInt8) {
        if keyboardPending != nil {
            keyboardPending = nil
            return enqueue([0xFA])
        }
        switch value {
        case 0xED, 0xF3: keyboardPending = value; return enqueue([0xFA])   // LEDs, typematic: argument follows
        case 0xEE: return enqueue([0xEE])                                  // echo
        case 0xF2: return enqueue([0xFA, 0xAB, 0x83])                      // identify: MF2 keyboard
        case 0xFF: return enqueue([0xFA, 0xAA])                            // reset, self test passed
        default: return enqueue([0xFA])
        }
    }
}

// MARK: Snapshot

extension I8042: SnapshotDevice {
    /// The output queue, the command byte, the command waiting for its parameter byte,
    /// the status register's command/data flag, the keyboard command waiting for its
    /// argument, and the level IRQ 1 is driven to.
    public struct SavedState: Codable, Sendable, Equatable {
        public var output: [UInt8]
        public var commandByte: UInt8
        public var pendingWrite: PendingWrite?
        public var lastWasCommand: Bool
        public var keyboardPending: UInt8?
        public var interruptLineHigh: Bool
    }

    static let deviceName = "i8042 keyboard controller"

    public func saveState() -> SavedState {
        state.withLock { state in
            SavedState(output: state.output, commandByte: state.commandByte, pendingWrite: state.pending,
                       lastWasCommand: state.lastWasCommand, keyboardPending: state.keyboardPending,
                       interruptLineHigh: state.interruptLineHigh)
        }
    }

    /// Checks `saved`, puts it back and drives IRQ 1 to the saved level.
    public func restoreState(_ saved: SavedState) throws(DeviceStateError) {
        func refuse(_ reason: String) -> DeviceStateError { DeviceStateError(device: Self.deviceName, reason) }
        guard saved.output.count <= Self.outputLimit else {
            throw refuse("\(saved.output.count) bytes in an output queue of \(Self.outputLimit)")
        }
        if let pending = saved.keyboardPending, pending != 0xED, pending != 0xF3 {
            throw refuse("keyboard command 0x\(String(pending, radix: 16)) does not take an argument")
        }
        var restored = State()
        restored.output = saved.output
        restored.commandByte = saved.commandByte
        restored.pending = saved.pendingWrite
        restored.lastWasCommand = saved.lastWasCommand
        restored.keyboardPending = saved.keyboardPending
        restored.interruptLineHigh = saved.interruptLineHigh
        guard restored.interruptLevel == saved.interruptLineHigh else {
            throw refuse("IRQ 1 is saved \(saved.interruptLineHigh ? "high" : "low") but the output queue and command byte say otherwise")
        }
        state.withLock { state in
            state = restored
            irq?.setLevel(restored.interruptLineHigh)
        }
    }
}
