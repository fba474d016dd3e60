/*
 * kernel.h: what the ring 0 start-up (kernel.c) hands to the ring 3 program (main.c).
 */
#ifndef KERNEL_H
#define KERNEL_H

#include <stdint.h>

/* How we were booted (entry.s passes one of these to kernel_main). */
enum boot_protocol {
    BOOT_MULTIBOOT = 1,
    BOOT_PVH = 2,
};

/* Filled in by kernel_main before it drops to ring 3. */
struct boot_info {
    enum boot_protocol protocol;
    /* The command line, a NUL-terminated string in guest memory (never NULL: "" when the
     * loader gave none). With Multiboot it starts with the kernel's file name. */
    const char *cmdline;
};

extern struct boot_info boot_info;

/* The ring 3 program: main.c. */
__attribute__((noreturn)) void user_main(void);

#endif
