# interrupts: the timer and the serial port interrupt the guest, through the IOAPIC.
#
#   printf 'hello.' | swiftlet run --flat guests/build/interrupts.bin --trace-exits
#
# What it shows (docs/interrupts.md follows one interrupt from the device to here)
#   * An IDT with three gates: vector 0x20 for the timer, 0x24 for the serial port and
#     0xFF for the local APIC's spurious interrupt.
#   * The interrupt controllers a modern kernel uses: the two 8259 PICs masked; the local
#     APIC switched on (its spurious-interrupt register); the IOAPIC told, pin by pin,
#     which vector to send: pin 0 (the 8254 PIT, GSI 0) -> 0x20, pin 4 (COM1, GSI 4) -> 0x24.
#   * The PIT's channel 0 programmed to 100 Hz, and the UART's "received data" interrupt
#     enabled in its IER.
#   * Waiting with `sti; hlt`: STI takes effect after the next instruction, so no
#     interrupt can slip in between and the HLT always sleeps until the next one. KVM
#     handles HLT itself: the vCPU thread sleeps in the kernel, not in Swiftlet.
#   * Handlers that count, drain the UART's receive FIFO (an edge-triggered pin fires once
#     per rising edge: take every byte, or the next one never interrupts) and end with an
#     EOI to the local APIC.
#
# With --trace-exits the table shows what reached Swiftlet: the UART registers (IER
# once, then per interrupt IIR, LSR and RBR) and the exit port, and the line says how often
# Swiftlet raised and lowered GSI 4 with KVM_IRQ_LINE. The PIC, PIT, IOAPIC and local
# APIC accesses, every timer tick, every EOI and every HLT stay inside KVM.
#
# It ends 0.5 s after it received a '.', or after 10 s (1000 ticks) without one.
#
# Memory: long-mode.inc's map, plus the IDT at 0x4000 (256 gates of 16 bytes) and a page
# directory at 0x5000 that maps the IOAPIC's and the local APIC's 2 MiB pages uncached.
# The received bytes go to a 256-byte ring inside the program.

        .include "print.inc"
        .include "long-mode.inc"

        .equ    IDT,            0x4000
        .equ    PD_HIGH,        0x5000          # page directory for virtual 3-4 GiB
        .equ    IOAPIC,         0xFEC00000      # IOREGSEL; IOWIN at +0x10
        .equ    LAPIC,          0xFEE00000
        .equ    LAPIC_EOI,      LAPIC + 0xB0
        .equ    LAPIC_SVR,      LAPIC + 0xF0    # spurious-interrupt vector register
        .equ    TIMER_VECTOR,   0x20
        .equ    SERIAL_VECTOR,  0x24
        .equ    SPURIOUS_VECTOR, 0xFF
        .equ    INTERRUPT_GATE, 0x8E            # present, DPL 0, 64-bit interrupt gate
        .equ    PTE_PWT,        1 << 3
        .equ    PTE_PCD,        1 << 4          # cache disabled: device registers
        .equ    PIT_HZ,         100
        .equ    PIT_DIVISOR,    1193182 / PIT_HZ  # the PIT counts at 1.193182 MHz
        .equ    TICKS_AFTER_DOT, 50             # 0.5 s
        .equ    TICKS_LIMIT,    1000            # 10 s

        .code64
long_mode_main:
        # ---- the IDT ------------------------------------------------------------------
        mov     $IDT, %edi
        xor     %eax, %eax
        mov     $(256 * 16 / 8), %ecx
        rep stosq
        mov     $TIMER_VECTOR, %edi
        lea     timer_handler(%rip), %rsi
        call    set_gate
        mov     $SERIAL_VECTOR, %edi
        lea     serial_handler(%rip), %rsi
        call    set_gate
        mov     $SPURIOUS_VECTOR, %edi
        lea     spurious_handler(%rip), %rsi
        call    set_gate
        lidt    idt_pointer(%rip)
        PRINT   "interrupts: IDT at 0x4000: vector 0x20 timer, 0x24 serial, 0xff spurious\n"

        # ---- map the IOAPIC and local APIC (virtual = physical) ---------------------------
        # 0xFEC00000 and 0xFEE00000 are the 2 MiB pages 502 and 503 of the fourth GiB.
        mov     $PD_HIGH, %edi
        xor     %eax, %eax
        mov     $512, %ecx
        rep stosq
        movq    $(PD_HIGH | PTE_P | PTE_W), PDPT + 3 * 8
        movl    $(IOAPIC | PTE_P | PTE_W | PTE_PS | PTE_PCD | PTE_PWT), PD_HIGH + 502 * 8
        movl    $(LAPIC | PTE_P | PTE_W | PTE_PS | PTE_PCD | PTE_PWT), PD_HIGH + 503 * 8
        mov     %cr3, %rax
        mov     %rax, %cr3

        # ---- the interrupt controllers -----------------------------------------------------
        mov     $0xFF, %al
        out     %al, $0x21              # mask every input of the master 8259 PIC
        out     %al, $0xA1              # and of the slave
        # Above 2 GiB an address does not fit in an instruction's 32-bit (sign-extended)
        # displacement: it goes in a register.
        mov     $LAPIC_SVR, %edi        # a 32-bit MOV zero-extends into RDI
        movl    $(0x100 | SPURIOUS_VECTOR), (%rdi)  # bit 8: the local APIC is on
        # IOAPIC redirection entry N is registers 0x10 + 2N (low: vector, delivery, trigger,
        # mask) and 0x11 + 2N (high: bits 63..56 the destination APIC ID). Select a register
        # by writing its number to IOREGSEL, then read or write it through IOWIN.
        # Low word: the vector; fixed delivery, physical destination, active high, edge
        # triggered, not masked: all those bits 0.
        mov     $IOAPIC, %edi
        movl    $0x10, (%rdi)           # IOREGSEL: pin 0 (the PIT), low word
        movl    $TIMER_VECTOR, 0x10(%rdi)   # IOWIN
        movl    $0x11, (%rdi)           # pin 0, high word: APIC ID 0
        movl    $0, 0x10(%rdi)
        movl    $0x18, (%rdi)           # pin 4 (COM1), low word
        movl    $SERIAL_VECTOR, 0x10(%rdi)
        movl    $0x19, (%rdi)
        movl    $0, 0x10(%rdi)
        PRINT   "interrupts: 8259 PICs masked, local APIC on, IOAPIC pin 0 -> vector 0x20, pin 4 -> vector 0x24\n"

        # ---- the devices -------------------------------------------------------------------
        mov     $0x34, %al              # PIT channel 0, low then high byte, mode 2 (rate generator)
        out     %al, $0x43
        mov     $(PIT_DIVISOR & 0xFF), %al
        out     %al, $0x40
        mov     $(PIT_DIVISOR >> 8), %al
        out     %al, $0x40
        mov     $0x3F9, %dx             # IER
        mov     $0x01, %al              # interrupt when a received byte waits
        out     %al, %dx
        PRINT   "interrupts: PIT channel 0 at 100 Hz, UART receive interrupt on (IER = 0x01)\n"
        PRINT   "interrupts: waiting with sti; hlt. Type text ending in '.', or wait 10 s\n"

        # ---- the waiting loop ----------------------------------------------------------------
wait:
        sti                             # interrupts on, from after the next instruction
        hlt                             # sleep until an interrupt; its handler runs, then here
        cli                             # the counters are ours while we look at them
        incq    wakeups(%rip)
        call    print_received
        mov     ticks(%rip), %rax
        cmp     next_report(%rip), %rax
        jb      1f
        addq    $PIT_HZ, next_report(%rip)
        PRINT   "[timer] "
        call    serial_putdec
        PRINT   " ticks\n"
1:      cmpq    $0, dot_at(%rip)
        je      2f
        mov     dot_at(%rip), %rbx
        add     $TICKS_AFTER_DOT, %rbx
        cmp     %rbx, %rax
        jae     done
2:      cmp     $TICKS_LIMIT, %rax
        jb      wait
        PRINT   "interrupts: no '.' within 10 s\n"

done:
        PRINT   "interrupts: "
        mov     ticks(%rip), %rax
        call    serial_putdec
        PRINT   " timer interrupts (vector 0x20), "
        mov     serial_interrupts(%rip), %rax
        call    serial_putdec
        PRINT   " serial interrupts (vector 0x24, IIR "
        mov     last_iir(%rip), %rax
        push    %rcx
        mov     $2, %ecx
        call    serial_puthexn
        pop     %rcx
        PRINT   "), "
        mov     received(%rip), %rax
        call    serial_putdec
        PRINT   " bytes received, woken from hlt "
        mov     wakeups(%rip), %rax
        call    serial_putdec
        PRINT   " times\n"
        cmpq    $0, ticks(%rip)
        je      fail
        mov     $0, %al
        jmp     exit_vm
fail:
        PRINT   "interrupts: FAILED: no timer interrupt\n"
        mov     $1, %al
        jmp     exit_vm

# print_received: print the bytes the serial handler stored since the last call, after
# "[serial] ". Called with interrupts off.
print_received:
        push    %rax
        push    %rbx
        mov     printed(%rip), %rbx
        cmp     received(%rip), %rbx
        je      3f
        PRINT   "[serial] "
1:      cmp     received(%rip), %rbx
        je      2f
        lea     ring(%rip), %rax
        push    %rbx
        and     $0xFF, %ebx
        mov     (%rax,%rbx), %al
        pop     %rbx
        call    serial_putc
        inc     %rbx
        jmp     1b
2:      mov     %rbx, printed(%rip)
        PRINT   "\n"
3:      pop     %rbx
        pop     %rax
        ret

# ---- the handlers -------------------------------------------------------------------------
# An interrupt gate clears IF on entry, and IRETQ restores the RFLAGS saved on the stack.
# The CPU pushes SS, RSP, RFLAGS, CS and RIP; a handler saves what else it uses.

timer_handler:
        push    %rax
        incq    ticks(%rip)
        mov     $LAPIC_EOI, %eax
        movl    $0, (%rax)              # end of interrupt: the local APIC may deliver the next
        pop     %rax
        iretq

serial_handler:
        push    %rax
        push    %rbx
        push    %rdx
        incq    serial_interrupts(%rip)
        mov     $0x3FA, %dx             # IIR: why the UART interrupts (0x04: received data)
        in      %dx, %al
        mov     %al, last_iir(%rip)
1:      mov     $0x3FD, %dx             # LSR
        in      %dx, %al
        test    $0x01, %al              # data ready?
        jz      2f
        mov     $0x3F8, %dx             # RBR: take the byte
        in      %dx, %al
        mov     received(%rip), %rbx
        and     $0xFF, %ebx
        lea     ring(%rip), %rdx
        mov     %al, (%rdx,%rbx)
        incq    received(%rip)
        cmp     $'.', %al
        jne     1b
        cmpq    $0, dot_at(%rip)
        jne     1b
        mov     ticks(%rip), %rbx
        or      $1, %rbx                # not 0, which means "no dot yet"
        mov     %rbx, dot_at(%rip)
        jmp     1b
2:      mov     $LAPIC_EOI, %eax
        movl    $0, (%rax)
        pop     %rdx
        pop     %rbx
        pop     %rax
        iretq

# The local APIC sends its spurious vector when an interrupt goes away before the CPU
# takes it. No EOI for this one.
spurious_handler:
        iretq

# set_gate: IDT entry EDI -> handler RSI, a 64-bit interrupt gate with CS = CODE64_SEL.
set_gate:
        push    %rax
        push    %rdi
        shl     $4, %edi
        add     $IDT, %edi
        mov     %si, (%rdi)             # offset 15..0
        movw    $CODE64_SEL, 2(%rdi)
        movb    $0, 4(%rdi)             # IST 0: the current stack
        movb    $INTERRUPT_GATE, 5(%rdi)
        mov     %rsi, %rax
        shr     $16, %rax
        mov     %ax, 6(%rdi)            # offset 31..16
        shr     $16, %rax
        mov     %eax, 8(%rdi)           # offset 63..32
        movl    $0, 12(%rdi)
        pop     %rdi
        pop     %rax
        ret

        .balign 8
idt_pointer:
        .word   256 * 16 - 1
        .quad   IDT
ticks:                  .quad 0
serial_interrupts:      .quad 0
received:               .quad 0         # bytes stored in the ring so far
printed:                .quad 0         # bytes printed so far
wakeups:                .quad 0
dot_at:                 .quad 0         # the tick at which '.' arrived (0: not yet)
next_report:            .quad PIT_HZ
last_iir:               .quad 0
ring:                   .fill 256, 1, 0
