/*
 * kvm-baseline: the smallest useful VMM, in plain C, as a yardstick for Swiftlet.
 *
 * It issues the same KVM calls a minimal VMM must issue and nothing more, so its
 * timings are the "floor" that bench/vm.py compares Swiftlet against:
 *
 *   open /dev/kvm -> KVM_CREATE_VM -> KVM_SET_TSS_ADDR -> KVM_SET_IDENTITY_MAP_ADDR
 *   -> KVM_CREATE_IRQCHIP -> mmap guest RAM + KVM_SET_USER_MEMORY_REGION
 *   -> KVM_CREATE_VCPU -> mmap kvm_run -> KVM_SET_CPUID2 (from KVM_GET_SUPPORTED_CPUID)
 *   -> load the flat binary at 0x7C00, KVM_SET_SREGS / KVM_SET_REGS (16-bit real mode)
 *   -> loop { KVM_RUN; handle the exit }
 *
 * Devices (port I/O only, everything else is fatal):
 *   0x3F8 write   COM1 transmit holding register: the byte goes to stdout
 *   0x3FD read    COM1 line status register: always 0x60 (THR empty, transmitter idle)
 *   0xF4  write   exit port (like QEMU's isa-debug-exit): exit((value << 1) | 1)
 *   0x80  write   POST code port: ignored (the PIO benchmark's no-op port)
 *   anything else: message on stderr, exit status 2
 *
 * Usage: kvm-baseline FILE.bin [MEM_MB]      (MEM_MB defaults to 64)
 * With KVM_BASELINE_TRACE=1 in the environment it prints, on stderr, the same line
 * Swiftlet prints with --trace-exits: "first KVM_RUN: monotonic <N> ns".
 *
 * Build: gcc -O2 -Wall -o kvm-baseline bench/kvm-baseline.c
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/kvm.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define LOAD_ADDRESS 0x7C00u
#define TSS_ADDRESS 0xfffbd000u /* three pages KVM needs for real mode on VMX; below 4 GiB */
#define IDENTITY_MAP_ADDRESS 0xfffbc000u /* one page, just below the TSS pages */

#define COM1_THR 0x3F8
#define COM1_LSR 0x3FD
#define EXIT_PORT 0xF4
#define POST_PORT 0x80

static void die(const char *what) {
    fprintf(stderr, "kvm-baseline: %s: %s\n", what, strerror(errno));
    exit(2);
}

/* ioctl that dies with a message on failure and retries on EINTR. Not used for KVM_RUN. */
static int xioctl(int fd, unsigned long request, void *arg, const char *name) {
    int r;
    do {
        r = ioctl(fd, request, arg);
    } while (r < 0 && errno == EINTR);
    if (r < 0) die(name);
    return r;
}

/* Same as xioctl for requests that take an integer argument. */
static int xioctl_int(int fd, unsigned long request, unsigned long arg, const char *name) {
    int r;
    do {
        r = ioctl(fd, request, arg);
    } while (r < 0 && errno == EINTR);
    if (r < 0) die(name);
    return r;
}

/* Hands KVM the CPUID table it supports, so the guest sees long mode, SSE and so on. */
static void set_cpuid(int kvm, int vcpu) {
    for (int n = 64; n <= 4096; n *= 2) {
        size_t size = sizeof(struct kvm_cpuid2) + n * sizeof(struct kvm_cpuid_entry2);
        struct kvm_cpuid2 *cpuid = calloc(1, size);
        if (!cpuid) die("calloc");
        cpuid->nent = n;
        if (ioctl(kvm, KVM_GET_SUPPORTED_CPUID, cpuid) < 0) {
            free(cpuid);
            if (errno == E2BIG) continue; /* table too small: try twice as many entries */
            die("KVM_GET_SUPPORTED_CPUID");
        }
        xioctl(vcpu, KVM_SET_CPUID2, cpuid, "KVM_SET_CPUID2");
        free(cpuid);
        return;
    }
    fprintf(stderr, "kvm-baseline: KVM_GET_SUPPORTED_CPUID: more than 4096 entries\n");
    exit(2);
}

/* A real-mode segment: base = selector * 16, 64 KiB limit. */
static void real_mode_segment(struct kvm_segment *seg, int code) {
    memset(seg, 0, sizeof *seg);
    seg->selector = 0;
    seg->base = 0;
    seg->limit = 0xFFFF;
    seg->type = code ? 0xB : 0x3; /* execute/read accessed, or read/write accessed */
    seg->present = 1;
    seg->s = 1;
}

static void write_byte(unsigned char c) {
    /* One write(2) per byte: the output is never held back in a buffer. */
    while (write(STDOUT_FILENO, &c, 1) < 0 && errno == EINTR) {}
}

/* Handles one KVM_EXIT_IO. Returns only if the VM should keep running. */
static void handle_io(struct kvm_run *run) {
    uint8_t *data = (uint8_t *)run + run->io.data_offset;
    for (uint32_t i = 0; i < run->io.count; i++, data += run->io.size) {
        uint16_t port = run->io.port;
        if (run->io.direction == KVM_EXIT_IO_OUT) {
            if (port == COM1_THR) {
                write_byte(data[0]);
            } else if (port == EXIT_PORT) {
                exit((data[0] << 1) | 1);
            } else if (port == POST_PORT) {
                /* ignored on purpose */
            } else {
                fprintf(stderr, "kvm-baseline: unhandled out to port 0x%x (size %u, value 0x%x)\n",
                        port, run->io.size, data[0]);
                exit(2);
            }
        } else {
            if (port == COM1_LSR) {
                memset(data, 0, run->io.size);
                data[0] = 0x60; /* THRE | TEMT: ready to send */
            } else {
                fprintf(stderr, "kvm-baseline: unhandled in from port 0x%x (size %u)\n", port,
                        run->io.size);
                exit(2);
            }
        }
    }
}

/* After a fatal exit: where the guest was, to help whoever debugs it. */
static void print_state(int vcpu) {
    struct kvm_regs regs;
    struct kvm_sregs sregs;
    if (ioctl(vcpu, KVM_GET_REGS, &regs) < 0 || ioctl(vcpu, KVM_GET_SREGS, &sregs) < 0) return;
    fprintf(stderr, "kvm-baseline: rip=0x%llx rsp=0x%llx rflags=0x%llx cs=0x%x cr0=0x%llx cr3=0x%llx cr4=0x%llx efer=0x%llx\n",
            (unsigned long long)regs.rip, (unsigned long long)regs.rsp, (unsigned long long)regs.rflags,
            sregs.cs.selector, (unsigned long long)sregs.cr0, (unsigned long long)sregs.cr3,
            (unsigned long long)sregs.cr4, (unsigned long long)sregs.efer);
}

int main(int argc, char **argv) {
    if (argc < 2 || argc > 3) {
        fprintf(stderr, "usage: %s FILE.bin [MEM_MB]\n", argv[0]);
        return 2;
    }
    unsigned long mem_mb = 64;
    if (argc == 3) {
        char *end;
        mem_mb = strtoul(argv[2], &end, 10);
        if (*end || mem_mb < 1 || mem_mb > 3072) {
            fprintf(stderr, "kvm-baseline: MEM_MB must be 1..3072\n");
            return 2;
        }
    }
    size_t mem_size = mem_mb << 20;
    int trace = getenv("KVM_BASELINE_TRACE") && strcmp(getenv("KVM_BASELINE_TRACE"), "1") == 0;

    /* The system fd, and a VM. */
    int kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
    if (kvm < 0) die("open /dev/kvm");
    if (xioctl_int(kvm, KVM_GET_API_VERSION, 0, "KVM_GET_API_VERSION") != KVM_API_VERSION) {
        fprintf(stderr, "kvm-baseline: unexpected KVM API version\n");
        return 2;
    }
    int vm = xioctl_int(kvm, KVM_CREATE_VM, 0, "KVM_CREATE_VM");

    /* Intel VMX needs these pages to run real-mode code; AMD ignores them. */
    xioctl_int(vm, KVM_SET_TSS_ADDR, TSS_ADDRESS, "KVM_SET_TSS_ADDR");
    uint64_t identity_map = IDENTITY_MAP_ADDRESS;
    xioctl(vm, KVM_SET_IDENTITY_MAP_ADDR, &identity_map, "KVM_SET_IDENTITY_MAP_ADDR");
    xioctl_int(vm, KVM_CREATE_IRQCHIP, 0, "KVM_CREATE_IRQCHIP");

    /* Guest RAM: one anonymous mapping at guest-physical 0. */
    void *ram = mmap(NULL, mem_size, PROT_READ | PROT_WRITE,
                     MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (ram == MAP_FAILED) die("mmap guest memory");
    struct kvm_userspace_memory_region region = {
        .slot = 0,
        .flags = 0,
        .guest_phys_addr = 0,
        .memory_size = mem_size,
        .userspace_addr = (uint64_t)(uintptr_t)ram,
    };
    xioctl(vm, KVM_SET_USER_MEMORY_REGION, &region, "KVM_SET_USER_MEMORY_REGION");

    /* One vCPU and its shared kvm_run page(s). */
    int vcpu = xioctl_int(vm, KVM_CREATE_VCPU, 0, "KVM_CREATE_VCPU");
    int run_size = xioctl_int(kvm, KVM_GET_VCPU_MMAP_SIZE, 0, "KVM_GET_VCPU_MMAP_SIZE");
    struct kvm_run *run = mmap(NULL, run_size, PROT_READ | PROT_WRITE, MAP_SHARED, vcpu, 0);
    if (run == MAP_FAILED) die("mmap kvm_run");
    set_cpuid(kvm, vcpu);

    /* The flat binary goes to 0x7C00. */
    int fd = open(argv[1], O_RDONLY | O_CLOEXEC);
    if (fd < 0) die(argv[1]);
    struct stat st;
    if (fstat(fd, &st) < 0) die("fstat");
    if (st.st_size <= 0 || (uint64_t)st.st_size > mem_size - LOAD_ADDRESS) {
        fprintf(stderr, "kvm-baseline: %s is empty or does not fit in guest memory\n", argv[1]);
        return 2;
    }
    for (off_t done = 0; done < st.st_size;) {
        ssize_t n = read(fd, (char *)ram + LOAD_ADDRESS + done, st.st_size - done);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) die("read");
        done += n;
    }
    close(fd);

    /* Entry state: 16-bit real mode, CS:IP = 0000:7C00, data segments 0, SP = 0x7C00. */
    struct kvm_sregs sregs;
    xioctl(vcpu, KVM_GET_SREGS, &sregs, "KVM_GET_SREGS");
    real_mode_segment(&sregs.cs, 1);
    real_mode_segment(&sregs.ds, 0);
    real_mode_segment(&sregs.es, 0);
    real_mode_segment(&sregs.fs, 0);
    real_mode_segment(&sregs.gs, 0);
    real_mode_segment(&sregs.ss, 0);
    xioctl(vcpu, KVM_SET_SREGS, &sregs, "KVM_SET_SREGS");
    struct kvm_regs regs;
    memset(&regs, 0, sizeof regs);
    regs.rip = LOAD_ADDRESS;
    regs.rsp = LOAD_ADDRESS;
    regs.rflags = 0x2; /* reserved bit 1; IF = 0 */
    xioctl(vcpu, KVM_SET_REGS, &regs, "KVM_SET_REGS");

    if (trace) {
        struct timespec ts;
        clock_gettime(CLOCK_MONOTONIC, &ts);
        fprintf(stderr, "first KVM_RUN: monotonic %lld ns\n",
                (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec);
    }

    for (;;) {
        if (ioctl(vcpu, KVM_RUN, 0) < 0) {
            if (errno == EINTR || errno == EAGAIN) continue;
            die("KVM_RUN");
        }
        if (run->exit_reason == KVM_EXIT_IO) {
            handle_io(run);
            continue;
        }
        print_state(vcpu);
        switch (run->exit_reason) {
        case KVM_EXIT_HLT:
            fprintf(stderr, "kvm-baseline: guest halted\n");
            return 2;
        case KVM_EXIT_SHUTDOWN:
            fprintf(stderr, "kvm-baseline: guest shut down (triple fault)\n");
            return 2;
        case KVM_EXIT_FAIL_ENTRY:
            fprintf(stderr, "kvm-baseline: entry failed, reason 0x%llx\n",
                    (unsigned long long)run->fail_entry.hardware_entry_failure_reason);
            return 2;
        case KVM_EXIT_INTERNAL_ERROR:
            fprintf(stderr, "kvm-baseline: KVM internal error, suberror %u\n", run->internal.suberror);
            return 2;
        case KVM_EXIT_MMIO:
            fprintf(stderr, "kvm-baseline: unhandled MMIO %s at 0x%llx\n",
                    run->mmio.is_write ? "write" : "read", (unsigned long long)run->mmio.phys_addr);
            return 2;
        default:
            fprintf(stderr, "kvm-baseline: unhandled exit reason %u\n", run->exit_reason);
            return 2;
        }
    }
}
