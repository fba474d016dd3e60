import Basics
import CKVM
import Foundation
@testable import KVM
import Memory
import Testing

/// Memory slots beyond plain RAM, and the vCPU's shared mapping, on real /dev/kvm: what
/// docs/memory.md and docs/architecture.md describe, checked.
@Suite("Memory slots, dirty log and the kvm_run mapping", .enabled(if: FileManager.default.isReadableFile(atPath: "/dev/kvm"), "needs /dev/kvm"))
struct MemorySlotTests {
    /// Real mode reaches 0x100000 (just above the TinyVM's 1 MiB of RAM) as 0xFFFF:0x0010.
    static let setDSToFFFF: [UInt8] = [0xB8, 0xFF, 0xFF, 0x8E, 0xD8]   // mov $0xffff, %ax; mov %ax, %ds

    @Test("A read-only slot is read without exits; a write to it exits as MMIO and leaves it unchanged")
    func readOnlySlot() throws {
        let code = Self.setDSToFFFF + [
            0xA0, 0x10, 0x00,               // mov ds:0x10, %al   (guest-physical 0x100000, the slot)
            0xE6, 0x80,                     // out %al, $0x80     (show what was read)
            0xC6, 0x06, 0x10, 0x00, 0x11,   // movb $0x11, ds:0x10
            0xE6, 0x81,                     // out %al, $0x81
        ]
        let tiny = try TinyVM(code: code)
        #expect(tiny.vm.system.check(.readOnlyMemory) > 0)
        let rom = try GuestMemory(size: 4096, transparentHugePages: false)
        try rom.write(Array("ROM!".utf8), at: 0)
        try tiny.vm.setUserMemoryRegion(slot: 1, guestAddress: 0x10_0000, size: 4096, hostAddress: rom.regions[0].hostAddress,
                                        flags: .readOnly)
        #expect(try tiny.runToPortExit()?.value == UInt8(ascii: "R"))
        guard case let .mmio(address, isWrite, data) = try tiny.vcpu.run() else {
            Issue.record("the write to the read-only slot did not exit as MMIO")
            return
        }
        #expect(address == 0x10_0000 && isWrite && data.count == 1 && data[0] == 0x11)
        #expect(try tiny.runToPortExit()?.port == 0x81)
        #expect(try rom.read(at: 0, count: 4) == Array("ROM!".utf8))
    }

    @Test("The dirty log names the pages the guest wrote, and reading it clears it")
    func dirtyLog() throws {
        let code: [UInt8] = [
            0xA2, 0x00, 0x50,               // mov %al, 0x5000
            0xA2, 0x00, 0x60,               // mov %al, 0x6000
            0xA2, 0x00, 0x68,               // mov %al, 0x6800 (the same page)
            0xE6, 0x80,                     // out %al, $0x80
            0xA2, 0x00, 0x90,               // mov %al, 0x9000
            0xE6, 0x81,                     // out %al, $0x81
        ]
        let tiny = try TinyVM(code: code, slotFlags: .logDirtyPages)
        let pages = Int(tiny.memory.size / 4096)
        #expect(try tiny.vm.dirtyLog(slot: 0, pageCount: pages).count == 0)
        #expect(try tiny.runToPortExit()?.port == 0x80)
        let first = try tiny.vm.dirtyLog(slot: 0, pageCount: pages)
        #expect(first.runs == [5..<7])
        #expect(try tiny.vm.dirtyLog(slot: 0, pageCount: pages).count == 0)
        #expect(try tiny.runToPortExit()?.port == 0x81)
        #expect(try tiny.vm.dirtyLog(slot: 0, pageCount: pages).runs == [9..<10])
    }

    @Test("A slot added while the guest runs appears at once; an address without one is an MMIO exit")
    func slotAddedAtRunTime() throws {
        let code = Self.setDSToFFFF + [
            0xA0, 0x10, 0x00,               // mov ds:0x10, %al   (0x100000: no slot yet)
            0xA0, 0x10, 0x00,               // the same read again, after the slot exists
            0xE6, 0x80,                     // out %al, $0x80
        ]
        let tiny = try TinyVM(code: code)
        guard case let .mmio(address, isWrite, data) = try tiny.vcpu.run() else {
            Issue.record("a read where no slot is did not exit as MMIO")
            return
        }
        #expect(address == 0x10_0000 && !isWrite)
        data[0] = 0xEE                      // what a device would answer
        let added = try GuestMemory(size: 4096, transparentHugePages: false)
        try added.write([0x5A], at: 0)
        try tiny.vm.setUserMemoryRegion(slot: 1, guestAddress: 0x10_0000, size: 4096, hostAddress: added.regions[0].hostAddress)
        #expect(try tiny.runToPortExit()?.value == 0x5A)
    }

    @Test("kvm_run fills the first page of the vCPU mapping; port data lives on the page after it")
    func runAreaLayout() throws {
        let tiny = try TinyVM(code: [0xB0, 0x42, 0xE6, 0x80])   // mov $0x42, %al; out %al, $0x80
        let mapping = tiny.vm.system.vcpuMmapSize
        #expect(MemoryLayout<kvm_run>.size <= 4096)
        #expect(mapping >= 3 * 4096, "kvm_run, the I/O data page and the coalesced-MMIO ring")
        #expect(try tiny.runToPortExit()?.value == 0x42)
        let offset = Int(tiny.vcpu.runArea.pointee.io.data_offset)
        #expect(offset == Int(CKVM_PIO_PAGE_OFFSET) * 4096)
        #expect(offset + 1 <= mapping)
    }

    @Test("During an 'in' exit RIP is still at the instruction; the next KVM_RUN completes it")
    func ripDuringAnInExit() throws {
        let tiny = try TinyVM(code: [0xE4, 0x81, 0x90])  // in $0x81, %al; nop
        guard case let .io(port, isWrite, _, _, data) = try tiny.vcpu.run() else {
            Issue.record("no port exit")
            return
        }
        #expect(port == 0x81 && !isWrite)
        #expect(try tiny.vcpu.registers().rip == 0x7C00)
        data[0] = 0x99
        // immediate_exit: complete the pending 'in' without running further.
        tiny.vcpu.requestImmediateExit()
        guard case .interrupted = try tiny.vcpu.run() else {
            Issue.record("KVM_RUN with immediate_exit did not return at once")
            return
        }
        let regs = try tiny.vcpu.registers()
        #expect(regs.rip == 0x7C02)
        #expect(regs.rax & 0xFF == 0x99)
    }
}

@Suite("PageBitmap (the dirty log's layout)")
struct PageBitmapTests {
    @Test("Runs of written pages, across word boundaries; bits past the slot are ignored")
    func runs() {
        var words: [UInt64] = [0, 0]
        for page in [0, 1, 2, 63, 64, 70] { words[page / 64] |= 1 << UInt64(page % 64) }
        words[1] |= 1 << 40                  // page 104: outside a 100-page slot
        let bitmap = PageBitmap(pageCount: 100, words: words)
        #expect(bitmap.runs == [0..<3, 63..<65, 70..<71])
        #expect(bitmap.count == 6)
        #expect(!bitmap.contains(104) && !bitmap.contains(-1))
    }

    @Test("Runs across whole words of written pages, up to the end of the slot")
    func longRuns() {
        #expect(PageBitmap(pageCount: 130, words: [.max, .max, .max]).runs == [0..<130])
        #expect(PageBitmap(pageCount: 200, words: [1 << 63, .max, 1, 0]).runs == [63..<129])
        #expect(PageBitmap(pageCount: 256, words: [0, 0, 0, 1 << 63]).runs == [255..<256])
    }

    @Test("A union keeps the pages of every read")
    func union() {
        var total = PageBitmap(pageCount: 10, words: [0b11])
        total.formUnion(PageBitmap(pageCount: 10, words: [0b1000]))
        #expect(total.runs == [0..<2, 3..<4])
        #expect(PageBitmap(pageCount: 0).runs.isEmpty)
    }
}
