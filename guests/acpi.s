# acpi: how an operating system learns to reset and power off a PC, from the ACPI tables.
#
# What it shows
#   * Finding the ACPI tables without a BIOS call: the RSDP ("Root System Description
#     Pointer") sits on a 16-byte boundary between 0xE0000 and 0xFFFFF and starts with
#     "RSD PTR ". It points at the RSDT, a list of 32-bit table addresses.
#   * Checksums: every ACPI table's bytes add up to 0 (mod 256); the RSDP's first 20.
#   * The FADT (signature "FACP"), the table of the fixed ACPI hardware:
#       - RESET_REG (offset 116, a generic address structure: address space, width,
#         offset, access size, 64-bit address) and RESET_VALUE (offset 128): write the
#         value there to reset the machine, if flags bit 10 (RESET_REG_SUP) is set;
#       - PM1a_CNT_BLK (offset 64): the port of the PM1a control register, where writing
#         a sleep type (SLP_TYP, bits 10-12) with SLP_EN (bit 13) puts the machine to
#         sleep, or switches it off;
#       - PM_TMR_BLK (offset 76): the power management timer, a counter at 3.579545 MHz;
#       - DSDT (offset 40): the table of AML byte code.
#   * Which SLP_TYP means "off" is not fixed by the hardware: the DSDT says so, in a
#     named package \_S5 = Package { SLP_TYPa, SLP_TYPb, ... }. In AML that is NameOp
#     (0x08), the name "_S5_", PackageOp (0x12), a PkgLength whose first byte's top two
#     bits say how many more length bytes follow, an element count, then the elements:
#     ZeroOp (0x00), OneOp (0x01) or BytePrefix (0x0A) and a byte. The guest finds
#     "_S5_" followed by 0x12 and reads the first element, as small kernels do.
#
# It prints what it found and checks the PM timer counts. Then it does what its command
# line asks:
#
#   swiftlet run --kernel guests/build/acpi.elf --cmdline reset      # status 6
#   swiftlet run --kernel guests/build/acpi.elf --cmdline poweroff   # status 0
#   swiftlet run --kernel guests/build/acpi.elf                      # status 1
#
# "reset" writes RESET_VALUE to RESET_REG; "poweroff" writes SLP_TYPa, then SLP_TYPa with
# SLP_EN, to PM1a_CNT (the two writes ACPICA, Linux's ACPI code, makes). A machine that
# is still running a second after the write (timed with the PM timer) is reported and
# the guest exits with 1 (status 3), as it does when a table is missing or broken. With
# nothing to do it exits with 0 (status 1).
#
# Like multiboot.s it is a 32-bit Multiboot ELF kernel linked at 1 MiB: Swiftlet writes
# the ACPI tables for a kernel it boots, not for a flat binary.

        .include "print.inc"

        .set    MB_MAGIC, 0x1BADB002
        .set    MB_FLAGS, 0x00000003    # align modules on pages; want memory info
        .set    MB_BOOTED, 0x2BADB002   # what the loader leaves in EAX

        # Table signatures as the little-endian dwords a `cmpl` compares.
        .set    SIG_RSD_, 0x20445352    # "RSD "
        .set    SIG_PTR_, 0x20525450    # "PTR "
        .set    SIG_RSDT, 0x54445352    # "RSDT"
        .set    SIG_FACP, 0x50434146    # "FACP"
        .set    SIG_DSDT, 0x54445344    # "DSDT"
        .set    NAME_S5, 0x5F35535F     # "_S5_"

        # FADT field offsets.
        .set    FADT_DSDT, 40
        .set    FADT_PM1A_CNT, 64
        .set    FADT_PM_TMR, 76
        .set    FADT_FLAGS, 112
        .set    FADT_RESET_REG, 116     # +0 space, +1 bit width, +4 address
        .set    FADT_RESET_VALUE, 128
        .set    RESET_REG_SUP, 1 << 10

        .set    SLP_EN, 1 << 13
        .set    PM_TIMER_HZ, 3579545

        .section .multiboot, "a"
        .p2align 2
        .long   MB_MAGIC
        .long   MB_FLAGS
        .long   -(MB_MAGIC + MB_FLAGS)

        .text
        .code32
        .globl  _start
_start:
        cli
        mov     $stack_top, %esp
        cmp     $MB_BOOTED, %eax
        jne     fail
        mov     %ebx, multiboot_info

# 1. The RSDP: "RSD PTR " on a 16-byte boundary, its first 20 bytes summing to 0.
        PRINT32 "acpi: looking for \"RSD PTR \" on 16-byte boundaries in 0xE0000-0xFFFFF\n"
        mov     $0xE0000, %esi
find_rsdp:
        cmpl    $SIG_RSD_, (%esi)
        jne     1f
        cmpl    $SIG_PTR_, 4(%esi)
        jne     1f
        mov     $20, %ecx
        call    checksum
        jz      found_rsdp
1:      add     $16, %esi
        cmp     $0x100000, %esi
        jb      find_rsdp
        PRINT32 "acpi: no RSDP\n"
        jmp     fail
found_rsdp:
        PRINT32 "  RSDP at "
        mov     %esi, %eax
        call    serial_puthex32
        mov     16(%esi), %ebx          # RsdtAddress
        PRINT32 ", RSDT at "
        mov     %ebx, %eax
        call    serial_puthex32
        PRINT32 "\n"

# 2. The RSDT: after its 36-byte header, (length - 36) / 4 table addresses. Find "FACP".
        mov     %ebx, %esi
        mov     $SIG_RSDT, %eax
        call    check_table
        jne     bad_table
        mov     4(%ebx), %ecx
        sub     $36, %ecx
        shr     $2, %ecx                # number of entries
        lea     36(%ebx), %edx
2:      test    %ecx, %ecx
        jz      no_fadt
        mov     (%edx), %esi
        cmpl    $SIG_FACP, (%esi)
        je      found_fadt
        add     $4, %edx
        dec     %ecx
        jmp     2b
no_fadt:
        PRINT32 "acpi: the RSDT lists no FADT\n"
        jmp     fail

found_fadt:
        mov     $SIG_FACP, %eax
        call    check_table
        jne     bad_table
        mov     %esi, %ebp              # EBP = the FADT from here on
        PRINT32 "  FADT (FACP) at "
        mov     %ebp, %eax
        call    serial_puthex32
        PRINT32 ", revision "
        movzbl  8(%ebp), %eax
        call    serial_puthex32
        PRINT32 "\n"

# 3. The fields a kernel needs to reset and to power off.
        PRINT32 "  RESET_REG: "
        testl   $RESET_REG_SUP, FADT_FLAGS(%ebp)
        jnz     3f
        PRINT32 "not supported (flags bit 10 clear)\n"
        jmp     4f
3:      PRINT32 "address space "
        movzbl  FADT_RESET_REG(%ebp), %eax
        call    serial_puthex32
        PRINT32 " (1 = port I/O), "
        movzbl  FADT_RESET_REG + 1(%ebp), %eax
        call    serial_puthex32
        PRINT32 " bits at "
        mov     FADT_RESET_REG + 4(%ebp), %eax
        call    serial_puthex32
        PRINT32 ", reset value "
        movzbl  FADT_RESET_VALUE(%ebp), %eax
        call    serial_puthex32
        PRINT32 "\n"
4:      PRINT32 "  PM1a_CNT_BLK: port "
        mov     FADT_PM1A_CNT(%ebp), %eax
        call    serial_puthex32
        PRINT32 "\n  PM_TMR_BLK: port "
        mov     FADT_PM_TMR(%ebp), %eax
        call    serial_puthex32
        PRINT32 "\n"

# 4. The DSDT: find "_S5_" followed by PackageOp and read SLP_TYPa.
        mov     FADT_DSDT(%ebp), %esi
        mov     $SIG_DSDT, %eax
        call    check_table
        jne     bad_table
        PRINT32 "  DSDT at "
        mov     %esi, %eax
        call    serial_puthex32
        mov     4(%esi), %ecx
        lea     36(%esi), %edx          # EDX: where the AML starts
        lea     -5(%esi,%ecx), %ecx     # ECX: the last place 5 bytes still fit
5:      cmp     %ecx, %edx
        ja      no_s5
        cmpl    $NAME_S5, (%edx)
        jne     6f
        cmpb    $0x12, 4(%edx)          # PackageOp
        je      found_s5
6:      inc     %edx
        jmp     5b
no_s5:
        PRINT32 "\nacpi: the DSDT has no \\_S5 package\n"
        jmp     fail
found_s5:
        lea     5(%edx), %esi           # the PkgLength
        movzbl  (%esi), %eax
        shr     $6, %eax                # bits 7-6: how many more length bytes
        lea     1(%esi,%eax), %esi      # skip the PkgLength ...
        inc     %esi                    # ... and the element count
        movzbl  (%esi), %eax            # the first element's opcode
        cmp     $0x01, %al              # ZeroOp (0) and OneOp (1) are their own value
        jbe     7f
        cmp     $0x0A, %al              # BytePrefix: the value is the next byte
        jne     no_s5
        movzbl  1(%esi), %eax
7:      mov     %eax, slp_typa
        PRINT32 "; \\_S5: SLP_TYPa = "
        call    serial_puthex32
        PRINT32 "\n"

# 5. The PM timer counts: read it until it changes.
        mov     FADT_PM_TMR(%ebp), %edx
        in      %dx, %eax
        mov     %eax, %ebx
        mov     $1000000, %ecx
8:      in      %dx, %eax
        cmp     %eax, %ebx
        jne     9f
        loop    8b
        PRINT32 "  PM timer: it does not count\n"
        jmp     fail
9:      PRINT32 "  PM timer: it counts\n"

# 6. What the command line asks for.
        mov     multiboot_info, %edi
        testl   $1 << 2, (%edi)         # a command line?
        jz      nothing_to_do
        mov     16(%edi), %esi
        mov     $word_reset, %edx
        call    contains
        je      do_reset
        mov     $word_poweroff, %edx
        call    contains
        je      do_poweroff
nothing_to_do:
        PRINT32 "acpi: nothing to do (the command line says neither reset nor poweroff)\n"
        mov     $0, %al
        out     %al, $0xF4
        jmp     halt

do_reset:
        testl   $RESET_REG_SUP, FADT_FLAGS(%ebp)
        jz      fail
        cmpb    $1, FADT_RESET_REG(%ebp) # only port I/O here
        jne     fail
        PRINT32 "acpi: writing the reset value to RESET_REG\n"
        mov     FADT_RESET_REG + 4(%ebp), %edx
        movb    FADT_RESET_VALUE(%ebp), %al
        out     %al, %dx
        jmp     still_running

do_poweroff:
        PRINT32 "acpi: writing SLP_TYPa, then SLP_TYPa | SLP_EN, to PM1a_CNT\n"
        mov     FADT_PM1A_CNT(%ebp), %edx
        in      %dx, %ax                # keep the other bits (SCI_EN)
        and     $~(7 << 10 | SLP_EN), %ax
        mov     slp_typa, %ebx
        shl     $10, %ebx
        or      %bx, %ax
        out     %ax, %dx
        or      $SLP_EN, %ax
        out     %ax, %dx

still_running:
        # A real machine is gone by now. Wait one second on the PM timer (24 bits: the
        # difference of two readings is taken modulo 2^24), then report.
        mov     FADT_PM_TMR(%ebp), %edx
        in      %dx, %eax
        mov     %eax, %ebx
1:      in      %dx, %eax
        sub     %ebx, %eax
        and     $0xFFFFFF, %eax
        cmp     $PM_TIMER_HZ, %eax
        jb      1b
        PRINT32 "acpi: still running one second after the write\n"
        jmp     fail

bad_table:
        PRINT32 "acpi: a table has the wrong signature or checksum\n"
fail:
        mov     $1, %al
        out     %al, $0xF4
halt:   hlt
        jmp     halt

# check_table: ZF = 1 when the table at ESI has signature EAX and its Length bytes sum
# to 0. Registers preserved.
check_table:
        cmp     %eax, (%esi)
        jne     1f
        push    %ecx
        mov     4(%esi), %ecx
        call    checksum
        pop     %ecx
1:      ret

# checksum: ZF = 1 when the ECX bytes at ESI add up to 0 (mod 256). ECX = 0 is not a
# table: ZF = 0. Registers preserved.
checksum:
        push    %esi
        push    %ecx
        push    %edx
        xor     %edx, %edx
        jecxz   2f
1:      add     (%esi), %dl
        inc     %esi
        loop    1b
        test    %dl, %dl
        jmp     3f
2:      test    %esp, %esp              # ESP is not 0: ZF = 0
3:      pop     %edx
        pop     %ecx
        pop     %esi
        ret

# contains: ZF = 1 when the NUL-terminated string at EDX occurs in the one at ESI.
# Registers preserved.
contains:
        push    %eax
        push    %ebx
        push    %ecx
        push    %esi
1:      mov     %esi, %eax              # EAX walks the text from this start ...
        mov     %edx, %ebx              # ... EBX the word
2:      movb    (%ebx), %cl
        test    %cl, %cl
        jz      4f                      # the whole word matched: ZF = 1
        cmpb    (%eax), %cl
        jne     3f
        inc     %eax
        inc     %ebx
        jmp     2b
3:      cmpb    $0, (%esi)
        je      5f                      # end of the text: not found
        inc     %esi
        jmp     1b
5:      test    %esp, %esp              # ZF = 0
4:      pop     %esi
        pop     %ecx
        pop     %ebx
        pop     %eax
        ret

word_reset:     .asciz  "reset"
word_poweroff:  .asciz  "poweroff"

        .include "serial32.inc"

        .bss
        .p2align 4
multiboot_info: .long   0
slp_typa:       .long   0
        .skip   4096
stack_top:
