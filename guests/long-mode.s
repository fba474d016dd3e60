# long-mode: 64-bit mode with page tables built by the guest, and a second mapping.
#
# What it shows
#   1. The road from real mode to 64-bit mode (long-mode.inc, shared with the CPL 3
#      guests): GDT, protected mode, 4-level page tables, PAE, EFER.LME, paging.
#   2. The control registers once there: CR0.PG and PE, CR3 (the page-table root),
#      CR4.PAE, EFER.LME and EFER.LMA ("long mode active").
#   3. Mapping one 4 KiB page at a "higher-half" virtual address, 0xFFFF800040203000,
#      to physical page 0x20000: how a virtual address splits into four 9-bit table
#      indexes and a 12-bit offset, and which entries the walk needs.
#   4. Proof: a value written at physical 0x20000 (through the identity map) is read
#      back through the new address, and a value written through the new address shows
#      up at physical 0x20000.
#
# Syntax: GNU as, AT&T order, "op source, destination".

        .include "print.inc"            # PRINT16 / PRINT32 / PRINT macros (no code)
        .include "long-mode.inc"        # the start-up; jumps to long_mode_main below

# A canonical "higher-half" address: bits 63..48 must all equal bit 47, so the only
# valid 64-bit addresses are 0..0x00007FFFFFFFFFFF and 0xFFFF800000000000..all ones.
        .equ    HIGH_VA,        0xFFFF800040203000
        .equ    PATTERN_PA,     0x20000         # the physical page it will map
        .equ    PDPT_HIGH,      0x4000          # new tables for the walk (long-mode.inc
        .equ    PD_HIGH,        0x5000          #  leaves 0x4000..0x6FFF free)
        .equ    PT_HIGH,        0x6000
        .equ    MAGIC,          0x0123456789ABCDEF  # any recognisable value
        .equ    MAGIC_BACK,     0xFEEDFACECAFEBEEF

        .code64
long_mode_main:
        PRINT   "  CR0  = "
        mov     %cr0, %rax
        call    serial_puthex
        PRINT   "  PG (bit 31) and PE (bit 0) set\n"
        PRINT   "  CR3  = "
        mov     %cr3, %rax
        call    serial_puthex
        PRINT   "  the PML4 table\n"
        PRINT   "  CR4  = "
        mov     %cr4, %rax
        call    serial_puthex
        PRINT   "  PAE (bit 5) set\n"
        PRINT   "  EFER = "
        mov     $MSR_EFER, %ecx
        rdmsr                           # EDX:EAX = EFER
        shl     $32, %rdx
        or      %rdx, %rax
        call    serial_puthex
        PRINT   "  LME (bit 8) and LMA (bit 10) set\n"

        # --- 1. put a known pattern in physical page 0x20000 -------------------------
        # Below 2 MiB virtual equals physical (the identity map), so this writes to
        # physical 0x20000: a 64-bit magic number, then a short text.
        PRINT   "[64-bit] writing "
        movabs  $MAGIC, %rax            # MOVABS: a full 64-bit immediate
        call    serial_puthex
        PRINT   " and a text to physical 0x20000\n"
        mov     %rax, PATTERN_PA
        lea     pattern_text(%rip), %rsi
        mov     $(PATTERN_PA + 8), %edi
        mov     $(pattern_text_end - pattern_text), %ecx
        rep movsb                       # copy ECX bytes from [RSI] to [RDI]

        # --- 2. map HIGH_VA -> PATTERN_PA ---------------------------------------------
        # A 4-level walk splits the virtual address like this:
        #   bits 47..39  index into the PML4   (which 512 GiB)
        #   bits 38..30  index into a PDPT     (which 1 GiB)
        #   bits 29..21  index into a PD       (which 2 MiB)
        #   bits 20..12  index into a PT       (which 4 KiB page)
        #   bits 11..0   offset in the page
        # Our identity map uses PML4[0] only, so the high address needs three new,
        # empty tables: clear them first.
        mov     $PDPT_HIGH, %edi
        xor     %eax, %eax
        mov     $(3 * 512), %ecx        # three tables of 512 entries
        rep stosq                       # store RAX at [RDI], RCX times

        PRINT   "[64-bit] mapping virtual "
        movabs  $HIGH_VA, %rbx          # RBX = the virtual address, kept throughout
        mov     %rbx, %rax
        call    serial_puthex
        PRINT   " to physical 0x20000:\n"

        mov     %rbx, %rax
        shr     $39, %rax
        and     $511, %eax              # RAX = PML4 index
        PRINT   "  PML4["
        call    serial_putdec
        PRINT   "] -> new PDPT at 0x4000\n"
        movq    $(PDPT_HIGH | PTE_P | PTE_W), PML4(, %rax, 8)

        mov     %rbx, %rax
        shr     $30, %rax
        and     $511, %eax              # RAX = PDPT index
        PRINT   "  PDPT["
        call    serial_putdec
        PRINT   "] -> new PD at 0x5000\n"
        movq    $(PD_HIGH | PTE_P | PTE_W), PDPT_HIGH(, %rax, 8)

        mov     %rbx, %rax
        shr     $21, %rax
        and     $511, %eax              # RAX = PD index
        PRINT   "  PD["
        call    serial_putdec
        PRINT   "] -> new PT at 0x6000\n"
        movq    $(PT_HIGH | PTE_P | PTE_W), PD_HIGH(, %rax, 8)

        mov     %rbx, %rax
        shr     $12, %rax
        and     $511, %eax              # RAX = PT index
        PRINT   "  PT["
        call    serial_putdec
        PRINT   "] -> physical page 0x20000 (present, writable, kernel only)\n"
        movq    $(PATTERN_PA | PTE_P | PTE_W), PT_HIGH(, %rax, 8)

        # The TLB caches translations. A not-present entry is never cached, so this
        # is not strictly needed here, but after changing a mapping that may have been
        # used, INVLPG (or reloading CR3) is what makes the CPU see the new entry.
        invlpg  (%rbx)

        # --- 3. read through the new mapping -----------------------------------------
        mov     (%rbx), %rax            # the load walks PML4 -> PDPT -> PD -> PT
        PRINT   "[64-bit] read through the higher-half address: "
        call    serial_puthex
        movabs  $MAGIC, %rcx
        cmp     %rcx, %rax
        jne     mismatch
        PRINT   " (matches)\n  and the text after it: \""
        lea     8(%rbx), %rsi
        call    serial_puts             # serial_puts reads the text through HIGH_VA
        PRINT   "\"\n"

        # --- 4. and the other way round ----------------------------------------------
        movabs  $MAGIC_BACK, %rdx
        mov     %rdx, 0x800(%rbx)       # write virtual HIGH_VA + 0x800
        PRINT   "[64-bit] wrote "
        mov     %rdx, %rax
        call    serial_puthex
        PRINT   " at virtual +0x800, physical 0x20800 holds "
        mov     (PATTERN_PA + 0x800), %rax  # read physical 0x20800 (identity map)
        call    serial_puthex
        cmp     %rdx, %rax
        jne     mismatch
        PRINT   " (matches)\n"

        PRINT   "long-mode: the mapping works; writing 0 to port 0xF4 to exit\n"
        xor     %eax, %eax
        jmp     exit_vm

mismatch:
        PRINT   " MISMATCH\n"
        mov     $1, %al                 # exit code 1: status 3, a failure
        jmp     exit_vm

pattern_text:
        .ascii  "hello from physical page 0x20000"
        .byte   0
pattern_text_end:
