# idle: print "idle", then spin forever at CPL 3.
#
# For measurements that need a guest that stays alive (for example the VMM's own
# memory use, read from /proc/PID/smaps while the guest runs). Run it with a timeout:
#     swiftlet run --flat guests/build/idle.bin --timeout 5
#
# It spins at CPL 3 rather than halting: a HLT with interrupts off would wait forever
# inside KVM only if the VMM created an in-kernel interrupt controller; without one,
# HLT exits to the VMM, which may well end the run. A ring 3 loop keeps the vCPU busy
# in the guest with any VMM, and runs natively even where ring 0 is emulated.
#
# Syntax: GNU as, AT&T order, "op source, destination".

        .include "print.inc"
        .include "long-mode.inc"
        .include "user-mode.inc"

        .code64
long_mode_main:
        lea     user_main(%rip), %rdi
        jmp     enter_user_mode

user_main:                              # CPL 3 from here
        PRINT   "idle\n"
1:      pause                           # "spin-wait hint": saves power in busy loops
        jmp     1b
