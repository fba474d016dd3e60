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
