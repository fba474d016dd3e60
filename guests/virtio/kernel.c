/*
 * kernel.c: the ring 0 (CPL 0) start-up, in 64-bit mode (entry.s got us there): check the
 * boot protocol, set up the TSS and the IDT, mask the legacy interrupt controller, and drop
 * to ring 3 (CPL 3), where the whole driver runs.
 *
 * Why ring 3? On the project's nested build hosts, guest code at CPL 0 is emulated one
 * instruction at a time (about 1 us each), while CPL 3 code with paging on runs natively
 * (docs/host-kvm.md). A driver that polls a ring and computes a CRC over megabytes belongs
 * at CPL 3. On real hardware both run natively, and this set-up is simply correct.
 *
 * What ring 3 needs, and how each need is met:
 *   - Code and data segments with DPL 3: GDT entries 0x18 and 0x20 (entry.s).
 *   - Pages it may touch: entry.s's page tables map the first 4 GiB to themselves with the
 *     U/S (user) bit set at every level: RAM for the rings and buffers, and the device
 *     registers (virtio-mmio, PCI BARs) in the MMIO hole below 4 GiB.
 *   - Port I/O (the UART, the PCI configuration ports, the exit port, the PIT's channels 0
 *     and 2): RFLAGS.IOPL = 3 allows every port at CPL 3. Some hosts (the nested KVM here) run
 *     ring 3 with IOPL forced to 0; for them the TSS's I/O permission bitmap grants
 *     exactly the ports used.
 *   - A TSS: where the CPU finds the ring 0 stack (RSP0) when an exception or an
 *     interrupt arrives in ring 3, and the I/O bitmap.
 *   - An IDT: none of this guest's code should ever fault, but if it does, every vector
 *     leads to isr_report(), which prints the vector, the error code and RIP and ends the
 *     VM with status 3, instead of a triple fault that resets the machine silently.
 *     (Interrupts are off: IF = 0. The nested hosts run ring 3 with IF forced to 1, which
 *     is one more reason to mask the 8259 PIC and to have an IDT anyway.)
 */
#include "kernel.h"
#include "lib.h"

struct boot_info boot_info;

/* ---- boot protocols ---------------------------------------------------------------------- */

#define MULTIBOOT_BOOTED 0x2BADB002u    /* EAX after a Multiboot v1 loader */
#define MULTIBOOT_INFO_CMDLINE (1u << 2) /* flags bit 2: the cmdline field is valid */
#define PVH_MAGIC 0x336EC578u           /* hvm_start_info.magic */

/* The Multiboot information structure (Multiboot 0.6.96, section 3.3), the fields used. */
struct multiboot_info {
    uint32_t flags;          /* +0  which of the fields below are valid */
    uint32_t mem_lower;      /* +4 */
    uint32_t mem_upper;      /* +8 */
    uint32_t boot_device;    /* +12 */
    uint32_t cmdline;        /* +16 physical address of a C string */
};

/* struct hvm_start_info (Xen's arch-x86/hvm/start_info.h), the fields used. */
struct hvm_start_info {
    uint32_t magic;          /* +0  0x336EC578 */
    uint32_t version;        /* +4 */
    uint32_t flags;          /* +8 */
    uint32_t nr_modules;     /* +12 */
    uint64_t modlist_paddr;  /* +16 */
    uint64_t cmdline_paddr;  /* +24 physical address of a C string, 0 if none */
} __attribute__((packed));

/* ---- the Global Descriptor Table ----------------------------------------------------------
 * entry.s defines it (the switch to 64-bit mode needs it before any C runs):
 *   0x00 null, 0x08 ring 0 code (64-bit), 0x10 ring 0 data, 0x18 ring 3 code (64-bit),
 *   0x20 ring 3 data, 0x28 the TSS (a 16-byte "system" descriptor in long mode).
 * A segment descriptor is 8 bytes, with its fields scattered for historical reasons:
 *   bits  0-15  limit 15..0          bits 16-39  base 23..0
 *   bits 40-47  access byte: present (bit 7), DPL (bits 5-6), S (bit 4, 1 = code/data),
 *               type (bits 0-3; 0x9 with S = 0: an available 64-bit TSS)
 *   bits 48-51  limit 19..16         bits 52-55  flags (G, D/B, L)
 *   bits 56-63  base 31..24
 * and a TSS descriptor adds base 63..32 in a second 8 bytes.
 * A selector is the byte offset of a descriptor in the GDT, with the requested privilege
 * level (RPL) in its low two bits. */
enum {
    KERNEL_CS = 0x08,
    TSS_SEL = 0x28,
};

extern uint64_t gdt[7];

/* ---- the task-state segment ---------------------------------------------------------------
 * The 64-bit TSS (Intel SDM vol. 3, 8.7). It no longer switches tasks; the CPU reads RSP0
 * when an interrupt moves it from ring 3 to ring 0, and the I/O permission bitmap, which
 * starts at iomap_base: bit n (bit n%8 of byte n/8) is port n, 0 = allowed. When code runs
 * with CPL > IOPL, IN and OUT are allowed only for ports whose bits are 0; a port past the
 * end of the bitmap (past the TSS limit) is denied. The CPU reads two bytes for each check,
 * so a byte of all ones follows the last one used. */
#define IOMAP_PORTS 0x1000              /* the bitmap covers ports 0x000..0xFFF */
struct tss {
    uint32_t reserved0;
    uint64_t rsp0;                      /* +4   ring 0 stack pointer */
    uint64_t rsp1, rsp2;
    uint64_t reserved1;
    uint64_t ist[7];                    /* +36  interrupt stacks (unused) */
    uint64_t reserved2;
    uint16_t reserved3;
    uint16_t iomap_base;                /* +102 offset of the I/O bitmap in the TSS */
    uint8_t iomap[IOMAP_PORTS / 8 + 1]; /* +104 */
} __attribute__((packed));
_Static_assert(__builtin_offsetof(struct tss, iomap) == 104, "the 64-bit TSS is 104 bytes before the bitmap");

static struct tss tss __attribute__((aligned(128)));

static void allow_ports(uint16_t first, uint16_t last)
{
    for (uint32_t port = first; port <= last; port++)
        tss.iomap[port / 8] &= (uint8_t)~(1u << (port % 8));
}

/* ---- the Interrupt Descriptor Table --------------------------------------------------------
 * 256 gates of 16 bytes. A 64-bit interrupt gate (SDM vol. 3, 6.14.1):
 *   bits  0-15  handler offset 15..0     bits 16-31  code selector (64-bit code)
 *   bits 32-34  IST (0: use RSP0)        bits 40-47  0x8E: present, DPL 0, type 0xE
 *   bits 48-63  handler offset 31..16    bits 64-95  handler offset 63..32
 * DPL 0 means ring 3 cannot raise them with INT n; exceptions and hardware interrupts
 * are delivered regardless of the gate's DPL. */
static uint64_t idt[256][2] __attribute__((aligned(16)));

/* The operand of LGDT and LIDT: a 16-bit limit (size - 1) and a 64-bit linear address. */
struct table_pointer {
    uint16_t limit;
    uint64_t base;
} __attribute__((packed));

/* entry.s */
__attribute__((noreturn)) void enter_user_mode(void (*entry)(void), uint64_t stack_top);
extern const uint8_t isr_stubs[];
extern uint8_t boot_stack_top[];

/* ---- ring 3 ---------------------------------------------------------------------------- */
static uint8_t user_stack[65536] __attribute__((aligned(16)));

/* The 8259 programmable interrupt controllers: writing the interrupt mask register
 * (OCW1, the data ports 0x21 and 0xA1) with all ones masks all 16 legacy IRQs. A firmware
 * may have left the timer (IRQ 0) running; a VMM's virtio-mmio device may raise IRQ 5.
 * We poll, so none is wanted. (The I/O APIC's entries are masked after reset.) */
static void mask_legacy_pic(void)
{
    outb(0x21, 0xFF);
    outb(0xA1, 0xFF);
}

__attribute__((noreturn)) void kernel_main(uint32_t protocol, uint32_t eax, uint32_t info);

void kernel_main(uint32_t protocol, uint32_t eax, uint32_t info)
{
    /* Which protocol, and where is the command line? */
    boot_info.protocol = protocol;
    boot_info.cmdline = "";
    if (protocol == BOOT_MULTIBOOT) {
        if (eax != MULTIBOOT_BOOTED)
            fail("entered at the Multiboot entry point with EAX = 0x%08x, not 0x2badb002", eax);
        const struct multiboot_info *mbi = (const struct multiboot_info *)(uintptr_t)info;
        if ((mbi->flags & MULTIBOOT_INFO_CMDLINE) && mbi->cmdline != 0)
            boot_info.cmdline = (const char *)(uintptr_t)mbi->cmdline;
    } else {
        const struct hvm_start_info *start = (const struct hvm_start_info *)(uintptr_t)info;
        if (start->magic != PVH_MAGIC)
            fail("entered at the PVH entry point, but EBX = 0x%08x holds 0x%08x, not 0x336ec578", info,
                 start->magic);
        if (start->cmdline_paddr >= 0x100000000ull)
            fail("the PVH command line is above 4 GiB (0x%lx), outside the identity map", start->cmdline_paddr);
        if (start->cmdline_paddr != 0)
            boot_info.cmdline = (const char *)(uintptr_t)start->cmdline_paddr;
    }

    /* The TSS: the ring 0 stack for interrupts (the boot stack: kernel_main never returns,
     * so it is free from now on), and the I/O bitmap. */
    memset(&tss, 0, sizeof(tss));
    tss.rsp0 = (uint64_t)(uintptr_t)boot_stack_top;
    tss.iomap_base = __builtin_offsetof(struct tss, iomap);
    memset(tss.iomap, 0xFF, sizeof(tss.iomap)); /* deny all, including the final byte */
    allow_ports(0x0F4, 0x0F4);          /* the exit port */
    allow_ports(0x3F8, 0x3FF);          /* COM1 */
    allow_ports(0xCF8, 0xCFF);          /* PCI configuration mechanism #1: 0xCF8 address, 0xCFC data */
    allow_ports(0x040, 0x043);          /* the 8254 PIT: channel 0 for virtio-blk's bench calibration (bench.c), channel 2 and the mode register for virtio-net's clock */
    allow_ports(0x061, 0x061);          /* system control port B: channel 2's gate and output */

    /* Its descriptor: type 0x9 (available 64-bit TSS), present, DPL 0; then LTR loads the
     * task register with it (and marks it busy). */
    uint64_t base = (uint64_t)(uintptr_t)&tss, limit = sizeof(tss) - 1;
    gdt[TSS_SEL / 8] = (limit & 0xFFFF) | (base & 0xFFFFFF) << 16 | (uint64_t)0x89 << 40 |
                       ((limit >> 16) & 0xF) << 48 | ((base >> 24) & 0xFF) << 56;
    gdt[TSS_SEL / 8 + 1] = base >> 32;
    __asm__ volatile("ltr %w0" : : "r"(TSS_SEL) : "memory");

    /* The IDT: every vector to its stub in entry.s. */
    for (uint32_t vector = 0; vector < 256; vector++) {
        uint64_t handler = (uint64_t)(uintptr_t)(isr_stubs + 16 * vector);
        idt[vector][0] = (handler & 0xFFFF) | (uint64_t)KERNEL_CS << 16 | (uint64_t)0x8E << 40 |
                         ((handler >> 16) & 0xFFFF) << 48;
        idt[vector][1] = handler >> 32;
    }
    struct table_pointer idtr = { sizeof(idt) - 1, (uint64_t)(uintptr_t)idt };
    __asm__ volatile("lidt %0" : : "m"(idtr));

    mask_legacy_pic();

    /* To ring 3, with IOPL 3 and interrupts off, on the ring 3 stack. */
    enter_user_mode(user_main, (uint64_t)(uintptr_t)(user_stack + sizeof(user_stack)));
}

/* ---- exceptions and interrupts ------------------------------------------------------------ */

/* What entry.s leaves on the ring 0 stack: the vector and error code from the stub, then
 * what the CPU pushed. */
struct interrupt_frame {
    uint64_t vector, error_code;
    uint64_t rip, cs, rflags, rsp, ss;
};

static const char *const exception_names[32] = {
    "#DE divide error", "#DB debug", "NMI", "#BP breakpoint", "#OF overflow", "#BR bound range",
    "#UD invalid opcode", "#NM device not available", "#DF double fault", "coprocessor overrun",
    "#TS invalid TSS", "#NP segment not present", "#SS stack fault", "#GP general protection",
    "#PF page fault", "reserved", "#MF x87 error", "#AC alignment check", "#MC machine check",
    "#XM SIMD error", "#VE virtualization", "#CP control protection",
};

__attribute__((noreturn)) void isr_report(const struct interrupt_frame *frame);

void isr_report(const struct interrupt_frame *frame)
{
    uint32_t vector = (uint32_t)frame->vector, cpl = (uint32_t)frame->cs & 3;
    if (vector < 32) {
        uint64_t cr2;
        __asm__ volatile("mov %%cr2, %0" : "=r"(cr2)); /* the address a page fault was about */
        const char *name = exception_names[vector] ? exception_names[vector] : "reserved";
        fail("CPU exception %u (%s), error code 0x%lx, at RIP 0x%lx, CPL %u, RSP 0x%lx, CR2 0x%lx", vector, name,
             frame->error_code, frame->rip, cpl, frame->rsp, cr2);
    }
    fail("unexpected interrupt, vector %u, at RIP 0x%lx, CPL %u (this guest polls: every IRQ is masked)", vector,
         frame->rip, cpl);
}
