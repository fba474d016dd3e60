import Foundation
import Testing

/// The guests that make interrupts and second-level paging visible (guests/interrupts.s,
/// guests/memory-slots.s), with what --trace-exits and --show-memory print about them.
@Suite("Teaching: interrupts and memory slots")
struct TeachingGuestTests {
    @Test("Timer ticks and the UART's receive interrupt reach the guest's handlers through the IOAPIC")
    func interrupts() throws {
        let result = try Swiftlet.run(["run", "--flat", Swiftlet.guest("interrupts"), "--trace-exits", "--timeout", "60"],
                                      input: Data("hello.".utf8))
        #expect(result.status == 1, "\(result.stdout)\n\(result.stderr)")
        #expect(result.stdout.contains("[serial] hello."))
        let summary = result.stdout.split(separator: "\n").first { $0.hasPrefix("interrupts: ") && $0.contains("timer interrupts") }
        let ticks = summary.flatMap { Int($0.split(separator: " ")[1]) } ?? 0
        #expect(ticks >= 50, "the guest waits 50 ticks after the '.': \(String(describing: summary))")
        #expect(summary?.contains("serial interrupts (vector 0x24, IIR 0x04), 6 bytes received") == true)
        // What reached Swiftlet: the UART's registers, and GSI 4 raised with KVM_IRQ_LINE.
        let table = result.stderr
        #expect(table.contains("port out 0x03f9 serial (COM1)"))
        #expect(table.contains("port in  0x03fa serial (COM1)"))
        let line = table.split(separator: "\n").first { $0.hasPrefix("interrupt lines Swiftlet drove (KVM_IRQ_LINE)") }
        #expect(line?.contains("GSI 4 serial (COM1): raised") == true)
        #expect(line?.contains("raised 0 times") == false)
        // What did not: the PICs, the PIT, the IOAPIC and local APIC stay in KVM.
        for absent in ["0x0020", "0x0021", "0x00a1", "0x0040", "0x0043", "0xfec", "0xfee", "MMIO"] {
            #expect(!table.contains(absent), "\(absent) reached Swiftlet:\n\(table)")
        }
    }

    @Test("Without input the timer alone ends the wait after 10 s of ticks")
    func interruptsWithoutInput() throws {
        let result = try Swiftlet.run(["run", "--flat", Swiftlet.guest("interrupts"), "--timeout", "60"])
        #expect(result.status == 1)
        #expect(result.stdout.contains("[timer] 1000 ticks"))
        #expect(result.stdout.contains("interrupts: 1000 timer interrupts (vector 0x20), 0 serial interrupts"))
    }

    @Test("Memory slots: an MMIO exit where no slot is, slots added at run time, a read-only slot, the dirty log")
    func memorySlots() throws {
        let result = try Swiftlet.run(["run", "--flat", Swiftlet.guest("memory-slots"), "--show-memory", "--trace-exits",
                                       "--memory", "64M", "--timeout", "60"])
        #expect(result.status == 1, "\(result.stdout)\n\(result.stderr)")
        let out = result.stdout
        #expect(out.contains("reading virtual 0x40000000, where no memory slot is: 0xffffffffffffffff"))
        #expect(out.contains("(KVM_SET_USER_MEMORY_REGION while the guest runs): slot 1\n   it holds \"RAM that Swiftlet added while the guest runs\""))
        #expect(out.contains("(KVM_MEM_READONLY): slot 2\n   it holds \"read-only memory: the guest reads it, a write leaves the guest\""))
        #expect(out.contains("Swiftlet's write trap saw 1 write, at 0xf0200010, value 0x5a5a5a5a"))
        #expect(out.contains("the dirty log now: 3 pages written: 0xf0001000 0xf0004000 0xf0005000"))
        #expect(out.contains("memory: done"))
        let err = result.stderr.split(separator: "\n").map(String.init)
        // At the start: guest RAM only.
        #expect(err.first == "memory slots (KVM_SET_USER_MEMORY_REGION): guest-physical range -> host address")
        #expect(err.count > 1 && err[1].hasPrefix("  slot 0: 0x0000000000000000-0x0000000003ffffff (64M) -> host 0x"))
        // The exits the steps caused.
        #expect(err.contains { $0.hasPrefix("MMIO read 0xf0000000 page (no device)") && $0.split(separator: " ").contains("1") })
        #expect(err.contains { $0.hasPrefix("MMIO write read-only slot (writes trap here)") && $0.split(separator: " ").contains("1") })
        // At the end: the slots added, and the pages written, as runs.
        #expect(err.contains { $0.hasPrefix("  slot 1: 0x00000000f0000000-0x00000000f01fffff (2M)")
            && $0.hasSuffix("RAM added at run time, KVM_MEM_LOG_DIRTY_PAGES: 4 pages written: 0xf0000000-0xf0001fff, 0xf0004000-0xf0005fff") })
        #expect(err.contains { $0.hasPrefix("  slot 2: 0x00000000f0200000-0x00000000f03fffff (2M)")
            && $0.hasSuffix("read-only, added at run time, KVM_MEM_READONLY: the guest cannot write here (each write was an MMIO exit)") })
        let slot0 = err.last { $0.hasPrefix("  slot 0:") }
        #expect(slot0?.contains("pages written: 0x1000-") == true, "page tables at 0x1000: \(String(describing: slot0))")
    }

    @Test("The memory-slots guest says what it needs when the slot device is absent")
    func memorySlotsWithoutDevice() throws {
        let result = try Swiftlet.run(["run", "--flat", Swiftlet.guest("memory-slots"), "--timeout", "60"])
        #expect(result.status == 3)
        #expect(result.stdout.contains("no slot device at port 0x5a0: run me with swiftlet run --show-memory"))
    }

    @Test("--show-memory lists the pages a guest wrote as runs, not one line per page")
    func showMemoryIsCompact() throws {
        let result = try Swiftlet.run(["run", "--flat", Swiftlet.guest("long-mode"), "--show-memory", "--memory", "64M"])
        #expect(result.status == 1)
        let lines = result.stderr.split(separator: "\n")
        #expect(lines.count == 5, "\(result.stderr)")
        // long-mode writes its page tables (0x1000-0x6fff), its stack page and the pattern page.
        #expect(lines.last?.contains("pages written: 0x1000-0x7fff, 0x20000-0x20fff") == true, "\(result.stderr)")
    }
}

@Suite("Debugging a guest")
struct DebuggingTests {
    @Test("A crash report names the objdump command that shows the faulting instruction, and it does")
    func objdumpHint() throws {
        let result = try Swiftlet.run(["run", "--flat", Swiftlet.guest("cmpxchg16b"), "--timeout", "60"])
        #expect(result.status == 4)
        let command = result.stderr.split(separator: "\n").first { $0.hasPrefix("    objdump -D -b binary -m i386:x86-64 --adjust-vma=0x7c00 ") }
        guard let command else {
            Issue.record("no objdump line in:\n\(result.stderr)")
            return
        }
        let disassembly = try Swiftlet.runShell(String(command))
        #expect(disassembly.status == 0)
        let first = disassembly.stdout.split(separator: "\n").first { $0.contains(":\t") }
        #expect(first?.contains("lock cmpxchg16b (%rdi)") == true, "\(disassembly.stdout)")
    }
}
