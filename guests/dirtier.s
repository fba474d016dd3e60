# dirtier: keep writing memory at CPL 3 and print a running checksum of it: the guest a
# live migration is tested and measured with. It dirties pages as fast as a real workload
# might, so the migration has to copy pages again and again while the guest runs, and
# its checksum, read back from every page each round, shows whether the copy the target
# continues with is exact.
#
# What it does
#   * At CPL 0: maps the first 1 GiB of physical memory with 2 MiB pages (one page
#     directory of 512 entries), reads the RAM size from the CMOS (registers 0x34/0x35:
#     64 KiB units above 16 MiB) and checks the working set fits; drops to CPL 3.
#   * At CPL 3, round R = 1, 2, 3, ...: adds (i + R) to the first 8 bytes of page i of the
#     working set (every page, in order), then reads all of them back, sums them and
#     prints "round R sum S". Page i holds R*i + R*(R+1)/2 after round R, so with N pages
#     S = R*N*(N-1)/2 + N*R*(R+1)/2: every line can be checked on its own, and a page the
#     migration lost or copied stale changes every later line. Between rounds it waits
#     DELAY loop iterations.
#
# Assembly-time parameters (as --defsym NAME=VALUE; bench/migration.py uses them):
#   WORKSET  bytes of RAM written each round, from 2 MiB up (default 8 MiB)
#   DELAY    loop iterations between rounds (default 1000000, about 1 ms natively)
# The dirtying rate is WORKSET per round; the guest prints how many pages it writes.
#
# Output: "dirtier: N pages from 0x200000", then one line per round. It never exits;
# run it with --timeout or stop it. With too little RAM for the working set it prints
# why and exits with 1 (status 3).
#
# Syntax: GNU as, AT&T order, "op source, destination".

        .include "print.inc"
        .include "long-mode.inc"
        .include "user-mode.inc"

        .ifndef WORKSET
        .equ    WORKSET, 8 << 20
        .endif
        .ifndef DELAY
        .equ    DELAY, 1000000
        .endif
        .equ    BASE, 0x200000          # the working set starts at 2 MiB
        .equ    PAGES, WORKSET / 4096   # N

        .code64
long_mode_main:
        # Map 0..1 GiB: PD entry k -> physical k * 2 MiB (long-mode.inc mapped entry 0).
        xor     %ecx, %ecx
1:      mov     %rcx, %rax
        shl     $21, %rax
        or      $(PTE_P | PTE_W | PTE_U | PTE_PS), %rax
        mov     %rax, PD(, %rcx, 8)
        inc     %ecx
        cmp     $512, %ecx
        jb      1b
        mov     %cr3, %rax              # reloading CR3 flushes the old translations
        mov     %rax, %cr3

        # RAM below 4 GiB = 16 MiB + CMOS[0x35:0x34] * 64 KiB (when there is more than 16 MiB).
        mov     $0x35, %al
        out     %al, $0x70
        in      $0x71, %al
        movzx   %al, %ebx
        shl     $8, %ebx
        mov     $0x34, %al
        out     %al, $0x70
        in      $0x71, %al
        movzx   %al, %eax
        or      %eax, %ebx
        shl     $16, %rbx
        add     $(16 << 20), %rbx       # RBX = end of RAM (valid above 16 MiB)
        cmp     $(BASE + WORKSET), %rbx
        jae     2f
        PRINT   "dirtier: not enough RAM for the working set\n"
        mov     $1, %al
        out     %al, $0xF4
2:
        PRINT   "dirtier: "
        mov     $PAGES, %eax
        call    serial_putdec
        PRINT   " pages from 0x200000\n"
        lea     user_main(%rip), %rdi
        jmp     enter_user_mode

user_main:                              # CPL 3 from here
        xor     %r8d, %r8d              # R8 = the round
round:
        inc     %r8
        # Write: page i += i + R.
        mov     $BASE, %rdi
        xor     %ecx, %ecx              # RCX = i
1:      lea     (%rcx, %r8), %rax
        add     %rax, (%rdi)
        add     $4096, %rdi
        inc     %rcx
        cmp     $PAGES, %rcx
        jb      1b
        # Read back: S = the sum of every page's first 8 bytes.
        mov     $BASE, %rdi
        xor     %ecx, %ecx
        xor     %edx, %edx              # RDX = S
2:      add     (%rdi), %rdx
        add     $4096, %rdi
        inc     %rcx
        cmp     $PAGES, %rcx
        jb      2b
        PRINT   "round "
        mov     %r8, %rax
        call    serial_putdec
        PRINT   " sum "
        mov     %rdx, %rax
        call    serial_putdec
        PRINT   "\n"
        mov     $DELAY, %ecx
3:      dec     %rcx                    # wait, natively at CPL 3
        jnz     3b
        jmp     round
