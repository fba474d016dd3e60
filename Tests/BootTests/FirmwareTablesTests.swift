import Boot
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
