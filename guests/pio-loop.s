# pio-loop: ITERATIONS port writes from ring 3, to time the VMM's I/O exit path.
#
# Every OUT to port 0x80 (the old "POST code" port, which the VMM ignores) leaves the
# guest: the CPU stops the vCPU, KVM hands the exit to the VMM's user-space loop, the
# VMM looks at the port, and calls KVM_RUN again. The loop runs at CPL 3 (same setup as
# user-mode.s) so that the instructions around the OUT run natively even on a host that
# emulates ring 0.
#
# Built twice by the Makefile, with ITERATIONS = 1000 and 101000:
#     cost of one exit = (time(101k) - time(1k)) / 100000
# The start-up (creating the VM, booting to ring 3, printing) is the same in both and
# cancels out.
#
# Syntax: GNU as, AT&T order, "op source, destination".

        .include "print.inc"
        .include "long-mode.inc"
        .include "user-mode.inc"

        .ifndef ITERATIONS
        .equ    ITERATIONS, 1000
        .endif

        .code64
long_mode_main:
        lea     user_main(%rip), %rdi
        jmp     enter_user_mode

# ---- CPL 3 ---------------------------------------------------------------------------
user_main:
        PRINT   "[CPL 3] "
        call    print_cpl
        PRINT   "\n"

        xor     %eax, %eax              # the byte written (the VMM ignores it)
        mov     $ITERATIONS, %ecx
1:      out     %al, $0x80              # one VM exit each
        dec     %ecx
        jnz     1b

        PRINT   "pio-loop: "
        mov     $ITERATIONS, %eax
        call    serial_putdec
        PRINT   " writes to port 0x80 from CPL 3, writing 0 to port 0xF4 to exit\n"
        xor     %eax, %eax
        jmp     exit_vm
