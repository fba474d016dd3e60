# echo: reading the keyboard through the serial port, in real mode.
#
# What it shows
#   * The receive side of the 16550A UART: bit 0 of the Line Status Register (port
#     0x3FD) says "data ready"; reading the Receive Buffer Register (port 0x3F8, the
#     same port as the transmit register) takes the byte. What you type in Swiftlet's
#     terminal arrives here, through the UART's 16-byte FIFO.
#   * Polling: with interrupts off, the guest asks the UART again and again. (A kernel
#     would enable the "received data" interrupt in IER and sleep until IRQ 4.)
#
# It echoes every character back in upper case, and ends when it reads a '.':
#
#   $ printf 'hello.' | swiftlet run --flat guests/build/echo.bin
#   echo: type something, '.' ends
#   HELLO.
#   echo: done

        .include "print.inc"

        .code16
        .globl  _start
_start:
        cli
        cld
        xor     %ax, %ax
        mov     %ax, %ds
        mov     %ax, %ss
        mov     $0x7C00, %sp

        PRINT16 "echo: type something, '.' ends\n"

next:   mov     $0x3FD, %dx             # LSR
1:      in      %dx, %al
        test    $0x01, %al              # bit 0: a received byte is waiting
        jz      1b                      # nothing yet: ask again
        mov     $0x3F8, %dx             # RBR: reading it takes the byte from the FIFO
        in      %dx, %al
        cmp     $'a', %al               # lower-case letter? make it upper case
        jb      2f
        cmp     $'z', %al
        ja      2f
        sub     $('a' - 'A'), %al
2:      call    serial_putc16
        cmp     $'.', %al
        jne     next

        PRINT16 "\necho: done\n"
        mov     $0, %al
        out     %al, $0xF4              # exit: status (0 << 1) | 1 = 1
3:      hlt
        jmp     3b

        .include "serial16.inc"
