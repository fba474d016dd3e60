@testable import Boot
import Foundation
import Testing

/// ACPICA's own compiler and disassembler (`iasl`, Debian's acpica-tools, which
/// `scripts/setup test` installs) judges the tables Swiftlet writes: it disassembles the
/// FADT field by field, checks its checksum and the FADT's consistency, and compiles the
/// ASL our DSDT stands for, which must give the same AML bytes.
@Suite("ACPI tables checked by iasl", .enabled(if: IASL.path != nil, "iasl is not installed (Debian: acpica-tools, installed by scripts/setup test)"))
struct IASLCrossCheckTests {
    @Test("iasl compiles the DSDT's ASL to the bytes Swiftlet writes")
    func dsdtMatchesCompiledASL() throws {
        let directory = try IASL.temporaryDirectory()
        defer { try? FileManager.default.removeItem(at: directory) }
        let source = """
            DefinitionBlock ("", "DSDT", 2, "SWIFTL", "SWIFTLET", 1)
            {
                Name (\\_S5, Package (0x04) { Zero, Zero, Zero, Zero })
            }
            """
        try source.write(to: directory.appendingPathComponent("dsdt.asl"), atomically: true, encoding: .utf8)
        // -oa: no optimizations, so the root prefix stays as written.
        let run = try IASL.run(["-oa", "dsdt.asl"], in: directory)
        #expect(run.status == 0, "\(run.output)")
        let compiled = Array(try Data(contentsOf: directory.appendingPathComponent("dsdt.aml")))
        let ours = FirmwareTables.dsdt()
        // The headers differ in the compiler ID and revision (and so the checksum).
        #expect(Array(compiled[36...]) == Array(ours[36...]))
        #expect(Array(compiled[0..<8]) == Array(ours[0..<8]))
    }

    @Test("iasl disassembles the FADT with the PM1a blocks, the PM timer and the reset register, and no complaint")
    func fadtDisassembles() throws {
        let directory = try IASL.temporaryDirectory()
        defer { try? FileManager.default.removeItem(at: directory) }
        let fadt = FirmwareTables.fadt(dsdt: 0xE1200, facs: 0xE1140)
        try Data(fadt).write(to: directory.appendingPathComponent("facp.dat"))
        let run = try IASL.run(["-d", "facp.dat"], in: directory)
        #expect(run.status == 0, "\(run.output)")
        let text = try String(contentsOf: directory.appendingPathComponent("facp.dsl"), encoding: .utf8)
        let fields = IASL.fields(text)
        #expect(fields["Signature"] == "\"FACP\"    [Fixed ACPI Description Table (FADT)]")
        #expect(fields["Revision"] == "06")
        #expect(fields["FACS Address"] == "000E1140")
        #expect(fields["DSDT Address"] == "000E1200")
        #expect(fields["SCI Interrupt"] == "0009")
        #expect(fields["SMI Command Port"] == "00000000")
        #expect(fields["PM1A Event Block Address"] == "00000600")
        #expect(fields["PM1A Control Block Address"] == "00000604")
        #expect(fields["PM Timer Block Address"] == "00000608")
        #expect(fields["PM1 Event Block Length"] == "04")
        #expect(fields["PM1 Control Block Length"] == "02")
        #expect(fields["PM Timer Block Length"] == "04")
        #expect(fields["RTC Century Index"] == "32")
        #expect(fields["Reset Register Supported (V2)"] == "1")
        #expect(fields["Hardware Reduced (V5)"] == "0")
        #expect(fields["32-bit PM Timer (V1)"] == "0")
        #expect(fields["Value to cause reset"] == "06")
        #expect(text.contains("[Generic Address Structure]"))
        #expect(text.contains("Address : 0000000000000CF9"))
        #expect(text.contains("Address : 0000000000000604"))
        // iasl checks the checksum and reports FADT inconsistencies in the output.
        #expect(!text.lowercased().contains("incorrect checksum"), "\(text)")
        #expect(!text.lowercased().contains("warning"), "\(text)")
        #expect(!run.output.lowercased().contains("warning"), "\(run.output)")
    }

    @Test("iasl disassembles the DSDT to Name (_S5, Package ...)")
    func dsdtDisassembles() throws {
        let directory = try IASL.temporaryDirectory()
        defer { try? FileManager.default.removeItem(at: directory) }
        try Data(FirmwareTables.dsdt()).write(to: directory.appendingPathComponent("dsdt.dat"))
        let run = try IASL.run(["-d", "dsdt.dat"], in: directory)
        #expect(run.status == 0, "\(run.output)")
        let text = try String(contentsOf: directory.appendingPathComponent("dsdt.dsl"), encoding: .utf8)
        #expect(text.contains("Name (\\_S5, Package (0x04)"), "\(text)")
        #expect(!text.lowercased().contains("checksum is incorrect"), "\(text)")
    }
}

/// The platform the cross-checks describe: two virtio-mmio devices in slots 0 and 1 and
/// a PCI host bridge with devices 1 and 2 on bus 0.
enum CrossCheckPlatform {
    static let devices = PlatformDevices(virtioMMIO: [VirtioMMIODevice.slot(0)!, VirtioMMIODevice.slot(1)!],
                                         pci: .swiftlet(deviceSlots: [1, 2]))

    /// The ASL that platform's DSDT stands for, written by hand from the ACPI
    /// specification, QEMU's q35 root bridge and Linux's virtio-mmio binding, not
    /// generated by Swiftlet's code.
    static let dsdtSource = """
        DefinitionBlock ("", "DSDT", 2, "SWIFTL", "SWIFTLET", 1)
        {
            Name (\\_S5, Package (0x04) { Zero, Zero, Zero, Zero })
            Scope (\\_SB)
            {
                Device (PCI0)
                {
                    Name (_HID, EisaId ("PNP0A08"))
                    Name (_CID, EisaId ("PNP0A03"))
                    Name (_SEG, Zero)
                    Name (_BBN, Zero)
                    Name (_UID, Zero)
                    Name (_CRS, ResourceTemplate ()
                    {
                        WordBusNumber (ResourceProducer, MinFixed, MaxFixed, PosDecode,
                            0x0000, 0x0000, 0x0000, 0x0000, 0x0001)
                        IO (Decode16, 0x0CF8, 0x0CF8, 0x01, 0x08)
                        WordIO (ResourceProducer, MinFixed, MaxFixed, PosDecode, EntireRange,
                            0x0000, 0x0000, 0x0CF7, 0x0000, 0x0CF8)
                        WordIO (ResourceProducer, MinFixed, MaxFixed, PosDecode, EntireRange,
                            0x0000, 0x0D00, 0xFFFF, 0x0000, 0xF300)
                        DWordMemory (ResourceProducer, PosDecode, MinFixed, MaxFixed, NonCacheable, ReadWrite,
                            0x00000000, 0xC0000000, 0xDFFFFFFF, 0x00000000, 0x20000000)
                    })
                    Name (_PRT, Package ()
                    {
                        Package () { 0x0001FFFF, Zero, Zero, 0x11 },
                        Package () { 0x0001FFFF, One, Zero, 0x12 },
                        Package () { 0x0001FFFF, 0x02, Zero, 0x13 },
                        Package () { 0x0001FFFF, 0x03, Zero, 0x10 },
                        Package () { 0x0002FFFF, Zero, Zero, 0x12 },
                        Package () { 0x0002FFFF, One, Zero, 0x13 },
                        Package () { 0x0002FFFF, 0x02, Zero, 0x10 },
                        Package () { 0x0002FFFF, 0x03, Zero, 0x11 }
                    })
                }
                Device (ECAM)
                {
                    Name (_HID, EisaId ("PNP0C02"))
                    Name (_CRS, ResourceTemplate ()
                    {
                        Memory32Fixed (ReadWrite, 0xE0000000, 0x00100000)
                    })
                }
                Device (VR00)
                {
                    Name (_HID, "LNRO0005")
                    Name (_UID, Zero)
                    Name (_CCA, One)
                    Name (_CRS, ResourceTemplate ()
                    {
                        Memory32Fixed (ReadWrite, 0xFEB00000, 0x00000200)
                        Interrupt (ResourceConsumer, Edge, ActiveHigh, Exclusive, ,, ) { 0x00000005 }
                    })
                }
                Device (VR01)
                {
                    Name (_HID, "LNRO0005")
                    Name (_UID, One)
                    Name (_CCA, One)
                    Name (_CRS, ResourceTemplate ()
                    {
                        Memory32Fixed (ReadWrite, 0xFEB00200, 0x00000200)
                        Interrupt (ResourceConsumer, Edge, ActiveHigh, Exclusive, ,, ) { 0x00000006 }
                    })
                }
            }
        }
        """
}

@Suite("Device tables checked by iasl", .enabled(if: IASL.path != nil, "iasl is not installed (Debian: acpica-tools, installed by scripts/setup test)"))
struct IASLDeviceCrossCheckTests {
    @Test("iasl compiles the ASL of a DSDT with 2 virtio-mmio devices and a PCI host with 2 slots to our bytes")
    func dsdtWithDevicesMatchesCompiledASL() throws {
        let directory = try IASL.temporaryDirectory()
        defer { try? FileManager.default.removeItem(at: directory) }
        try CrossCheckPlatform.dsdtSource.write(to: directory.appendingPathComponent("dsdt.asl"), atomically: true, encoding: .utf8)
        let run = try IASL.run(["-oa", "dsdt.asl"], in: directory)
        #expect(run.status == 0, "\(run.output)")
        #expect(run.output.contains("0 Errors, 0 Warnings"), "\(run.output)")
        let compiled = Array(try Data(contentsOf: directory.appendingPathComponent("dsdt.aml")))
        let ours = FirmwareTables.dsdt(CrossCheckPlatform.devices)
        #expect(Array(compiled[36...]) == Array(ours[36...]))
        #expect(Array(compiled[0..<8]) == Array(ours[0..<8]))
    }

    @Test("iasl disassembles our DSDT with devices without complaint, to the objects Linux looks for")
    func dsdtWithDevicesDisassembles() throws {
        let directory = try IASL.temporaryDirectory()
        defer { try? FileManager.default.removeItem(at: directory) }
        try Data(FirmwareTables.dsdt(CrossCheckPlatform.devices)).write(to: directory.appendingPathComponent("dsdt.dat"))
        let run = try IASL.run(["-d", "dsdt.dat"], in: directory)
        #expect(run.status == 0, "\(run.output)")
        #expect(!run.output.lowercased().contains("warning") && !run.output.lowercased().contains("error"), "\(run.output)")
        let text = try String(contentsOf: directory.appendingPathComponent("dsdt.dsl"), encoding: .utf8)
        #expect(!text.lowercased().contains("checksum is incorrect"), "\(text)")
        for expected in ["Name (_HID, EisaId (\"PNP0A08\")", "Name (_CID, EisaId (\"PNP0A03\")", "Name (_HID, EisaId (\"PNP0C02\")",
                         "Device (VR00)", "Device (VR01)", "Name (_HID, \"LNRO0005\")",
                         "Memory32Fixed (ReadWrite,", "0xFEB00200,", "Interrupt (ResourceConsumer, Edge, ActiveHigh, Exclusive, ,, )",
                         "WordBusNumber (ResourceProducer, MinFixed, MaxFixed, PosDecode,",
                         "DWordMemory (ResourceProducer, PosDecode, MinFixed, MaxFixed, NonCacheable, ReadWrite,",
                         "0x0002FFFF,", "Name (\\_S5, Package (0x04)"] {
            #expect(text.contains(expected), "\(expected) not in \(text)")
        }
    }

    @Test("iasl disassembles our MCFG (ECAM base, segment 0, bus 0-0) and compiles it back to the same bytes")
    func mcfgRoundTrip() throws {
        let directory = try IASL.temporaryDirectory()
        defer { try? FileManager.default.removeItem(at: directory) }
        let ours = FirmwareTables.mcfg(try #require(CrossCheckPlatform.devices.pci))
        try Data(ours).write(to: directory.appendingPathComponent("mcfg.dat"))
        let run = try IASL.run(["-d", "mcfg.dat"], in: directory)
        #expect(run.status == 0, "\(run.output)")
        #expect(!run.output.lowercased().contains("warning"), "\(run.output)")
        let text = try String(contentsOf: directory.appendingPathComponent("mcfg.dsl"), encoding: .utf8)
        #expect(!text.lowercased().contains("incorrect checksum"), "\(text)")
        let fields = IASL.fields(text)
        #expect(fields["Signature"] == "\"MCFG\"    [Memory Mapped Configuration table]", "\(text)")
        #expect(fields["Table Length"] == "0000003C")
        #expect(fields["Revision"] == "01")
        #expect(fields["Base Address"] == "00000000E0000000")
        #expect(fields["Segment Group Number"] == "0000")
        #expect(fields["Start Bus Number"] == "00")
        #expect(fields["End Bus Number"] == "00")
        // iasl's data table compiler lays the fields out again from their names.
        let compile = try IASL.run(["mcfg.dsl"], in: directory)
        #expect(compile.status == 0, "\(compile.output)")
        let compiled = Array(try Data(contentsOf: directory.appendingPathComponent("mcfg.aml")))
        #expect(compiled.count == ours.count)
        #expect(Array(compiled[36...]) == Array(ours[36...]))
        #expect(Array(compiled[0..<9]) == Array(ours[0..<9]))
        #expect(Array(compiled[10..<28]) == Array(ours[10..<28]))
    }
}

/// Finding and running `iasl`.
enum IASL {
    static let path: String? = ["/usr/bin/iasl", "/usr/local/bin/iasl"].first { FileManager.default.isExecutableFile(atPath: $0) }

    static func temporaryDirectory() throws -> URL {
        let url = FileManager.default.temporaryDirectory.appendingPathComponent("swiftlet-iasl-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: url, withIntermediateDirectories: true)
        return url
    }

    /// Runs iasl in `directory`; returns its status and its output (stdout and stderr).
    static func run(_ arguments: [String], in directory: URL) throws -> (status: Int32, output: String) {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: try #require(path))
        process.arguments = arguments
        process.currentDirectoryURL = directory
        let pipe = Pipe()
        process.standardOutput = pipe
        process.standardError = pipe
        try process.run()
        let output = pipe.fileHandleForReading.readDataToEndOfFile()
        process.waitUntilExit()
        return (process.terminationStatus, String(decoding: output, as: UTF8.self))
    }

    /// The "[offset len] Name : value" lines of an iasl data-table disassembly, and the
    /// "Flag name : 0/1" lines that decode flags, by name (the first occurrence of each).
    static func fields(_ text: String) -> [String: String] {
        var fields: [String: String] = [:]
        for line in text.split(separator: "\n") {
            let start = line.hasPrefix("[") ? line.firstIndex(of: "]").map { line.index(after: $0) } : line.startIndex
            guard let start, let colon = line[start...].range(of: " : ") else { continue }
            let name = line[start..<colon.lowerBound].trimmingCharacters(in: .whitespaces)
            let value = line[colon.upperBound...].trimmingCharacters(in: .whitespaces)
            if fields[name] == nil { fields[name] = value }
        }
        return fields
    }
}
