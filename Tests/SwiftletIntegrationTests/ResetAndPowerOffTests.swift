import Foundation
import Testing

/// Every way a PC guest resets or powers off the machine ends the VM with its documented
/// status and one line on stderr naming the path (docs/booting.md, "Reset and power-off").
/// The keyboard controller and the triple fault have their tests in ``StopTests``.
@Suite("Reset and power-off paths")
struct ResetAndPowerOffTests {
    /// Runs `code` as a flat binary (real mode at 0x7C00).
    func runFlat(_ code: [UInt8], name: String) throws -> Swiftlet.Result {
        let path = try temporaryFile(code, name: name)
        defer { try? FileManager.default.removeItem(at: path) }
        return try Swiftlet.run(["run", "--flat", path.path, "--timeout", "30"])
    }

    @Test("Port 0xCF9 as Linux's reboot=pci writes it: 0x02 (reads back, no reset), then 0x06: status 6")
    func resetControlRegister() throws {
        //   mov $0xcf9, %dx; mov $0x02, %al; out %al, %dx; in %dx, %al; cmp $0x02, %al; jne bad
        //   mov $0x06, %al; out %al, %dx; 1: jmp 1b
        //   bad: mov $1, %al; out %al, $0xf4; jmp bad
        let code: [UInt8] = [0xBA, 0xF9, 0x0C, 0xB0, 0x02, 0xEE, 0xEC, 0x3C, 0x02, 0x75, 0x05,
                             0xB0, 0x06, 0xEE, 0xEB, 0xFE, 0xB0, 0x01, 0xE6, 0xF4, 0xEB, 0xFA]
        let result = try runFlat(code, name: "cf9.bin")
        #expect(result.status == 6, "stdout: \(result.stdout) stderr: \(result.stderr)")
        #expect(result.stderr == "swiftlet: the guest asked for a reset (reset control register at port 0xCF9, the FADT's RESET_REG: wrote 0x06, hard reset)\n")
    }

    @Test("Port 0x92: A20 reads as enabled, setting bit 0 resets: status 6")
    func systemControlPortA() throws {
        //   in $0x92, %al; test $0x02, %al; jz bad; or $0x01, %al; out %al, $0x92; 1: jmp 1b
        //   bad: mov $1, %al; out %al, $0xf4; jmp bad
        let code: [UInt8] = [0xE4, 0x92, 0xA8, 0x02, 0x74, 0x06, 0x0C, 0x01, 0xE6, 0x92, 0xEB, 0xFE,
                             0xB0, 0x01, 0xE6, 0xF4, 0xEB, 0xFA]
        let result = try runFlat(code, name: "port92.bin")
        #expect(result.status == 6, "stdout: \(result.stdout) stderr: \(result.stderr)")
        #expect(result.stderr == "swiftlet: the guest asked for a reset (system control port A at port 0x92: fast reset, bit 0)\n")
    }

    @Test("0x2000 (SLP_EN, SLP_TYP 0 = S5) to PM1a_CNT at 0x604, the documented port and value: status 0")
    func powerOffThroughPM1aControl() throws {
        //   mov $0x604, %dx; mov $0x2000, %ax; out %ax, %dx; 1: jmp 1b
        let code: [UInt8] = [0xBA, 0x04, 0x06, 0xB8, 0x00, 0x20, 0xEF, 0xEB, 0xFE]
        let result = try runFlat(code, name: "s5.bin")
        #expect(result.status == 0, "stdout: \(result.stdout) stderr: \(result.stderr)")
        #expect(result.stderr == "swiftlet: the guest powered off (ACPI sleep state S5: SLP_TYP 0 with SLP_EN written to PM1a_CNT at port 0x604)\n")
    }

    @Test("A sleep type the DSDT does not offer (SLP_TYP 1, QEMU's S3) is ignored: the guest runs on")
    func otherSleepTypesAreIgnored() throws {
        //   mov $0x604, %dx; mov $0x2400, %ax; out %ax, %dx; mov $0, %al; out %al, $0xf4; 1: jmp 1b
        let code: [UInt8] = [0xBA, 0x04, 0x06, 0xB8, 0x00, 0x24, 0xEF, 0xB0, 0x00, 0xE6, 0xF4, 0xEB, 0xFE]
        let result = try runFlat(code, name: "s3.bin")
        #expect(result.status == 1)
        #expect(result.stderr.isEmpty)
    }

    /// guests/acpi.s finds the RSDP, the FADT and the DSDT as a kernel does.
    static let acpiGuest = Swiftlet.packageRoot.appendingPathComponent("guests/build/acpi.elf").path

    @Test("guests/acpi.s reads the FADT's RESET_REG and writes its value there: status 6")
    func acpiResetRegister() throws {
        let result = try Swiftlet.run(["run", "--kernel", Self.acpiGuest, "--cmdline", "reset", "--timeout", "60"])
        #expect(result.status == 6, "stdout: \(result.stdout) stderr: \(result.stderr)")
        #expect(result.stdout.contains("RESET_REG: address space 0x00000001 (1 = port I/O), 0x00000008 bits at 0x00000cf9, reset value 0x00000006"))
        #expect(result.stdout.contains("PM timer: it counts"))
        #expect(result.stdout.contains("acpi: writing the reset value to RESET_REG"))
        #expect(result.stderr == "swiftlet: the guest asked for a reset (reset control register at port 0xCF9, the FADT's RESET_REG: wrote 0x06, hard reset)\n")
    }

    @Test("guests/acpi.s reads \\_S5 from the DSDT and PM1a_CNT_BLK from the FADT, enters S5: status 0")
    func acpiPowerOff() throws {
        let result = try Swiftlet.run(["run", "--kernel", Self.acpiGuest, "--cmdline", "poweroff", "--timeout", "60"])
        #expect(result.status == 0, "stdout: \(result.stdout) stderr: \(result.stderr)")
        #expect(result.stdout.contains("PM1a_CNT_BLK: port 0x00000604"))
        #expect(result.stdout.contains("PM_TMR_BLK: port 0x00000608"))
        #expect(result.stdout.contains("\\_S5: SLP_TYPa = 0x00000000"))
        #expect(result.stdout.contains("acpi: writing SLP_TYPa, then SLP_TYPa | SLP_EN, to PM1a_CNT"))
        #expect(!result.stdout.contains("still running"))
        #expect(result.stderr == "swiftlet: the guest powered off (ACPI sleep state S5: SLP_TYP 0 with SLP_EN written to PM1a_CNT at port 0x604)\n")
    }

    @Test("guests/acpi.s with nothing to do exits through port 0xF4: status 1")
    func acpiNothingToDo() throws {
        let result = try Swiftlet.run(["run", "--kernel", Self.acpiGuest, "--timeout", "60"])
        #expect(result.status == 1, "stdout: \(result.stdout) stderr: \(result.stderr)")
        #expect(result.stdout.contains("acpi: nothing to do"))
        #expect(result.stderr.isEmpty)
    }

    @Test("The same guest under QEMU's q35 machine (the reference) finds the same ports and resets or powers off there too",
          arguments: ["reset", "poweroff"])
    func acpiGuestUnderQEMU(action: String) throws {
        // -no-reboot turns the reset into QEMU's exit; the exit port would report a failure
        // (the guest's "still running" path) as status 3.
        let result = try Swiftlet.runShell("""
            timeout 120 qemu-system-x86_64 -enable-kvm -machine q35 -m 64 -nographic -no-reboot -net none \
              -device isa-debug-exit,iobase=0xf4,iosize=4 -kernel '\(Self.acpiGuest)' -append \(action) 2>&1
            """)
        #expect(result.status == 0, "\(result.stdout)")
        #expect(result.stdout.contains("at 0x00000cf9, reset value"))
        #expect(result.stdout.contains("PM1a_CNT_BLK: port 0x00000604"))
        #expect(result.stdout.contains("\\_S5: SLP_TYPa = 0x00000000"))
        #expect(result.stdout.contains("acpi: writing"))
        #expect(!result.stdout.contains("still running"))
    }
}
