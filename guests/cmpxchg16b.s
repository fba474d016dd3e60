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

        .include "print.inc"
        .include "long-mode.inc"

        .equ    MMIO_ADDRESS,   0xD0000000
        .equ    PD_HOLE,        0x5000  # a page directory for 3-4 GiB (long-mode.inc leaves 0x4000-0x6FFF free)

        .code64
long_mode_main:
        # Map 0xC0000000-0xFFFFFFFF: PDPT[3] -> PD_HOLE, PD_HOLE[128] -> a 2 MiB page at
        # 0xD0000000 (uncached: PCD and PWT, as MMIO wants).
        mov     $PD_HOLE, %edi
        xor     %eax, %eax
        mov     $512, %ecx
        rep stosq
        movq    $(PD_HOLE | PTE_P | PTE_W), PDPT + 3 * 8
        mov     $(MMIO_ADDRESS | PTE_P | PTE_W | PTE_PS | 0x18), %eax
        mov     %rax, PD_HOLE + 128 * 8
        mov     %cr3, %rax
        mov     %rax, %cr3              # flush the TLB

        PRINT   "cmpxchg16b: lock cmpxchg16b on MMIO at 0xd0000000\n"
        mov     $MMIO_ADDRESS, %edi
        xor     %eax, %eax
        xor     %edx, %edx
        xor     %ebx, %ebx
        xor     %ecx, %ecx
        lock cmpxchg16b (%rdi)          # f0 48 0f c7 0f
        PRINT   "cmpxchg16b: completed, which no KVM should do\n"
        mov     $1, %al
        jmp     exit_vm
