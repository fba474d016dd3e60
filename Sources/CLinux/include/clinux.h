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
