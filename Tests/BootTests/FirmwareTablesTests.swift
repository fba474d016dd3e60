@testable import Boot
import Layout
import Devices
import Foundation
import Memory
import Testing

@Suite("MP table and ACPI tables")
struct FirmwareTablesTests {
    func sum(_ memory: GuestMemory, _ address: UInt64, _ count: Int) throws -> UInt8 {
        try memory.read(at: address, count: count).reduce(0, &+)
    }

    func signature(_ memory: GuestMemory, _ address: UInt64, _ count: Int = 4) throws -> String {
        String(decoding: try memory.read(at: address, count: count), as: UTF8.self)
    }

    @Test(arguments: [1, 2, 8, 254])
    func mpTableListsEveryCPUAndTheIOAPIC(cpus: Int) throws {
        let memory = try Images.memory()
        try FirmwareTables.write(into: memory, cpuCount: cpus)
        let pointer = BootLayout.mpTable
        #expect(try signature(memory, pointer) == "_MP_")
        #expect(try sum(memory, pointer, 16) == 0)
        #expect(pointer % 16 == 0 && pointer >= 0xF0000 && pointer < 0x100000)
        let config = UInt64(try memory.load(UInt32.self, at: pointer + 4))
        #expect(try signature(memory, config) == "PCMP")
        let length = Int(try memory.load(UInt16.self, at: config + 4))
        #expect(try sum(memory, config, length) == 0)
        #expect(try memory.load(UInt32.self, at: config + 36) == 0xFEE0_0000)
        let count = Int(try memory.load(UInt16.self, at: config + 34))
        var position = config + 44
        var processors: [UInt8] = [], ioapics: [UInt8] = [], interrupts: [(UInt8, UInt8)] = []
        for _ in 0..<count {
            let type = try memory.load(UInt8.self, at: position)
            switch type {
            case 0:
                processors.append(try memory.load(UInt8.self, at: position + 1))
                let flags = try memory.load(UInt8.self, at: position + 3)
                #expect(flags & 1 == 1)
                #expect((flags & 2 != 0) == (processors.count == 1))
                position += 20
            case 2:
                ioapics.append(try memory.load(UInt8.self, at: position + 1))
                #expect(try memory.load(UInt32.self, at: position + 4) == 0xFEC0_0000)
                position += 8
            case 3:
                interrupts.append((try memory.load(UInt8.self, at: position + 5), try memory.load(UInt8.self, at: position + 7)))
                position += 8
            default:
                position += 8
            }
        }
        #expect(position == config + UInt64(length))
        #expect(processors == (0..<cpus).map { UInt8($0) })
        #expect(ioapics == [UInt8(cpus)])
        #expect(interrupts.map(\.0) == (0..<16).map { UInt8($0) })
        #expect(interrupts.allSatisfy { $0.0 == $0.1 })
    }

    @Test func acpiTablesHaveValidChecksumsAndContent() throws {
        let memory = try Images.memory()
        let cpus = 3
        let rsdp = try FirmwareTables.write(into: memory, cpuCount: cpus)
        #expect(rsdp >= 0xE0000 && rsdp < 0x100000 && rsdp % 16 == 0)
        #expect(try signature(memory, rsdp, 8) == "RSD PTR ")
        #expect(try sum(memory, rsdp, 20) == 0)
        #expect(try sum(memory, rsdp, 36) == 0)
        #expect(try memory.load(UInt8.self, at: rsdp + 15) == 2)

        func table(_ address: UInt64) throws -> (String, Int) {
            let length = Int(try memory.load(UInt32.self, at: address + 4))
            let name = try signature(memory, address)
            #expect(try sum(memory, address, length) == 0, "checksum of \(name)")
            return (name, length)
        }
        let xsdt = try memory.load(UInt64.self, at: rsdp + 24)
        let (xsdtSignature, xsdtLength) = try table(xsdt)
        #expect(xsdtSignature == "XSDT")
        let rsdt = UInt64(try memory.load(UInt32.self, at: rsdp + 16))
        #expect(try table(rsdt).0 == "RSDT")
        var found: [String: UInt64] = [:]
        for index in 0..<((xsdtLength - 36) / 8) {
            let address = try memory.load(UInt64.self, at: xsdt + 36 + UInt64(index) * 8)
            found[try table(address).0] = address
        }
        let madt = try #require(found["APIC"])
        let fadt = try #require(found["FACP"])
        // FADT -> DSDT, both 32- and 64-bit pointers.
        let dsdt = UInt64(try memory.load(UInt32.self, at: fadt + 40))
        #expect(try memory.load(UInt64.self, at: fadt + 140) == dsdt)
        #expect(try table(dsdt).0 == "DSDT")
        #expect(try table(fadt).1 == 276)
        // XSDT lists the MADT and the FADT; the FACS and the DSDT hang off the FADT.
        #expect(Set(found.keys) == ["APIC", "FACP"])

        // MADT entries.
        let madtLength = try table(madt).1
        #expect(try memory.load(UInt32.self, at: madt + 36) == 0xFEE0_0000)
        var position = madt + 44
        var apicIDs: [UInt8] = [], ioapicIDs: [UInt8] = [], overrides: [(UInt8, UInt32)] = []
        while position < madt + UInt64(madtLength) {
            let type = try memory.load(UInt8.self, at: position)
            let length = try memory.load(UInt8.self, at: position + 1)
            switch type {
            case 0:
                apicIDs.append(try memory.load(UInt8.self, at: position + 3))
                #expect(try memory.load(UInt32.self, at: position + 4) & 1 == 1)
            case 1:
                ioapicIDs.append(try memory.load(UInt8.self, at: position + 2))
                #expect(try memory.load(UInt32.self, at: position + 4) == 0xFEC0_0000)
                #expect(try memory.load(UInt32.self, at: position + 8) == 0)
            case 2:
                overrides.append((try memory.load(UInt8.self, at: position + 3), try memory.load(UInt32.self, at: position + 4)))
            default: break
            }
            #expect(length > 0)
            position += UInt64(max(length, 1))
        }
        #expect(position == madt + UInt64(madtLength))
        #expect(apicIDs == [0, 1, 2])
        #expect(ioapicIDs == [3])
        #expect(!overrides.contains { $0.0 == 0 })
    }

    /// The FADT, FACS and DSDT as a kernel finds them: RSDP -> XSDT -> FACP -> FACS, DSDT.
    struct ACPITables {
        let fadt: [UInt8]
        let facsAddress: UInt64
        let facs: [UInt8]
        let dsdt: [UInt8]
    }

    func acpiTables(cpus: Int = 1) throws -> ACPITables {
        let memory = try Images.memory()
        let rsdp = try FirmwareTables.write(into: memory, cpuCount: cpus)
        let xsdt = try memory.load(UInt64.self, at: rsdp + 24)
        let count = (Int(try memory.load(UInt32.self, at: xsdt + 4)) - 36) / 8
        var fadtAddress: UInt64?
        for index in 0..<count {
            let address = try memory.load(UInt64.self, at: xsdt + 36 + UInt64(index) * 8)
            if try signature(memory, address) == "FACP" { fadtAddress = address }
        }
        let fadtAt = try #require(fadtAddress)
        let fadt = try memory.read(at: fadtAt, count: Int(try memory.load(UInt32.self, at: fadtAt + 4)))
        let facsAddress = UInt64(try #require(fadt.le(UInt32.self, at: 36)))
        let facs = try memory.read(at: facsAddress, count: 64)
        let dsdtAddress = try #require(fadt.le(UInt64.self, at: 140))
        let dsdt = try memory.read(at: dsdtAddress, count: Int(try memory.load(UInt32.self, at: dsdtAddress + 4)))
        return ACPITables(fadt: fadt, facsAddress: facsAddress, facs: facs, dsdt: dsdt)
    }

    /// A generic address structure at `offset`: (space, bit width, bit offset, access size, address).
    func genericAddress(_ table: [UInt8], _ offset: Int) -> (UInt8, UInt8, UInt8, UInt8, UInt64?) {
        (table[offset], table[offset + 1], table[offset + 2], table[offset + 3], table.le(UInt64.self, at: offset + 4))
    }

    @Test("FADT: revision 6, not hardware-reduced, PM1a blocks and PM timer at the ACPILayout ports")
    func fadtPowerManagementBlocks() throws {
        let fadt = try acpiTables().fadt
        #expect(fadt.count == 276)
        #expect(fadt.reduce(0, &+) == 0, "checksum")
        #expect(fadt[8] == 6)                                           // revision
        #expect(fadt.le(UInt16.self, at: 46) == 9)                      // SCI_INT
        #expect(fadt.le(UInt32.self, at: 48) == 0)                      // SMI_CMD: always in ACPI mode
        #expect(fadt.le(UInt32.self, at: 56) == 0x600)                  // PM1a_EVT_BLK
        #expect(fadt.le(UInt32.self, at: 60) == 0)                      // no PM1b
        #expect(fadt.le(UInt32.self, at: 64) == 0x604)                  // PM1a_CNT_BLK
        #expect(fadt.le(UInt32.self, at: 76) == 0x608)                  // PM_TMR_BLK
        #expect(fadt.le(UInt32.self, at: 80) == 0)                      // no GPE0 block
        #expect(fadt[88] == 4 && fadt[89] == 2 && fadt[91] == 4)        // PM1_EVT_LEN, PM1_CNT_LEN, PM_TMR_LEN
        #expect(fadt.le(UInt16.self, at: 96)! > 100)                    // no C2
        #expect(fadt.le(UInt16.self, at: 98)! > 1000)                   // no C3
        #expect(fadt[108] == 0x32)                                      // CENTURY in CMOS
        #expect(fadt.le(UInt16.self, at: 109) == 0x3)                   // legacy devices, 8042
        let flags = try #require(fadt.le(UInt32.self, at: 112))
        #expect(flags & (1 << 20) == 0, "HW_REDUCED_ACPI must be clear with PM1 blocks")
        #expect(flags & (1 << 8) == 0, "TMR_VAL_EXT: the timer counts 24 bits")
        #expect(flags & (1 << 4) != 0 && flags & (1 << 5) != 0, "no fixed power or sleep button")
        // The X_ fields say the same in generic address structures (system I/O).
        #expect(genericAddress(fadt, 148) == (1, 32, 0, 0, 0x600))
        #expect(genericAddress(fadt, 160).4 == 0)                       // X_PM1b_EVT_BLK
        #expect(genericAddress(fadt, 172) == (1, 16, 0, 0, 0x604))
        #expect(genericAddress(fadt, 208) == (1, 32, 0, 0, 0x608))
        #expect(genericAddress(fadt, 220).4 == 0)                       // X_GPE0_BLK
        #expect(genericAddress(fadt, 244).4 == 0)                       // no sleep control register
        // And the same numbers as the device the machine registers.
        #expect(UInt64(fadt.le(UInt32.self, at: 64)!) == ACPILayout.pm1aControlBlock)
        #expect(UInt64(fadt.le(UInt32.self, at: 56)!) == ACPILayout.pm1aEventBlock)
        #expect(UInt64(fadt.le(UInt32.self, at: 76)!) == ACPILayout.pmTimerBlock)
    }

    @Test("FADT: RESET_REG is port 0xCF9, one byte, value 0x06, RESET_REG_SUP set")
    func fadtResetRegister() throws {
        let fadt = try acpiTables().fadt
        let flags = try #require(fadt.le(UInt32.self, at: 112))
        #expect(flags & (1 << 10) != 0)
        #expect(genericAddress(fadt, 116) == (1, 8, 0, 1, 0xCF9))
        #expect(fadt[128] == 0x06)
        #expect(genericAddress(fadt, 116).4 == ResetControl.port)
        #expect(fadt[128] == ACPILayout.resetValue)
    }

    @Test("FACS: 64 bytes, 64-byte aligned, named by FIRMWARE_CTRL only")
    func facs() throws {
        let tables = try acpiTables()
        #expect(tables.facsAddress % 64 == 0)
        #expect(tables.facsAddress >= 0xE0000 && tables.facsAddress < 0xF0000)
        #expect(String(decoding: tables.facs[0..<4], as: UTF8.self) == "FACS")
        #expect(tables.facs.le(UInt32.self, at: 4) == 64)
        #expect(tables.facs.le(UInt32.self, at: 16) == 0)                // global lock free
        #expect(tables.fadt.le(UInt64.self, at: 132) == 0)              // X_FIRMWARE_CTRL
        // The FACS does not overlap the FADT or the DSDT.
        let fadtAddress = UInt64(BootLayout.acpiTables) + FirmwareTables.fadtOffset
        #expect(tables.facsAddress >= fadtAddress + UInt64(tables.fadt.count))
        #expect(tables.facsAddress + 64 <= UInt64(BootLayout.acpiTables) + FirmwareTables.dsdtOffset)
    }

    @Test("DSDT: \\_S5 is a package whose first element is the S5 sleep type")
    func dsdtSleepState() throws {
        let dsdt = try acpiTables().dsdt
        #expect(dsdt.reduce(0, &+) == 0, "checksum")
        let body = Array(dsdt[36...])
        // NameOp, root, "_S5_", PackageOp: found by its bytes, as a guest scanning AML would.
        let pattern: [UInt8] = [0x08, 0x5C, 0x5F, 0x53, 0x35, 0x5F, 0x12]
        let start = try #require((0...(body.count - pattern.count)).first { Array(body[$0..<($0 + pattern.count)]) == pattern })
        var position = start + pattern.count
        let length = Int(body[position])                       // one-byte PkgLength
        #expect(length < 0x40)
        #expect(position + length <= body.count)
        position += 1
        #expect(body[position] >= 2)                           // SLP_TYPa and SLP_TYPb at least
        position += 1
        func integer() -> UInt64? {
            defer { position += body[position] == 0x0A ? 2 : 1 }
            switch body[position] {
            case 0x00: return 0
            case 0x01: return 1
            case 0x0A: return UInt64(body[position + 1])
            default: return nil
            }
        }
        #expect(integer() == UInt64(ACPILayout.s5SleepType))  // SLP_TYPa
        #expect(integer() == UInt64(ACPILayout.s5SleepType))  // SLP_TYPb
        // Nothing else in the DSDT: no \_S3 or \_S4.
        #expect(!body.indices.dropLast(3).contains { Array(body[$0..<($0 + 4)]) == Array("_S3_".utf8) })
        #expect(body == AML.name("\\_S5", .package([.integer(0), .integer(0), .integer(0), .integer(0)])).encoded)
    }

    @Test func irq0OverrideWhenAsked() throws {
        let memory = try Images.memory()
        let rsdp = try FirmwareTables.write(into: memory, cpuCount: 1, irq0ToGSI2: true)
        let xsdt = try memory.load(UInt64.self, at: rsdp + 24)
        let madt = try memory.load(UInt64.self, at: xsdt + 36)
        let bytes = try memory.read(at: madt, count: Int(try memory.load(UInt32.self, at: madt + 4)))
        // An override entry: type 2, length 10, bus 0, source 0, GSI 2.
        let found = (44..<(bytes.count - 9)).contains { bytes[$0] == 2 && bytes[$0 + 1] == 10 && bytes[$0 + 3] == 0 && bytes[$0 + 4] == 2 }
        #expect(found)
    }

    @Test func refusesTooManyCPUs() throws {
        let memory = try Images.memory()
        #expect(throws: BootError.tooManyCPUs(255, maximum: 254)) { try FirmwareTables.write(into: memory, cpuCount: 255) }
        #expect(throws: BootError.tooManyCPUs(0, maximum: 254)) {
            try KernelImage.load(VmlinuxTests.vmlinux(), into: memory, options: BootOptions(cpuCount: 0))
        }
    }
}
