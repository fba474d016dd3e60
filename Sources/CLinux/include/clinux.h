// CLinux: Linux calls that Swift cannot import directly: GNU extensions behind
// _GNU_SOURCE, headers Glibc's module map leaves out (epoll, eventfd, timerfd,
// signalfd), and structures whose layout Swift should not guess (the packed
// epoll_event). Kept tiny; KVM's ioctls live in CKVM instead.
#pragma once

#include <stdint.h>
#include <signal.h>
#include <sys/eventfd.h>
#include <sys/signalfd.h>
#include <sys/timerfd.h>

/// Names the calling thread (at most 15 bytes are kept), for `top -H` and `ps -L`.
/// Returns 0 or an errno value.
int clinux_set_thread_name(const char *name);
/// The calling thread's name (at most 15 bytes and a NUL) into `buffer`.
int clinux_get_thread_name(char *buffer, unsigned long length);

// --- epoll ------------------------------------------------------------------------------
// struct epoll_event is packed on x86-64; these wrappers take and return plain fields.

/// One readiness report: the epoll event bits and the 64-bit token it was registered with.
struct clinux_event {
    uint32_t events;
    uint64_t token;
};

static const uint32_t CLINUX_EPOLLIN = 0x001;
static const uint32_t CLINUX_EPOLLOUT = 0x004;
static const uint32_t CLINUX_EPOLLERR = 0x008;
static const uint32_t CLINUX_EPOLLHUP = 0x010;
static const uint32_t CLINUX_EPOLLRDHUP = 0x2000;
static const uint32_t CLINUX_EPOLLET = 1u << 31;

/// epoll_create1(EPOLL_CLOEXEC). Returns the descriptor or -1 with errno set.
int clinux_epoll_create(void);
/// epoll_ctl(EPOLL_CTL_ADD / MOD / DEL) with the events and token given.
int clinux_epoll_add(int epfd, int fd, uint32_t events, uint64_t token);
int clinux_epoll_modify(int epfd, int fd, uint32_t events, uint64_t token);
int clinux_epoll_delete(int epfd, int fd);
/// epoll_wait into `out` (at most `capacity` reports). Returns the count or -1 with errno.
int clinux_epoll_wait(int epfd, struct clinux_event *out, int capacity, int timeout_ms);

// --- Ordered access to memory shared with a guest ------------------------------------------
// Virtqueue indices are written by one side and read by the other, on other CPUs. These are
// the acquire loads, release stores and full fences the virtio specification's memory
// ordering asks for (C11 atomics on naturally aligned locations).

static inline uint16_t clinux_load_acquire_16(const void *address) {
    return __atomic_load_n((const uint16_t *)address, __ATOMIC_ACQUIRE);
}
static inline uint32_t clinux_load_acquire_32(const void *address) {
    return __atomic_load_n((const uint32_t *)address, __ATOMIC_ACQUIRE);
}
static inline uint64_t clinux_load_acquire_64(const void *address) {
    return __atomic_load_n((const uint64_t *)address, __ATOMIC_ACQUIRE);
}
static inline void clinux_store_release_16(void *address, uint16_t value) {
    __atomic_store_n((uint16_t *)address, value, __ATOMIC_RELEASE);
}
static inline void clinux_store_release_32(void *address, uint32_t value) {
    __atomic_store_n((uint32_t *)address, value, __ATOMIC_RELEASE);
}
static inline void clinux_store_release_64(void *address, uint64_t value) {
    __atomic_store_n((uint64_t *)address, value, __ATOMIC_RELEASE);
}
/// Atomically replaces the value at `address` with `desired` if it equals `expected`
/// (sequentially consistent); returns 1 when it did. For page-table accessed/dirty bits
/// the guest's other vCPUs may be changing at the same time.
static inline int clinux_compare_exchange_32(void *address, uint32_t expected, uint32_t desired) {
    return __atomic_compare_exchange_n((uint32_t *)address, &expected, desired, 0, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
}
static inline int clinux_compare_exchange_64(void *address, uint64_t expected, uint64_t desired) {
    return __atomic_compare_exchange_n((uint64_t *)address, &expected, desired, 0, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
}
/// A full barrier: no load or store moves across it (mb() in the virtio specification).
// Bitmaps shared between threads (the log of pages Swiftlet writes into guest RAM).
static inline void clinux_atomic_or_64(void *address, uint64_t bits) {
    __atomic_fetch_or((uint64_t *)address, bits, __ATOMIC_RELAXED);
}
static inline uint64_t clinux_atomic_exchange_64(void *address, uint64_t value) {
    return __atomic_exchange_n((uint64_t *)address, value, __ATOMIC_ACQ_REL);
}
static inline void clinux_fence(void) {
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
}

// --- memfd ----------------------------------------------------------------------------------

/// memfd_create(name, MFD_CLOEXEC): anonymous memory with a file descriptor, which can be
/// mapped again (a snapshot of guest RAM) or handed to another process.
int clinux_memfd_create(const char *name);

// --- Files ----------------------------------------------------------------------------------
// fallocate(2) is a GNU extension that Glibc's module map does not export.

/// Keep the file size when the range reaches past the end (FALLOC_FL_KEEP_SIZE).
static const int CLINUX_FALLOC_KEEP_SIZE = 0x01;
/// Free the range's blocks: it reads as zeros afterwards (FALLOC_FL_PUNCH_HOLE; needs KEEP_SIZE).
static const int CLINUX_FALLOC_PUNCH_HOLE = 0x02;
/// Make the range read as zeros, keeping it allocated (FALLOC_FL_ZERO_RANGE).
static const int CLINUX_FALLOC_ZERO_RANGE = 0x10;

/// fallocate(fd, mode, offset, length) with the CLINUX_FALLOC_* bits. Returns 0, or -1 with
/// errno set (EOPNOTSUPP when the file system cannot do it).
int clinux_fallocate(int fd, int mode, int64_t offset, int64_t length);

/// preadv2(fd, {buffer, length}, offset, RWF_NOWAIT): reads only what the page cache
/// holds, without waiting for the disk. Returns the bytes read, or -1 with errno set
/// (EAGAIN: the data is not cached; EOPNOTSUPP: the file or kernel cannot say).
int64_t clinux_pread_nowait(int fd, void *buffer, uint64_t length, int64_t offset);

// --- TAP devices ----------------------------------------------------------------------------
// The multi-step set-up of a TAP interface for virtio-net stays in C (struct ifreq, the
// TUN ioctls); each call returns a descriptor or 0 on success, -errno on failure.

/// TUNSETOFFLOAD bits (TUN_F_*): the offloads the TAP may hand its reader (packets with a
/// partial checksum, TSO and UFO/USO segments). USO4 and USO6 go together (Linux 6.2+).
static const unsigned int CLINUX_TUN_F_CSUM = 0x01;
static const unsigned int CLINUX_TUN_F_TSO4 = 0x02;
static const unsigned int CLINUX_TUN_F_TSO6 = 0x04;
static const unsigned int CLINUX_TUN_F_TSO_ECN = 0x08;
static const unsigned int CLINUX_TUN_F_UFO = 0x10;
static const unsigned int CLINUX_TUN_F_USO4 = 0x20;
static const unsigned int CLINUX_TUN_F_USO6 = 0x40;

/// Which step of clinux_tap_open failed.
enum clinux_tap_step {
    CLINUX_TAP_STEP_NAME = 1,        // the name is empty or longer than IFNAMSIZ - 1
    CLINUX_TAP_STEP_OPEN = 2,        // open("/dev/net/tun")
    CLINUX_TAP_STEP_ATTACH = 3,      // TUNSETIFF
    CLINUX_TAP_STEP_HEADER_SIZE = 4, // TUNSETVNETHDRSZ
};

/// Opens /dev/net/tun (non-blocking, close-on-exec) and attaches it to the TAP interface
/// `name` with IFF_TAP | IFF_NO_PI | IFF_VNET_HDR (TUNSETIFF; a TAP made multi-queue is
/// attached as one of its queues). TUNSETIFF creates the interface when it does not exist
/// and the caller has CAP_NET_ADMIN; such a TAP is not persistent and goes away with the
/// descriptor. Then sets the virtio-net header every frame carries to
/// `vnet_header_size` bytes (TUNSETVNETHDRSZ). `*existed` says whether an interface of
/// that name existed before. Returns the descriptor, or -errno with `*failed_step` set.
int clinux_tap_open(const char *name, int vnet_header_size, int *existed, int *failed_step);

/// TUNSETOFFLOAD with CLINUX_TUN_F_* bits. Returns 0 or -errno (EINVAL for a combination
/// this kernel does not accept).
int clinux_tap_set_offload(int fd, unsigned int offloads);

/// Sets IFF_UP on the interface `name` (SIOCGIFFLAGS, then SIOCSIFFLAGS, on a datagram
/// socket). Returns 0 or -errno.
int clinux_interface_up(const char *name);

/// The process's argc and argv as execve gave them (captured before main; they do not need
/// /proc, unlike Swift's CommandLine.arguments on Linux).
int clinux_argc(void);
char *const *clinux_argv(void);
