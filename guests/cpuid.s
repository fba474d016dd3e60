# cpuid: the CPU model as the guest sees it, read with CPUID from ring 3 (CPL 3).
#
# What it shows
#   1. CPUID is not a privileged instruction: user code may execute it. (Under VT-x and
#      AMD-V it always exits to KVM, which answers from the table the VMM set with
#      KVM_SET_CPUID2: that table is the CPU model, `swiftlet run --cpu MODEL`.)
#   2. The identity of the CPU: the vendor string (leaf 0), family, model and stepping
#      (leaf 1 EAX) and the brand string (leaves 0x80000002-0x80000004).
#   3. The feature registers a CPU model defines, in hex: leaf 1 ECX/EDX, leaf 7.0
#      EBX/ECX/EDX, leaf 0x80000001 ECX/EDX, and the XSAVE components (leaf 0xD.0 EAX).
#   4. A few features by name, tested bit by bit: the x86-64-v2, -v3 and -v4 levels.
#
# Compare its output with `swiftlet cpu --show MODEL`. On hardware KVM the two agree
# (except OSXSAVE, which follows CR4, and HTT/APIC ID, which differ per vCPU). On a nested
# KVM that ignores CPUID masks the guest sees the host's feature bits instead.
#
# Syntax: GNU as, AT&T order, "op source, destination".

        .include "print.inc"
        .include "long-mode.inc"        # start-up; jumps to long_mode_main
        .include "user-mode.inc"        # enter_user_mode, print_cpl

# FEATURE "name", leaf, subleaf, register, bit: print " name" if CPUID(leaf, subleaf)
# has that bit set in that register (eax, ebx, ecx or edx).
        .macro  FEATURE name, leaf, subleaf, register, bit
        mov     $\leaf, %eax
        mov     $\subleaf, %ecx
        cpuid
        bt      $\bit, %\register
        jnc     .Lfeature_absent_\@
        PRINT   " \name"
.Lfeature_absent_\@:
        .endm

# LEAF "label", leaf, subleaf: print the label and the four registers of CPUID(leaf, subleaf).
        .macro  LEAF label, leaf, subleaf
        PRINT   "\label"
        mov     $\leaf, %eax
        mov     $\subleaf, %ecx
        call    print_leaf
        .endm

        .code64
long_mode_main:
        lea     user_main(%rip), %rdi
        jmp     enter_user_mode

# ---- everything below runs at CPL 3 --------------------------------------------------
user_main:
        PRINT   "cpuid: read at "
        call    print_cpl

        # Leaf 0: EAX = highest basic leaf; EBX, EDX, ECX = the vendor, 12 characters.
        PRINT   "\nvendor     "
        xor     %eax, %eax
        cpuid
        mov     %eax, %r12d             # keep the highest basic leaf
        sub     $16, %rsp               # a 13-byte string on the (user) stack
        mov     %ebx, (%rsp)
        mov     %edx, 4(%rsp)
        mov     %ecx, 8(%rsp)
        movb    $0, 12(%rsp)
        mov     %rsp, %rsi
        call    serial_puts
        add     $16, %rsp
        PRINT   ", highest basic leaf "
        mov     %r12, %rax
        call    print_word

        # Leaf 1 EAX: stepping [3:0], model [7:4], family [11:8], extended model
        # [19:16], extended family [27:20].
        PRINT   "\nsignature  family "
        mov     $1, %eax
        cpuid
        mov     %eax, %ebx
        shr     $8, %eax
        and     $0xF, %eax
        cmp     $0xF, %eax              # family 15 adds the extended family
        jne     1f
        mov     %ebx, %ecx
        shr     $20, %ecx
        and     $0xFF, %ecx
        add     %ecx, %eax
1:      call    serial_putdec
        PRINT   ", model "
        mov     %ebx, %eax
        shr     $4, %eax
        and     $0xF, %eax
        mov     %ebx, %ecx
        shr     $12, %ecx               # extended model [19:16] -> bits [7:4]
        and     $0xF0, %ecx
        or      %ecx, %eax
        call    serial_putdec
        PRINT   ", stepping "
        mov     %ebx, %eax
        and     $0xF, %eax
        call    serial_putdec

        # The brand string, if the extended leaves reach 0x80000004.
        PRINT   "\nbrand      "
        mov     $0x80000000, %eax
        cpuid
        mov     %eax, %r13d             # keep the highest extended leaf
        cmp     $0x80000004, %eax
        jb      no_brand
        sub     $64, %rsp
        mov     %rsp, %rdi
        mov     $0x80000002, %r8d
2:      mov     %r8d, %eax
        cpuid
        mov     %eax, (%rdi)
        mov     %ebx, 4(%rdi)
        mov     %ecx, 8(%rdi)
        mov     %edx, 12(%rdi)
        add     $16, %rdi
        inc     %r8d
        cmp     $0x80000004, %r8d
        jbe     2b
        movb    $0, (%rdi)
        mov     %rsp, %rsi
        call    serial_puts
        add     $64, %rsp
        jmp     registers
no_brand:
        PRINT   "(none)"

registers:
        LEAF    "\nleaf 1     ", 1, 0
        cmp     $7, %r12d
        jb      1f
        LEAF    "\nleaf 7.0   ", 7, 0
1:      cmp     $0xD, %r12d
        jb      2f
        LEAF    "\nleaf 0xd.0 ", 0xD, 0
2:      cmp     $0x80000001, %r13d
        jb      3f
        LEAF    "\nleaf 0x80000001 ", 0x80000001, 0
3:
        # By name: the psABI levels (x86-64-v2: cx16 ... sse4_2; v3: avx ... movbe;
        # v4: avx512*), and a few system features.
        PRINT   "\nfeatures  "
        FEATURE "sse2", 1, 0, edx, 26
        FEATURE "pni", 1, 0, ecx, 0
        FEATURE "ssse3", 1, 0, ecx, 9
        FEATURE "cx16", 1, 0, ecx, 13
        FEATURE "sse4_1", 1, 0, ecx, 19
        FEATURE "sse4_2", 1, 0, ecx, 20
        FEATURE "popcnt", 1, 0, ecx, 23
        FEATURE "x2apic", 1, 0, ecx, 21
        FEATURE "movbe", 1, 0, ecx, 22
        FEATURE "xsave", 1, 0, ecx, 26
        FEATURE "avx", 1, 0, ecx, 28
        FEATURE "f16c", 1, 0, ecx, 29
        FEATURE "fma", 1, 0, ecx, 12
        FEATURE "hypervisor", 1, 0, ecx, 31
        cmp     $7, %r12d
        jb      4f
        FEATURE "bmi1", 7, 0, ebx, 3
        FEATURE "avx2", 7, 0, ebx, 5
        FEATURE "bmi2", 7, 0, ebx, 8
        FEATURE "avx512f", 7, 0, ebx, 16
        FEATURE "avx512dq", 7, 0, ebx, 17
        FEATURE "avx512cd", 7, 0, ebx, 28
        FEATURE "avx512bw", 7, 0, ebx, 30
        FEATURE "avx512vl", 7, 0, ebx, 31
4:      cmp     $0x80000001, %r13d
        jb      5f
        FEATURE "lahf_lm", 0x80000001, 0, ecx, 0
        FEATURE "abm", 0x80000001, 0, ecx, 5
        FEATURE "nx", 0x80000001, 0, edx, 20
        FEATURE "lm", 0x80000001, 0, edx, 29
5:
        PRINT   "\ncpuid: done\n"
        xor     %eax, %eax
        jmp     exit_vm

# print_leaf: CPUID(EAX, ECX), printed as "eax=0x........ ebx=... ecx=... edx=...".
print_leaf:
        cpuid
        push    %rdx
        push    %rcx
        push    %rbx
        PRINT   "eax="
        call    print_word
        PRINT   " ebx="
        pop     %rax
        call    print_word
        PRINT   " ecx="
        pop     %rax
        call    print_word
        PRINT   " edx="
        pop     %rax
        call    print_word
        ret

# print_word: the low 32 bits of RAX as "0x" and eight hex digits.
print_word:
        push    %rcx
        mov     $8, %ecx
        call    serial_puthexn
        pop     %rcx
        ret
