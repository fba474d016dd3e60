# mmio-sweep: touch every 4 KiB page of 256 MiB of the MMIO hole, where there is no RAM.
#
# What it shows
#   * An access to a guest-physical address that no memory slot backs leaves the guest:
#     KVM_RUN returns with KVM_EXIT_MMIO, and the VMM's bus finds no device there. A
#     read gets all ones, as on a real bus with nothing on it; a write is dropped.
#   * What `--trace-exits` makes of many such exits: one row per page only for the first
#     few pages, then one "other addresses" row, so a guest cannot make the table (or
#     Swiftlet's memory) grow without bound.
#
# It is a Multiboot kernel, so it starts in 32-bit protected mode with flat segments:
#
#   swiftlet run --kernel guests/build/mmio-sweep.elf --trace-exits
#
# It writes, then reads, one dword in each page from 0xE8000000 to 0xF7FFFFFF (65536
# pages, 131072 exits), checks that every read gave 0xFFFFFFFF, and exits through port
# 0xF4 with 0 (status 1), or 1 (status 3) when a read gave anything else.

        .include "print.inc"

        .set    MB_MAGIC, 0x1BADB002
        .set    MB_FLAGS, 0x00000000
        .set    SWEEP_START, 0xE8000000
        .set    SWEEP_END, 0xF8000000

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
        PRINT32 "mmio-sweep: writing and reading one dword per page, 0xE8000000-0xF7FFFFFF\n"
        mov     $SWEEP_START, %ebx
1:      movl    $0x12345678, (%ebx)     # no RAM, no device: the write is dropped
        mov     (%ebx), %eax            # and the read returns all ones
        cmp     $0xFFFFFFFF, %eax
        jne     wrong
        add     $0x1000, %ebx
        cmp     $SWEEP_END, %ebx
        jne     1b
        PRINT32 "mmio-sweep: every read gave 0xFFFFFFFF\n"
        mov     $0, %al
        out     %al, $0xF4
        jmp     halt

wrong:
        PRINT32 "mmio-sweep: a read gave "
        call    serial_puthex32
        PRINT32 " at "
        mov     %ebx, %eax
        call    serial_puthex32
        PRINT32 "\n"
        mov     $1, %al
        out     %al, $0xF4
halt:   hlt
        jmp     halt

        .include "serial32.inc"

        .bss
        .p2align 4
        .skip   4096
stack_top:
