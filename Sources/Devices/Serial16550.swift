import DequeModule
import Synchronization

/// Where a serial port's transmitted bytes go: the terminal, a file, or a test buffer.
public protocol ByteSink: Sendable {
    func write(_ bytes: UnsafeRawBufferPointer)
}

/// A 16550A UART, the PC serial port (COM1 is 8 registers at port 0x3F8, IRQ 4).
///
/// Owns the register file, a 16-byte receive FIFO fed from the host, and the interrupt
/// line it drives. It models what a Linux 8250 driver probes: the scratch register,
/// LSR, IIR/FCR with FIFOs (IIR bits 7:6 read 11 once FIFOs are on), and MCR loopback
/// (transmitted bytes come back as received; MSR mirrors the MCR outputs). Transmission
/// is instant, so the transmitter is always empty. Baud rate and line settings are
/// stored but have no effect, as on any virtual UART.
public final class Serial16550: IODevice {
    // Register offsets from the base port.
    static let dataRegister: UInt64 = 0        // RBR (read) / THR (write) / DLL when DLAB
    static let interruptEnable: UInt64 = 1     // IER / DLM when DLAB
    static let interruptIdentify: UInt64 = 2   // IIR (read) / FCR (write)
    static let lineControl: UInt64 = 3
    static let modemControl: UInt64 = 4
    static let lineStatus: UInt64 = 5
    static let modemStatus: UInt64 = 6
    static let scratch: UInt64 = 7

    // Bits.
    static let lcrDLAB: UInt8 = 0x80
    static let ierReceivedData: UInt8 = 0x01
    static let ierTransmitterEmpty: UInt8 = 0x02
    static let ierLineStatus: UInt8 = 0x04
    static let ierModemStatus: UInt8 = 0x08
    static let lsrDataReady: UInt8 = 0x01
    static let lsrOverrun: UInt8 = 0x02
    static let lsrTransmitterHoldingEmpty: UInt8 = 0x20
    static let lsrTransmitterEmpty: UInt8 = 0x40
    static let mcrLoopback: UInt8 = 0x10
    static let fcrEnable: UInt8 = 0x01
    static let fcrClearReceive: UInt8 = 0x02
    static let iirNoInterrupt: UInt8 = 0x01
    static let iirFIFOsEnabled: UInt8 = 0xC0

    /// Depth of the receive FIFO (a 16550A has 16 bytes).
    public static let fifoDepth = 16
    /// How many host bytes may wait for FIFO space before further input is dropped.
    public static let pendingInputLimit = 64 * 1024

    struct State {
        var ier: UInt8 = 0
        var lcr: UInt8 = 0x03 // 8 data bits, like firmware leaves it
        var mcr: UInt8 = 0x08 // OUT2 set
        var lsr: UInt8 = lsrTransmitterHoldingEmpty | lsrTransmitterEmpty
        var scr: UInt8 = 0
        var fcr: UInt8 = 0
        var divisor: UInt16 = 12 // 9600 baud
        var receiveFIFO = Deque<UInt8>()
        /// Host input waiting for room in the FIFO (a paste into the console). A deque: the
        /// guest takes from the front while the host appends, each in O(1).
        var pendingInput = Deque<UInt8>()
        /// A THRE interrupt is pending until IIR reports it or THR is written.
        var transmitInterruptPending = false
        var interruptLineHigh = false
    }

    private let state = Mutex(State())
    private let output: any ByteSink
    private let interrupt: any InterruptLine

    public init(output: any ByteSink, interrupt: any InterruptLine) {
        self.output = output
        self.interrupt = interrupt
    }

    /// Queues bytes typed on the host for the guest to read; they enter the FIFO as it
    /// drains. Returns how many were accepted (the rest is dropped once
    /// ``pendingInputLimit`` bytes are waiting).
    @discardableResult
    public func receive(_ bytes: some Collection<UInt8>) -> Int {
        withRegisters { state in
            let room = max(0, Self.pendingInputLimit - state.pendingInput.count)
            let accepted = min(room, bytes.count)
            state.pendingInput.append(contentsOf: bytes.prefix(accepted))
            Self.refillFIFO(&state)
            return accepted
        }
    }

    /// Bytes received but not yet read by the guest (FIFO plus pending host input).
    public var bufferedInputCount: Int {
        state.withLock { $0.receiveFIFO.count + $0.pendingInput.count }
    }

    public func read(offset: UInt64, into data: UnsafeMutableRawBufferPointer) {
        guard !data.isEmpty else { return }
        data[0] = withRegisters { Self.readRegister(offset, &$0) }
        for index in data.indices.dropFirst() { data[index] = 0 }
    }

    public func write(offset: UInt64, from data: UnsafeRawBufferPointer) {
        guard let value = data.first else { return }
        if var byte = withRegisters({ Self.writeRegister(offset, value, &$0) }) {
            withUnsafeBytes(of: &byte) { output.write($0) }
        }
    }

    // MARK: Register file

    private static func readRegister(_ offset: UInt64, _ state: inout State) -> UInt8 {
        let dlab = state.lcr & lcrDLAB != 0
        switch offset {
        case dataRegister:
            if dlab { return UInt8(truncatingIfNeeded: state.divisor) }
            guard !state.receiveFIFO.isEmpty else { return 0 }
            let byte = state.receiveFIFO.removeFirst()
            refillFIFO(&state)
            return byte
        case interruptEnable:
            return dlab ? UInt8(truncatingIfNeeded: state.divisor >> 8) : state.ier
        case interruptIdentify:
            let identity = interruptIdentity(state)
            // Reading IIR while it reports THRE acknowledges that interrupt.
            if identity == 0x02 { state.transmitInterruptPending = false }
            return identity | (state.fcr & fcrEnable != 0 ? iirFIFOsEnabled : 0)
        case lineControl: return state.lcr
        case modemControl: return state.mcr
        case lineStatus:
            let value = state.lsr
            state.lsr &= ~lsrOverrun // error bits clear on read
            return value
        case modemStatus:
            if state.mcr & mcrLoopback != 0 {
                // Loopback wires outputs to inputs: RTS->CTS, DTR->DSR, OUT1->RI, OUT2->DCD.
                let mcr = state.mcr
                return (mcr & 0x02 != 0 ? 0x10 : 0) | (mcr & 0x01 != 0 ? 0x20 : 0)
                    | (mcr & 0x04 != 0 ? 0x40 : 0) | (mcr & 0x08 != 0 ? 0x80 : 0)
            }
            return 0xB0 // DCD, DSR, CTS: a cable is connected and the other end is ready
        case scratch: return state.scr
        default: return 0xFF
        }
    }

    /// Applies a register write; returns a byte to transmit to the host, if any.
    private static func writeRegister(_ offset: UInt64, _ value: UInt8, _ state: inout State) -> UInt8? {
        let dlab = state.lcr & lcrDLAB != 0
        switch offset {
        case dataRegister:
            if dlab {
                state.divisor = (state.divisor & 0xFF00) | UInt16(value)
                return nil
            }
            state.transmitInterruptPending = state.ier & ierTransmitterEmpty != 0
            if state.mcr & mcrLoopback != 0 {
                pushReceived(value, &state)
                return nil
            }
            return value
        case interruptEnable:
            if dlab {
                state.divisor = (state.divisor & 0x00FF) | UInt16(value) << 8
                return nil
            }
            let enablingTransmit = value & ierTransmitterEmpty != 0 && state.ier & ierTransmitterEmpty == 0
            state.ier = value & 0x0F
            // The transmitter is always empty, so enabling its interrupt raises it at once
            // (Linux's 8250 driver relies on this to start sending).
            if enablingTransmit { state.transmitInterruptPending = true }
            if value & ierTransmitterEmpty == 0 { state.transmitInterruptPending = false }
        case interruptIdentify:
            state.fcr = value & 0xC9
            if value & fcrClearReceive != 0 { state.receiveFIFO.removeAll(keepingCapacity: true); refillFIFO(&state) }
            if value & fcrEnable == 0 { state.receiveFIFO = Deque(state.receiveFIFO.prefix(1)) }
        case lineControl: state.lcr = value
        case modemControl:
            let leavingLoopback = state.mcr & mcrLoopback != 0 && value & mcrLoopback == 0
            state.mcr = value & 0x1F
            if leavingLoopback { refillFIFO(&state) }
        case lineStatus, modemStatus: break // read-only
        case scratch: state.scr = value
        default: break
        }
        return nil
    }

    private static func capacity(_ state: State) -> Int {
        state.fcr & fcrEnable != 0 ? fifoDepth : 1
    }

    /// A byte arriving from the line (or looped back): overruns when the FIFO is full.
    private static func pushReceived(_ byte: UInt8, _ state: inout State) {
        if state.receiveFIFO.count < capacity(state) {
            state.receiveFIFO.append(byte)
        } else {
            state.lsr |= lsrOverrun
        }
        updateDataReady(&state)
    }

    /// Moves waiting host input into the FIFO. Host input is held back, never overrun,
    /// and does not arrive while the port is in loopback (its line is disconnected).
    private static func refillFIFO(_ state: inout State) {
        if state.mcr & mcrLoopback == 0 {
            let room = capacity(state) - state.receiveFIFO.count
            if room > 0 && !state.pendingInput.isEmpty {
                let count = min(room, state.pendingInput.count)
                state.receiveFIFO.append(contentsOf: state.pendingInput.prefix(count))
                state.pendingInput.removeFirst(count)
            }
        }
        updateDataReady(&state)
    }

    private static func updateDataReady(_ state: inout State) {
        if state.receiveFIFO.isEmpty { state.lsr &= ~lsrDataReady } else { state.lsr |= lsrDataReady }
    }

    /// IIR bits 3:0 for the highest-priority pending interrupt (0x01 when none).
    private static func interruptIdentity(_ state: State) -> UInt8 {
        if state.ier & ierLineStatus != 0 && state.lsr & lsrOverrun != 0 { return 0x06 }
        if state.ier & ierReceivedData != 0 && state.lsr & lsrDataReady != 0 { return 0x04 }
        if state.ier & ierTransmitterEmpty != 0 && state.transmitInterruptPending { return 0x02 }
        return iirNoInterrupt
    }

    private static func interruptLevel(_ state: State) -> Bool {
        interruptIdentity(state) != iirNoInterrupt
    }

    /// Runs `body` on the registers, then drives the IRQ line if the interrupt state
    /// changed (each change is one `KVM_IRQ_LINE`). Both happen under one lock, so line
    /// changes reach the irqchip in the order the register accesses made them.
    private func withRegisters<Result>(_ body: (inout State) -> Result) -> Result {
        state.withLock { state in
            let result = body(&state)
            let high = Self.interruptLevel(state)
            if high != state.interruptLineHigh {
                state.interruptLineHigh = high
                interrupt.setLevel(high)
            }
            return result
        }
    }
}

// MARK: Snapshot

extension Serial16550: SnapshotDevice {
    /// Every register, both FIFOs (the receive FIFO and the host input waiting for it),
    /// the pending THRE interrupt and the level the IRQ line is driven to.
    public struct SavedState: Codable, Sendable, Equatable {
        public var interruptEnable: UInt8
        public var lineControl: UInt8
        public var modemControl: UInt8
        public var lineStatus: UInt8
        public var scratch: UInt8
        public var fifoControl: UInt8
        public var divisor: UInt16
        public var receiveFIFO: [UInt8]
        public var pendingInput: [UInt8]
        public var transmitInterruptPending: Bool
        public var interruptLineHigh: Bool
    }

    static let deviceName = "serial (16550)"

    public func saveState() -> SavedState {
        state.withLock { state in
            SavedState(interruptEnable: state.ier, lineControl: state.lcr, modemControl: state.mcr, lineStatus: state.lsr,
                       scratch: state.scr, fifoControl: state.fcr, divisor: state.divisor,
                       receiveFIFO: Array(state.receiveFIFO), pendingInput: Array(state.pendingInput),
                       transmitInterruptPending: state.transmitInterruptPending, interruptLineHigh: state.interruptLineHigh)
        }
    }

    /// Checks `saved` against what the registers can hold, puts it back, and drives the
    /// IRQ line to the saved level (in a new machine the line starts low; the irqchip's
    /// own state is restored by the machine first).
    public func restoreState(_ saved: SavedState) throws(DeviceStateError) {
        func refuse(_ reason: String) -> DeviceStateError { DeviceStateError(device: Self.deviceName, reason) }
        guard saved.interruptEnable & ~0x0F == 0 else { throw refuse("IER 0x\(String(saved.interruptEnable, radix: 16)) has bits above 3") }
        guard saved.modemControl & ~0x1F == 0 else { throw refuse("MCR 0x\(String(saved.modemControl, radix: 16)) has bits above 4") }
        guard saved.fifoControl & ~0xC9 == 0 else { throw refuse("FCR 0x\(String(saved.fifoControl, radix: 16)) keeps bits the UART does not") }
        let statusBits = Self.lsrDataReady | Self.lsrOverrun | Self.lsrTransmitterHoldingEmpty | Self.lsrTransmitterEmpty
        let transmitterEmpty = Self.lsrTransmitterHoldingEmpty | Self.lsrTransmitterEmpty
        guard saved.lineStatus & ~statusBits == 0, saved.lineStatus & transmitterEmpty == transmitterEmpty else {
            throw refuse("LSR 0x\(String(saved.lineStatus, radix: 16)) is not a state of this UART (its transmitter is always empty)")
        }
        let capacity = saved.fifoControl & Self.fcrEnable != 0 ? Self.fifoDepth : 1
        guard saved.receiveFIFO.count <= capacity else {
            throw refuse("\(saved.receiveFIFO.count) bytes in a receive FIFO of \(capacity)")
        }
        guard (saved.lineStatus & Self.lsrDataReady != 0) == !saved.receiveFIFO.isEmpty else {
            throw refuse("LSR data ready disagrees with the \(saved.receiveFIFO.count) bytes in the receive FIFO")
        }
        guard saved.pendingInput.count <= Self.pendingInputLimit else {
            throw refuse("\(saved.pendingInput.count) bytes of host input waiting, more than the \(Self.pendingInputLimit) kept")
        }
        guard !saved.transmitInterruptPending || saved.interruptEnable & Self.ierTransmitterEmpty != 0 else {
            throw refuse("a THRE interrupt pending while IER does not enable it")
        }
        var restored = State()
        restored.ier = saved.interruptEnable
        restored.lcr = saved.lineControl
        restored.mcr = saved.modemControl
        restored.lsr = saved.lineStatus
        restored.scr = saved.scratch
        restored.fcr = saved.fifoControl
        restored.divisor = saved.divisor
        restored.receiveFIFO = Deque(saved.receiveFIFO)
        restored.pendingInput = Deque(saved.pendingInput)
        restored.transmitInterruptPending = saved.transmitInterruptPending
        restored.interruptLineHigh = saved.interruptLineHigh
        guard Self.interruptLevel(restored) == saved.interruptLineHigh else {
            throw refuse("the IRQ line is saved \(saved.interruptLineHigh ? "high" : "low") but the registers say \(saved.interruptLineHigh ? "low" : "high")")
        }
        state.withLock { state in
            state = restored
            interrupt.setLevel(restored.interruptLineHigh)
        }
    }
}
