/// Where Swiftlet's PC keeps its ACPI fixed hardware: the one place that says which port
/// each register is at and which values mean what. The device models are registered at
/// these ports (`Board`), and `FirmwareTables` writes the same numbers into the FADT
/// and the DSDT, so the tables cannot describe hardware that is somewhere else.
///
/// The layout is QEMU's `pc` machine (PIIX4 power management at 0x600, the PIIX/ICH
/// reset control register at 0xCF9), so guests written for QEMU find the same ports:
///
/// | register | port | width | FADT field |
/// | --- | --- | --- | --- |
/// | PM1a event block: PM1_STS, PM1_EN | 0x600, 0x602 | 2 + 2 bytes | PM1a_EVT_BLK, PM1_EVT_LEN = 4 |
/// | PM1a control block: PM1_CNT | 0x604 | 2 bytes | PM1a_CNT_BLK, PM1_CNT_LEN = 2 |
/// | power management timer: PM_TMR | 0x608 | 4 bytes (24-bit count) | PM_TMR_BLK, PM_TMR_LEN = 4 |
/// | reset control register | 0xCF9 | 1 byte | RESET_REG, RESET_VALUE = 0x06 |
public enum ACPILayout {
    /// First port of the power management registers (PIIX4's PMBASE as QEMU sets it).
    public static let powerManagementBase: UInt64 = 0x600
    /// PM1a event block: PM1_STS (2 bytes) then PM1_EN (2 bytes).
    public static let pm1aEventBlock: UInt64 = powerManagementBase
    public static let pm1EventLength: UInt8 = 4
    /// PM1a control block: PM1_CNT.
    public static let pm1aControlBlock: UInt64 = powerManagementBase + 4
    public static let pm1ControlLength: UInt8 = 2
    /// The power management timer: a 24-bit count at ``ACPIPowerManagement/timerFrequency``.
    public static let pmTimerBlock: UInt64 = powerManagementBase + 8
    public static let pmTimerLength: UInt8 = 4
    /// Ports the power management device covers: the three blocks above (0x600-0x60B).
    public static let powerManagementLength: UInt64 = 12

    /// The ISA IRQ of the system control interrupt (SCI), as on PIIX4. Nothing raises it:
    /// see ``ACPIPowerManagement``.
    public static let sciIRQ: UInt16 = 9

    /// The sleep type (PM1_CNT.SLP_TYP) that the DSDT's `\_S5` names and that powers the
    /// machine off. 0, as in QEMU's `pc` DSDT, so the `outw(0x2000, 0x604)` that many
    /// hobby kernels use to power QEMU off works here too.
    public static let s5SleepType: UInt8 = 0

    /// The FADT's RESET_REG: the reset control register, written with RESET_VALUE.
    public static let resetRegister: UInt64 = ResetControl.port
    /// 0x06: SYS_RST (hard reset) with RST_CPU, what a PIIX/ICH BIOS advertises.
    public static let resetValue: UInt8 = 0x06
}
