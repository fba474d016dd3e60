# cmpxchg16b: an instruction no KVM emulates, on an address only an emulator can reach.
#
# `lock cmpxchg16b` compares RDX:RAX with 16 bytes of memory and, if equal, stores
# RCX:RBX there. Its operand here is 0xD0000000, in the 32-bit MMIO hole where no RAM
# and no device is: every access to it leaves the guest, and KVM's instruction emulator
# has to carry it out. That emulator does not implement CMPXCHG16B (it gives up on the
# 16-byte form of CMPXCHG8B), on any host. Swiftlet does not complete it either, so the
# VM stops as a crash (status 4) with a report naming the instruction and its bytes:
#
#   KVM could not emulate lock cmpxchg16b [rdi] at RIP 0x... (bytes f0 48 0f c7 0f) ...
#
# If the instruction ever completed, the guest would print so and exit with status 3.
#
# Assembled with --defsym USER=1 (cmpxchg16b-user.bin) it runs the instruction at CPL 3.
# There KVM's own answer to an instruction it cannot emulate is a #UD for the guest, not
# a stop, and Swiftlet keeps it so (it injects the #UD when KVM hands it the failure).
# The guest's #UD handler checks the saved RIP points at the instruction and exits with
# status 1.

        .ifndef USER
        .equ    USER, 0
        .endif

        .include "print.inc"
        .include "long-mode.inc"
        .include "user-mode.inc"

        .equ    MMIO_ADDRESS,   0xD0000000
        .equ    PD_HOLE,        0x5000  # a page directory for 3-4 GiB (long-mode.inc leaves 0x4000-0x6FFF free)
        .equ    IDT,            0x4000  # 256 gates of 16 bytes

        .code64
long_mode_main:
        # Map 0xC0000000-0xFFFFFFFF: PDPT[3] -> PD_HOLE, PD_HOLE[128] -> a 2 MiB page at
        # 0xD0000000 (uncached: PCD and PWT, as MMIO wants).
        mov     $PD_HOLE, %edi
        xor     %eax, %eax
        mov     $512, %ecx
        rep stosq
        movq    $(PD_HOLE | PTE_P | PTE_W | PTE_U), PDPT + 3 * 8
        mov     $(MMIO_ADDRESS | PTE_P | PTE_W | PTE_U | PTE_PS | 0x18), %eax
        mov     %rax, PD_HOLE + 128 * 8
        mov     %cr3, %rax
        mov     %rax, %cr3              # flush the TLB

        .if USER
        # An IDT whose only gate is #UD (vector 6), handled at CPL 0 on the TSS's RSP0 stack.
        mov     $IDT, %edi
        xor     %eax, %eax
        mov     $(256 * 16 / 8), %ecx
        rep stosq
        lea     invalid_opcode_handler(%rip), %rax
        mov     %ax, IDT + 6 * 16
        movw    $CODE64_SEL, IDT + 6 * 16 + 2
        movw    $0x8E00, IDT + 6 * 16 + 4   # present, DPL 0, interrupt gate
        shr     $16, %rax
        mov     %ax, IDT + 6 * 16 + 6
        shr     $16, %rax
        mov     %eax, IDT + 6 * 16 + 8
        lidt    idt_pointer(%rip)
        lea     run_it(%rip), %rdi
        jmp     enter_user_mode         # continues at run_it, at CPL 3
        .endif

run_it:
        .if USER
        PRINT   "cmpxchg16b: lock cmpxchg16b on MMIO at 0xd0000000, at CPL 3\n"
        .else
        PRINT   "cmpxchg16b: lock cmpxchg16b on MMIO at 0xd0000000\n"
        .endif
        mov     $MMIO_ADDRESS, %edi
        xor     %eax, %eax
        xor     %edx, %edx
        xor     %ebx, %ebx
        xor     %ecx, %ecx
the_instruction:
        lock cmpxchg16b (%rdi)          # f0 48 0f c7 0f
        PRINT   "cmpxchg16b: completed, which no KVM should do\n"
        mov     $1, %al
        jmp     exit_vm

# #UD from CPL 3: the frame holds the faulting RIP (the instruction) and CS with RPL 3.
invalid_opcode_handler:
        lea     the_instruction(%rip), %rax
        cmp     %rax, (%rsp)
        jne     1f
        testb   $3, 8(%rsp)
        jz      1f
        PRINT   "cmpxchg16b: #UD at CPL 3, reported at the instruction\n"
        mov     $0, %al
        jmp     exit_vm
1:      PRINT   "cmpxchg16b: unexpected #UD frame\n"
        mov     $1, %al
        jmp     exit_vm

        .balign 8
idt_pointer:
        .word   256 * 16 - 1
        .quad   IDT
