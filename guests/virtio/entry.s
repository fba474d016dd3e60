# entry.s: the first instructions of the virtio guests (virtio-blk, virtio-net), the switch
# to 64-bit mode, and the few things C cannot say.
#
# One ELF file, two ways in
#
#   The same file carries the headers of two boot protocols, each with its own entry point:
#
#   * Multiboot v1 (what Swiftlet, GRUB and QEMU's pc, q35 and microvm -kernel use for this
#     file): the header below, three words in the first 8 KiB of the file. The loader loads
#     the ELF segments and jumps to the ELF entry point, `multiboot_entry`, in 32-bit
#     protected mode, paging off, flat segments, with
#         EAX = 0x2BADB002 (the "booted by Multiboot" magic)
#         EBX = physical address of the Multiboot information (flags, command line, ...)
#   * Xen PVH (what QEMU's microvm and Swiftlet use for an ELF *without* a Multiboot
#     header: guests/build/virtio-blk-pvh.elf and virtio-net-pvh.elf are the programs
#     without it): an ELF note,
#     type 18 (XEN_ELFNOTE_PHYS32_ENTRY), names `pvh_entry`. The loader enters there in
#     32-bit protected mode, paging off, flat segments, with
#         EBX = physical address of struct hvm_start_info, whose first word is the magic
#               0x336EC578 and whose cmdline_paddr field (offset 24) points at the
#               command line.
#
#   A loader that knows both picks one; QEMU and Swiftlet both try Multiboot first. The two
#   entries differ only in the protocol number they pass on; kernel_main (kernel.c) checks
#   the magic number of the protocol it was entered by.
#
# From 32-bit protected mode to 64-bit mode (as in ../long-mode.inc)
#
#   The driver runs at CPL 3 in 64-bit mode, because on the project's nested build hosts
#   only CPL 3 code *with paging on* runs natively: ring 0 code, and any code without
#   paging, is emulated one instruction at a time (~1 us each); and those hosts refuse
#   to turn on 32-bit (non-long-mode) paging at all. 64-bit mode is paging by definition.
#
#       load our GDT and flat data segments
#       CR4.PAE = 1, CR3 = the PML4 below, EFER.LME = 1, CR0.PG = 1  -> long mode is active
#       far jump to a code segment with L = 1                        -> 64-bit mode
#
# The C code is compiled for 64-bit mode (-m64). The ELF file is nevertheless an ELF32
# file (the linker script asks for elf32-i386), because Multiboot loaders, QEMU's among
# them, only load 32-bit ELF files; every address is below 4 GiB, so nothing is lost.
#
# Also here, because C has no words for them: the GDT and the page tables (constant
# data), dropping to ring 3 (IRETQ), and the 256 interrupt entry stubs.

        .set    MB_MAGIC, 0x1BADB002    # Multiboot v1 header magic
        .set    MB_FLAGS, 0x00000000    # no requirements: the ELF headers say where to load
        .set    BOOT_MULTIBOOT, 1       # kernel_main's `protocol` argument (kernel.h)
        .set    BOOT_PVH, 2

        .set    KERNEL_CS, 0x08         # GDT selectors (kernel.h has the same list)
        .set    KERNEL_DS, 0x10
        .set    USER_CS, 0x18 | 3       # RPL 3 in the low two bits
        .set    USER_DS, 0x20 | 3

        .set    MSR_EFER, 0xC0000080
        .set    EFER_LME, 1 << 8        # long mode enable
        .set    CR0_PG, 1 << 31
        .set    CR4_PAE, 1 << 5

# ---- the Multiboot header ----------------------------------------------------------------
# The linker script puts .multiboot first in the file, well inside the first 8 KiB.
        .section .multiboot, "a"
        .p2align 2
        .long   MB_MAGIC
        .long   MB_FLAGS
        .long   -(MB_MAGIC + MB_FLAGS)  # the three words add up to 0 (mod 2^32)

# ---- the PVH note ------------------------------------------------------------------------
# An ELF note: name size, descriptor size, type, then the name ("Xen" and its NUL) and the
# descriptor (the 32-bit physical entry address), each padded to 4 bytes. The linker script
# gives it a PT_NOTE program header, which is where loaders look for notes.
        .section .note.Xen, "a"
        .p2align 2
        .long   4                       # namesz: "Xen\0"
        .long   4                       # descsz: one 32-bit address
        .long   18                      # type: XEN_ELFNOTE_PHYS32_ENTRY
        .asciz  "Xen"
        .long   pvh_entry

        .text
# ---- 32-bit protected mode -----------------------------------------------------------------
        .code32
        .globl  multiboot_entry
multiboot_entry:                        # the ELF entry point
        cli                             # no IDT yet: interrupts stay off
        mov     $BOOT_MULTIBOOT, %edi
        jmp     start32

        .globl  pvh_entry
pvh_entry:                              # named by the PVH note
        cli
        mov     $BOOT_PVH, %edi

# EDI = the protocol, EAX and EBX = what the loader left there.
start32:
        cld                             # string instructions count upwards (the C ABI)
        mov     %eax, %esi              # keep the loader's EAX (WRMSR needs EAX)
        lgdt    gdt_pointer             # in 32-bit mode LGDT reads a 6-byte pointer
        mov     $KERNEL_DS, %ax         # flat data from our GDT
        mov     %ax, %ds
        mov     %ax, %es
        mov     %ax, %ss
        mov     %ax, %fs
        mov     %ax, %gs
        mov     $boot_stack_top, %esp   # neither protocol gives us a stack

        mov     %cr4, %eax              # long mode uses the PAE page-table format
        or      $CR4_PAE, %eax
        mov     %eax, %cr4
        mov     $pml4, %eax             # the top-level page table
        mov     %eax, %cr3
        mov     $MSR_EFER, %ecx         # RDMSR/WRMSR: MSR number in ECX, value in EDX:EAX
        rdmsr
        or      $EFER_LME, %eax
        wrmsr
        mov     %cr0, %eax              # paging on with EFER.LME set: long mode is active,
        or      $CR0_PG, %eax           # in compatibility mode (CS is still 32-bit)
        mov     %eax, %cr0
        ljmp    $KERNEL_CS, $start64    # CS with L = 1: 64-bit mode

# ---- 64-bit mode, CPL 0 ---------------------------------------------------------------------
        .code64
start64:
        mov     $KERNEL_DS, %eax
        mov     %eax, %ds
        mov     %eax, %es
        mov     %eax, %ss
        mov     $boot_stack_top, %rsp
        # kernel_main(protocol, EAX, EBX): the first three integer arguments of the System V
        # ABI go in EDI, ESI, EDX. (The upper halves of registers are undefined after the
        # mode switch; the 32-bit arguments only use the lower halves.)
        mov     %ebx, %edx
        call    kernel_main             # never returns
1:      jmp     1b

# ---- enter_user_mode(entry, user stack) --------------------------------------------------------
# There is no "jump to ring 3" instruction. IRETQ, the return from an interrupt, pops RIP,
# CS, RFLAGS, RSP and SS, and may return to a less privileged ring. So we build the frame
# an interrupt taken in ring 3 would have left, and return from it (see ../user-mode.inc):
#     SS = ring 3 data, RSP = the user stack, RFLAGS = IOPL 3 and IF = 0,
#     CS = ring 3 64-bit code, RIP = the entry point.
        .globl  enter_user_mode
enter_user_mode:
        mov     $USER_DS, %eax          # DS and ES: ring 3 data too (ignored in 64-bit mode
        mov     %eax, %ds               # for addressing, but a ring 3 program may reload them)
        mov     %eax, %es
        push    $USER_DS                # SS
        push    %rsi                    # RSP
        push    $(3 << 12) | (1 << 1)   # RFLAGS: IOPL = 3 (bits 12-13), reserved bit 1
        push    $USER_CS                # CS
        push    %rdi                    # RIP
        iretq

# ---- interrupt and exception entry stubs -----------------------------------------------------
# The IDT (kernel.c) has one gate per vector 0..255, each pointing at one 16-byte stub
# here: isr_stubs + 16 * vector. On an exception or interrupt the CPU switches to the ring
# 0 stack named in the TSS (when it came from ring 3) and pushes, 8 bytes each,
#     SS, RSP, RFLAGS, CS, RIP, and an error code only for vectors 8, 10-14, 17, 21, 29, 30.
# Each stub makes the frame uniform, pushing a 0 "error code" where the CPU pushed none,
# then pushes its vector number and jumps to isr_common, which calls isr_report(frame) in
# C: it prints what happened and ends the VM. In this guest every interrupt or exception
# is a bug.
        .p2align 4
        .globl  isr_stubs
isr_stubs:
        .set    vector, 0
        .rept   256
1:
        .if (vector == 8) || (vector >= 10 && vector <= 14) || (vector == 17) || (vector == 21) || (vector == 29) || (vector == 30)
        .else
        push    $0                      # no error code from the CPU: push a dummy
        .endif
        push    $vector
        jmp     isr_common
        .org    1b + 16, 0x90           # pad to exactly 16 bytes (an error if it were longer)
        .set    vector, vector + 1
        .endr

isr_common:
        mov     %rsp, %rdi              # isr_report's argument: the frame
        and     $-16, %rsp              # the ABI wants a 16-byte aligned stack at a call
        call    isr_report              # never returns
1:      jmp     1b

# ---- the Global Descriptor Table -------------------------------------------------------------
# Segment descriptors (8 bytes; kernel.c explains the fields):
#   access 0x9A / 0x92: present, ring 0, code (execute/read) / data (read/write)
#   access 0xFA / 0xF2: the same with DPL = 3, usable from ring 3
#   flags  0xA: 4 KiB granularity, L = 1 (64-bit code);  0xC: 4 KiB granularity, 32-bit
# In 64-bit mode, base and limit are ignored; type, DPL and L still matter.
        .data
        .p2align 3
        .globl  gdt
gdt:
        .quad   0                       # 0x00 null
        .quad   0x00AF9A000000FFFF      # 0x08 ring 0 code, 64-bit
        .quad   0x00CF92000000FFFF      # 0x10 ring 0 data
        .quad   0x00AFFA000000FFFF      # 0x18 ring 3 code, 64-bit
        .quad   0x00CFF2000000FFFF      # 0x20 ring 3 data
        .quad   0, 0                    # 0x28 the TSS: 16 bytes, filled in by kernel.c
gdt_end:
        .p2align 3
gdt_pointer:                            # LGDT's operand: limit, then base
        .word   gdt_end - gdt - 1
        .quad   gdt                     # 32-bit LGDT reads the low 4 bytes only

# ---- the page tables -----------------------------------------------------------------------
# 4-level paging (Intel SDM vol. 3, 4.5) mapping the first 4 GiB to themselves (an
# "identity map": virtual = physical, so the addresses the program uses are the physical
# addresses a device needs). Each entry: the physical address of the next table or of the
# page, plus flag bits:
#   bit 0 P present, bit 1 R/W writable, bit 2 U/S user (CPL 3 may use it),
#   bit 3 PWT and bit 4 PCD (write-through, cache disable), bit 7 PS (a 2 MiB page).
#   PML4[0] -> PDPT;  PDPT[0..3] -> four page directories;  PD entry i -> 2 MiB at i * 2 MiB.
# The first 4 MiB, where this program, its stacks, rings and buffers are, is ordinary
# cached memory. Everything above is mapped uncached (PCD | PWT): that is where device
# registers (virtio-mmio, PCI BARs) can be, and this program keeps no data there.
        .set    PTE_TABLE, 0x07         # P | R/W | U/S
        .set    PTE_PAGE, 0x87          # P | R/W | U/S | PS
        .set    PTE_UNCACHED, 0x18      # PWT | PCD
        .p2align 12
pml4:
        .quad   pdpt + PTE_TABLE
        .fill   511, 8, 0
pdpt:
        .quad   page_directories + 0x0000 + PTE_TABLE
        .quad   page_directories + 0x1000 + PTE_TABLE
        .quad   page_directories + 0x2000 + PTE_TABLE
        .quad   page_directories + 0x3000 + PTE_TABLE
        .fill   508, 8, 0
page_directories:
        .set    page, 0
        .rept   2048
        .if page < 2
        .quad   (page << 21) | PTE_PAGE
        .else
        .quad   (page << 21) | PTE_PAGE | PTE_UNCACHED
        .endif
        .set    page, page + 1
        .endr

# ---- stacks ----------------------------------------------------------------------------------
        .bss
        .p2align 4
        .skip   16384
        .globl  boot_stack_top
boot_stack_top:                         # ring 0: boot code, then interrupts (the TSS's RSP0)

# No executable stack wanted: this empty section tells the linker so (else it warns).
        .section .note.GNU-stack, "", @progbits
