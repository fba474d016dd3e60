# user-mode: a loop of 100 million iterations in ring 3 (CPL 3), 64-bit mode.
#
# What it shows
#   1. The 64-bit start-up of long-mode.inc.
#   2. Entering ring 3 with IRETQ (user-mode.inc): a TSS with RSP0, ring 3 code and
#      data segments, user-accessible pages, and IOPL = 3 in RFLAGS.
#   3. Ring 3 code reading CS to prove where it runs (CPL = CS & 3).
#   4. A long computation at CPL 3: the sum 1 + 2 + ... + N for N = 100 000 000,
#      checked against N(N + 1)/2. On a host that emulates ring 0 code this loop
#      still runs natively, in a fraction of a second.
#   5. Ring 3 code doing port I/O (the serial port, the exit port) thanks to IOPL = 3:
#      the guest finishes without ever going back to ring 0.
#
# The iteration count can be changed when assembling: as --defsym ITERATIONS=1000 ...
#
# Syntax: GNU as, AT&T order, "op source, destination".

        .include "print.inc"
        .include "long-mode.inc"        # start-up; jumps to long_mode_main
        .include "user-mode.inc"        # enter_user_mode, print_cpl

        .ifndef ITERATIONS
        .equ    ITERATIONS, 100000000
        .endif

        .code64
long_mode_main:
        PRINT   "[CPL 0] "
        call    print_cpl
        PRINT   "\n[CPL 0] loading the TSS and dropping to ring 3 with IRETQ\n"
        lea     user_main(%rip), %rdi
        jmp     enter_user_mode

# ---- everything below runs at CPL 3 --------------------------------------------------
user_main:
        PRINT   "[CPL 3] "
        call    print_cpl
        PRINT   "\n[CPL 3] summing 1 + 2 + ... + "
        mov     $ITERATIONS, %eax
        call    serial_putdec
        PRINT   "\n"

        # The loop: RBX counts iterations, RAX accumulates the sum.
        xor     %eax, %eax
        xor     %ebx, %ebx
        mov     $ITERATIONS, %ecx
1:      inc     %rbx
        add     %rbx, %rax
        cmp     %rcx, %rbx
        jne     1b

        PRINT   "[CPL 3] ran "
        xchg    %rax, %rbx              # print the count (RBX), keep the sum in RBX
        call    serial_putdec
        PRINT   " iterations at CPL "
        xor     %eax, %eax
        mov     %cs, %ax
        and     $3, %eax
        call    serial_putdec
        PRINT   ", sum = "
        mov     %rbx, %rax
        call    serial_putdec

        # Check: N(N + 1)/2, computed with one multiplication.
        mov     $ITERATIONS, %eax
        lea     1(%rax), %rcx
        mul     %rcx                    # RDX:RAX = N * (N + 1)
        shr     $1, %rax                # fits in 64 bits for any N < 2^32
        cmp     %rax, %rbx
        jne     wrong
        PRINT   " = N(N+1)/2\n"

        PRINT   "user-mode: done, writing 0 to port 0xF4 from CPL 3\n"
        xor     %eax, %eax
        jmp     exit_vm

wrong:
        PRINT   " but N(N+1)/2 = "
        call    serial_putdec
        PRINT   "\n"
        mov     $1, %al                 # exit code 1: status 3, a failure
        jmp     exit_vm
