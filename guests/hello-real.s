# hello-real: the smallest guest. 16-bit real mode, the mode every x86 CPU starts in.
#
# What it shows
#   * The loading convention: these bytes are copied to physical address 0x7C00 and
#     the CPU starts here in real mode with CS:IP = 0000:7C00 and SP = 0x7C00.
#   * Real-mode addressing: physical address = segment * 16 + offset, so
#     0000:7C00 and 07C0:0000 name the same byte.
#   * Talking to hardware without a BIOS: the serial port through IN/OUT, and the exit
#     port 0xF4 to stop the virtual machine.
#
# It is also a valid PC boot sector: 512 bytes ending in the signature 0x55 0xAA. A
# BIOS (SeaBIOS under QEMU, or a real PC) loads the first sector of a disk at 0x7C00
# and jumps to it, so the very same file boots there too. That is why the code does
# not trust the registers it starts with (a BIOS leaves them in various states).
#
# Syntax: GNU as, AT&T order, "op source, destination"; $ marks an immediate, % a
# register. "mov $0x7C00, %sp" sets SP to 0x7C00.

        .code16                         # assemble for 16-bit real mode
        .globl  _start
_start:
        cli                             # no interrupts: we set up no handlers
        cld                             # string instructions (LODSB) move forward
        # Some BIOSes jump to 07C0:0000 instead of 0000:7C00. A far jump loads CS and
        # IP together, so from here on CS = 0 and offsets equal physical addresses.
        ljmp    $0, $start
start:
        xor     %ax, %ax                # DS = ES = SS = 0: segment bases at 0
        mov     %ax, %ds
        mov     %ax, %es
        mov     %ax, %ss                # (writing SS blocks interrupts for one
        mov     $0x7C00, %sp            #  instruction, so SS:SP change together)

        mov     $msg_hello, %si
        call    serial_puts16

        # Real mode has no protection: CR0.PE (bit 0) is 0. SMSW reads the low 16 bits
        # of CR0 (the "machine status word") and works in any mode.
        mov     $msg_cr0, %si
        call    serial_puts16
        smsw    %ax
        call    serial_puthex16
        mov     $msg_pe0, %si
        call    serial_puts16

        # Segment arithmetic: read the first byte of this program twice, once as
        # 0000:7C00 and once as 07C0:0000 (07C0 * 16 + 0 = 7C00).
        mov     $msg_seg, %si
        call    serial_puts16
        mov     0x7C00, %al             # DS = 0: physical 0x7C00
        call    serial_puthex8
        mov     $msg_and, %si
        call    serial_puts16
        mov     $0x07C0, %bx
        mov     %bx, %es                # ES base = 0x07C0 * 16 = 0x7C00
        mov     %es:0, %al              # ES:0000, physical 0x7C00 again
        call    serial_puthex8
        mov     $msg_same, %si
        call    serial_puts16

        mov     $msg_bye, %si
        call    serial_puts16
        mov     $0, %al                 # exit code 0: the VMM exits with status 1
        out     %al, $0xF4
halt:   hlt                             # not reached under a VMM with an exit port
        jmp     halt

        .include "serial16.inc"

msg_hello:  .asciz "Hello from real mode!\n"
msg_cr0:    .asciz "  CR0 low word (SMSW) = 0x"
msg_pe0:    .asciz ": PE (bit 0) is 0, no protection, 16-bit code\n"
msg_seg:    .asciz "  0000:7C00 holds 0x"
msg_and:    .asciz " and 07C0:0000 holds 0x"
msg_same:   .asciz ": the same byte, physical = segment*16 + offset\n"
msg_bye:    .asciz "  writing 0 to port 0xF4 to exit\n"

# Pad to 510 bytes and end with the boot signature 0x55, 0xAA (the word 0xAA55 in
# little-endian). The .fill fails to assemble if the code above grew past 510 bytes.
        .fill   510 - (. - _start), 1, 0
        .word   0xAA55
