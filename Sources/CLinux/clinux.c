#define _GNU_SOURCE
#include "clinux.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/if_tun.h>
#include <net/if.h>
#include <pthread.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

_Static_assert(EPOLLIN == 0x001 && EPOLLOUT == 0x004 && EPOLLERR == 0x008 && EPOLLHUP == 0x010, "epoll bits");
_Static_assert(EPOLLRDHUP == 0x2000 && EPOLLET == (1u << 31), "epoll bits");
_Static_assert(FALLOC_FL_KEEP_SIZE == 0x01 && FALLOC_FL_PUNCH_HOLE == 0x02 && FALLOC_FL_ZERO_RANGE == 0x10, "fallocate bits");

int clinux_set_thread_name(const char *name) {
    char truncated[16];
    strncpy(truncated, name, sizeof(truncated) - 1);
    truncated[sizeof(truncated) - 1] = '\0';
    return pthread_setname_np(pthread_self(), truncated);
}

int clinux_get_thread_name(char *buffer, unsigned long length) {
    return pthread_getname_np(pthread_self(), buffer, length);
}

int clinux_epoll_create(void) {
    return epoll_create1(EPOLL_CLOEXEC);
}

static int control(int epfd, int op, int fd, uint32_t events, uint64_t token) {
    struct epoll_event event;
    memset(&event, 0, sizeof(event));
    event.events = events;
    event.data.u64 = token;
    return epoll_ctl(epfd, op, fd, &event);
}

int clinux_epoll_add(int epfd, int fd, uint32_t events, uint64_t token) {
    return control(epfd, EPOLL_CTL_ADD, fd, events, token);
}

int clinux_epoll_modify(int epfd, int fd, uint32_t events, uint64_t token) {
    return control(epfd, EPOLL_CTL_MOD, fd, events, token);
}

int clinux_epoll_delete(int epfd, int fd) {
    return control(epfd, EPOLL_CTL_DEL, fd, 0, 0);
}

int clinux_epoll_wait(int epfd, struct clinux_event *out, int capacity, int timeout_ms) {
    struct epoll_event events[64];
    if (capacity > 64) capacity = 64;
    int count = epoll_wait(epfd, events, capacity, timeout_ms);
    for (int index = 0; index < count; index++) {
        out[index].events = events[index].events;
        out[index].token = events[index].data.u64;
    }
    return count;
}

int clinux_memfd_create(const char *name) {
    return memfd_create(name, MFD_CLOEXEC);
}

int clinux_fallocate(int fd, int mode, int64_t offset, int64_t length) {
    return fallocate(fd, mode, (off_t)offset, (off_t)length);
}

int64_t clinux_pread_nowait(int fd, void *buffer, uint64_t length, int64_t offset) {
    struct iovec vector = { buffer, (size_t)length };
    return preadv2(fd, &vector, 1, (off_t)offset, RWF_NOWAIT);
}

// --- TAP devices ----------------------------------------------------------------------------

_Static_assert(TUN_F_CSUM == 0x01 && TUN_F_TSO4 == 0x02 && TUN_F_TSO6 == 0x04 && TUN_F_TSO_ECN == 0x08 && TUN_F_UFO == 0x10,
               "TUN_F_* bits");
#ifdef TUN_F_USO4
_Static_assert(TUN_F_USO4 == 0x20 && TUN_F_USO6 == 0x40, "TUN_F_USO bits");
#endif

static int copy_name(struct ifreq *request, const char *name) {
    size_t length = strlen(name);
    if (length == 0 || length >= IFNAMSIZ) return -EINVAL;
    memset(request, 0, sizeof(*request));
    memcpy(request->ifr_name, name, length);
    return 0;
}

int clinux_tap_open(const char *name, int vnet_header_size, int *existed, int *failed_step) {
    struct ifreq request;
    *existed = 0;
    if (copy_name(&request, name) != 0) {
        *failed_step = CLINUX_TAP_STEP_NAME;
        return -EINVAL;
    }
    *existed = if_nametoindex(name) != 0;
    int fd = open("/dev/net/tun", O_RDWR | O_NONBLOCK | O_CLOEXEC);
    if (fd < 0) {
        *failed_step = CLINUX_TAP_STEP_OPEN;
        return -errno;
    }
    request.ifr_flags = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR;
    int result = ioctl(fd, TUNSETIFF, &request);
    int error = result < 0 ? errno : 0;
    if (error == EINVAL && *existed) {
        // An existing TAP made with IFF_MULTI_QUEUE accepts only multi-queue attaches; if
        // that fails too, the first refusal is the one to report.
        copy_name(&request, name);
        request.ifr_flags = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR | IFF_MULTI_QUEUE;
        result = ioctl(fd, TUNSETIFF, &request);
        if (result == 0) error = 0;
    }
    if (result < 0) {
        close(fd);
        *failed_step = CLINUX_TAP_STEP_ATTACH;
        return -error;
    }
    if (ioctl(fd, TUNSETVNETHDRSZ, &vnet_header_size) < 0) {
        int error = errno;
        close(fd);
        *failed_step = CLINUX_TAP_STEP_HEADER_SIZE;
        return -error;
    }
    return fd;
}

int clinux_tap_set_offload(int fd, unsigned int offloads) {
    return ioctl(fd, TUNSETOFFLOAD, (unsigned long)offloads) < 0 ? -errno : 0;
}

int clinux_interface_up(const char *name) {
    struct ifreq request;
    if (copy_name(&request, name) != 0) return -EINVAL;
    int sock = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (sock < 0) return -errno;
    int result = ioctl(sock, SIOCGIFFLAGS, &request);
    if (result == 0 && !(request.ifr_flags & IFF_UP)) {
        request.ifr_flags |= IFF_UP;
        result = ioctl(sock, SIOCSIFFLAGS, &request);
    }
    int error = result < 0 ? errno : 0;
    close(sock);
    return -error;
}

// --- The command line, as the process got it ---------------------------------------------------
// glibc passes argc and argv to the functions of .init_array; Swift's CommandLine.arguments
// reads /proc/self/cmdline on Linux, which a jail (no /proc) does not have.
static int captured_argc;
static char **captured_argv;

__attribute__((constructor)) static void clinux_capture_arguments(int argc, char **argv, char **envp) {
    (void)envp;
    captured_argc = argc;
    captured_argv = argv;
}

int clinux_argc(void) { return captured_argc; }
char *const *clinux_argv(void) { return captured_argv; }
