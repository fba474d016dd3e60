# completions: instructions that some KVMs cannot emulate at CPL 0, run at CPL 0.
#
# On hardware KVM every one of them runs natively. On a KVM that emulates ring 0 code
# in software (this project's nested build hosts, see docs/host-kvm.md) each one fails in
# KVM's emulator, and Swiftlet completes it (docs/instruction-completion.md). Either way
# the guest must see exactly what a CPU does, and checks it:
#
#   1. int3 through an interrupt gate: the handler runs once, sees the address of the
#      next instruction as the saved RIP, and IRETQ returns there.
#   2. int $0x41 through a trap gate: the same.
#   3. stmxcsr/ldmxcsr with the addressing forms kernels use ([rsp+4], RIP-relative, a
#      SIB byte with an index), and ldmxcsr of a reserved bit: #GP(0), MXCSR unchanged.
#   4. popcnt: register and memory operands, 16/32/64 bits, ZF for a zero source.
#   5. fwait with no x87 exception pending: nothing happens.
#   6. stac/clac (when CPUID says the CPU has SMAP): RFLAGS.AC set, then cleared.
#   7. ldmxcsr at CPL 0, then stmxcsr at CPL 3: ring 3 runs natively even on the hosts
#      that emulate ring 0, so this reads the MXCSR the CPU really holds.
#
# Then it writes 0 to the exit port (status 1); any mismatch prints FAILED and writes 1
# (status 3).
#
# Memory: the IDT at 0x4000 (free in long-mode.inc's map), 256 gates of 16 bytes.

        .include "print.inc"
        .include "long-mode.inc"
        .include "user-mode.inc"

        .equ    IDT,            0x4000
        .equ    INTERRUPT_GATE, 0x8E    # present, DPL 0, 64-bit interrupt gate (clears IF)
        .equ    TRAP_GATE,      0x8F    # present, DPL 0, 64-bit trap gate (keeps IF)
        .equ    USER_GATE,      0x60    # DPL 3: what kernels give int3, so user code may use it

        .code64
long_mode_main:
        # ---- the IDT ------------------------------------------------------------------
        mov     $IDT, %edi
        xor     %eax, %eax
        mov     $(256 * 16 / 8), %ecx
        rep stosq
        mov     $3, %edi
        lea     breakpoint_handler(%rip), %rsi
        mov     $(INTERRUPT_GATE | USER_GATE), %edx
        call    set_gate
        mov     $0x41, %edi
        lea     int41_handler(%rip), %rsi
        mov     $TRAP_GATE, %edx
        call    set_gate
        mov     $13, %edi
        lea     gp_handler(%rip), %rsi
        mov     $INTERRUPT_GATE, %edx
        call    set_gate
        lidt    idt_pointer(%rip)

        # ---- 1. int3 ------------------------------------------------------------------
        PRINT   "int3: "
        int3
after_int3:
        cmpl    $1, breakpoint_count(%rip)
        jne     fail
        lea     after_int3(%rip), %rax
        cmp     %rax, breakpoint_rip(%rip)
        jne     fail
        PRINT   "the handler ran once and returned to the next instruction\n"

        # ---- 2. int $0x41 ---------------------------------------------------------------
        PRINT   "int $0x41: "
        int     $0x41
after_int41:
        cmpl    $1, int41_count(%rip)
        jne     fail
        lea     after_int41(%rip), %rax
        cmp     %rax, int41_rip(%rip)
        jne     fail
        PRINT   "the handler ran once and returned to the next instruction\n"

        # ---- 3. MXCSR -------------------------------------------------------------------
        # SSE instructions need CR4.OSFXSR (bit 9: the OS saves SSE state with FXSAVE);
        # without it they raise #UD, which Swiftlet reproduces too.
        mov     %cr4, %rax
        or      $(1 << 9), %rax
        mov     %rax, %cr4
        PRINT   "stmxcsr: MXCSR = "
        sub     $16, %rsp
        stmxcsr 4(%rsp)                 # 0f ae 5c 24 04
        mov     4(%rsp), %eax
        push    %rcx
        mov     $8, %ecx
        call    serial_puthexn
        pop     %rcx
        PRINT   "\n"
        cmp     $0x1F80, %eax           # the power-on value
        jne     fail
        PRINT   "ldmxcsr [rsp+4] = 0x3f80, stmxcsr [rip+...]: "
        movl    $0x3F80, 4(%rsp)        # round down (RC = 01)
        ldmxcsr 4(%rsp)                 # 0f ae 54 24 04: the form Debian's kernel uses
        stmxcsr mxcsr_copy(%rip)
        cmpl    $0x3F80, mxcsr_copy(%rip)
        jne     fail
        PRINT   "ok\n"
        PRINT   "ldmxcsr [rbx+rcx*4]: "
        lea     mxcsr_values(%rip), %rbx
        mov     $1, %ecx
        ldmxcsr (%rbx,%rcx,4)           # mxcsr_values[1] = 0x1F80
        stmxcsr 8(%rsp)
        cmpl    $0x1F80, 8(%rsp)
        jne     fail
        PRINT   "ok\n"
        PRINT   "ldmxcsr of a reserved bit: "
        movl    $0x11F80, 4(%rsp)       # bit 16 is reserved on every CPU
        lea     after_reserved(%rip), %rax
        mov     %rax, gp_resume(%rip)
        ldmxcsr 4(%rsp)
        jmp     fail                    # not reached: the CPU raises #GP(0)
after_reserved:
        cmpl    $1, gp_count(%rip)
        jne     fail
        cmpq    $0, gp_error(%rip)
        jne     fail
        stmxcsr 8(%rsp)
        cmpl    $0x1F80, 8(%rsp)        # unchanged
        jne     fail
        add     $16, %rsp
        PRINT   "#GP(0), MXCSR unchanged\n"

        # ---- 4. popcnt ------------------------------------------------------------------
        PRINT   "popcnt: "
        mov     $0xF0F1, %ecx
        mov     $-1, %rax
        popcnt  %ecx, %eax              # 9, zero-extended into RAX
        cmp     $9, %rax
        jne     fail
        lea     all_ones(%rip), %rdi
        popcnt  (%rdi), %rax            # 64 bits from memory
        cmp     $64, %rax
        jne     fail
        mov     $0x12345678, %eax
        mov     $0xFFFF00FF, %ecx
        popcnt  %cx, %ax                # 16 bits: 8, the upper bits of EAX kept
        cmp     $0x12340008, %eax
        jne     fail
        xor     %ecx, %ecx
        popcnt  %rcx, %rdx              # a zero source sets ZF
        jnz     fail
        PRINT   "ok\n"

        # ---- 5. fwait -------------------------------------------------------------------
        PRINT   "fwait: "
        fwait
        PRINT   "ok\n"

        # ---- 6. stac/clac ---------------------------------------------------------------
        PRINT   "stac/clac: "
        mov     $7, %eax
        xor     %ecx, %ecx
        cpuid
        bt      $20, %ebx               # CPUID.(EAX=7,ECX=0):EBX.SMAP
        jnc     no_smap
        stac
        pushfq
        pop     %rax
        bt      $18, %rax               # RFLAGS.AC
        jnc     fail
        clac
        pushfq
        pop     %rax
        bt      $18, %rax
        jc      fail
        PRINT   "RFLAGS.AC set, then cleared\n"
        jmp     done
no_smap:
        PRINT   "skipped (the CPU has no SMAP)\n"

done:
        # ---- 7. the MXCSR the CPU holds ------------------------------------------------
        PRINT   "ldmxcsr 0x3f80 at CPL 0, stmxcsr at CPL 3: "
        ldmxcsr mxcsr_values(%rip)      # 0x3F80
        lea     user_check(%rip), %rdi
        jmp     enter_user_mode
user_check:                             # CPL 3 from here
        stmxcsr mxcsr_copy(%rip)
        cmpl    $0x3F80, mxcsr_copy(%rip)
        jne     fail
        PRINT   "0x3f80\n"
        PRINT   "completions: all as a CPU does them\n"
        mov     $0, %al
        jmp     exit_vm

fail:
        PRINT   "FAILED\n"
        mov     $1, %al
        jmp     exit_vm

# set_gate: IDT entry EDI -> handler RSI, code selector CODE64_SEL, type/attributes DL.
set_gate:
        push    %rax
        push    %rdi
        shl     $4, %edi
        add     $IDT, %edi
        mov     %si, (%rdi)             # offset 15..0
        movw    $CODE64_SEL, 2(%rdi)
        movb    $0, 4(%rdi)             # IST 0: the current stack
        mov     %dl, 5(%rdi)
        mov     %rsi, %rax
        shr     $16, %rax
        mov     %ax, 6(%rdi)            # offset 31..16
        shr     $16, %rax
        mov     %eax, 8(%rdi)           # offset 63..32
        movl    $0, 12(%rdi)
        pop     %rdi
        pop     %rax
        ret

# The handlers record how often they ran and the saved RIP (the top of the frame).
breakpoint_handler:
        incl    breakpoint_count(%rip)
        push    %rax
        mov     8(%rsp), %rax
        mov     %rax, breakpoint_rip(%rip)
        pop     %rax
        iretq

int41_handler:
        incl    int41_count(%rip)
        push    %rax
        mov     8(%rsp), %rax
        mov     %rax, int41_rip(%rip)
        pop     %rax
        iretq

# #GP pushes an error code below the saved RIP; resume at gp_resume.
gp_handler:
        incl    gp_count(%rip)
        push    %rax
        mov     8(%rsp), %rax           # the error code
        mov     %rax, gp_error(%rip)
        mov     gp_resume(%rip), %rax
        mov     %rax, 16(%rsp)          # the saved RIP
        pop     %rax
        add     $8, %rsp                # drop the error code
        iretq

        .balign 8
idt_pointer:
        .word   256 * 16 - 1
        .quad   IDT
breakpoint_count:       .long 0
int41_count:            .long 0
gp_count:               .long 0
mxcsr_copy:             .long 0
        .balign 8
breakpoint_rip:         .quad 0
int41_rip:              .quad 0
gp_error:               .quad -1
gp_resume:              .quad 0
all_ones:               .quad -1
mxcsr_values:           .long 0x3F80, 0x1F80
