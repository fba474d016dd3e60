/*
 * net.h: the virtio-net device type (virtio 1.2, 5.1): its feature bits, configuration
 * layout and packet header, and the driver's interface (net.c).
 *
 * A virtio network device has (without VIRTIO_NET_F_MQ and VIRTIO_NET_F_CTRL_VQ) two
 * queues:
 *     queue 0  receiveq1   the driver posts empty, device-writable buffers; the device
 *                          fills one (or, with MRG_RXBUF, several) per incoming frame
 *     queue 1  transmitq1  the driver posts device-readable frames; the device sends
 *                          them and gives the buffers back
 * Every frame in either direction is preceded by a struct virtio_net_hdr.
 */
#ifndef NET_H
#define NET_H

#include "virtio_driver.h"

/* ---- 5.1.3 Feature bits ----------------------------------------------------------------------
 * Only the ones this driver looks at. The offloads (CSUM, GUEST_CSUM, the TSO/UFO family)
 * are left out on purpose: without them, every frame in both directions is a plain,
 * complete Ethernet frame with correct checksums, and the header is all zeros. */
#define VIRTIO_NET_F_CSUM (1ull << 0)       /* the device can finish checksums we leave (not taken) */
#define VIRTIO_NET_F_GUEST_CSUM (1ull << 1) /* the device may leave checksums to us (not taken) */
#define VIRTIO_NET_F_MAC (1ull << 5)        /* mac in the configuration: the NIC's address */
#define VIRTIO_NET_F_MRG_RXBUF (1ull << 15) /* a received frame may span several buffers */
#define VIRTIO_NET_F_STATUS (1ull << 16)    /* status in the configuration (link up) */

/* 5.1.4 Device configuration layout: offsets of the fields read here. */
#define VIRTIO_NET_CFG_MAC 0                /* u8[6], with VIRTIO_NET_F_MAC */
#define VIRTIO_NET_CFG_STATUS 6             /* le16, with VIRTIO_NET_F_STATUS */
#define VIRTIO_NET_S_LINK_UP 1

#define VIRTIO_NET_RECEIVEQ 0
#define VIRTIO_NET_TRANSMITQ 1

/* ---- 5.1.6 Device Operation: the header --------------------------------------------------------
 * With VIRTIO_F_VERSION_1 the header is always these 12 bytes, whether MRG_RXBUF is
 * negotiated or not (only the legacy interface without MRG_RXBUF leaves num_buffers out,
 * making it 10). Without offloads the driver sends all zeros, and the device must send
 * flags = 0 (no NEEDS_CSUM: we did not take GUEST_CSUM) and gso_type = NONE. num_buffers
 * says over how many receive buffers the device spread one frame: with MRG_RXBUF 1 or
 * more; without it "the device MUST set num_buffers to 1" (5.1.6.4.1). */
struct virtio_net_hdr {
    uint8_t flags;                      /* VIRTIO_NET_HDR_F_NEEDS_CSUM 1, DATA_VALID 2, RSC_INFO 4 */
    uint8_t gso_type;                   /* VIRTIO_NET_HDR_GSO_NONE 0, TCPV4 1, UDP 3, TCPV6 4, ... */
    uint16_t hdr_len;
    uint16_t gso_size;
    uint16_t csum_start;
    uint16_t csum_offset;
    uint16_t num_buffers;
};
_Static_assert(sizeof(struct virtio_net_hdr) == 12, "the virtio 1.x network header is 12 bytes");
#define VIRTIO_NET_HDR_GSO_NONE 0

/* ---- the driver (net.c) ------------------------------------------------------------------------ */

#define NET_QUEUE_LIMIT 256             /* entries per queue, at most */
#define NET_BUFFER_BYTES 2048           /* one receive buffer, one transmit slot */
/* The largest frame this driver sends or takes: 1514 bytes (14 of Ethernet header, 1500 of
 * payload), plus 4 for a VLAN tag a host might add. Frames are passed without the FCS. */
#define NET_FRAME_MAX 1518

/* How a transmitted frame is laid out in descriptors (tx= on the command line):
 *   NET_TX_ONE   one descriptor: header and frame back to back (what Linux does when the
 *                frame has room in front of it)
 *   NET_TX_SPLIT two descriptors: the header, then the frame elsewhere in the buffer
 * Both are valid in virtio 1.x (2.7.4 "Message Framing": the device must not assume
 * any particular layout); a device must handle both. */
enum net_tx_layout {
    NET_TX_ONE,
    NET_TX_SPLIT,
};

struct net_counters {
    uint64_t rx_frames, rx_bytes;       /* frames the device delivered (without headers) */
    uint64_t rx_bad;                    /* dropped: used length or header out of spec */
    uint64_t rx_num_buffers;            /* accepted, but num_buffers was not 1 without MRG_RXBUF */
    uint64_t rx_merged;                 /* frames that came in more than one buffer (MRG_RXBUF) */
    uint64_t rx_oversize;               /* dropped: longer than NET_BUFFER_BYTES in all */
    uint64_t tx_frames, tx_bytes;       /* frames handed to the device */
    uint64_t tx_full;                   /* frames dropped: no transmit slot came free in time */
};

struct net {
    struct virtio_device *dev;
    uint64_t features;                  /* accepted */
    uint8_t mac[6];
    bool mac_from_device;               /* VIRTIO_NET_F_MAC: the device's; else our own */
    uint32_t header_bytes;              /* 12 (virtio 1.x) */
    enum net_tx_layout tx_layout;
    struct virtqueue rx, tx;
    /* Receive: descriptor i always names rx buffer i; rx_posted[i] says it is with the
     * device. */
    bool rx_posted[NET_QUEUE_LIMIT];
    uint32_t rx_reposted;               /* buffers given back since the last kick */
    uint16_t rx_current[NET_QUEUE_LIMIT]; /* the buffers of the frame net_rx_next returned */
    uint32_t rx_current_count;
    /* Transmit: slot s owns one buffer and its descriptors (s, or 2s and 2s + 1 when
     * split); free slots are kept on a stack. */
    uint32_t tx_slots;
    bool tx_busy[NET_QUEUE_LIMIT];
    uint16_t tx_free[NET_QUEUE_LIMIT];
    uint32_t tx_free_count;
    uint32_t tx_pending;                /* frames added since the last kick */
    struct net_counters counters;
};

/* Initializes the device: features (VERSION_1, MAC unless `mac` is given, MRG_RXBUF when
 * `mrg_rxbuf`, STATUS), configuration, both queues with every receive buffer posted,
 * DRIVER_OK. `mac` (6 bytes, or NULL) is the address to use instead of the device's. */
void net_init(struct net *net, struct virtio_device *dev, const uint8_t *mac, bool mrg_rxbuf,
              enum net_tx_layout tx_layout);

/* Takes the next received frame, if any: *frame points at it (inside a receive buffer, or
 * an assembly buffer when it came in several) and *length is its size. The frame stays
 * valid until net_rx_done(). Frames the device got wrong are counted and skipped. */
bool net_rx_next(struct net *net, const uint8_t **frame, uint32_t *length);
/* Gives the buffers of the frame net_rx_next returned back to the device (not yet
 * visible: net_flush). */
void net_rx_done(struct net *net);

/* Takes a free transmit slot without waiting (after collecting what the device returned):
 * false when every slot is with the device. */
bool net_tx_try_slot(struct net *net, uint32_t *slot);
/* A transmit buffer for one frame of up to NET_FRAME_MAX bytes, or NULL when every slot is
 * still with the device after a short wait (the frame is then dropped and counted). */
uint8_t *net_tx_buffer(struct net *net, uint32_t *slot);
/* Slot `slot`'s frame area, whether the slot is free or not (to fill buffers ahead). */
uint8_t *net_tx_frame(struct net *net, uint32_t slot);
/* Queues the frame of `length` bytes written into slot's buffer (not yet visible:
 * net_flush). */
void net_tx_send(struct net *net, uint32_t slot, uint32_t length);
/* Takes back the transmit buffers the device is done with. */
void net_tx_reclaim(struct net *net);
/* Publishes what was queued on both queues and notifies the device where it wants it. */
void net_flush(struct net *net);

#endif
