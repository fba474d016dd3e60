/*
 * lib.h: the little a freestanding kernel needs from a "C library" it does not have.
 *
 * There is no libc here: the guest is compiled with -ffreestanding -nostdlib, so only the
 * compiler's own headers (<stdint.h>, <stddef.h>, <stdbool.h>, <stdarg.h>) exist. This file
 * adds:
 *   - port I/O (IN/OUT) and memory-mapped I/O (MMIO) accessors,
 *   - the compiler barrier and the full memory fence the virtqueue code needs,
 *   - the serial console (COM1) with a small printf,
 *   - ending the VM through the exit port 0xF4,
 *   - a few string helpers and the time-stamp counter.
 *
 * Everything here works at any privilege level: at CPL 3 the ports must be granted in the
 * TSS I/O permission bitmap (kernel.c), and the identity-mapped, user-accessible page
 * tables (entry.s) make every physical address below 4 GiB, RAM or device, reachable.
 */
#ifndef LIB_H
#define LIB_H

#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* ---- port I/O ------------------------------------------------------------------------
 * x86 has a second address space of 65536 "ports", reached only with IN and OUT. The
 * port number goes in DX (or is an 8-bit immediate), the data in AL, AX or EAX. */
static inline void outb(uint16_t port, uint8_t value) { __asm__ volatile("outb %0, %1" : : "a"(value), "Nd"(port)); }
static inline void outw(uint16_t port, uint16_t value) { __asm__ volatile("outw %0, %1" : : "a"(value), "Nd"(port)); }
static inline void outl(uint16_t port, uint32_t value) { __asm__ volatile("outl %0, %1" : : "a"(value), "Nd"(port)); }
static inline uint8_t inb(uint16_t port) { uint8_t v; __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port)); return v; }
static inline uint16_t inw(uint16_t port) { uint16_t v; __asm__ volatile("inw %1, %0" : "=a"(v) : "Nd"(port)); return v; }
static inline uint32_t inl(uint16_t port) { uint32_t v; __asm__ volatile("inl %1, %0" : "=a"(v) : "Nd"(port)); return v; }

/* ---- memory-mapped I/O ---------------------------------------------------------------
 * A device register in the physical address space is read and written with ordinary MOV
 * instructions. `volatile` tells the compiler that every access matters: it must emit
 * exactly one load or store of exactly this width, in program order, never cache the value
 * in a register and never merge or split accesses. A virtio device decodes the access
 * width (a 16-bit write to a 32-bit register may be ignored), so the width is part of the
 * protocol. Under a VMM each such access leaves the guest (an "MMIO exit"): the VMM sees
 * the address, the width and the value. */
static inline uint8_t mmio_read8(uintptr_t a) { return *(volatile uint8_t *)a; }
static inline uint16_t mmio_read16(uintptr_t a) { return *(volatile uint16_t *)a; }
static inline uint32_t mmio_read32(uintptr_t a) { return *(volatile uint32_t *)a; }
static inline void mmio_write8(uintptr_t a, uint8_t v) { *(volatile uint8_t *)a = v; }
static inline void mmio_write16(uintptr_t a, uint16_t v) { *(volatile uint16_t *)a = v; }
static inline void mmio_write32(uintptr_t a, uint32_t v) { *(volatile uint32_t *)a = v; }

/* ---- ordering ------------------------------------------------------------------------
 * Two different things can reorder memory accesses:
 *
 *   1. The compiler, which may move, merge or delete ordinary loads and stores as long as
 *      this one thread cannot tell. compiler_barrier() forbids that across it: the empty
 *      asm statement "clobbers memory", so every value must be in memory before it and be
 *      read again after it.
 *   2. The CPU. x86 is "TSO" (total store order): loads are not reordered with other loads,
 *      stores not with other stores, and a store is not moved before an earlier load. The
 *      one reordering it does: a LOAD may complete before an earlier STORE to a different
 *      address has left the store buffer. Only a fence (MFENCE, or a LOCKed instruction)
 *      stops that. full_fence() is MFENCE plus a compiler barrier.
 *
 * The virtio spec (2.7.13 "Supplying Buffers to The Device", 2.7.14 "Receiving Used
 * Buffers") names the barriers a driver needs; virtqueue.c says at each one why, on x86,
 * a compiler barrier is enough or why it needs the fence. */
static inline void compiler_barrier(void) { __asm__ volatile("" : : : "memory"); }
static inline void full_fence(void) { __asm__ volatile("mfence" : : : "memory"); }

/* PAUSE: a hint to the CPU (and to a hyperthread sibling) that this is a spin loop. */
static inline void cpu_relax(void) { __asm__ volatile("pause" : : : "memory"); }

/* RDTSC: the time-stamp counter, a cycle counter readable at CPL 3 (CR4.TSD = 0). EDX:EAX. */
static inline uint64_t rdtsc(void)
{
    uint32_t lo, hi;
    __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
    return ((uint64_t)hi << 32) | lo;
}

/* ---- the console and the exit port (lib.c) --------------------------------------------- */
void console_putc(char c);
void console_puts(const char *s);
/* kprintf: printf with %s %c %d %u %x, %lu %lx for 64-bit numbers (uint64_t is an unsigned
 * long here), an optional '0' flag and a width ("%08x").
 * ksnprintf: the same into a buffer, always NUL-terminated. The format attribute lets gcc
 * check the arguments against the format, as it does for printf. */
void kprintf(const char *format, ...) __attribute__((format(printf, 1, 2)));
void ksnprintf(char *buffer, size_t capacity, const char *format, ...) __attribute__((format(printf, 3, 4)));
/* Writes `code` to port 0xF4 (the VMM exits with status code*2+1), then spins. */
__attribute__((noreturn)) void exit_vm(uint8_t code);
/* The program's name, the prefix of its messages ("virtio-blk", "virtio-net"): each guest's
 * main.c defines it. */
extern const char program_name[];
/* Prints "<program_name>: error: ..." and the newline, then exit_vm(1). */
__attribute__((noreturn, format(printf, 1, 2))) void fail(const char *format, ...);

/* ---- memory and strings --------------------------------------------------------------- */
void *memset(void *d, int c, size_t n);
void *memcpy(void *d, const void *s, size_t n);
size_t strlen(const char *s);
bool starts_with(const char *s, const char *prefix);
/* Copies one word of `source` (up to a space, a tab or the end) into `destination`. */
void copy_word(char *destination, size_t capacity, const char *source);
/* Parses an unsigned number: "0x..." hexadecimal or decimal. Returns the characters used
 * (0 if none, or if it overflows 64 bits). */
size_t parse_u64(const char *s, uint64_t *value);

#define ARRAY_SIZE(a) (sizeof(a) / sizeof((a)[0]))

#endif
