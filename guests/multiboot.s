# multiboot: a kernel in the format GRUB loads, and what a boot loader hands it.
#
# What it shows
#   * The Multiboot v1 header: three 32-bit words (magic 0x1BADB002, flags, checksum)
#     in the first 8 KiB of the file. A loader that finds them loads the ELF file's
#     segments at their physical addresses and jumps to its entry point in 32-bit
#     protected mode, paging off, with EAX = 0x2BADB002 and EBX = the address of the
#     Multiboot information structure.
#   * That structure: which fields are valid (flags), how much memory there is
#     (mem_lower/mem_upper, in KiB), the command line, and the modules (Swiftlet's
#     --initrd becomes module 0).
#
# Unlike the flat guests, this one is an ELF file (guests/build/multiboot.elf), linked
# for 1 MiB. Run it with:
#
#   swiftlet run --kernel guests/build/multiboot.elf --cmdline "hello world" --initrd FILE
#
# It prints what it found, then exits through port 0xF4 with 0 (status 1), or with 1
# (status 3) when it was not started by a Multiboot loader. With a command line ending in
# " stay" it halts instead, and runs until the VM is stopped.

        .include "print.inc"

        .set    MB_MAGIC, 0x1BADB002
        .set    MB_FLAGS, 0x00000003    # bit 0: align modules on pages; bit 1: want memory info
        .set    MB_BOOTED, 0x2BADB002   # what the loader leaves in EAX

        .section .multiboot, "a"
        .p2align 2
        .long   MB_MAGIC
        .long   MB_FLAGS
        .long   -(MB_MAGIC + MB_FLAGS)  # the three words must add up to 0

        .text
        .code32
        .globl  _start
_start:
        cli
        mov     $stack_top, %esp        # Multiboot gives no stack: make one
        mov     %ebx, %edi              # EDI = the Multiboot information
        PRINT32 "multiboot: started in 32-bit protected mode, EAX = "
        call    serial_puthex32
        cmp     $MB_BOOTED, %eax
        jne     not_multiboot
        PRINT32 " (the Multiboot magic)\n"

        PRINT32 "  info at "
        mov     %edi, %eax
        call    serial_puthex32
        PRINT32 ", flags "
        mov     0(%edi), %eax           # flags: which fields below are valid
        call    serial_puthex32
        PRINT32 "\n"

        testl   $1 << 0, 0(%edi)        # bit 0: mem_lower and mem_upper
        jz      1f
        PRINT32 "  memory below 1 MiB: "
        mov     4(%edi), %eax
        call    serial_puthex32
        PRINT32 " KiB, above 1 MiB: "
        mov     8(%edi), %eax
        call    serial_puthex32
        PRINT32 " KiB\n"
1:
        testl   $1 << 2, 0(%edi)        # bit 2: cmdline (address of a C string)
        jz      2f
        PRINT32 "  command line: \""
        mov     16(%edi), %esi
        call    serial_puts32
        PRINT32 "\"\n"
2:
        testl   $1 << 3, 0(%edi)        # bit 3: mods_count and mods_addr
        jz      3f
        PRINT32 "  modules: "
        mov     20(%edi), %eax          # mods_count
        call    serial_puthex32
        PRINT32 "\n"
        cmpl    $0, 20(%edi)
        je      3f
        mov     24(%edi), %ebx          # mods_addr: array of {start, end, string, reserved}
        PRINT32 "  module 0 at "
        mov     0(%ebx), %eax
        call    serial_puthex32
        PRINT32 ", "
        mov     4(%ebx), %eax
        sub     0(%ebx), %eax           # size = end - start
        call    serial_puthex32
        PRINT32 " bytes, first word "
        mov     0(%ebx), %esi
        mov     (%esi), %eax
        call    serial_puthex32
        PRINT32 "\n"
3:
        # A command line that ends in " stay" keeps the kernel alive (halted, interrupts
        # off) instead of exiting: for measuring the VMM while a guest with an initrd runs.
        testl   $1 << 2, 0(%edi)
        jz      4f
        mov     16(%edi), %esi
5:      cmpb    $0, (%esi)              # find the end of the string
        je      6f
        inc     %esi
        jmp     5b
6:      cmpl    $0x79617473, -4(%esi)   # "stay", little-endian
        jne     4f
        cmpb    $' ', -5(%esi)
        jne     4f
        PRINT32 "multiboot: staying\n"
        jmp     halt
4:
        PRINT32 "multiboot: done\n"
        mov     $0, %al
        out     %al, $0xF4
        jmp     halt

not_multiboot:
        PRINT32 " (not the Multiboot magic)\n"
        mov     $1, %al
        out     %al, $0xF4
halt:   hlt
        jmp     halt

        .include "serial32.inc"

        .bss
        .p2align 4
        .skip   4096
stack_top:
