/*
 * bench/tap-floor.c: the floor for virtio-net throughput: the same frames a VMM's virtio-net
 * device moves, moved by a C program that does nothing else. bench/virtio-net.py builds it
 * (gcc -O2) and runs it in the benchmark's network namespace, against the same TAP device
 * the VMMs use, in the same run.
 *
 *   tap-floor write TAP COUNT SIZE SRCMAC DSTMAC SRCIP DSTIP SRCPORT DSTPORT
 *       Opens TAP as a VMM does (IFF_TAP | IFF_NO_PI | IFF_VNET_HDR, a 12-byte header) and
 *       writes COUNT frames of SIZE bytes (a whole Ethernet frame: Ethernet, IPv4 and UDP
 *       headers and the payload of the virtio-net guest's "send" command: a 64-bit
 *       big-endian sequence number, then bytes i & 0xFF), one write(2) per frame, as fast
 *       as it can: the guest-to-host path with no guest and no device in it. Prints
 *       "wrote N frames in T s".
 *   tap-floor read TAP DSTPORT IDLE_MS
 *       Opens TAP the same way and reads frames, one read(2) each, counting the UDP
 *       datagrams to DSTPORT, until none came for IDLE_MS after the first one: the
 *       host-to-guest path with no device and no guest. Prints "ready" once the TAP is
 *       open, then "read N frames, M to port P".
 *   tap-floor send DSTIP DSTPORT SIZE SECONDS
 *       A UDP sender: datagrams making SIZE-byte Ethernet frames to DSTIP:DSTPORT, 64 per
 *       sendmmsg(2), for SECONDS: the traffic both the floor reader and a guest receive.
 *       Prints "sent N datagrams in T s".
 * Exit status 0, or 1 with a message on stderr.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/if.h>
#include <linux/if_tun.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#define VNET_HDR_BYTES 12               /* struct virtio_net_hdr_mrg_rxbuf, as with VERSION_1 */
#define FRAME_MAX 1514

static void die(const char *what)
{
    fprintf(stderr, "tap-floor: %s: %s\n", what, strerror(errno));
    exit(1);
}

static void usage(void)
{
    fprintf(stderr, "usage: tap-floor write TAP COUNT SIZE SRCMAC DSTMAC SRCIP DSTIP SRCPORT DSTPORT\n"
                    "       tap-floor read TAP DSTPORT IDLE_MS\n"
                    "       tap-floor send DSTIP DSTPORT SIZE SECONDS\n");
    exit(1);
}

static double now(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec / 1e9;
}

static long number(const char *s, long min, long max)
{
    char *end;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (errno || *end || v < min || v > max) {
        fprintf(stderr, "tap-floor: %s: expected a number from %ld to %ld\n", s, min, max);
        exit(1);
    }
    return v;
}

/* Opens an existing TAP device the way QEMU and Swiftlet do. */
static int open_tap(const char *name)
{
    int fd = open("/dev/net/tun", O_RDWR | O_CLOEXEC);
    if (fd < 0)
        die("/dev/net/tun");
    struct ifreq request;
    memset(&request, 0, sizeof(request));
    request.ifr_flags = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR;
    snprintf(request.ifr_name, sizeof(request.ifr_name), "%s", name);
    if (ioctl(fd, TUNSETIFF, &request) < 0)
        die(name);
    int header = VNET_HDR_BYTES;
    if (ioctl(fd, TUNSETVNETHDRSZ, &header) < 0)
        die("TUNSETVNETHDRSZ");
    if (ioctl(fd, TUNSETOFFLOAD, 0) < 0)  /* no offloads: plain, checksummed frames both ways */
        die("TUNSETOFFLOAD");
    return fd;
}

static uint32_t checksum_add(uint32_t sum, const uint8_t *p, size_t n)
{
    for (size_t i = 0; i + 1 < n; i += 2)
        sum += (uint32_t)p[i] << 8 | p[i + 1];
    if (n & 1)
        sum += (uint32_t)p[n - 1] << 8;
    return sum;
}

static uint16_t checksum_finish(uint32_t sum)
{
    while (sum >> 16)
        sum = (sum & 0xFFFF) + (sum >> 16);
    return (uint16_t)~sum;
}

static void put16(uint8_t *p, uint16_t v) { p[0] = (uint8_t)(v >> 8); p[1] = (uint8_t)v; }

static void parse_mac(const char *s, uint8_t mac[6])
{
    unsigned b[6];
    if (sscanf(s, "%x:%x:%x:%x:%x:%x", &b[0], &b[1], &b[2], &b[3], &b[4], &b[5]) != 6) {
        fprintf(stderr, "tap-floor: %s: not a MAC address\n", s);
        exit(1);
    }
    for (int i = 0; i < 6; i++)
        mac[i] = (uint8_t)b[i];
}

static uint32_t parse_ip(const char *s)
{
    struct in_addr a;
    if (inet_pton(AF_INET, s, &a) != 1) {
        fprintf(stderr, "tap-floor: %s: not an IPv4 address\n", s);
        exit(1);
    }
    return ntohl(a.s_addr);
}

static int do_write(char **argv)
{
    int fd = open_tap(argv[0]);
    long count = number(argv[1], 1, 1000000000L);
    size_t size = (size_t)number(argv[2], 50, FRAME_MAX);
    uint8_t src_mac[6], dst_mac[6];
    parse_mac(argv[3], src_mac);
    parse_mac(argv[4], dst_mac);
    uint32_t src = parse_ip(argv[5]), dst = parse_ip(argv[6]);
    uint16_t sport = (uint16_t)number(argv[7], 1, 65535), dport = (uint16_t)number(argv[8], 1, 65535);

    /* The frame after a zeroed virtio-net header, exactly as the guest builds it. */
    static uint8_t buffer[VNET_HDR_BYTES + FRAME_MAX];
    uint8_t *f = buffer + VNET_HDR_BYTES;
    memcpy(f, dst_mac, 6);
    memcpy(f + 6, src_mac, 6);
    put16(f + 12, 0x0800);
    uint8_t *ip = f + 14;
    size_t udp_length = size - 14 - 20;
    ip[0] = 0x45;
    put16(ip + 2, (uint16_t)(20 + udp_length));
    put16(ip + 6, 0x4000);
    ip[8] = 64;
    ip[9] = 17;
    put16(ip + 12, (uint16_t)(src >> 16));
    put16(ip + 14, (uint16_t)src);
    put16(ip + 16, (uint16_t)(dst >> 16));
    put16(ip + 18, (uint16_t)dst);
    put16(ip + 10, checksum_finish(checksum_add(0, ip, 20)));
    uint8_t *udp = ip + 20;
    put16(udp, sport);
    put16(udp + 2, dport);
    put16(udp + 4, (uint16_t)udp_length);
    uint8_t *payload = udp + 8;
    for (size_t i = 8; i < udp_length - 8; i++)
        payload[i] = (uint8_t)i;
    /* The sum of everything but the sequence number and the checksum field. */
    uint32_t pseudo = (src >> 16) + (src & 0xFFFF) + (dst >> 16) + (dst & 0xFFFF) + 17 + (uint32_t)udp_length;
    uint32_t base = checksum_add(pseudo, udp, udp_length);

    double start = now();
    for (long n = 0; n < count; n++) {
        uint32_t seq = (uint32_t)n;
        payload[4] = (uint8_t)(seq >> 24);
        payload[5] = (uint8_t)(seq >> 16);
        payload[6] = (uint8_t)(seq >> 8);
        payload[7] = (uint8_t)seq;
        uint16_t sum = checksum_finish(base + (seq >> 16) + (seq & 0xFFFF));
        put16(udp + 6, sum == 0 ? 0xFFFF : sum);
        if (write(fd, buffer, VNET_HDR_BYTES + size) != (ssize_t)(VNET_HDR_BYTES + size))
            die("write");
    }
    printf("wrote %ld frames in %.6f s\n", count, now() - start);
    return 0;
}

static int do_read(char **argv)
{
    int fd = open_tap(argv[0]);
    uint16_t port = (uint16_t)number(argv[1], 1, 65535);
    int idle_ms = (int)number(argv[2], 1, 600000);
    printf("ready\n");
    fflush(stdout);
    static uint8_t buffer[VNET_HDR_BYTES + 65536];
    long frames = 0, matching = 0;
    int timeout = 60000;                /* the first frame may take a while */
    for (;;) {
        struct pollfd p = { .fd = fd, .events = POLLIN };
        int ready = poll(&p, 1, timeout);
        if (ready < 0 && errno != EINTR)
            die("poll");
        if (ready == 0)
            break;
        /* Drain what is there without going back to poll for each frame. */
        for (;;) {
            ssize_t n = read(fd, buffer, sizeof(buffer));
            if (n < 0) {
                if (errno == EAGAIN || errno == EINTR)
                    break;
                die("read");
            }
            frames++;
            const uint8_t *f = buffer + VNET_HDR_BYTES;
            if (n >= VNET_HDR_BYTES + 14 + 20 + 8 && f[12] == 0x08 && f[13] == 0 && f[14 + 9] == 17) {
                const uint8_t *udp = f + 14 + (f[14] & 0x0F) * 4;
                if ((udp[2] << 8 | udp[3]) == port)
                    matching++;
            }
            if (matching)
                timeout = idle_ms;
            int flags = fcntl(fd, F_GETFL);
            if (!(flags & O_NONBLOCK))
                fcntl(fd, F_SETFL, flags | O_NONBLOCK);
        }
    }
    printf("read %ld frames, %ld to port %u\n", frames, matching, port);
    return 0;
}

static int do_send(char **argv)
{
    uint32_t dst = parse_ip(argv[0]);
    uint16_t port = (uint16_t)number(argv[1], 1, 65535);
    size_t size = (size_t)number(argv[2], 50, FRAME_MAX);
    double seconds = (double)number(argv[3], 1, 3600);
    int fd = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        die("socket");
    struct sockaddr_in to = { .sin_family = AF_INET, .sin_port = htons(port), .sin_addr.s_addr = htonl(dst) };
    if (connect(fd, (struct sockaddr *)&to, sizeof(to)) < 0)
        die("connect");
    enum { BATCH = 64 };
    static uint8_t payload[FRAME_MAX];
    size_t length = size - 14 - 20 - 8;
    for (size_t i = 0; i < length; i++)
        payload[i] = (uint8_t)i;
    struct iovec iov[BATCH];
    struct mmsghdr messages[BATCH];
    memset(messages, 0, sizeof(messages));
    for (int i = 0; i < BATCH; i++) {
        iov[i].iov_base = payload;
        iov[i].iov_len = length;
        messages[i].msg_hdr.msg_iov = &iov[i];
        messages[i].msg_hdr.msg_iovlen = 1;
    }
    double start = now(), end = start + seconds, t = start;
    long sent = 0;
    while ((t = now()) < end) {
        int n = sendmmsg(fd, messages, BATCH, 0);
        if (n < 0) {
            if (errno == ENOBUFS || errno == EAGAIN || errno == ECONNREFUSED)
                continue;               /* a full queue, or an ICMP error from a floor without a stack */
            die("sendmmsg");
        }
        sent += n;
    }
    printf("sent %ld datagrams in %.6f s\n", sent, t - start);
    return 0;
}

int main(int argc, char **argv)
{
    if (argc < 2)
        usage();
    if (!strcmp(argv[1], "write") && argc == 11)
        return do_write(argv + 2);
    if (!strcmp(argv[1], "read") && argc == 5)
        return do_read(argv + 2);
    if (!strcmp(argv[1], "send") && argc == 6)
        return do_send(argv + 2);
    usage();
}
