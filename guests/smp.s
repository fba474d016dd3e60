# smp: start every CPU of the machine, the way a PC operating system does.
#
# What it shows
#   1. The CPU count from QEMU's firmware configuration device (fw_cfg), read through
#      two I/O ports: a selector (0x510) and a data port (0x511).
#   2. The boot CPU ("BSP", bootstrap processor) is the only one that runs at power-on.
#      Every other CPU ("AP", application processor) sits in its local APIC, waiting.
#      The BSP wakes them with inter-processor interrupts (IPIs) that it sends through
#      its own local APIC: INIT (reset and wait), then Startup ("SIPI", start running
#      real-mode code at a page given by the IPI's vector).
#   3. The AP "trampoline": 16-bit code at a 4 KiB-aligned address below 1 MiB, where
#      each AP starts, in real mode, and climbs to protected mode on its own.
#   4. A spinlock (LOCK XCHG) so that several CPUs can share the serial port without
#      mixing their lines, and an atomic counter (LOCK INC) to count the arrivals.
#
# The local APIC is a memory-mapped device at physical 0xFEE00000, above real mode's
# reach, so the BSP and every AP switch to 32-bit protected mode (flat segments,
# paging off) before they touch it.
#
# Memory used:
#   0x00007C00          the program (BSP entry); the BSP's stack grows down from here
#   0x00008000          the AP trampoline, inside the program (see .org below)
#   0x00010000-0x0004FFFF  AP stacks, 1 KiB per APIC ID (0..255)
#   0xFEE00000          the local APIC of whichever CPU reads or writes it
#
# Expected output with --cpus 4 (the AP lines in any order; status 1):
#   smp: starting the application processors with INIT and Startup IPIs
#   smp: 4 CPUs reported by fw_cfg
#   smp: BSP in protected mode, local APIC at 0xfee00000, APIC ID 0
#   smp: sending INIT, then two Startup IPIs with vector 0x08 (APs start at 0x8000)
#   AP with APIC ID 1 checked in
#   AP with APIC ID 2 checked in
#   AP with APIC ID 3 checked in
#   smp: all 4 CPUs checked in
#
# Syntax: GNU as, AT&T order, "op source, destination".

        .include "print.inc"            # PRINT16 / PRINT32 macros (no code)

        .equ    LOAD_ADDRESS,   0x7C00  # where the VMM puts byte 0 of this file

# fw_cfg (QEMU's "firmware configuration" device, legacy I/O interface): write an item
# number to the 16-bit selector port, then read the item's bytes one by one from the
# data port.
        .equ    FW_CFG_SELECTOR, 0x510
        .equ    FW_CFG_DATA,    0x511
        .equ    FW_CFG_SIGNATURE, 0x00  # item 0: the four bytes "QEMU"
        .equ    FW_CFG_NB_CPUS, 0x05    # item 5: number of CPUs, 16-bit little-endian

# The local APIC (xAPIC mode): 4 KiB of registers, one every 16 bytes. Every CPU sees
# its own local APIC at the same address.
        .equ    LAPIC,          0xFEE00000
        .equ    LAPIC_ID,       LAPIC + 0x20    # bits 31..24: this CPU's APIC ID
        .equ    LAPIC_SVR,      LAPIC + 0xF0    # spurious vector register; bit 8 enables
        .equ    LAPIC_ICR_LOW,  LAPIC + 0x300   # interrupt command: writing it sends
        .equ    LAPIC_ICR_HIGH, LAPIC + 0x310   # bits 31..24: destination APIC ID

# Interrupt Command Register, low dword:
#   bits  7..0  vector (for a Startup IPI: the page where the AP starts)
#   bits 10..8  delivery mode: 101 = INIT, 110 = Startup
#   bit  12     delivery status (read-only): 1 while the IPI is still being sent
#   bit  14     level: 1 = assert
#   bits 19..18 destination shorthand: 11 = all CPUs except myself
        .equ    ICR_INIT,       0x000C4500      # INIT, assert, to all excluding self
        .equ    ICR_STARTUP,    0x000C4600      # Startup, assert, to all excluding self
        .equ    ICR_BUSY,       1 << 12         # delivery status

# A Startup IPI with vector V starts the AP in real mode at CS:IP = (V * 0x100):0000,
# that is at physical V * 0x1000: the trampoline must start on a 4 KiB boundary below
# 1 MiB. This program is loaded at 0x7C00, so the trampoline goes 0x400 bytes in.
        .equ    TRAMPOLINE,     0x8000
        .equ    SIPI_VECTOR,    TRAMPOLINE >> 12        # 0x08

        .equ    AP_STACKS,      0x10000 # AP n's stack is the KiB ending at 0x10000 + (n + 1) * 0x400
        .equ    AP_STACK_SIZE,  0x400
        # In xAPIC mode an APIC ID has 8 bits: 256 CPUs at most (IDs 0..255). Beyond that
        # two CPUs would share an ID, and here a stack; a machine that big needs x2APIC.
        .equ    MAX_CPUS,       256

# The 8254 timer (PIT), channel 2, used as a stopwatch: it counts down at 1.193182 MHz.
        .equ    PIT_CH2,        0x42
        .equ    PIT_MODE,       0x43
        .equ    PIT_GATE_PORT,  0x61    # bit 0 gate of channel 2, bit 1 speaker, bit 5 OUT2
        .equ    PIT_10MS,       11932   # 10 ms in PIT ticks
        .equ    PIT_200US,      239     # 200 us
        .equ    WAIT_ROUNDS,    2000    # the BSP waits for the APs 2000 x 10 ms = 20 s

        .equ    CODE32_SEL,     0x08
        .equ    DATA32_SEL,     0x10

        .equ    CR0_PE,         1 << 0
        .equ    CR0_NW_CD,      (1 << 29) | (1 << 30)   # "not write-through", "cache disable"

# ---- BSP: 16-bit real mode, at 0x7C00 ------------------------------------------------
        .code16
        .globl  _start
_start:
        cli                             # no IDT is set up: interrupts must stay off
        cld
        ljmp    $0, $bsp_start16        # CS = 0 (see hello-real.s), and jump over the
                                        # trampoline, which sits at 0x8000

# ---- AP trampoline: 16-bit real mode, at 0x8000 --------------------------------------
# Every AP starts here after the Startup IPI, in the state of a CPU that was just reset
# (real mode, interrupts off, DS = ES = SS = 0), except CS = 0x0800 and IP = 0.
        .org    TRAMPOLINE - LOAD_ADDRESS       # pad with zeros up to 0x8000
ap_trampoline:
        cli
        cld
        # 0800:0000 is physical 0x8000, but this code is linked to run with CS = 0,
        # where IP equals the physical address (labels are 0x8000 and up). A far jump
        # switches to CS = 0 without moving: it lands on the very next instruction.
        ljmp    $0, $ap_start16
ap_start16:
        xor     %ax, %ax
        mov     %ax, %ds                # DS = 0: data labels are physical addresses
        lgdtl   gdt_pointer             # the same GDT as the BSP
        mov     %cr0, %eax
        and     $~CR0_NW_CD, %eax       # INIT left the caches off (CD = NW = 1):
                                        # turn them on, as the BSP has them
        or      $CR0_PE, %eax           # protected mode
        mov     %eax, %cr0
        ljmpl   $CODE32_SEL, $ap_start32        # CS = 32-bit code segment

# ---- AP: 32-bit protected mode -------------------------------------------------------
        .code32
ap_start32:
        mov     $DATA32_SEL, %ax
        mov     %ax, %ds
        mov     %ax, %es
        mov     %ax, %ss

        # Who am I? Each CPU reads its own APIC ID at the same address 0xFEE00020.
        mov     LAPIC_ID, %ebx
        shr     $24, %ebx               # EBX = APIC ID (bits 31..24)

        # Every CPU needs a stack of its own (CALL pushes there): 1 KiB per APIC ID.
        lea     1(%ebx), %eax           # EAX = ID + 1
        imul    $AP_STACK_SIZE, %eax    # * 1 KiB
        add     $AP_STACKS, %eax
        mov     %eax, %esp              # top of this AP's stack

        call    lock_uart               # one CPU at a time on the serial port
        PRINT32 "AP with APIC ID "
        mov     %ebx, %eax
        call    serial_putdec32
        PRINT32 " checked in\n"
        call    unlock_uart

        # Tell the BSP. INC on memory is a read, an add and a write: without LOCK, two
        # CPUs could read the same old value and one increment would be lost. LOCK
        # makes the three steps one indivisible operation.
        lock incl checked_in

        # Nothing left to do: sleep. With interrupts off, HLT ends only on an NMI, an
        # INIT or the end of the VM; the JMP is for the NMI.
ap_halt:
        cli
        hlt
        jmp     ap_halt

# ---- BSP: 16-bit real mode, continued ------------------------------------------------
        .code16
bsp_start16:
        xor     %ax, %ax
        mov     %ax, %ds
        mov     %ax, %es
        mov     %ax, %ss
        mov     $LOAD_ADDRESS, %sp

        PRINT16 "smp: starting the application processors with INIT and Startup IPIs\n"

        # Is there a fw_cfg device? Select item 0 and compare its bytes with "QEMU".
        # The selector port is 16 bits wide: OUT from AX, not AL.
        mov     $FW_CFG_SELECTOR, %dx
        mov     $FW_CFG_SIGNATURE, %ax
        out     %ax, %dx
        mov     $FW_CFG_DATA, %dx
        mov     $fw_cfg_signature, %si
        mov     $4, %cx
1:      in      %dx, %al                # the next byte of the item
        cmp     (%si), %al
        jne     no_fw_cfg
        inc     %si
        loop    1b                      # CX -= 1, again while CX != 0

        # Item 5: the CPU count, two bytes, low byte first.
        mov     $FW_CFG_SELECTOR, %dx
        mov     $FW_CFG_NB_CPUS, %ax
        out     %ax, %dx
        mov     $FW_CFG_DATA, %dx
        in      %dx, %al                # low byte
        mov     %al, %bl
        in      %dx, %al                # high byte
        mov     %al, %bh
        mov     %bx, cpu_count          # the high word of cpu_count stays 0
        test    %bx, %bx
        jz      bad_count               # 0 CPUs: not a value we can use
        cmp     $MAX_CPUS, %bx
        ja      bad_count               # more than xAPIC IDs can number

        # Into protected mode, as in protected-mode.s.
        lgdtl   gdt_pointer
        mov     %cr0, %eax
        or      $CR0_PE, %eax
        mov     %eax, %cr0
        ljmpl   $CODE32_SEL, $bsp_start32

no_fw_cfg:
        PRINT16 "smp: no fw_cfg device at port 0x510 (item 0 is not QEMU), cannot count the CPUs\n"
        jmp     fail16
bad_count:
        PRINT16 "smp: fw_cfg reports 0 CPUs or more than 256 (the most 8-bit xAPIC IDs can number)\n"
fail16:
        mov     $1, %al                 # exit code 1: status 3, a failure
        out     %al, $0xF4
1:      hlt
        jmp     1b

# ---- BSP: 32-bit protected mode ------------------------------------------------------
        .code32
bsp_start32:
        mov     $DATA32_SEL, %ax
        mov     %ax, %ds
        mov     %ax, %es
        mov     %ax, %ss
        mov     $LOAD_ADDRESS, %esp

        PRINT32 "smp: "
        mov     cpu_count, %eax
        call    serial_putdec32
        PRINT32 " CPUs reported by fw_cfg\n"

        PRINT32 "smp: BSP in protected mode, local APIC at 0xfee00000, APIC ID "
        mov     LAPIC_ID, %eax
        shr     $24, %eax
        call    serial_putdec32
        PRINT32 "\n"

        cmpl    $1, cpu_count
        je      all_checked_in          # no APs: nothing to start

        # Software-enable the local APIC (SVR bit 8), as the MP specification's start-up
        # sequence does; the low byte keeps its reset value 0xFF, the spurious vector.
        orl     $0x100, LAPIC_SVR

        PRINT32 "smp: sending INIT, then two Startup IPIs with vector 0x08 (APs start at 0x8000)\n"

        # The destination field (ICR high) is ignored with a shorthand; clear it anyway.
        # Writing ICR low is what sends the IPI.
        movl    $0, LAPIC_ICR_HIGH
        movl    $ICR_INIT, LAPIC_ICR_LOW        # INIT: every AP resets and waits
        call    wait_for_icr
        mov     $PIT_10MS, %ecx                 # the MP specification: wait 10 ms
        call    pit_delay

        # Two Startup IPIs, 200 us apart (the second one is for CPUs that missed the
        # first; a CPU that is already running ignores it).
        movl    $ICR_STARTUP | SIPI_VECTOR, LAPIC_ICR_LOW
        call    wait_for_icr
        mov     $PIT_200US, %ecx
        call    pit_delay
        movl    $ICR_STARTUP | SIPI_VECTOR, LAPIC_ICR_LOW
        call    wait_for_icr
        mov     $PIT_200US, %ecx
        call    pit_delay

        # Wait until cpu_count - 1 APs have checked in, looking every 10 ms, at most
        # WAIT_ROUNDS times. The APs print while we wait.
        mov     cpu_count, %edx
        dec     %edx                    # EDX = APs to wait for
        mov     $WAIT_ROUNDS, %edi
1:      cmp     %edx, checked_in        # a plain aligned 32-bit read is atomic
        je      all_checked_in
        mov     $PIT_10MS, %ecx
        call    pit_delay
        dec     %edi
        jnz     1b

        # Time is up. (If an AP hung while holding the lock, this would wait forever,
        # and the VMM's --timeout would end the VM.)
        call    lock_uart
        PRINT32 "smp: timed out: "
        mov     checked_in, %eax
        inc     %eax                    # the APs that arrived, and the BSP
        call    serial_putdec32
        PRINT32 " of "
        mov     cpu_count, %eax
        call    serial_putdec32
        PRINT32 " CPUs checked in\n"
        call    unlock_uart
        mov     $1, %al                 # exit code 1: status 3, a failure
        out     %al, $0xF4
        jmp     bsp_halt

all_checked_in:
        # The APs have let go of the lock before counting themselves in, so this does
        # not wait; it is here because every CPU follows the same rule for the port.
        call    lock_uart
        PRINT32 "smp: all "
        mov     cpu_count, %eax
        call    serial_putdec32
        PRINT32 " CPUs checked in\n"
        call    unlock_uart
        mov     $0, %al                 # exit code 0: status 1, success
        out     %al, $0xF4
bsp_halt:
        hlt
        jmp     bsp_halt

# ---- routines shared by the BSP and the APs (32-bit) ---------------------------------

# lock_uart: take the serial port's spinlock; spin until it is free.
# XCHG swaps a register with memory in one indivisible step (with a memory operand it
# is always locked; the LOCK prefix only says so). Whoever swaps a 1 in and gets a 0
# back owns the lock; getting a 1 back means someone else has it.
lock_uart:
        push    %eax
1:      mov     $1, %eax
        lock xchg %eax, uart_lock
        test    %eax, %eax
        jz      3f                      # it was 0: the lock is ours
2:      pause                           # a hint to the CPU (and hypervisor): spinning
        cmpl    $0, uart_lock           # wait with plain reads until it looks free,
        jne     2b                      # so that waiting CPUs do not fight over the
        jmp     1b                      # cache line with locked writes; then retry
3:      pop     %eax
        ret

# unlock_uart: release it. On x86 a plain store is enough: the CPU does not let it
# overtake the earlier writes to the serial port or memory.
unlock_uart:
        movl    $0, uart_lock
        ret

# wait_for_icr: wait until the local APIC has sent the last IPI (ICR delivery status).
wait_for_icr:
        pause
        testl   $ICR_BUSY, LAPIC_ICR_LOW
        jnz     wait_for_icr
        ret

# pit_delay: wait ECX (1..65535) ticks of the 1.193182 MHz PIT, using channel 2 in
# mode 0 ("interrupt on terminal count", no interrupt wired here): its output OUT2,
# readable as bit 5 of port 0x61, goes high when the count reaches 0.
pit_delay:
        push    %eax
        in      $PIT_GATE_PORT, %al
        and     $0xFC, %al              # speaker off (bit 1)...
        or      $0x01, %al              # ...and channel 2's gate on (bit 0): count
        out     %al, $PIT_GATE_PORT
        mov     $0xB0, %al              # channel 2, low byte then high byte, mode 0, binary
        out     %al, $PIT_MODE
        mov     %cl, %al
        out     %al, $PIT_CH2           # count, low byte
        mov     %ch, %al
        out     %al, $PIT_CH2           # count, high byte: counting starts
1:      in      $PIT_GATE_PORT, %al
        test    $0x20, %al              # OUT2 high?
        jz      1b
        pop     %eax
        ret

# serial_putdec32: send EAX as an unsigned decimal number. Digits come out of repeated
# division by 10 lowest first, so they are pushed and then popped in the right order.
serial_putdec32:
        push    %eax
        push    %ebx
        push    %ecx
        push    %edx
        mov     $10, %ebx
        xor     %ecx, %ecx              # digits pushed
1:      xor     %edx, %edx              # DIV divides EDX:EAX
        div     %ebx                    # EAX = quotient, EDX = remainder 0..9
        add     $'0', %dl
        push    %edx
        inc     %ecx
        test    %eax, %eax
        jnz     1b
2:      pop     %eax
        call    serial_putc32
        loop    2b
        pop     %edx
        pop     %ecx
        pop     %ebx
        pop     %eax
        ret

# ---- data ----------------------------------------------------------------------------
        .balign 4
cpu_count:      .long   0               # from fw_cfg
checked_in:     .long   0               # APs that have printed their line
uart_lock:      .long   0               # 0 = free, 1 = taken
fw_cfg_signature:
        .ascii  "QEMU"

# The GDT of protected-mode.s, without its 1 MiB segment. The APs load it too.
        .macro  DESCRIPTOR base, limit, access, flags
        .word   (\limit) & 0xFFFF                       # limit 15..0
        .word   (\base) & 0xFFFF                        # base 15..0
        .byte   ((\base) >> 16) & 0xFF                  # base 23..16
        .byte   \access
        .byte   (((\limit) >> 16) & 0x0F) | ((\flags) << 4)  # limit 19..16, flags
        .byte   ((\base) >> 24) & 0xFF                  # base 31..24
        .endm

        .balign 8
gdt:
        .quad   0                                       # 0x00: the null descriptor
        DESCRIPTOR 0, 0xFFFFF, 0x9A, 0xC                # 0x08: code, 0..4 GiB, 32-bit
        DESCRIPTOR 0, 0xFFFFF, 0x92, 0xC                # 0x10: data, 0..4 GiB
gdt_end:

gdt_pointer:
        .word   gdt_end - gdt - 1
        .long   gdt

        .include "serial16.inc"
        .include "serial32.inc"
