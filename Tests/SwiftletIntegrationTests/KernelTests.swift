import Foundation
import Testing

/// Where `guests/linux/fetch-debian-kernel.sh` (run by .ci/run) caches Debian's kernel.
let debianKernelCache = ProcessInfo.processInfo.environment["SWIFTLET_KERNEL_CACHE"] ?? "/var/cache/swiftlet/linux"
let debianKernelPresent = FileManager.default.fileExists(atPath: debianKernelCache + "/vmlinux")
    && FileManager.default.fileExists(atPath: debianKernelCache + "/vmlinuz")

/// A temporary file holding `bytes`, removed by the caller.
func temporaryFile(_ bytes: [UInt8], name: String) throws -> URL {
    let url = FileManager.default.temporaryDirectory.appendingPathComponent("\(name)-\(UUID().uuidString)")
    try Data(bytes).write(to: url)
    return url
}

/// A minimal ELF64 executable with one PT_LOAD segment at physical `address`.
func elf64(loadAddress address: UInt64, size: UInt64) -> [UInt8] {
    var bytes = [UInt8](repeating: 0, count: 0x78 + 16)
    func put<T: FixedWidthInteger>(_ value: T, _ offset: Int) {
        withUnsafeBytes(of: value.littleEndian) { for (index, byte) in $0.enumerated() { bytes[offset + index] = byte } }
    }
    bytes[0...3] = [0x7F, 0x45, 0x4C, 0x46] // \x7FELF
    bytes[4] = 2; bytes[5] = 1; bytes[6] = 1 // 64-bit, little-endian, version 1
    put(UInt16(2), 16)            // ET_EXEC
    put(UInt16(0x3E), 18)         // x86-64
    put(UInt32(1), 20)
    put(address, 24)              // e_entry
    put(UInt64(64), 32)           // e_phoff
    put(UInt16(64), 52)           // e_ehsize
    put(UInt16(56), 54)           // e_phentsize
    put(UInt16(1), 56)            // e_phnum
    put(UInt32(1), 64)            // PT_LOAD
    put(UInt32(5), 68)            // R+X
    put(UInt64(0x78), 72)         // p_offset
    put(address, 80)              // p_vaddr
    put(address, 88)              // p_paddr
    put(UInt64(16), 96)           // p_filesz
    put(size, 104)                // p_memsz
    put(UInt64(0x1000), 112)      // p_align
    return bytes
}

/// Bad kernels and boot arguments are refused with one clear line, before any vCPU runs.
@Suite("Kernel loading errors")
struct KernelErrorTests {
    @Test("A file that is no kernel")
    func notAKernel() throws {
        let file = try temporaryFile(Array(repeating: 0x5A, count: 4096), name: "junk")
        defer { try? FileManager.default.removeItem(at: file) }
        let result = try Swiftlet.run(["run", "--kernel", file.path])
        #expect(result.status == 2)
        #expect(result.stderr.hasPrefix("swiftlet: "))
        #expect(result.stderr.contains("not a kernel") || result.stderr.contains("no bzImage header"))
        #expect(result.stderr.split(separator: "\n").count == 1)
    }

    @Test("An ELF whose segment lies outside guest memory")
    func segmentOutsideMemory() throws {
        let file = try temporaryFile(elf64(loadAddress: 0x4000_0000, size: 0x1000), name: "far.elf")
        defer { try? FileManager.default.removeItem(at: file) }
        let result = try Swiftlet.run(["run", "--kernel", file.path, "--memory", "64M"])
        #expect(result.status == 2)
        #expect(result.stderr.hasPrefix("swiftlet: "))
        #expect(result.stderr.split(separator: "\n").count == 1)
        #expect(result.stdout.isEmpty)
    }

    @Test("A truncated bzImage", .enabled(if: debianKernelPresent, "Debian's kernel is not cached: run guests/linux/fetch-debian-kernel.sh"))
    func truncatedBzImage() throws {
        let whole = try Data(contentsOf: URL(fileURLWithPath: debianKernelCache + "/vmlinuz"))
        let file = try temporaryFile(Array(whole.prefix(whole.count / 2)), name: "half-vmlinuz")
        defer { try? FileManager.default.removeItem(at: file) }
        let result = try Swiftlet.run(["run", "--kernel", file.path])
        #expect(result.status == 2)
        #expect(result.stderr.contains("truncated"))
        #expect(result.stderr.split(separator: "\n").count == 1)
    }

    @Test("A command line longer than the kernel's cmdline_size", .enabled(if: debianKernelPresent, "Debian's kernel is not cached: run guests/linux/fetch-debian-kernel.sh"))
    func commandLineTooLong() throws {
        let result = try Swiftlet.run(["run", "--kernel", debianKernelCache + "/vmlinuz", "--cmdline", String(repeating: "x", count: 5000)])
        #expect(result.status == 2)
        #expect(result.stderr.contains("command line"))
        #expect(result.stderr.split(separator: "\n").count == 1)
    }

    @Test("An initrd larger than the memory the kernel allows", .enabled(if: debianKernelPresent, "Debian's kernel is not cached: run guests/linux/fetch-debian-kernel.sh"))
    func initrdTooLarge() throws {
        let initrd = try temporaryFile(Array(repeating: 0, count: 48 << 20), name: "big-initrd")
        defer { try? FileManager.default.removeItem(at: initrd) }
        let result = try Swiftlet.run(["run", "--kernel", debianKernelCache + "/vmlinuz", "--initrd", initrd.path, "--memory", "64M"])
        #expect(result.status == 2)
        #expect(result.stderr.contains("initrd"))
        #expect(result.stderr.split(separator: "\n").count == 1)
    }

    @Test("Kernel options without --kernel are refused, not ignored", arguments: [
        ["--cmdline", "quiet"], ["--initrd", "/etc/hostname"], ["--linux-entry", "pvh"], ["--no-decompress-on-host"],
        ["--flat", "/etc/hostname", "--linux-entry", "linux64"],
    ])
    func needsKernel(arguments: [String]) throws {
        let result = try Swiftlet.run(["run"] + arguments)
        #expect(result.status == 2)
        #expect(result.stderr.hasPrefix("swiftlet: --"))
        #expect(result.stderr.contains("applies only to --kernel"))
    }

    @Test("A huge sparse file is refused as 'not a kernel' from its header, without reading it")
    func hugeSparseFile() throws {
        let file = FileManager.default.temporaryDirectory.appendingPathComponent("sparse-\(UUID().uuidString)")
        _ = FileManager.default.createFile(atPath: file.path, contents: Data(repeating: 0x5A, count: 4096))
        defer { try? FileManager.default.removeItem(at: file) }
        let handle = try FileHandle(forWritingTo: file)
        try handle.truncate(atOffset: 4 << 30)
        try handle.close()
        // With its address space limited to 1 GiB, Swiftlet could not even hold the file:
        // only a header check answers.
        let result = try Swiftlet.run(["run", "--kernel", file.path, "--memory", "64M"], addressSpaceLimit: 1 << 30)
        #expect(result.status == 2)
        #expect(result.stderr.contains("is not a kernel"))
        #expect(result.stderr.split(separator: "\n").count == 1)
    }

    @Test("A kernel file larger than guest RAM is refused without being read")
    func kernelLargerThanRAM() throws {
        let file = try temporaryFile(elf64(loadAddress: 0x10_0000, size: 0x1000), name: "huge.elf")
        defer { try? FileManager.default.removeItem(at: file) }
        let handle = try FileHandle(forWritingTo: file)
        try handle.truncate(atOffset: 4 << 30)
        try handle.close()
        let result = try Swiftlet.run(["run", "--kernel", file.path, "--memory", "64M"], addressSpaceLimit: 1 << 30)
        #expect(result.status == 2)
        #expect(result.stderr == "swiftlet: cannot open kernel '\(file.path)': it is larger than the guest's RAM (64M)\n")
    }
}

/// guests/multiboot.s: a Multiboot v1 ELF kernel that prints what the loader gave it.
@Suite("Multiboot")
struct MultibootTests {
    @Test("Magic, memory sizes, command line with the kernel's name, and the initrd as module 0")
    func multibootInformation() throws {
        let kernel = Swiftlet.packageRoot.appendingPathComponent("guests/build/multiboot.elf").path
        let module = try temporaryFile(Array("module data\n".utf8), name: "module")
        defer { try? FileManager.default.removeItem(at: module) }
        let result = try Swiftlet.run(["run", "--kernel", kernel, "--cmdline", "hello world", "--initrd", module.path, "--memory", "64M"])
        #expect(result.status == 1)
        #expect(result.stdout.contains("EAX = 0x2badb002 (the Multiboot magic)"))
        // 639 KiB below the EBDA, and 64 MiB - 1 MiB above 1 MiB.
        #expect(result.stdout.contains("memory below 1 MiB: 0x0000027f KiB, above 1 MiB: 0x0000fc00 KiB"))
        #expect(result.stdout.contains("command line: \"\(kernel) hello world\""))
        #expect(result.stdout.contains("modules: 0x00000001"))
        // 12 bytes, starting with "modu" (0x75646f6d little-endian), page-aligned.
        #expect(result.stdout.contains(", 0x0000000c bytes, first word 0x75646f6d"))
        #expect(result.stdout.contains("module 0 at 0x00102000"))
    }
}

/// Debian's stock kernel on our machine: on this project's nested-KVM hosts a kernel only
/// gets through its early boot messages (see docs/host-kvm.md), so the test reads those, then
/// ends the VM.
@Suite("Debian's Linux kernel", .enabled(if: debianKernelPresent, "Debian's kernel is not cached: run guests/linux/fetch-debian-kernel.sh"))
struct DebianKernelTests {
    @Test("vmlinux through PVH: our command line, our e820 map, KVM detected, our ACPI tables with the PM timer")
    func bootsToEarlyMessages() throws {
        let marker = "swiftlet.test=\(UInt32.random(in: 0...UInt32.max))"
        let result = try Swiftlet.run(["run", "--kernel", debianKernelCache + "/vmlinux", "--memory", "512M", "--timeout", "240",
                                       "--cmdline", "console=ttyS0 earlyprintk=serial noxsave \(marker)"]) { process, output in
            // The PM timer line comes from the FADT, parsed ~11 s into the boot on the
            // nested-KVM build hosts (after the e820 map and the table list).
            if Swiftlet.waitFor("ACPI: PM-Timer IO Port", in: output, seconds: 230) {
                kill(process.processIdentifier, SIGTERM)
            }
        }
        #expect(result.stdout.contains("Linux version 6."))
        #expect(result.stdout.contains("Command line: console=ttyS0 earlyprintk=serial noxsave \(marker)"))
        // Our e820 map: low RAM below the EBDA, the BIOS area reserved, then RAM to 512M.
        #expect(result.stdout.contains("BIOS-e820: [mem 0x0000000000000000-0x000000000009fbff] usable"))
        #expect(result.stdout.contains("BIOS-e820: [mem 0x0000000000100000-0x000000001fffffff] usable"))
        #expect(result.stdout.contains("Hypervisor detected: KVM"))
        // Our ACPI tables: the FADT (revision 6) with its FACS, and the PM1 block's timer.
        #expect(result.stdout.contains("ACPI: FACP 0x00000000000E1000 000114 (v06 SWIFTL SWIFTLET"))
        #expect(result.stdout.contains("ACPI: FACS 0x00000000000E1140 000040"))
        #expect(result.stdout.contains("ACPI: DSDT 0x00000000000E1200"))
        #expect(result.stdout.contains("ACPI: PM-Timer IO Port: 0x608"))
        #expect(!result.stdout.contains("ACPI Error"))
        #expect(!result.stdout.contains("ACPI BIOS Error"))
        #expect(result.signal == SIGTERM, "the test ends the VM with SIGTERM once it has what it checks")
    }
}
