# memory-slots: the two translations of a guest address, and memory slots that change
# while the guest runs. Run it with --show-memory (which gives it the slot device) and
# --trace-exits:
#
#   swiftlet run --flat guests/build/memory-slots.bin --show-memory --trace-exits
#
# What it shows (docs/memory.md explains each step)
#   1. Translation one, the guest's own: its page tables map virtual 0x40000000 to
#      guest-physical 0xF0000000, a 2 MiB page in the MMIO hole. Translation two, KVM's:
#      guest-physical to host memory, through the memory slots (EPT/NPT). No slot covers
#      0xF0000000 yet, so the read leaves the guest as an MMIO exit; no device answers
#      there, and it reads all ones.
#   2. The guest asks Swiftlet (command 1 to the slot device at port 0x5A0) for a slot
#      there. Swiftlet maps 2 MiB of new host memory, writes a text at its start and calls
#      KVM_SET_USER_MEMORY_REGION while the guest runs. The same virtual address now reads
#      the text, and a write and read-back never leave the guest.
#   3. Command 2: a read-only slot (KVM_MEM_READONLY) at 0xF0200000. Reads come from
#      memory; a write leaves the guest as an MMIO exit, which Swiftlet's write trap
#      counts (command 4 reports it), and the memory keeps what it held.
#   4. The dirty log: command 3 reads KVM_GET_DIRTY_LOG for the RAM slot (which clears
#      it); the guest then writes to three pages and reads the log again: exactly those
#      three pages.
#
# The slot device (Sources/Devices/SlotControl.swift): write a command byte to port
# 0x5A0, then read the answer from port 0x5A4, one 32-bit word per IN (0xFFFFFFFF when
# there is nothing, or on failure). Port 0x5A0 reads "SLOT" when the device is there.
#
# Memory: long-mode.inc's map, plus a page directory at 0x4000 for virtual 1-2 GiB.
# Everything runs at CPL 0: a few hundred instructions, so it stays short even where CPL 0
# is emulated.

        .include "print.inc"
        .include "long-mode.inc"

        .equ    SLOT_PORT,      0x5A0           # command (write), "SLOT" (read)
        .equ    ANSWER_PORT,    0x5A4           # the answer, word by word
        .equ    SIGNATURE,      0x544F4C53      # "SLOT", little-endian
        .equ    PD_WINDOW,      0x4000          # page directory for virtual 1-2 GiB
        .equ    WINDOW,         0x40000000      # virtual: 1 GiB
        .equ    RAM_SLOT,       0xF0000000      # guest-physical: the RAM slot
        .equ    ROM_SLOT,       0xF0200000      # guest-physical: the read-only slot
        .equ    ROM_WINDOW,     WINDOW + 0x200000

        .code64
long_mode_main:
        mov     $SLOT_PORT, %dx
        in      %dx, %eax
        cmp     $SIGNATURE, %eax
        jne     no_device
        PRINT   "memory: the slot device answers at port 0x5a0\n"

        # ---- 1. the guest's translation, and an address KVM has no memory for --------
        # PDPT[1] covers virtual 1-2 GiB: point it at a new page directory whose first two
        # entries map 2 MiB pages at 0xF0000000 and 0xF0200000.
        mov     $PD_WINDOW, %edi
        xor     %eax, %eax
        mov     $512, %ecx
        rep stosq
        movq    $(PD_WINDOW | PTE_P | PTE_W), PDPT + 1 * 8
        movl    $(RAM_SLOT | PTE_P | PTE_W | PTE_PS), PD_WINDOW + 0 * 8
        movl    $(ROM_SLOT | PTE_P | PTE_W | PTE_PS), PD_WINDOW + 1 * 8
        mov     %cr3, %rax
        mov     %rax, %cr3              # reload CR3: forget cached translations
        PRINT   "1. page tables: virtual 0x40000000 -> guest-physical 0xf0000000 (PDPT[1] -> PD at 0x4000, PD[0]: a 2 MiB page)\n"
        PRINT   "   reading virtual 0x40000000, where no memory slot is: "
        mov     WINDOW, %rax
        call    serial_puthex
        PRINT   "\n   the read left the guest (an MMIO exit) and no device answered: all ones\n"

        # ---- 2. a RAM slot added while the guest runs ----------------------------------
        PRINT   "2. asking Swiftlet for RAM at 0xf0000000 (KVM_SET_USER_MEMORY_REGION while the guest runs): slot "
        mov     $1, %al
        call    slot_command
        call    serial_putdec
        PRINT   "\n   it holds \""
        mov     $WINDOW, %esi
        call    serial_puts             # the text Swiftlet put there
        PRINT   "\"\n"
        movabs  $0x1122334455667788, %rax
        mov     %rax, WINDOW + 0x800
        mov     WINDOW + 0x800, %rbx
        cmp     %rax, %rbx
        jne     fail
        PRINT   "   wrote "
        call    serial_puthex
        PRINT   " at virtual 0x40000800 and read it back: plain memory now, no exit\n"

        # ---- 3. a read-only slot ---------------------------------------------------------
        PRINT   "3. asking for read-only memory at 0xf0200000 (KVM_MEM_READONLY): slot "
        mov     $2, %al
        call    slot_command
        call    serial_putdec
        PRINT   "\n   it holds \""
        mov     $ROM_WINDOW, %esi
        call    serial_puts
        PRINT   "\"\n   writing 0x5a5a5a5a to virtual 0x40200010: "
        mov     ROM_WINDOW + 0x10, %ebx     # what it holds before
        movl    $0x5A5A5A5A, ROM_WINDOW + 0x10
        mov     $4, %al
        call    slot_command            # EAX = writes the trap saw
        cmp     $1, %eax
        jne     fail
        PRINT   "it left the guest as an MMIO exit; Swiftlet's write trap saw 1 write, at "
        call    read_answer
        call    put_hex32
        PRINT   ", value "
        call    read_answer
        call    put_hex32
        cmp     %ebx, ROM_WINDOW + 0x10
        jne     fail
        PRINT   "\n   the memory still holds what it held\n"

        # ---- 4. the dirty log --------------------------------------------------------------
        PRINT   "4. reading the RAM slot's dirty log clears it (KVM_GET_DIRTY_LOG)\n"
        mov     $3, %al
        call    slot_command            # the pages written so far; not needed
        PRINT   "   writing a byte to pages 1, 4 and 5 of the slot (virtual 0x40001000, 0x40004000, 0x40005800)\n"
        movb    $1, WINDOW + 0x1000
        movb    $1, WINDOW + 0x4000
        movb    $1, WINDOW + 0x5800
        PRINT   "   the dirty log now: "
        mov     $3, %al
        call    slot_command            # EAX = the number of pages
        mov     %eax, %ecx
        call    serial_putdec
        PRINT   " pages written:"
        lea     expected_pages(%rip), %rdi
        cmp     $3, %ecx
        jne     fail
1:      PRINT   " "
        call    read_answer
        call    put_hex32
        cmp     (%rdi), %eax
        jne     fail
        add     $4, %rdi
        dec     %ecx
        jnz     1b
        PRINT   "\nmemory: done\n"
        mov     $0, %al
        jmp     exit_vm

no_device:
        PRINT   "memory: no slot device at port 0x5a0: run me with swiftlet run --show-memory\n"
        mov     $1, %al
        jmp     exit_vm

fail:
        PRINT   "\nmemory: FAILED\n"
        mov     $1, %al
        jmp     exit_vm

# slot_command: send the command in AL to the slot device; EAX = the first answer word
# (zero-extended into RAX). A word of all ones means the command failed.
slot_command:
        push    %rdx
        mov     $SLOT_PORT, %dx
        out     %al, %dx
        pop     %rdx
        call    read_answer
        cmp     $0xFFFFFFFF, %eax
        je      fail
        ret

# read_answer: EAX = the next answer word (zero-extended into RAX).
read_answer:
        push    %rdx
        mov     $ANSWER_PORT, %dx
        in      %dx, %eax               # a 32-bit IN writes EAX and clears RAX's top half
        pop     %rdx
        ret

# put_hex32: print EAX as eight hexadecimal digits.
put_hex32:
        push    %rcx
        mov     $8, %ecx
        call    serial_puthexn
        pop     %rcx
        ret

        .balign 4
expected_pages:
        .long   RAM_SLOT + 0x1000, RAM_SLOT + 0x4000, RAM_SLOT + 0x5000
