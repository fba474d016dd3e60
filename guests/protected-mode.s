# protected-mode: from 16-bit real mode into 32-bit protected mode.
#
# What it shows
#   1. A Global Descriptor Table (GDT): the table of segment descriptors that protected
#      mode uses instead of real mode's "segment * 16". LGDT tells the CPU where it is.
#   2. Setting CR0.PE (bit 0) switches on protection, but the CPU keeps running the old
#      16-bit code until CS is reloaded: a far jump loads CS with a selector of a 32-bit
#      code descriptor, and from then on instructions are decoded as 32-bit code.
#   3. In 32-bit code: loading the data segment registers with selectors, reading CR0,
#      addressing memory beyond real mode's 1 MiB reach, and how a descriptor's base
#      moves a segment: offset 0 in a segment with base 1 MiB is physical 1 MiB.
#
# Syntax: GNU as, AT&T order, "op source, destination".

        .include "print.inc"            # PRINT16 / PRINT32 macros (no code)

        .code16
        .globl  _start
_start:
        cli                             # no IDT is set up: interrupts must stay off
        cld
        ljmp    $0, $start16            # make sure CS = 0 (see hello-real.s)
start16:
        xor     %ax, %ax
        mov     %ax, %ds
        mov     %ax, %es
        mov     %ax, %ss
        mov     $0x7C00, %sp

        PRINT16 "[real mode] loading the GDT and setting CR0.PE\n"

        # LGDT reads a 6-byte "pseudo-descriptor": a 16-bit limit (size - 1) and a
        # 32-bit base. The "l" suffix makes it load all 32 bits of the base.
        lgdtl   gdt_pointer

        mov     %cr0, %eax
        or      $1, %eax                # CR0.PE = 1: protected mode
        mov     %eax, %cr0

        # Still decoding 16-bit code with the old CS. Reload CS with selector 0x08,
        # the 32-bit code descriptor below; "ljmpl" encodes a 32-bit target offset.
        ljmpl   $CODE32_SEL, $start32

        .code32
start32:
        # Selectors are indexes into the GDT (index * 8, plus table and privilege bits).
        # Loading one makes the CPU read that descriptor's base, limit and type into
        # the segment register's hidden part.
        mov     $DATA32_SEL, %ax
        mov     %ax, %ds
        mov     %ax, %es
        mov     %ax, %fs
        mov     %ax, %gs
        mov     %ax, %ss
        mov     $0x7C00, %esp

        PRINT32 "[protected mode] running 32-bit code, CS = 0x08\n"

        PRINT32 "  CR0 = "
        mov     %cr0, %eax
        call    serial_puthex32
        PRINT32 " (PE = bit 0 is set, paging is off)\n"

        # Real mode can only address the first 1 MiB (plus 64 KiB). Our flat segments
        # have a 4 GiB limit, so plain 32-bit addresses reach any RAM.
        movl    $0x5EC0DE32, 0x100000   # write a dword at physical 1 MiB
        PRINT32 "  wrote "
        mov     0x100000, %eax          # and read it back through DS (base 0)
        call    serial_puthex32
        PRINT32 " at 1 MiB through DS (base 0, offset 0x00100000)\n"

        # Selector 0x18 describes a data segment whose base is 1 MiB: address 0 in it
        # is physical 0x00100000, the dword we just wrote.
        mov     $DATA_AT_1M_SEL, %ax
        mov     %ax, %es
        mov     %es:0, %eax
        PRINT32 "  read  "
        call    serial_puthex32
        PRINT32 " through ES (base 0x00100000, offset 0): same memory\n"
        cmp     $0x5EC0DE32, %eax
        jne     failed

        PRINT32 "  writing 0 to port 0xF4 to exit\n"
        mov     $0, %al
        out     %al, $0xF4
1:      hlt
        jmp     1b

failed:
        PRINT32 "  MISMATCH\n"
        mov     $1, %al                 # exit code 1: status 3, a failure
        out     %al, $0xF4
        jmp     1b

# --- the Global Descriptor Table ----------------------------------------------------
#
# Each descriptor is 8 bytes: base (32 bits), limit (20 bits), access byte and flags,
# scattered over the 8 bytes for historical reasons (the 80286 had 24-bit bases).
#
#   access byte 0x9A = present, ring 0, code/data, code: execute + read
#   access byte 0x92 = present, ring 0, code/data, data: read + write
#   flags       0xC  = granularity 4 KiB (limit counted in pages), 32-bit default size
#   flags       0x4  = byte granularity, 32-bit
#
# The macro takes the fields and lays the bits out where the CPU expects them.
        .macro  DESCRIPTOR base, limit, access, flags
        .word   (\limit) & 0xFFFF                       # limit 15..0
        .word   (\base) & 0xFFFF                        # base 15..0
        .byte   ((\base) >> 16) & 0xFF                  # base 23..16
        .byte   \access
        .byte   (((\limit) >> 16) & 0x0F) | ((\flags) << 4)  # limit 19..16, flags
        .byte   ((\base) >> 24) & 0xFF                  # base 31..24
        .endm

        .equ    CODE32_SEL, 0x08
        .equ    DATA32_SEL, 0x10
        .equ    DATA_AT_1M_SEL, 0x18

        .balign 8                       # descriptors are fetched faster when aligned
gdt:
        .quad   0                                       # 0x00: the null descriptor
        DESCRIPTOR 0,        0xFFFFF, 0x9A, 0xC         # 0x08: code, 0..4 GiB, 32-bit
        DESCRIPTOR 0,        0xFFFFF, 0x92, 0xC         # 0x10: data, 0..4 GiB
        DESCRIPTOR 0x100000, 0xFFFF,  0x92, 0x4         # 0x18: data, 1 MiB..+64 KiB
gdt_end:

gdt_pointer:
        .word   gdt_end - gdt - 1       # limit: size in bytes minus 1
        .long   gdt                     # base: linear address of the table

        .include "serial16.inc"
        .include "serial32.inc"
