/*
 * lib.c: the serial console, a small printf, the exit port and string helpers.
 *
 * The console is COM1, a 16550A UART at ports 0x3F8-0x3FF, driven as serial32.inc does it:
 * wait until the line status register (LSR, 0x3FD) says the transmit holding register is
 * empty (bit 5), then write the byte to the transmit register (THR, 0x3F8). Every IN and
 * OUT leaves the guest (a VM exit), so a character costs two exits: print sparingly.
 */
#include "lib.h"

#define COM1_THR 0x3F8  /* transmit holding register (write) */
#define COM1_LSR 0x3FD  /* line status register (read) */
#define LSR_THR_EMPTY 0x20
#define EXIT_PORT 0xF4  /* like QEMU's isa-debug-exit: writing V ends the VM with status V*2+1 */

void console_putc(char c)
{
    while (!(inb(COM1_LSR) & LSR_THR_EMPTY))
        cpu_relax();
    outb(COM1_THR, (uint8_t)c);
}

void console_puts(const char *s)
{
    while (*s)
        console_putc(*s++);
}

/* Where formatted text goes: the console (buffer == NULL) or a buffer of `capacity` bytes,
 * always NUL-terminated, excess dropped. */
struct sink {
    char *buffer;
    size_t capacity, length;
};

static void emit(struct sink *out, char c)
{
    if (!out->buffer) {
        console_putc(c);
    } else if (out->length + 1 < out->capacity) {
        out->buffer[out->length++] = c;
        out->buffer[out->length] = 0;
    }
}

/* Emits `value` in `base` (10 or 16), at least `width` characters wide, padded on the
 * left with `pad` (' ' or '0'). Digits come out least significant first, so they are
 * collected backwards in a buffer. */
static void emit_number(struct sink *out, uint64_t value, uint32_t base, int width, char pad)
{
    char digits[24];
    int n = 0;
    do {
        uint32_t digit = (uint32_t)(value % base);
        value /= base;
        digits[n++] = (char)(digit < 10 ? '0' + digit : 'a' + digit - 10);
    } while (value != 0);
    while (n < width--)
        emit(out, pad);
    while (n > 0)
        emit(out, digits[--n]);
}

/* The format language: %s, %c, %d, %u, %x, with "l" for 64-bit arguments (%lu, %lx),
 * an optional '0' flag and a width (%08x). */
static void format(struct sink *out, const char *f, va_list ap)
{
    for (; *f; f++) {
        if (*f != '%') {
            emit(out, *f);
            continue;
        }
        f++;
        char pad = ' ';
        if (*f == '0') {
            pad = '0';
            f++;
        }
        int width = 0;
        while (*f >= '0' && *f <= '9')
            width = width * 10 + (*f++ - '0');
        bool wide = false;              /* "l": the argument is 64 bits */
        if (*f == 'l') {
            wide = true;
            f++;
        }
        switch (*f) {
        case 's':
            for (const char *s = va_arg(ap, const char *); *s; s++)
                emit(out, *s);
            break;
        case 'c': emit(out, (char)va_arg(ap, int)); break;
        case 'd': {
            int32_t v = va_arg(ap, int32_t);
            if (v < 0) {
                emit(out, '-');
                emit_number(out, (uint64_t)(-(int64_t)v), 10, width, pad);
            } else {
                emit_number(out, (uint64_t)v, 10, width, pad);
            }
            break;
        }
        case 'u': emit_number(out, wide ? va_arg(ap, uint64_t) : va_arg(ap, uint32_t), 10, width, pad); break;
        case 'x': emit_number(out, wide ? va_arg(ap, uint64_t) : va_arg(ap, uint32_t), 16, width, pad); break;
        case '%': emit(out, '%'); break;
        default: emit(out, '?'); break;
        }
        if (*f == 0)
            break;
    }
}

void kprintf(const char *f, ...)
{
    struct sink console = { 0, 0, 0 };
    va_list ap;
    va_start(ap, f);
    format(&console, f, ap);
    va_end(ap);
}

void ksnprintf(char *buffer, size_t capacity, const char *f, ...)
{
    struct sink out = { buffer, capacity, 0 };
    if (capacity > 0)
        buffer[0] = 0;
    va_list ap;
    va_start(ap, f);
    format(&out, f, ap);
    va_end(ap);
}

void exit_vm(uint8_t code)
{
    outb(EXIT_PORT, code);
    /* Without an exit device the VM goes on: spin. (HLT would be nicer but is a privileged
     * instruction: at CPL 3 it faults.) */
    for (;;)
        cpu_relax();
}

void fail(const char *f, ...)
{
    struct sink console = { 0, 0, 0 };
    va_list ap;
    va_start(ap, f);
    console_puts(program_name);
    console_puts(": error: ");
    format(&console, f, ap);
    va_end(ap);
    console_putc('\n');
    exit_vm(1);
}

/* gcc may turn a loop or a struct assignment into a call to memset or memcpy even in a
 * freestanding program, so both must exist. (-fno-tree-loop-distribute-patterns in the
 * Makefile keeps it from turning these very loops into calls to themselves.) */
void *memset(void *d, int c, size_t n)
{
    uint8_t *p = d;
    while (n--)
        *p++ = (uint8_t)c;
    return d;
}

void *memcpy(void *d, const void *s, size_t n)
{
    uint8_t *p = d;
    const uint8_t *q = s;
    while (n--)
        *p++ = *q++;
    return d;
}

size_t strlen(const char *s)
{
    size_t n = 0;
    while (s[n])
        n++;
    return n;
}

bool starts_with(const char *s, const char *prefix)
{
    while (*prefix)
        if (*s++ != *prefix++)
            return false;
    return true;
}

void copy_word(char *destination, size_t capacity, const char *source)
{
    size_t n = 0;
    while (n + 1 < capacity && source[n] && source[n] != ' ' && source[n] != '\t') {
        destination[n] = source[n];
        n++;
    }
    if (capacity > 0)
        destination[n] = 0;
}

size_t parse_u64(const char *s, uint64_t *value)
{
    const char *p = s;
    uint32_t base = 10;
    if (p[0] == '0' && (p[1] == 'x' || p[1] == 'X')) {
        base = 16;
        p += 2;
    }
    const char *digits = p;
    uint64_t v = 0;
    for (;; p++) {
        uint32_t d;
        if (*p >= '0' && *p <= '9') d = (uint32_t)(*p - '0');
        else if (base == 16 && *p >= 'a' && *p <= 'f') d = (uint32_t)(*p - 'a' + 10);
        else if (base == 16 && *p >= 'A' && *p <= 'F') d = (uint32_t)(*p - 'A' + 10);
        else break;
        /* Would v * base + d overflow 64 bits? */
        uint64_t limit = base == 16 ? UINT64_MAX / 16 : UINT64_MAX / 10;
        if (v > limit || v * base + d < v * base)
            return 0;
        v = v * base + d;
    }
    if (p == digits)
        return 0;
    *value = v;
    return (size_t)(p - s);
}
