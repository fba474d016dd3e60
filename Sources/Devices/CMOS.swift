import Synchronization

/// The MC146818 real-time clock and CMOS memory at ports 0x70 (index) and 0x71 (data).
///
/// Owns the 128 bytes of CMOS memory and the selected index. Register it at
/// ``basePort`` with length ``portCount``. Bit 7 of the index write is the NMI-disable
/// bit: it is kept (a snapshot records it) and has no effect (KVM delivers NMIs itself). The time registers (0x00-0x09, century 0x32) are computed on
/// each read from the injected clock, in BCD and 24-hour mode unless the guest changes
/// status register B's data-mode bits. Guest writes to the time registers are ignored
/// (the host clock stays the source of truth). Status A reports no update in progress,
/// C no pending interrupt, D valid RAM and time.
///
/// The memory-size bytes firmware-era software reads are filled from the RAM layout:
/// 0x15/0x16 base memory (640 KiB), 0x17/0x18 and 0x30/0x31 KiB above 1 MiB (at most
/// 0xFFFF), 0x34/0x35 64 KiB units above 16 MiB below 4 GiB, 0x5B-0x5D 64 KiB units above
/// 4 GiB, 0x5F the vCPU count minus one (as QEMU sets them for SeaBIOS).
public final class CMOS: IODevice {
    public static let basePort: UInt64 = 0x70
    public static let portCount: UInt64 = 2

    static let seconds = 0x00, minutes = 0x02, hours = 0x04, weekday = 0x06
    static let dayOfMonth = 0x07, month = 0x08, year = 0x09, century = 0x32
    static let statusA = 0x0A, statusB = 0x0B, statusC = 0x0C, statusD = 0x0D
    static let statusB24Hour: UInt8 = 0x02
    static let statusBBinary: UInt8 = 0x04

    struct State {
        var index = 0
        var memory = [UInt8](repeating: 0, count: 128)
        /// Bit 7 of the last index write.
        var nmiDisabled = false
    }

    private let state: Mutex<State>
    private let now: @Sendable () -> Int64

    /// - Parameters:
    ///   - ramBelow4G: bytes of RAM below 4 GiB; `ramAbove4G`: bytes from 4 GiB up.
    ///   - cpuCount: vCPUs (CMOS 0x5F, QEMU's convention).
    ///   - now: the current time as seconds since 1970-01-01 UTC (the host's clock in the
    ///     machine, a fixed value in tests).
    public init(ramBelow4G: UInt64, ramAbove4G: UInt64 = 0, cpuCount: Int = 1, now: @escaping @Sendable () -> Int64) {
        self.now = now
        var memory = [UInt8](repeating: 0, count: 128)
        memory[Self.statusA] = 0x26     // 32.768 kHz time base, 1024 Hz periodic rate
        memory[Self.statusB] = Self.statusB24Hour
        memory[Self.statusD] = 0x80     // valid RAM and time
        func put16(_ value: UInt64, _ low: Int) {
            let clamped = min(value, 0xFFFF)
            memory[low] = UInt8(clamped & 0xFF)
            memory[low + 1] = UInt8(clamped >> 8)
        }
        put16(640, 0x15)
        let extended = ramBelow4G > 0x10_0000 ? (ramBelow4G - 0x10_0000) / 1024 : 0
        put16(extended, 0x17)
        put16(extended, 0x30)
        put16(ramBelow4G > 0x100_0000 ? (ramBelow4G - 0x100_0000) / 65536 : 0, 0x34)
        let high = min(ramAbove4G / 65536, 0xFF_FFFF)
        memory[0x5B] = UInt8(high & 0xFF)
        memory[0x5C] = UInt8((high >> 8) & 0xFF)
        memory[0x5D] = UInt8(high >> 16)
        memory[0x5F] = UInt8(clamping: max(cpuCount, 1) - 1)
        state = Mutex(State(index: 0, memory: memory))
    }

    public func read(offset: UInt64, into data: UnsafeMutableRawBufferPointer) {
        var value: UInt8 = 0xFF
        if offset == 1 {
            value = state.withLock { state in register(state.index, state.memory) }
        }
        for index in data.indices { data[index] = index == 0 ? value : 0xFF }
    }

    public func write(offset: UInt64, from data: UnsafeRawBufferPointer) {
        guard let value = data.first else { return }
        state.withLock { state in
            if offset == 0 {
                state.index = Int(value & 0x7F)
                state.nmiDisabled = value & 0x80 != 0   // kept, not modelled
            } else if offset == 1 {
                switch state.index {
                case Self.seconds...Self.year, Self.century, Self.statusC, Self.statusD:
                    break                             // clock and read-only status
                case Self.statusA:
                    state.memory[Self.statusA] = value & 0x7F   // UIP is read-only
                default:
                    state.memory[state.index] = value
                }
            }
        }
    }

    /// The value of register `index`: time fields from the clock, the rest from memory.
    private func register(_ index: Int, _ memory: [UInt8]) -> UInt8 {
        let mode = memory[Self.statusB]
        switch index {
        case Self.seconds...Self.year, Self.century:
            let time = CivilTime(unixSeconds: now())
            let binary = mode & Self.statusBBinary != 0
            func encode(_ value: Int) -> UInt8 {
                let value = UInt8(clamping: value)
                return binary ? value : (value / 10) << 4 | (value % 10)
            }
            switch index {
            case Self.seconds: return encode(time.second)
            case Self.minutes: return encode(time.minute)
            case Self.hours:
                if mode & Self.statusB24Hour != 0 { return encode(time.hour) }
                let hour12 = time.hour % 12 == 0 ? 12 : time.hour % 12
                return encode(hour12) | (time.hour >= 12 ? 0x80 : 0)
            case Self.weekday: return encode(time.weekday + 1)     // 1 = Sunday
            case Self.dayOfMonth: return encode(time.day)
            case Self.month: return encode(time.month)
            case Self.year: return encode(time.year % 100)
            case Self.century: return encode(time.year / 100)
            default: return 0                                     // alarm registers
            }
        default:
            return memory[index]
        }
    }
}

// MARK: Snapshot

extension CMOS: SnapshotDevice {
    /// The 128 bytes of CMOS memory, the selected index and the NMI-disable bit. The time
    /// is not saved: it keeps coming from the host clock, as it does on a PC whose RTC
    /// runs on while the machine is off.
    public struct SavedState: Codable, Sendable, Equatable {
        public var index: Int
        public var nmiDisabled: Bool
        public var memory: [UInt8]
    }

    static let deviceName = "CMOS RTC"

    public func saveState() -> SavedState {
        state.withLock { SavedState(index: $0.index, nmiDisabled: $0.nmiDisabled, memory: $0.memory) }
    }

    /// Checks `saved` (128 bytes, an index below 128, status registers a guest cannot
    /// change still as the device made them) and puts it back.
    public func restoreState(_ saved: SavedState) throws(DeviceStateError) {
        func refuse(_ reason: String) -> DeviceStateError { DeviceStateError(device: Self.deviceName, reason) }
        guard saved.memory.count == 128 else { throw refuse("\(saved.memory.count) bytes of CMOS memory, not 128") }
        guard (0..<128).contains(saved.index) else { throw refuse("index \(saved.index) is outside the 128 registers") }
        let current = state.withLock { $0.memory }
        // The clock registers, status C and D, and status A's update-in-progress bit are
        // never written by the guest.
        let fixed = Array(Self.seconds...Self.year) + [Self.century, Self.statusC, Self.statusD]
        if let register = fixed.first(where: { saved.memory[$0] != current[$0] }) {
            throw refuse("register 0x\(String(register, radix: 16)) is read-only, but holds 0x\(String(saved.memory[register], radix: 16))")
        }
        guard saved.memory[Self.statusA] & 0x80 == 0 else { throw refuse("status A has the read-only update-in-progress bit set") }
        state.withLock { state in
            state = State(index: saved.index, memory: saved.memory, nmiDisabled: saved.nmiDisabled)
        }
    }
}

/// A UTC calendar date and time from a Unix timestamp (proleptic Gregorian calendar;
/// Howard Hinnant's days-to-civil algorithm).
struct CivilTime: Equatable {
    var year: Int, month: Int, day: Int, hour: Int, minute: Int, second: Int
    /// 0 = Sunday.
    var weekday: Int

    init(unixSeconds: Int64) {
        let secondsPerDay: Int64 = 86_400
        var days = unixSeconds / secondsPerDay
        var rest = unixSeconds % secondsPerDay
        if rest < 0 { rest += secondsPerDay; days -= 1 }
        hour = Int(rest / 3600); minute = Int(rest % 3600 / 60); second = Int(rest % 60)
        weekday = Int(((days % 7) + 11) % 7)       // 1970-01-01 was a Thursday (4)
        let z = days + 719_468
        let era = (z >= 0 ? z : z - 146_096) / 146_097
        let dayOfEra = z - era * 146_097
        let yearOfEra = (dayOfEra - dayOfEra / 1460 + dayOfEra / 36524 - dayOfEra / 146_096) / 365
        let dayOfYear = dayOfEra - (365 * yearOfEra + yearOfEra / 4 - yearOfEra / 100)
        let mp = (5 * dayOfYear + 2) / 153
        day = Int(dayOfYear - (153 * mp + 2) / 5 + 1)
        month = Int(mp < 10 ? mp + 3 : mp - 9)
        year = Int(yearOfEra + era * 400) + (month <= 2 ? 1 : 0)
    }
}
