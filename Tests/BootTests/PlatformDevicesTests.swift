@testable import Boot
import Basics
import Layout
import Foundation
import Memory
import Testing

/// The firmware tables with virtio-mmio devices and a PCI host bridge: the MCFG, the DSDT
/// devices as a guest finds them by their bytes, the MP table's PCI bus and INTx entries,
/// and the checks that refuse a platform the tables cannot describe truthfully.
@Suite("Firmware tables: platform devices")
struct PlatformDevicesTests {
    static let devices = PlatformDevices(virtioMMIO: [VirtioMMIODevice.slot(0)!, VirtioMMIODevice.slot(1)!],
                                         pci: .swiftlet(deviceSlots: [1, 2]))

    /// Every table the RSDP leads to, by signature, after checking each checksum.
    func tables(_ memory: GuestMemory, rsdp: UInt64) throws -> [String: [UInt8]] {
        func table(_ address: UInt64) throws -> [UInt8] {
            let length = Int(try memory.load(UInt32.self, at: address + 4))
            let bytes = try memory.read(at: address, count: length)
            #expect(bytes.reduce(0, &+) == 0, "checksum of \(String(decoding: bytes[0..<4], as: UTF8.self))")
            return bytes
        }
        let xsdt = try table(try memory.load(UInt64.self, at: rsdp + 24))
        let rsdt = try table(UInt64(try memory.load(UInt32.self, at: rsdp + 16)))
        var found: [String: [UInt8]] = [:]
        var addresses: [UInt64] = []
        for index in 0..<((xsdt.count - 36) / 8) {
            let address = try #require(xsdt.le(UInt64.self, at: 36 + index * 8))
            addresses.append(address)
            let bytes = try table(address)
            found[String(decoding: bytes[0..<4], as: UTF8.self)] = bytes
        }
        // The RSDT lists the same tables.
        #expect((0..<((rsdt.count - 36) / 4)).map { UInt64(rsdt.le(UInt32.self, at: 36 + $0 * 4)!) } == addresses)
        let fadt = try #require(found["FACP"])
        found["DSDT"] = try table(try #require(fadt.le(UInt64.self, at: 140)))
        return found
    }

    func position(of pattern: [UInt8], in bytes: [UInt8]) -> Int? {
        guard bytes.count >= pattern.count else { return nil }
        return (0...(bytes.count - pattern.count)).first { Array(bytes[$0..<($0 + pattern.count)]) == pattern }
    }

    @Test("Without devices: no MCFG, a DSDT with \\_S5 only, the MP table as before")
    func noDevicesChangeNothing() throws {
        let memory = try Images.memory()
        let rsdp = try FirmwareTables.write(into: memory, cpuCount: 2)
        let found = try tables(memory, rsdp: rsdp)
        #expect(Set(found.keys) == ["APIC", "FACP", "DSDT"])
        #expect(FirmwareTables.dsdt() == FirmwareTables.dsdt(.none))
        #expect(FirmwareTables.mpTable(cpuCount: 2, irq0ToGSI2: false) == FirmwareTables.mpTable(cpuCount: 2, irq0ToGSI2: false, devices: .none))
        #expect(try #require(found["DSDT"]).count == 36 + 13)
    }

    @Test("MCFG: listed in the XSDT and RSDT, 60 bytes, revision 1, ECAM 0xE0000000, segment 0, buses 0-0")
    func mcfg() throws {
        let memory = try Images.memory()
        let rsdp = try FirmwareTables.write(into: memory, cpuCount: 2, devices: Self.devices)
        let found = try tables(memory, rsdp: rsdp)
        #expect(Set(found.keys) == ["APIC", "FACP", "DSDT", "MCFG"])
        let mcfg = try #require(found["MCFG"])
        #expect(mcfg.count == 60)
        #expect(mcfg[8] == 1)
        #expect(String(decoding: mcfg[10..<16], as: UTF8.self) == "SWIFTL")
        #expect(mcfg.le(UInt64.self, at: 36) == 0)                        // reserved
        #expect(mcfg.le(UInt64.self, at: 44) == AddressMap.pciECAMStart)
        #expect(mcfg.le(UInt64.self, at: 44) == 0xE000_0000)
        #expect(mcfg.le(UInt16.self, at: 52) == 0)                        // segment group
        #expect(mcfg[54] == 0 && mcfg[55] == 0)                          // start and end bus
        #expect(mcfg.le(UInt32.self, at: 56) == 0)                        // reserved
        // It lies between the FACS and the DSDT and overlaps neither.
        let mcfgAddress = BootLayout.acpiTables + FirmwareTables.mcfgOffset
        #expect(mcfgAddress >= BootLayout.acpiTables + FirmwareTables.facsOffset + 64)
        #expect(mcfgAddress + 60 <= BootLayout.acpiTables + FirmwareTables.dsdtOffset)
        #expect(try memory.read(at: mcfgAddress, count: 60) == mcfg)
    }

    @Test("MCFG with a bus range: the base stays bus 0's, the reservation covers buses 2-5")
    func busRange() throws {
        var pci = PCIHostDescription.swiftlet(deviceSlots: [0])
        pci.busRange = 2...5
        let mcfg = FirmwareTables.mcfg(pci)
        #expect(mcfg[54] == 2 && mcfg[55] == 5)
        #expect(mcfg.le(UInt64.self, at: 44) == 0xE000_0000)
        #expect(pci.ecamRange == 0xE020_0000..<0xE060_0000)
        let dsdt = FirmwareTables.dsdt(PlatformDevices(pci: pci))
        // Memory32Fixed (ReadWrite, 0xE0200000, 0x00400000) and _BBN 2.
        #expect(position(of: [0x86, 0x09, 0x00, 0x01, 0x00, 0x00, 0x20, 0xE0, 0x00, 0x00, 0x40, 0x00], in: dsdt) != nil)
        #expect(position(of: [0x08] + Array("_BBN".utf8) + [0x0A, 0x02], in: dsdt) != nil)
    }

    @Test("DSDT: each virtio-mmio device's _HID, _UID, memory range and edge-triggered active-high GSI, as a guest reads them")
    func virtioMMIODevices() throws {
        let memory = try Images.memory()
        let rsdp = try FirmwareTables.write(into: memory, cpuCount: 1, devices: Self.devices)
        let dsdt = try #require(try tables(memory, rsdp: rsdp)["DSDT"])
        // \_S5 is still the first object.
        #expect(Array(dsdt[36..<43]) == [0x08, 0x5C, 0x5F, 0x53, 0x35, 0x5F, 0x12])
        for (index, device) in Self.devices.virtioMMIO.enumerated() {
            let name = try #require(position(of: Array("VR0\(index)".utf8), in: dsdt))
            #expect(Array(dsdt[(name - 4)..<(name - 2)]) == [0x5B, 0x82])   // DeviceOp, then a 2-byte PkgLength
            let body = Array(dsdt[name...])
            #expect(position(of: [0x08] + Array("_HID".utf8) + [0x0D] + Array("LNRO0005".utf8) + [0], in: body) == 4)
            var memory32: [UInt8] = [0x86, 0x09, 0x00, 0x01]
            memory32 += Array.littleEndian(UInt32(device.base)) + Array.littleEndian(UInt32(device.size))
            var interrupt: [UInt8] = [0x89, 0x06, 0x00, 0x03, 0x01]     // consumer, edge, active high, exclusive
            interrupt += Array.littleEndian(device.gsi)
            let crs = try #require(position(of: memory32 + interrupt + [0x79, 0x00], in: body))
            #expect(crs < 60)
        }
        #expect(Self.devices.virtioMMIO[0].base == 0xFEB0_0000 && Self.devices.virtioMMIO[0].gsi == 5)
        #expect(Self.devices.virtioMMIO[1].base == 0xFEB0_0200 && Self.devices.virtioMMIO[1].gsi == 6)
    }

    @Test("DSDT: PCI0's _PRT routes INTA-INTD of each slot straight to the swizzled GSIs")
    func pciRouting() throws {
        let dsdt = FirmwareTables.dsdt(Self.devices)
        let prt = try #require(position(of: [0x08] + Array("_PRT".utf8), in: dsdt))
        let body = Array(dsdt[(prt + 5)...])
        #expect(body[0] == 0x12)                                          // PackageOp
        #expect(body[3] == 8)                                             // 2 slots x 4 pins, after a 2-byte PkgLength
        var offset = 4
        for device: UInt32 in [1, 2] {
            for pin: UInt32 in 0..<4 {
                let gsi = 16 + (device + pin) % 4
                let pinBytes: [UInt8] = pin == 0 ? [0x00] : pin == 1 ? [0x01] : [0x0A, UInt8(pin)]
                let route: [UInt8] = [0x0C] + Array.littleEndian(device << 16 | 0xFFFF) + pinBytes + [0x00, 0x0A, UInt8(gsi)]
                #expect(body[offset] == 0x12 && Int(body[offset + 1]) == route.count + 2 && body[offset + 2] == 4)
                #expect(Array(body[(offset + 3)..<(offset + 3 + route.count)]) == route, "device \(device) pin \(pin)")
                offset += 3 + route.count
            }
        }
    }

    /// The MP table's entries: (type, bytes).
    func mpEntries(_ memory: GuestMemory) throws -> [[UInt8]] {
        let config = UInt64(try memory.load(UInt32.self, at: BootLayout.mpTable + 4))
        let length = Int(try memory.load(UInt16.self, at: config + 4))
        let table = try memory.read(at: config, count: length)
        #expect(table.reduce(0, &+) == 0)
        var entries: [[UInt8]] = []
        var offset = 44
        for _ in 0..<Int(table.le(UInt16.self, at: 34)!) {
            let size = table[offset] == 0 ? 20 : 8
            entries.append(Array(table[offset..<(offset + size)]))
            offset += size
        }
        #expect(offset == length)
        return entries
    }

    @Test("MP table: PCI bus 0 and ISA bus 1, ISA IRQs on bus 1, INTx level/low per slot and pin, virtio GSIs above 15 edge/high")
    func mpTable() throws {
        let memory = try Images.memory()
        var devices = Self.devices
        devices.virtioMMIO.append(VirtioMMIODevice(base: 0xFEB0_1000, size: 0x200, gsi: 21))
        try FirmwareTables.write(into: memory, cpuCount: 2, devices: devices)
        let entries = try mpEntries(memory)
        let buses = entries.filter { $0[0] == 1 }
        #expect(buses == [[1, 0] + Array("PCI   ".utf8), [1, 1] + Array("ISA   ".utf8)])
        let interrupts = entries.filter { $0[0] == 3 }
        let isa = interrupts.filter { $0[4] == 1 }
        let pci = interrupts.filter { $0[4] == 0 }
        #expect(isa.count == 17)
        #expect(isa.prefix(16).map { $0[5] } == (0..<16).map { UInt8($0) })
        #expect(isa.prefix(16).allSatisfy { $0[2] == 0 && $0[3] == 0 && $0[5] == $0[7] && $0[6] == 2 })
        #expect(isa[16] == [3, 0, 0x05, 0x00, 1, 21, 2, 21])              // edge, active high
        #expect(pci.count == 8)
        for (index, entry) in pci.enumerated() {
            let device = UInt8([1, 2][index / 4]), pin = UInt8(index % 4)
            #expect(entry == [3, 0, 0x0F, 0x00, 0, device << 2 | pin, 2, 16 + (device + pin) % 4])
        }
        // Order: processors, buses, IOAPIC, I/O interrupts, local interrupts.
        #expect(entries.map { $0[0] } == [0, 0, 1, 1, 2] + Array(repeating: 3, count: 25) + [4, 4])
    }

    @Test("The Swiftlet layout: virtio-mmio slots and the PCI host from AddressMap and InterruptMap")
    func swiftletLayout() {
        #expect(VirtioMMIODevice.slot(3) == VirtioMMIODevice(base: 0xFEB0_0600, size: 0x200, gsi: InterruptMap.virtioMMIO[3]))
        #expect(VirtioMMIODevice.slot(16) == nil && VirtioMMIODevice.slot(-1) == nil)
        let pci = PCIHostDescription.swiftlet(deviceSlots: [0, 5])
        #expect(pci.ecamBase == 0xE000_0000 && pci.busRange == 0...0)
        #expect(pci.memoryWindow == 0xC000_0000..<0xE000_0000)
        #expect(pci.ioWindows == [0x0000...0x0CF7, 0x0D00...0xFFFF] && pci.configurationPorts)
        #expect(pci.slots == [PCISlotInterrupts(device: 0, gsis: [16, 17, 18, 19]), PCISlotInterrupts(device: 5, gsis: [17, 18, 19, 16])])
    }

    @Test("An I/O window of all 64 Ki ports is a DWordIO (a WordIO's length cannot say 0x10000)")
    func fullIOWindow() {
        var pci = PCIHostDescription.swiftlet(deviceSlots: [])
        pci.ioWindows = [0x0000...0xFFFF]
        pci.configurationPorts = false
        let dsdt = FirmwareTables.dsdt(PlatformDevices(pci: pci))
        #expect(position(of: [0x87, 0x17, 0x00, 0x01, 0x0C, 0x03], in: dsdt) != nil)
        #expect(position(of: [0x47, 0x01, 0xF8, 0x0C], in: dsdt) == nil)
        #expect(position(of: Array("_PRT".utf8), in: dsdt) == nil)        // no slots, no routing table
    }

    static let refused: [(String, PlatformDevices)] = {
        let slot0 = VirtioMMIODevice.slot(0)!
        var cases: [(String, PlatformDevices)] = []
        func pci(_ change: (inout PCIHostDescription) -> Void) -> PlatformDevices {
            var pci = PCIHostDescription.swiftlet(deviceSlots: [1])
            change(&pci)
            return PlatformDevices(pci: pci)
        }
        cases.append(("overlaps virtio-mmio device 0", PlatformDevices(virtioMMIO: [slot0, VirtioMMIODevice(base: 0xFEB0_0100, size: 0x200, gsi: 6)])))
        cases.append(("overlaps guest RAM", PlatformDevices(virtioMMIO: [VirtioMMIODevice(base: 0x10_0000, size: 0x200, gsi: 5)])))
        cases.append(("overlaps the IOAPIC", PlatformDevices(virtioMMIO: [VirtioMMIODevice(base: 0xFEC0_0000, size: 0x200, gsi: 5)])))
        cases.append(("ends above 4 GiB", PlatformDevices(virtioMMIO: [VirtioMMIODevice(base: 0xFFFF_FF00, size: 0x200, gsi: 5)])))
        cases.append(("is empty", PlatformDevices(virtioMMIO: [VirtioMMIODevice(base: 0xFEB0_0000, size: 0, gsi: 5)])))
        cases.append(("more than a 32-bit range holds", PlatformDevices(virtioMMIO: [VirtioMMIODevice(base: UInt64.max - 1, size: 0x200, gsi: 5)])))
        cases.append(("the IOAPIC has pins 0-23", PlatformDevices(virtioMMIO: [VirtioMMIODevice(base: 0xFEB0_0000, size: 0x200, gsi: 24)])))
        cases.append(("a platform device's", PlatformDevices(virtioMMIO: [VirtioMMIODevice(base: 0xFEB0_0000, size: 0x200, gsi: 9)])))
        cases.append(("a platform device's", PlatformDevices(virtioMMIO: [VirtioMMIODevice(base: 0xFEB0_0000, size: 0x200, gsi: 4)])))
        cases.append(("like another virtio-mmio device", PlatformDevices(virtioMMIO: [slot0, VirtioMMIODevice(base: 0xFEB0_0200, size: 0x200, gsi: 5)])))
        cases.append(("which PCI INTx uses", PlatformDevices(virtioMMIO: [VirtioMMIODevice.slot(8)!], pci: .swiftlet(deviceSlots: [0]))))
        cases.append(("overlaps the PCI ECAM", PlatformDevices(virtioMMIO: [VirtioMMIODevice(base: 0xE000_0000, size: 0x200, gsi: 5)],
                                                                pci: .swiftlet(deviceSlots: []))))
        cases.append(("not 1 MiB aligned", pci { $0.ecamBase = 0xE000_1000 }))
        cases.append(("above 4 GiB", pci { $0.ecamBase = 0x1_0010_0000 }))
        cases.append(("ends above 4 GiB", pci { $0.ecamBase = 0xFFF0_0000; $0.busRange = 0...1 }))
        cases.append(("PCI bus 255", pci { $0.busRange = 0...255 }))
        cases.append(("overlaps the PCI ECAM", pci { $0.memoryWindow = 0xD000_0000..<0xE000_1000 }))
        cases.append(("the PCI memory window is empty", pci { $0.memoryWindow = 0xD000_0000..<0xD000_0000 }))
        cases.append(("overlaps guest RAM", pci { $0.memoryWindow = 0x0..<0x1000 }))
        cases.append(("includes the configuration ports", pci { $0.ioWindows = [0x0000...0xFFFF] }))
        cases.append(("the PCI I/O windows overlap", pci { $0.ioWindows = [0x1000...0x1FFF, 0x1800...0x2FFF] }))
        cases.append(("PCI device 32 does not exist", pci { $0.slots = [.swizzled(device: 32)] }))
        cases.append(("PCI device 1 is listed twice", pci { $0.slots = [.swizzled(device: 1), .swizzled(device: 1)] }))
        cases.append(("INTA-INTD need 4", pci { $0.slots = [PCISlotInterrupts(device: 1, gsis: [16])] }))
        cases.append(("INTx on GSI 11", pci { $0.slots = [PCISlotInterrupts(device: 1, gsis: [11, 16, 17, 18])] }))
        cases.append(("INTx on GSI 24", pci { $0.slots = [PCISlotInterrupts(device: 1, gsis: [16, 17, 18, 24])] }))
        let many = (0..<257).map { VirtioMMIODevice(base: 0xFEB0_0000 + UInt64($0) * 0x200, size: 0x200, gsi: 5) }
        cases.append(("257 virtio-mmio devices", PlatformDevices(virtioMMIO: many)))
        return cases
    }()

    @Test("A platform the tables cannot describe is refused with one line, before anything is written",
          arguments: 0..<refused.count)
    func refusesImpossiblePlatforms(index: Int) throws {
        let (reason, devices) = Self.refused[index]
        let memory = try Images.memory()
        let error = #expect(throws: BootError.self) { try FirmwareTables.write(into: memory, cpuCount: 1, devices: devices) }
        guard case let .invalidPlatform(message) = error else { Issue.record("got \(String(describing: error))"); return }
        #expect(message.contains(reason), "\(message)")
        #expect(!String(describing: error!).contains("\n"))
        #expect(try memory.read(at: BootLayout.acpiTables, count: 0x2000).allSatisfy { $0 == 0 })
        #expect(try memory.read(at: BootLayout.mpTable, count: 0x100).allSatisfy { $0 == 0 })
    }

    @Test("With a PCI host the e820 map reserves the ECAM: zero page, PVH memory map, Multiboot mmap")
    func e820ReservesTheECAM() throws {
        let ecam = E820Entry(address: 0xE000_0000, size: 0x10_0000, kind: .reserved)
        func zeroPageMap(_ memory: GuestMemory) throws -> [E820Entry] {
            let count = Int(try memory.load(UInt8.self, at: BootLayout.zeroPage + 0x1E8))
            return try (0..<count).map { index in
                let entry = BootLayout.zeroPage + 0x2D0 + UInt64(index) * 20
                return E820Entry(address: try memory.load(UInt64.self, at: entry), size: try memory.load(UInt64.self, at: entry + 8),
                                 kind: try #require(E820Entry.Kind(rawValue: try memory.load(UInt32.self, at: entry + 16))))
            }
        }
        func pvhMap(_ memory: GuestMemory) throws -> [E820Entry] {
            let count = Int(try memory.load(UInt32.self, at: BootLayout.pvhStartInfo + 48))
            return try (0..<count).map { index in
                let entry = BootLayout.pvhMemoryMap + UInt64(index) * 24
                return E820Entry(address: try memory.load(UInt64.self, at: entry), size: try memory.load(UInt64.self, at: entry + 8),
                                 kind: try #require(E820Entry.Kind(rawValue: try memory.load(UInt32.self, at: entry + 16))))
            }
        }
        let memory = try Images.memory()
        let plain = E820Map.build(for: memory)
        // 64-bit entry through the zero page.
        _ = try KernelImage.load(VmlinuxTests.vmlinux(), into: memory, options: BootOptions(linuxEntry: .linux64, platformDevices: Self.devices))
        #expect(try zeroPageMap(memory) == plain + [ecam])
        _ = try KernelImage.load(VmlinuxTests.vmlinux(), into: memory, options: BootOptions(linuxEntry: .linux64))
        #expect(try zeroPageMap(memory) == plain)
        // PVH.
        _ = try KernelImage.load(VmlinuxTests.vmlinux(pvh: 0x100_0850), into: memory, options: BootOptions(platformDevices: Self.devices))
        #expect(try pvhMap(memory) == plain + [ecam])
        // Only virtio-mmio devices, or no firmware tables: nothing reserved.
        _ = try KernelImage.load(VmlinuxTests.vmlinux(pvh: 0x100_0850), into: memory,
                                 options: BootOptions(platformDevices: PlatformDevices(virtioMMIO: Self.devices.virtioMMIO)))
        #expect(try pvhMap(memory) == plain)
        _ = try KernelImage.load(VmlinuxTests.vmlinux(pvh: 0x100_0850), into: memory,
                                 options: BootOptions(firmwareTables: false, platformDevices: Self.devices))
        #expect(try pvhMap(memory) == plain)
    }

    @Test("BootOptions carry the devices to the tables a loaded kernel finds")
    func bootOptionsCarryTheDevices() throws {
        let memory = try Images.memory()
        let options = BootOptions(cpuCount: 1, platformDevices: Self.devices)
        let loaded = try KernelImage.load(VmlinuxTests.vmlinux(), into: memory, options: options)
        let found = try tables(memory, rsdp: try #require(loaded.rsdp))
        #expect(found["MCFG"] != nil)
        #expect(position(of: Array("LNRO0005".utf8), in: try #require(found["DSDT"])) != nil)
    }
}
