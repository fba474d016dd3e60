import Foundation
import Testing

/// Each teaching guest runs through the real binary on real KVM and reports what it did.
@Suite("Teaching guests under swiftlet run")
struct GuestTests {
    @Test("The built-in guest is the assembled hello-real.bin")
    func embeddedGuestIsCurrent() throws {
        let built = try Data(contentsOf: URL(fileURLWithPath: Swiftlet.guest("hello-real")))
        let source = try String(contentsOf: Swiftlet.packageRoot.appendingPathComponent("Sources/swiftlet/DefaultGuest.swift"), encoding: .utf8)
        let embedded = source.matches(of: /0x([0-9a-f]{2})/).map { UInt8($0.1, radix: 16)! }
        #expect(embedded == Array(built), "run 'make embed' after changing guests/hello-real.s")
    }

    @Test("swiftlet run with no arguments boots the real-mode hello")
    func defaultGuest() throws {
        let result = try Swiftlet.run(["run"])
        #expect(result.status == 1)
        #expect(result.stdout.contains("Hello from real mode!"))
        #expect(result.stdout.contains("PE (bit 0) is 0"))
        #expect(result.stderr.isEmpty)
    }

    @Test("Real mode: segment arithmetic")
    func helloReal() throws {
        let result = try Swiftlet.run(["run", "--flat", Swiftlet.guest("hello-real")])
        #expect(result.status == 1)
        #expect(result.stdout.contains("0000:7C00 holds 0xfa and 07C0:0000 holds 0xfa"))
    }

    @Test("Protected mode with the guest's own GDT")
    func protectedMode() throws {
        let result = try Swiftlet.run(["run", "--flat", Swiftlet.guest("protected-mode")])
        #expect(result.status == 1)
        #expect(result.stdout.contains("[protected mode] running 32-bit code"))
        #expect(result.stdout.contains("CR0 = 0x00000011"))
        #expect(result.stdout.contains("same memory"))
    }

    @Test("Long mode: own page tables, and a second mapping proven by reading through it")
    func longMode() throws {
        let result = try Swiftlet.run(["run", "--flat", Swiftlet.guest("long-mode"), "--memory", "64M"])
        #expect(result.status == 1)
        #expect(result.stdout.contains("EFER = 0x0000000000000500"))
        let readBack = result.stdout.split(separator: "\n").first { $0.contains("read through the higher-half address:") }
        #expect(readBack?.hasSuffix("(matches)") == true)
        #expect(result.stdout.contains("the mapping works"))
    }

    @Test("CPL 3: a loop in user mode, then I/O and exit from ring 3")
    func userMode() throws {
        let result = try Swiftlet.run(["run", "--flat", Swiftlet.guest("user-mode"), "--timeout", "120"])
        #expect(result.status == 1)
        #expect(result.stdout.contains("[CPL 3] CS = 0x0033, CPL = 3"))
        #expect(result.stdout.contains("ran 100000000 iterations at CPL 3, sum = 5000000050000000"))
    }

    @Test("Standard input reaches the guest through the UART's receive FIFO")
    func consoleInput() throws {
        // More than the 16-byte FIFO holds: the rest waits on the host side.
        let text = "the quick brown fox jumps over the lazy dog."
        let result = try Swiftlet.run(["run", "--flat", Swiftlet.guest("echo"), "--timeout", "60"], input: Data(text.utf8))
        #expect(result.status == 1)
        #expect(result.stdout.contains(text.uppercased()))
        #expect(result.stdout.contains("echo: done"))
    }

    @Test("--trace-exits counts every exit by port and names the device")
    func traceExits() throws {
        let result = try Swiftlet.run(["run", "--flat", Swiftlet.guest("pio-loop-1k"), "--trace-exits"])
        #expect(result.status == 1)
        let row = result.stderr.split(separator: "\n").first { $0.contains("port out 0x0080 POST diagnostic port") }
        #expect(row?.split(separator: " ").contains("1000") == true, "expected 1000 exits on port 0x80 in:\n\(result.stderr)")
        #expect(result.stderr.contains("port out 0x00f4 debug exit"))
        #expect(result.stderr.contains("first KVM_RUN: monotonic"))
    }

    @Test("--trace-exits stays small when a guest sweeps the MMIO hole")
    func traceExitsIsBounded() throws {
        let kernel = Swiftlet.packageRoot.appendingPathComponent("guests/build/mmio-sweep.elf").path
        let result = try Swiftlet.run(["run", "--kernel", kernel, "--trace-exits", "--timeout", "120"])
        #expect(result.status == 1)
        #expect(result.stdout.contains("every read gave 0xFFFFFFFF"))
        let lines = result.stderr.split(separator: "\n")
        // 65536 pages written and read: 16 rows of each, the rest in one row per direction.
        #expect(lines.count < 50, "\(lines.count) lines")
        let other = lines.first { $0.hasPrefix("unclaimed MMIO write, other addresses") }
        #expect(other?.split(separator: " ").contains("65520") == true)
        let total = lines.first { $0.hasPrefix("total") }
        #expect((total.flatMap { Int($0.split(separator: " ")[1]) } ?? 0) >= 131_072)
    }

    @Test("Serial output can go to a file")
    func serialToFile() throws {
        let path = FileManager.default.temporaryDirectory.appendingPathComponent("swiftlet-serial-\(UUID().uuidString)").path
        defer { try? FileManager.default.removeItem(atPath: path) }
        let result = try Swiftlet.run(["run", "--serial", "file:\(path)"])
        #expect(result.status == 1)
        #expect(result.stdout.isEmpty)
        #expect(try String(contentsOfFile: path, encoding: .utf8).contains("Hello from real mode!"))
    }

    @Test("Guest RAM above the 3 GiB hole works (memory is reserved, not touched)")
    func largeMemory() throws {
        let result = try Swiftlet.run(["run", "--memory", "5G"])
        #expect(result.status == 1)
        #expect(result.stdout.contains("Hello from real mode!"))
    }
}

/// How a VM ends: timeout, signals, the console escape, a crashing guest.
@Suite("Stopping a VM")
struct StopTests {
    @Test("--timeout ends a guest that runs forever with status 124")
    func timeout() throws {
        let result = try Swiftlet.run(["run", "--flat", Swiftlet.guest("idle"), "--timeout", "1"])
        #expect(result.status == 124)
        #expect(result.stdout.contains("idle"))
        #expect(result.stderr == "swiftlet: timed out\n")
    }

    @Test("SIGINT, SIGTERM, SIGHUP and SIGQUIT stop the VM cleanly; Swiftlet then ends by that signal",
          arguments: [SIGINT, SIGTERM, SIGHUP, SIGQUIT])
    func terminationSignal(number: Int32) throws {
        let result = try Swiftlet.run(["run", "--flat", Swiftlet.guest("idle"), "--timeout", "60"]) { process, output in
            _ = Swiftlet.waitFor("idle", in: output)
            kill(process.processIdentifier, number)
        }
        #expect(result.signal == number)
        #expect(result.stderr == "swiftlet: stopped by signal \(number)\n")
    }

    @Test("Ctrl-A x on the console quits with status 0")
    func consoleEscape() throws {
        // The input arrives at once; the guest is still starting when Swiftlet reads it.
        let result = try Swiftlet.run(["run", "--flat", Swiftlet.guest("idle"), "--timeout", "60"], input: Data([0x01, UInt8(ascii: "x")]))
        #expect(result.status == 0)
    }

    @Test("A reset through the keyboard controller (0xFE to port 0x64) ends the VM with status 6")
    func keyboardControllerReset() throws {
        // mov $0xfe, %al; out %al, $0x64; 1: jmp 1b
        let path = try temporaryFile([0xB0, 0xFE, 0xE6, 0x64, 0xEB, 0xFE], name: "reset.bin")
        defer { try? FileManager.default.removeItem(at: path) }
        let result = try Swiftlet.run(["run", "--flat", path.path, "--timeout", "30"])
        #expect(result.status == 6)
        #expect(result.stderr == "swiftlet: the guest asked for a reset (i8042 keyboard controller reset line)\n")
    }

    @Test("MMIO to an address with neither RAM nor a device: writes dropped, reads all ones")
    func unclaimedMMIO() throws {
        // Protected mode with flat segments, then:
        //   movl $0x12345678, 0xf0000000; mov 0xf0000000, %eax; cmp $-1, %eax
        //   jne bad; out 0 to 0xf4 (status 1); bad: out 1 to 0xf4 (status 3)
        let code: [UInt8] = [
            0xfa, 0x66, 0x0f, 0x01, 0x16, 0x58, 0x7c, 0x0f, 0x20, 0xc0, 0x0c, 0x01, 0x0f, 0x22, 0xc0, 0x66,
            0xea, 0x17, 0x7c, 0x00, 0x00, 0x08, 0x00, 0x66, 0xb8, 0x10, 0x00, 0x8e, 0xd8, 0xc7, 0x05, 0x00,
            0x00, 0x00, 0xf0, 0x78, 0x56, 0x34, 0x12, 0xa1, 0x00, 0x00, 0x00, 0xf0, 0x83, 0xf8, 0xff, 0x75,
            0x04, 0xb0, 0x00, 0xe6, 0xf4, 0xb0, 0x01, 0xe6, 0xf4, 0x0f, 0x1f, 0x80, 0x00, 0x00, 0x00, 0x00,
            0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0xff, 0xff, 0x00, 0x00, 0x00, 0x9a, 0xcf, 0x00,
            0xff, 0xff, 0x00, 0x00, 0x00, 0x92, 0xcf, 0x00, 0x17, 0x00, 0x40, 0x7c, 0x00, 0x00,
        ]
        let path = try temporaryFile(code, name: "mmio.bin")
        defer { try? FileManager.default.removeItem(at: path) }
        let result = try Swiftlet.run(["run", "--flat", path.path, "--timeout", "30", "--trace-exits"])
        #expect(result.status == 1)
        #expect(result.stderr.contains("MMIO write 0xf0000000 page (no device)"))
        #expect(result.stderr.contains("MMIO read 0xf0000000 page (no device)"))
    }

    @Test("A triple fault stops the VM with status 4, the reason and a register dump; --triple-fault reset makes it a reset")
    func tripleFault() throws {
        // Real mode -> protected mode with a GDT and an IDT of limit 0, then ud2: #UD
        // cannot be delivered (-> #GP -> #DF -> triple fault). Assembled from:
        //   7c00 cli; lgdtl 0x7c30; lidtl 0x7c36; mov %cr0,%eax; or $1,%al; mov %eax,%cr0
        //   7c15 ljmpl $0x8,$0x7c1d;  7c1d (32-bit) ud2
        //   7c20 GDT: null, flat 32-bit code;  7c30 GDTR (15, 0x7c20);  7c36 IDTR (0, 0)
        let code: [UInt8] = [
            0xfa, 0x66, 0x0f, 0x01, 0x16, 0x30, 0x7c, 0x66, 0x0f, 0x01, 0x1e, 0x36, 0x7c, 0x0f, 0x20, 0xc0,
            0x0c, 0x01, 0x0f, 0x22, 0xc0, 0x66, 0xea, 0x1d, 0x7c, 0x00, 0x00, 0x08, 0x00, 0x0f, 0x0b, 0x90,
            0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0xff, 0xff, 0x00, 0x00, 0x00, 0x9a, 0xcf, 0x00,
            0x0f, 0x00, 0x20, 0x7c, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
        ]
        let path = FileManager.default.temporaryDirectory.appendingPathComponent("triple-\(UUID().uuidString).bin")
        try Data(code).write(to: path)
        defer { try? FileManager.default.removeItem(at: path) }
        let result = try Swiftlet.run(["run", "--flat", path.path, "--timeout", "30"])
        #expect(result.status == 4)
        #expect(result.stderr.contains("triple-faulted (KVM_EXIT_SHUTDOWN)"))
        #expect(result.stderr.contains("RIP=0000000000007c1d"))
        #expect(result.stderr.contains("mode: 32-bit protected mode, CPL 0"))
        #expect(result.stderr.contains("CS=0008"))
        #expect(result.stderr.contains("GDT=0000000000007c20/000f IDT=0000000000000000/0000"))

        let reset = try Swiftlet.run(["run", "--flat", path.path, "--timeout", "30", "--triple-fault", "reset"])
        #expect(reset.status == 6)
        #expect(reset.stderr == "swiftlet: the guest asked for a reset (triple fault on vCPU 0)\n")
    }
}
