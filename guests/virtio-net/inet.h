/*
 * inet.h: just enough of Ethernet, ARP, IPv4, ICMP and UDP to answer a ping and echo a
 * datagram (inet.c). All multi-byte fields on the wire are big-endian ("network byte
 * order"); x86 is little-endian, so fields are read and written a byte at a time with
 * get_be16/put_be16, which also works at any alignment (a frame starts 12 bytes into its
 * buffer, after the virtio-net header, so the IPv4 header is not 4-byte aligned).
 */
#ifndef INET_H
#define INET_H

#include "net.h"

#define ETH_HEADER_BYTES 14             /* destination MAC, source MAC, EtherType */
#define ETHERTYPE_IPV4 0x0800
#define ETHERTYPE_ARP 0x0806
#define IPV4_HEADER_BYTES 20            /* without options */
#define UDP_HEADER_BYTES 8
#define IP_PROTOCOL_ICMP 1
#define IP_PROTOCOL_UDP 17

/* The UDP services (their classic port numbers, RFC 862 and 863, and one of our own). */
#define UDP_PORT_ECHO 7                 /* the datagram comes back unchanged */
#define UDP_PORT_DISCARD 9              /* the datagram is counted and dropped */
#define UDP_PORT_CONTROL 5555           /* text commands: "stats", "send COUNT SIZE" (main.c) */

static inline uint16_t get_be16(const uint8_t *p) { return (uint16_t)(p[0] << 8 | p[1]); }
static inline uint32_t get_be32(const uint8_t *p)
{
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}
static inline void put_be16(uint8_t *p, uint16_t v) { p[0] = (uint8_t)(v >> 8); p[1] = (uint8_t)v; }
static inline void put_be32(uint8_t *p, uint32_t v)
{
    p[0] = (uint8_t)(v >> 24); p[1] = (uint8_t)(v >> 16); p[2] = (uint8_t)(v >> 8); p[3] = (uint8_t)v;
}

/* The Internet checksum (RFC 1071): the ones' complement of the ones' complement sum of
 * the data as 16-bit big-endian words (an odd last byte is padded with a zero). Sums can
 * be built in pieces (a pseudo-header, then the data) with checksum_add, then folded and
 * complemented once with checksum_finish. Data whose checksum field is filled in sums to
 * 0xFFFF, so checksum_finish gives 0: that is how a received checksum is verified. */
uint32_t checksum_add(uint32_t sum, const uint8_t *data, uint32_t length);
uint16_t checksum_finish(uint32_t sum);

/* Who we are. */
struct inet {
    struct net *net;
    uint32_t ip;                        /* our IPv4 address (host order: 192.0.2.2 = 0xC0000202) */
    uint16_t next_ip_id;
    struct inet_counters {
        uint64_t arp_replies;           /* ARP requests for our address, answered */
        uint64_t ping_replies;          /* ICMP echo requests answered */
        uint64_t udp_echoed;            /* datagrams to port 7 sent back */
        uint64_t udp_discarded;         /* datagrams to port 9, counted */
        uint64_t udp_discarded_bytes;   /* their payload bytes */
        uint64_t control;               /* commands on the control port */
        uint64_t not_for_us;            /* another MAC or IP address, or multicast */
        uint64_t unsupported;           /* other EtherTypes, IP protocols, ICMP types, UDP ports */
        uint64_t malformed;             /* bad lengths, version, header checksum; fragments */
        uint64_t bad_checksum;          /* ICMP or UDP checksums that do not add up */
    } counters;
};

/* A UDP datagram for us, as main.c's services see it. */
struct udp_datagram {
    const uint8_t *src_mac;             /* the sender's Ethernet address */
    uint32_t src_ip;
    uint16_t src_port, dst_port;
    const uint8_t *payload;
    uint32_t length;                    /* payload bytes */
};

/* Handles one received Ethernet frame: answers ARP and ICMP echo itself, passes UDP
 * datagrams for our address to udp_deliver() (main.c). Replies are queued on the transmit
 * queue (net_flush sends them). */
void inet_handle_frame(struct inet *inet, const uint8_t *frame, uint32_t length);
void udp_deliver(struct inet *inet, const struct udp_datagram *datagram);

/* Writes an Ethernet + IPv4 + UDP frame carrying `length` payload bytes, which must
 * already be at frame + UDP_PAYLOAD_OFFSET, with the checksums computed. Returns the
 * frame's length. */
#define UDP_PAYLOAD_OFFSET (ETH_HEADER_BYTES + IPV4_HEADER_BYTES + UDP_HEADER_BYTES)
uint32_t inet_build_udp(struct inet *inet, uint8_t *frame, const uint8_t *dst_mac, uint32_t dst_ip,
                        uint16_t src_port, uint16_t dst_port, uint32_t length);
/* Sends a datagram with `length` bytes of `payload` (at most NET_FRAME_MAX - 42 - 4).
 * False when no transmit slot came free (the datagram is dropped). */
bool inet_send_udp(struct inet *inet, const uint8_t *dst_mac, uint32_t dst_ip, uint16_t src_port,
                   uint16_t dst_port, const uint8_t *payload, uint32_t length);

#endif
