/*
 * inet.c: the few protocols the virtio-net guest speaks, each checked as it is read.
 *
 *   Ethernet II (IEEE 802.3):  destination MAC (6), source MAC (6), EtherType (2), payload.
 *   ARP (RFC 826) for IPv4 over Ethernet, 28 bytes:
 *       hardware type 1, protocol type 0x0800, hardware size 6, protocol size 4,
 *       operation (1 request, 2 reply), sender MAC, sender IP, target MAC, target IP.
 *   IPv4 (RFC 791), a 20-byte header (more with options):
 *       version 4 and header length in 32-bit words (1), type of service (1), total
 *       length (2), identification (2), flags and fragment offset (2), time to live (1),
 *       protocol (1: 1 ICMP, 17 UDP), header checksum (2), source (4), destination (4).
 *   ICMP echo (RFC 792): type (8 request, 0 reply), code 0, checksum over the whole ICMP
 *       message, identifier, sequence number, data.
 *   UDP (RFC 768): source port, destination port, length (header + data), checksum over
 *       a pseudo-header (source, destination, 0, protocol 17, UDP length) and the
 *       datagram; 0 means "not computed" (IPv4 only).
 *
 * A reply is built in a transmit slot: Ethernet addresses swapped, a fresh IPv4 header
 * from us to the sender (TTL 64, no options), the ICMP or UDP message copied, its
 * checksum computed anew.
 */
#include "inet.h"

static const uint8_t broadcast_mac[6] = { 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF };

static bool same_mac(const uint8_t *a, const uint8_t *b)
{
    for (int i = 0; i < 6; i++)
        if (a[i] != b[i])
            return false;
    return true;
}

/* ---- the Internet checksum -------------------------------------------------------------- */

uint32_t checksum_add(uint32_t sum, const uint8_t *data, uint32_t length)
{
    /* 64-bit accumulator: no carry is lost however long the data (each word < 2^16). */
    uint64_t s = sum;
    uint32_t i = 0;
    for (; i + 1 < length; i += 2)
        s += (uint32_t)data[i] << 8 | data[i + 1];
    if (i < length)
        s += (uint32_t)data[i] << 8;    /* an odd last byte, padded with a zero */
    while (s >> 32)
        s = (s & 0xFFFFFFFFu) + (s >> 32);
    return (uint32_t)s;
}

uint16_t checksum_finish(uint32_t sum)
{
    /* Fold the carries back in (ones' complement addition), then complement. */
    while (sum >> 16)
        sum = (sum & 0xFFFF) + (sum >> 16);
    return (uint16_t)~sum;
}

/* The UDP pseudo-header's sum: addresses, protocol, UDP length. */
static uint32_t pseudo_header_sum(uint32_t src, uint32_t dst, uint32_t udp_length)
{
    return (src >> 16) + (src & 0xFFFF) + (dst >> 16) + (dst & 0xFFFF) + IP_PROTOCOL_UDP + udp_length;
}

/* ---- building frames ------------------------------------------------------------------------ */

/* Ethernet header: to `dst`, from us. */
static void put_ethernet(struct inet *inet, uint8_t *frame, const uint8_t *dst, uint16_t ethertype)
{
    memcpy(frame, dst, 6);
    memcpy(frame + 6, inet->net->mac, 6);
    put_be16(frame + 12, ethertype);
}

/* A 20-byte IPv4 header from us to `dst` for `payload` bytes of `protocol`. */
static void put_ipv4(struct inet *inet, uint8_t *ip, uint32_t dst, uint8_t protocol, uint32_t payload)
{
    ip[0] = 0x45;                       /* version 4, header length 5 words */
    ip[1] = 0;                          /* type of service */
    put_be16(ip + 2, (uint16_t)(IPV4_HEADER_BYTES + payload));
    put_be16(ip + 4, inet->next_ip_id++);
    put_be16(ip + 6, 0x4000);           /* Don't Fragment, offset 0 */
    ip[8] = 64;                         /* time to live */
    ip[9] = protocol;
    put_be16(ip + 10, 0);               /* the checksum field counts as 0 while summing */
    put_be32(ip + 12, inet->ip);
    put_be32(ip + 16, dst);
    put_be16(ip + 10, checksum_finish(checksum_add(0, ip, IPV4_HEADER_BYTES)));
}

uint32_t inet_build_udp(struct inet *inet, uint8_t *frame, const uint8_t *dst_mac, uint32_t dst_ip,
                        uint16_t src_port, uint16_t dst_port, uint32_t length)
{
    uint32_t udp_length = UDP_HEADER_BYTES + length;
    put_ethernet(inet, frame, dst_mac, ETHERTYPE_IPV4);
    put_ipv4(inet, frame + ETH_HEADER_BYTES, dst_ip, IP_PROTOCOL_UDP, udp_length);
    uint8_t *udp = frame + ETH_HEADER_BYTES + IPV4_HEADER_BYTES;
    put_be16(udp, src_port);
    put_be16(udp + 2, dst_port);
    put_be16(udp + 4, (uint16_t)udp_length);
    put_be16(udp + 6, 0);
    uint16_t sum = checksum_finish(checksum_add(pseudo_header_sum(inet->ip, dst_ip, udp_length), udp, udp_length));
    put_be16(udp + 6, sum == 0 ? 0xFFFF : sum); /* a computed 0 is sent as 0xFFFF: 0 means "none" */
    return ETH_HEADER_BYTES + IPV4_HEADER_BYTES + udp_length;
}

bool inet_send_udp(struct inet *inet, const uint8_t *dst_mac, uint32_t dst_ip, uint16_t src_port,
                   uint16_t dst_port, const uint8_t *payload, uint32_t length)
{
    uint32_t slot;
    uint8_t *frame = net_tx_buffer(inet->net, &slot);
    if (!frame)
        return false;
    memcpy(frame + UDP_PAYLOAD_OFFSET, payload, length);
    net_tx_send(inet->net, slot, inet_build_udp(inet, frame, dst_mac, dst_ip, src_port, dst_port, length));
    return true;
}

/* ---- ARP ------------------------------------------------------------------------------------ */

static void handle_arp(struct inet *inet, const uint8_t *arp, uint32_t length)
{
    if (length < 28 || get_be16(arp) != 1 || get_be16(arp + 2) != ETHERTYPE_IPV4 || arp[4] != 6 || arp[5] != 4) {
        inet->counters.malformed++;
        return;
    }
    uint16_t operation = get_be16(arp + 6);
    const uint8_t *sender_mac = arp + 8;
    uint32_t sender_ip = get_be32(arp + 14), target_ip = get_be32(arp + 24);
    if (operation != 1) {               /* a reply (we never ask) or something else */
        inet->counters.unsupported++;
        return;
    }
    if (target_ip != inet->ip) {        /* "who has 192.0.2.9?": not us */
        inet->counters.not_for_us++;
        return;
    }
    /* "192.0.2.2 is at <our MAC>", sent to the asker only. */
    uint32_t slot;
    uint8_t *reply = net_tx_buffer(inet->net, &slot);
    if (!reply)
        return;
    put_ethernet(inet, reply, sender_mac, ETHERTYPE_ARP);
    uint8_t *r = reply + ETH_HEADER_BYTES;
    put_be16(r, 1);                     /* Ethernet */
    put_be16(r + 2, ETHERTYPE_IPV4);
    r[4] = 6;
    r[5] = 4;
    put_be16(r + 6, 2);                 /* reply */
    memcpy(r + 8, inet->net->mac, 6);   /* sender: us */
    put_be32(r + 14, inet->ip);
    memcpy(r + 18, sender_mac, 6);      /* target: the asker */
    put_be32(r + 24, sender_ip);
    net_tx_send(inet->net, slot, ETH_HEADER_BYTES + 28);
    inet->counters.arp_replies++;
}

/* ---- ICMP echo ------------------------------------------------------------------------------ */

static void handle_icmp(struct inet *inet, const uint8_t *frame, uint32_t src_ip, const uint8_t *icmp, uint32_t length)
{
    if (length < 8) {
        inet->counters.malformed++;
        return;
    }
    if (checksum_finish(checksum_add(0, icmp, length)) != 0) {
        inet->counters.bad_checksum++;
        return;
    }
    if (icmp[0] != 8 || icmp[1] != 0) { /* only echo requests */
        inet->counters.unsupported++;
        return;
    }
    if (length > NET_FRAME_MAX - ETH_HEADER_BYTES - IPV4_HEADER_BYTES) {
        inet->counters.malformed++;
        return;
    }
    uint32_t slot;
    uint8_t *reply = net_tx_buffer(inet->net, &slot);
    if (!reply)
        return;
    put_ethernet(inet, reply, frame + 6, ETHERTYPE_IPV4);
    put_ipv4(inet, reply + ETH_HEADER_BYTES, src_ip, IP_PROTOCOL_ICMP, length);
    uint8_t *r = reply + ETH_HEADER_BYTES + IPV4_HEADER_BYTES;
    memcpy(r, icmp, length);            /* identifier, sequence number and data unchanged */
    r[0] = 0;                           /* echo reply */
    put_be16(r + 2, 0);
    put_be16(r + 2, checksum_finish(checksum_add(0, r, length)));
    net_tx_send(inet->net, slot, ETH_HEADER_BYTES + IPV4_HEADER_BYTES + length);
    inet->counters.ping_replies++;
}

/* ---- UDP ----------------------------------------------------------------------------------- */

static void handle_udp(struct inet *inet, const uint8_t *frame, uint32_t src_ip, uint32_t dst_ip, const uint8_t *udp,
                       uint32_t length)
{
    if (length < UDP_HEADER_BYTES || get_be16(udp + 4) < UDP_HEADER_BYTES || get_be16(udp + 4) > length) {
        inet->counters.malformed++;
        return;
    }
    length = get_be16(udp + 4);         /* the UDP length rules (IP may carry padding) */
    if (get_be16(udp + 6) != 0 &&
        checksum_finish(checksum_add(pseudo_header_sum(src_ip, dst_ip, length), udp, length)) != 0) {
        inet->counters.bad_checksum++;
        return;
    }
    struct udp_datagram d = {
        .src_mac = frame + 6,
        .src_ip = src_ip,
        .src_port = get_be16(udp),
        .dst_port = get_be16(udp + 2),
        .payload = udp + UDP_HEADER_BYTES,
        .length = length - UDP_HEADER_BYTES,
    };
    udp_deliver(inet, &d);
}

/* ---- IPv4 ---------------------------------------------------------------------------------- */

static void handle_ipv4(struct inet *inet, const uint8_t *frame, const uint8_t *ip, uint32_t length)
{
    if (length < IPV4_HEADER_BYTES || (ip[0] >> 4) != 4) {
        inet->counters.malformed++;
        return;
    }
    uint32_t header = (ip[0] & 0x0F) * 4u, total = get_be16(ip + 2);
    if (header < IPV4_HEADER_BYTES || total < header || total > length) {
        inet->counters.malformed++;
        return;
    }
    if (checksum_finish(checksum_add(0, ip, header)) != 0) {
        inet->counters.malformed++;
        return;
    }
    uint32_t src = get_be32(ip + 12), dst = get_be32(ip + 16);
    if (dst != inet->ip) {
        inet->counters.not_for_us++;
        return;
    }
    /* More Fragments set, or a fragment offset: a piece of a larger datagram. This guest
     * does not reassemble (its peers send at most 1500-byte packets). */
    if (get_be16(ip + 6) & 0x3FFF) {
        inet->counters.malformed++;
        return;
    }
    /* From here on, only `total` bytes count: a short frame may have been padded to
     * Ethernet's 60-byte minimum. Options (header > 20) are skipped. */
    const uint8_t *payload = ip + header;
    uint32_t payload_length = total - header;
    switch (ip[9]) {
    case IP_PROTOCOL_ICMP: handle_icmp(inet, frame, src, payload, payload_length); break;
    case IP_PROTOCOL_UDP: handle_udp(inet, frame, src, dst, payload, payload_length); break;
    default: inet->counters.unsupported++; break;
    }
}

/* ---- Ethernet ------------------------------------------------------------------------------- */

void inet_handle_frame(struct inet *inet, const uint8_t *frame, uint32_t length)
{
    if (length < ETH_HEADER_BYTES) {
        inet->counters.malformed++;
        return;
    }
    const uint8_t *dst = frame;
    uint16_t ethertype = get_be16(frame + 12);
    bool to_us = same_mac(dst, inet->net->mac), broadcast = same_mac(dst, broadcast_mac);
    if (ethertype == ETHERTYPE_ARP && (to_us || broadcast)) {
        handle_arp(inet, frame + ETH_HEADER_BYTES, length - ETH_HEADER_BYTES);
    } else if (ethertype == ETHERTYPE_IPV4 && to_us) {
        handle_ipv4(inet, frame, frame + ETH_HEADER_BYTES, length - ETH_HEADER_BYTES);
    } else if (!to_us && !broadcast) {
        inet->counters.not_for_us++;    /* another station's, or multicast (IPv6 neighbour discovery...) */
    } else {
        inet->counters.unsupported++;   /* IPv6, VLAN tags, broadcast IPv4... */
    }
}
