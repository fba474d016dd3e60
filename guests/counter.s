# counter: count forever at CPL 3, printing each number: a guest whose progress shows
# whether a VM was paused, snapshotted and restored, or migrated without losing or
# repeating a step.
#
# What it shows
#   * Everything a running guest is: its registers (the count lives in RBX, the delay
#     loop in RCX), its memory (a checksum of every number printed so far is kept in RAM
#     at 0x90000), and the devices it talks to (the UART). A VMM that saves and restores
#     all of it lets the guest go on as if nothing happened.
#
# Output: one line per count, "count N sum S", where S is the running sum of every N
# printed, kept in memory: a restored or migrated guest continues with N + 1 and the
# right S. It never exits; run it with --timeout or stop it.
#
# Syntax: GNU as, AT&T order, "op source, destination".

        .include "print.inc"
        .include "long-mode.inc"
        .include "user-mode.inc"

        .equ    DELAY, 20000000         # loop iterations between lines (~10-20 ms natively)
        .equ    SUM, 0x90000            # the running sum, in guest RAM

        .code64
long_mode_main:
        movq    $0, SUM
        lea     user_main(%rip), %rdi
        jmp     enter_user_mode

user_main:                              # CPL 3 from here
        xor     %ebx, %ebx              # RBX = the count
1:      inc     %rbx
        add     %rbx, SUM               # the running sum lives in memory, not a register
        PRINT   "count "
        mov     %rbx, %rax
        call    serial_putdec
        PRINT   " sum "
        mov     SUM, %rax
        call    serial_putdec
        PRINT   "\n"
        mov     $DELAY, %ecx
2:      dec     %rcx                    # wait a little, natively at CPL 3
        jnz     2b
        jmp     1b
