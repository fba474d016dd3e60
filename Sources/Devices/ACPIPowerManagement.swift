import Synchronization

/// The ACPI fixed hardware a non-reduced FADT promises: the PM1a event block (PM1_STS,
/// PM1_EN), the PM1a control block (PM1_CNT) and the power management timer (PM_TMR),
/// at the ports ``ACPILayout`` gives. Register it at ``ACPILayout/powerManagementBase``
/// with length ``ACPILayout/powerManagementLength``; offsets are from 0x600:
///
/// | offset | register | behaviour |
/// | --- | --- | --- |
/// | 0-1 | PM1_STS | TMR_STS (bit 0) set whenever bit 23 of the timer has changed since the guest last wrote 1 to it; no other event exists, so the other bits read 0 |
/// | 2-3 | PM1_EN | TMR_EN, GBL_EN, PWRBTN_EN, SLPBTN_EN, RTC_EN, PCIEXP_WAKE_DIS kept and read back (ACPICA checks that they stick) |
/// | 4-5 | PM1_CNT | SCI_EN reads 1 (the machine is always in ACPI mode; the FADT has no SMI_CMD); BM_RLD and SLP_TYP kept; GBL_RLS and SLP_EN read 0 |
/// | 6-7 | - | all ones |
/// | 8-11 | PM_TMR | free-running 24-bit count at 3.579545 MHz from the injected clock; writes ignored |
///
/// Writing PM1_CNT with SLP_EN (bit 13) set asks for the sleep state in SLP_TYP (bits
/// 10-12). Sleep type ``ACPILayout/s5SleepType``, the one the DSDT offers (`\_S5`),
/// calls `onPowerOff`: the machine ends the VM as powered off (status 0). Other sleep
/// types are ignored and the guest runs on: the DSDT offers no `\_S1`-`\_S4`, so an
/// operating system never asks for them, and there is no wake-up path to return through.
///
/// Accesses of any width from 1 to 4 bytes work at any offset, byte by byte, as the
/// registers are laid out (a 1-byte write of 0x20 to 0x605 sets SLP_EN with SLP_TYP 0).
///
/// Nothing raises the SCI (ISA IRQ 9): there is no power or sleep button (the FADT says
/// so), no RTC alarm wake-up, and the timer-carry event sets TMR_STS without an
/// interrupt (Linux and ACPICA never enable it; they read the timer).
public final class ACPIPowerManagement: IODevice {
    /// The PM timer's frequency in Hz (the PC's 14.31818 MHz crystal divided by 4).
    public static let timerFrequency: UInt64 = 3_579_545
    /// The timer counts 24 bits (the FADT does not set TMR_VAL_EXT).
    static let timerMask: UInt64 = 0xFF_FFFF
    static let timerCarryBit: UInt64 = 23

    // Offsets from the base port.
    static let statusOffset = 0, enableOffset = 2, controlOffset = 4, timerOffset = 8

    // PM1_STS / PM1_EN bits.
    static let timerStatus: UInt16 = 1 << 0
    static let enableBits: UInt16 = 1 << 0 | 1 << 5 | 1 << 8 | 1 << 9 | 1 << 10 | 1 << 14
    // PM1_CNT bits.
    static let sciEnable: UInt16 = 1 << 0
    static let busMasterReload: UInt16 = 1 << 1
    static let sleepTypeShift: UInt16 = 10
    static let sleepTypeMask: UInt16 = 0x7 << sleepTypeShift
    static let sleepEnable: UInt16 = 1 << 13
    static let controlKeptBits: UInt16 = busMasterReload | sleepTypeMask

    struct State {
        var enable: UInt16 = 0
        var control: UInt16 = 0
        /// Timer ticks when TMR_STS was last cleared.
        var timerStatusClearedAt: UInt64 = 0
        /// The clock's reading when the timer had the count `timerAtStart`: the device's
        /// creation (count 0), or a restore (the saved count).
        var clockStart: UInt64
        var timerAtStart: UInt64 = 0
    }

    private let state: Mutex<State>
    private let clock: @Sendable () -> UInt64
    private let onPowerOff: @Sendable () -> Void

    /// - Parameters:
    ///   - clock: nanoseconds on a monotonic clock (`CLOCK_MONOTONIC` in the machine, a
    ///     value the test sets in tests). The timer counts from 0 when the device is made.
    ///   - onPowerOff: called (from a vCPU thread) when the guest enters sleep state S5.
    public init(clock: @escaping @Sendable () -> UInt64, onPowerOff: @escaping @Sendable () -> Void) {
        self.clock = clock
        self.state = Mutex(State(clockStart: clock()))
        self.onPowerOff = onPowerOff
    }

    /// Timer ticks now, not truncated to 24 bits.
    private func ticks(_ state: State) -> UInt64 {
        let elapsed = clock() &- state.clockStart
        let nanosecondsPerSecond: UInt64 = 1_000_000_000
        return state.timerAtStart &+ (elapsed / nanosecondsPerSecond) &* Self.timerFrequency
            &+ (elapsed % nanosecondsPerSecond) * Self.timerFrequency / nanosecondsPerSecond
    }

    public func read(offset: UInt64, into data: UnsafeMutableRawBufferPointer) {
        let (now, status, enable, control) = state.withLock { state -> (UInt64, UInt16, UInt16, UInt16) in
            let now = ticks(state)
            let carried = now >> Self.timerCarryBit != state.timerStatusClearedAt >> Self.timerCarryBit
            return (now, carried ? Self.timerStatus : 0, state.enable, state.control | Self.sciEnable)
        }
        let timer = UInt32(truncatingIfNeeded: now & Self.timerMask)
        for index in data.indices {
            let position = offset.addingReportingOverflow(UInt64(index))
            guard !position.overflow, position.partialValue < ACPILayout.powerManagementLength else {
                data[index] = 0xFF
                continue
            }
            let byte = Int(position.partialValue)
            switch byte {
            case Self.statusOffset..<Self.enableOffset: data[index] = Self.byte(status, byte - Self.statusOffset)
            case Self.enableOffset..<Self.controlOffset: data[index] = Self.byte(enable, byte - Self.enableOffset)
            case Self.controlOffset..<(Self.controlOffset + 2): data[index] = Self.byte(control, byte - Self.controlOffset)
            case Self.timerOffset..<(Self.timerOffset + 4): data[index] = UInt8(truncatingIfNeeded: timer >> (8 * UInt32(byte - Self.timerOffset)))
            default: data[index] = 0xFF
            }
        }
    }

    public func write(offset: UInt64, from data: UnsafeRawBufferPointer) {
        // Gather the access into per-register values and byte masks, then apply them.
        var statusClear: UInt16 = 0
        var enableValue: UInt16 = 0, enableMask: UInt16 = 0
        var controlValue: UInt16 = 0, controlMask: UInt16 = 0
        for index in data.indices {
            let position = offset.addingReportingOverflow(UInt64(index))
            guard !position.overflow, position.partialValue < ACPILayout.powerManagementLength else { continue }
            let byte = Int(position.partialValue)
            let value = UInt16(data[index])
            switch byte {
            case Self.statusOffset..<Self.enableOffset:
                statusClear |= value << (8 * UInt16(byte - Self.statusOffset))
            case Self.enableOffset..<Self.controlOffset:
                let shift = 8 * UInt16(byte - Self.enableOffset)
                enableValue |= value << shift
                enableMask |= 0xFF << shift
            case Self.controlOffset..<(Self.controlOffset + 2):
                let shift = 8 * UInt16(byte - Self.controlOffset)
                controlValue |= value << shift
                controlMask |= 0xFF << shift
            default:
                break    // the timer is read-only; 6-7 are not registers
            }
        }
        let sleepType = state.withLock { state -> UInt8? in
            if statusClear & Self.timerStatus != 0 { state.timerStatusClearedAt = ticks(state) }
            state.enable = (state.enable & ~enableMask | enableValue & enableMask) & Self.enableBits
            let control = state.control & ~controlMask | controlValue & controlMask
            state.control = control & Self.controlKeptBits
            guard control & Self.sleepEnable != 0 else { return nil }
            return UInt8((control & Self.sleepTypeMask) >> Self.sleepTypeShift)
        }
        if sleepType == ACPILayout.s5SleepType { onPowerOff() }
    }

    private static func byte(_ value: UInt16, _ index: Int) -> UInt8 {
        UInt8(truncatingIfNeeded: value >> (8 * UInt16(index)))
    }
}

// MARK: Snapshot

extension ACPIPowerManagement: SnapshotDevice {
    /// PM1_EN, PM1_CNT's kept bits, the timer's count and the count when TMR_STS was last
    /// cleared. The timer continues from the saved count when restored: it does not jump
    /// by the time the snapshot spent on disk, so a guest's clocksource sees no gap.
    public struct SavedState: Codable, Sendable, Equatable {
        public var enable: UInt16
        public var control: UInt16
        /// The timer's count, all 64 bits (the guest reads the low 24).
        public var timer: UInt64
        public var timerStatusClearedAt: UInt64
    }

    static let deviceName = "ACPI power management"

    public func saveState() -> SavedState {
        state.withLock { state in
            SavedState(enable: state.enable, control: state.control, timer: ticks(state),
                       timerStatusClearedAt: state.timerStatusClearedAt)
        }
    }

    /// Checks `saved` (only the bits the registers keep; TMR_STS cleared at a count the
    /// timer had reached) and puts it back, the timer counting on from `saved.timer`.
    public func restoreState(_ saved: SavedState) throws(DeviceStateError) {
        func refuse(_ reason: String) -> DeviceStateError { DeviceStateError(device: Self.deviceName, reason) }
        guard saved.enable & ~Self.enableBits == 0 else {
            throw refuse("PM1_EN 0x\(String(saved.enable, radix: 16)) sets bits the register does not keep")
        }
        guard saved.control & ~Self.controlKeptBits == 0 else {
            throw refuse("PM1_CNT 0x\(String(saved.control, radix: 16)) sets bits the register does not keep")
        }
        guard saved.timerStatusClearedAt <= saved.timer else {
            throw refuse("TMR_STS was cleared at count \(saved.timerStatusClearedAt), after the timer's count \(saved.timer)")
        }
        state.withLock { state in
            state = State(enable: saved.enable, control: saved.control, timerStatusClearedAt: saved.timerStatusClearedAt,
                          clockStart: clock(), timerAtStart: saved.timer)
        }
    }
}
