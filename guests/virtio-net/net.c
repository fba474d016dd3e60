/*
 * net.c: the virtio-net driver proper (virtio 1.2, 5.1): which features it takes, the
 * device configuration, receive buffers and transmit slots.
 *
 * Receiving (5.1.6.3, 5.1.6.4)
 *   At start-up every descriptor of the receive queue names one 2 KiB buffer, marked
 *   device-writable, and all of them are made available: the device now has room for as
 *   many frames as the queue has entries. When a frame arrives on the host side (the TAP
 *   device), the device takes the next available buffer, writes a 12-byte virtio_net_hdr
 *   and the frame into it, and puts {buffer, 12 + frame length} in the used ring. The
 *   driver, polling used->idx, takes the element, checks it, hands the frame to the
 *   program, and when the program is done gives the same buffer back (available ring;
 *   a batch of them published and notified together). A device with no buffer left
 *   stops taking frames from the host (the host then queues or drops them): that is the
 *   only flow control there is.
 *
 *   With VIRTIO_NET_F_MRG_RXBUF the device may spread one frame over several buffers: the
 *   first one's header says how many (num_buffers), and they are the next used elements.
 *   2 KiB buffers hold any 1514-byte frame, so this driver rarely sees it; when it does, it
 *   copies the pieces into one assembly buffer.
 *
 * Transmitting (5.1.6.2)
 *   The driver has as many transmit slots as the queue allows (one descriptor per frame,
 *   or two with tx=split). To send, it takes a free slot, writes a zeroed virtio_net_hdr
 *   and the frame into the slot's buffer, describes it (device-readable) and makes it
 *   available; a batch is published and notified together. The device reads the frame,
 *   writes it to the TAP device, and returns the slot in the used ring, which the driver
 *   collects (net_tx_reclaim) to use again. When every slot is still with the device, the
 *   driver waits a little, then drops the frame: a burst larger than the queue costs
 *   frames, never a hang.
 */
#include "net.h"

/* A transmit slot's frame starts right after the header (tx=one) or here (tx=split), so
 * that with split the two descriptors do not even touch. */
#define TX_SPLIT_FRAME_OFFSET 64

/* How long net_tx_buffer waits for the device to return a transmit slot: 2^26 TSC ticks,
 * 20 to 35 ms at 2-3.5 GHz. */
#define TX_WAIT_TICKS (1ull << 26)

static uint8_t rx_buffers[NET_QUEUE_LIMIT][NET_BUFFER_BYTES] __attribute__((aligned(4096)));
static uint8_t tx_buffers[NET_QUEUE_LIMIT][NET_BUFFER_BYTES] __attribute__((aligned(4096)));
/* Where a frame that came in several buffers is put together. */
static uint8_t assembly[NET_BUFFER_BYTES] __attribute__((aligned(64)));

/* ---- receive ---------------------------------------------------------------------------- */

static void rx_post(struct net *net, uint16_t id)
{
    struct virtq_desc *d = &net->rx.desc[id];
    d->addr = (uint64_t)(uintptr_t)rx_buffers[id];
    d->len = NET_BUFFER_BYTES;
    d->flags = VIRTQ_DESC_F_WRITE;      /* the device writes it; no NEXT: one descriptor */
    d->next = 0;
    net->rx_posted[id] = true;
    virtqueue_add(&net->rx, id);
    net->rx_reposted++;
}

/* The next used receive element, checked: a buffer we posted, a length that fits. */
static bool rx_take(struct net *net, uint16_t *id, uint32_t *len)
{
    uint32_t used_id, used_len;
    if (!virtqueue_get_used(&net->rx, &used_id, &used_len))
        return false;
    if (used_id >= net->rx.size || !net->rx_posted[used_id])
        fail("%s: the receive queue's used ring returned descriptor %u, which is not a posted buffer",
             net->dev->where, used_id);
    if (used_len > NET_BUFFER_BYTES)
        fail("%s: the device says it wrote %u bytes into a %u-byte receive buffer", net->dev->where, used_len,
             NET_BUFFER_BYTES);
    net->rx_posted[used_id] = false;
    *id = (uint16_t)used_id;
    *len = used_len;
    return true;
}

void net_rx_done(struct net *net)
{
    for (uint32_t i = 0; i < net->rx_current_count; i++)
        rx_post(net, net->rx_current[i]);
    net->rx_current_count = 0;
}

bool net_rx_next(struct net *net, const uint8_t **frame, uint32_t *length)
{
    for (;;) {
        net_rx_done(net);               /* in case the caller forgot: never lose a buffer */
        uint16_t id;
        uint32_t len;
        if (!rx_take(net, &id, &len))
            return false;
        net->rx_current[net->rx_current_count++] = id;

        if (len < net->header_bytes) {  /* not even a header */
            net->counters.rx_bad++;
            continue;
        }
        const struct virtio_net_hdr *hdr = (const struct virtio_net_hdr *)rx_buffers[id];
        uint16_t buffers = 1;
        if (net->features & VIRTIO_NET_F_MRG_RXBUF)
            buffers = hdr->num_buffers;
        else if (hdr->num_buffers != 1)
            net->counters.rx_num_buffers++; /* 5.1.6.4.1: the device MUST set it to 1 */

        /* No offloads were negotiated: the device must neither leave a checksum to us
         * (NEEDS_CSUM) nor hand us a segmentation-offload super-frame. DATA_VALID is
         * allowed only with GUEST_CSUM as well. */
        bool bad = hdr->flags != 0 || hdr->gso_type != VIRTIO_NET_HDR_GSO_NONE || buffers == 0 ||
                   buffers > net->rx.size;

        const uint8_t *data = rx_buffers[id] + net->header_bytes;
        uint32_t total = len - net->header_bytes;
        if (buffers > 1) {
            /* The rest of the frame is in the next buffers-1 used elements, which the device
             * publishes together with the first (it updates used->idx once for all). */
            net->counters.rx_merged++;
            bool fits = total <= sizeof(assembly);
            if (fits)
                memcpy(assembly, data, total);
            struct deadline deadline;
            deadline_start(&deadline);
            for (uint16_t n = 1; n < buffers;) {
                if (!rx_take(net, &id, &len)) {
                    if (deadline_passed(&deadline))
                        fail("%s: a received frame announced %u buffers, but only %u came", net->dev->where,
                             buffers, n);
                    cpu_relax();
                    continue;
                }
                net->rx_current[net->rx_current_count++] = id;
                if (fits && total + len <= sizeof(assembly))
                    memcpy(assembly + total, rx_buffers[id], len);
                else
                    fits = false;
                total += len;
                n++;
            }
            if (!fits) {
                net->counters.rx_oversize++;
                continue;
            }
            data = assembly;
        }
        if (bad) {
            net->counters.rx_bad++;
            continue;
        }
        net->counters.rx_frames++;
        net->counters.rx_bytes += total;
        *frame = data;
        *length = total;
        return true;
    }
}

/* ---- transmit ---------------------------------------------------------------------------- */

uint8_t *net_tx_frame(struct net *net, uint32_t slot)
{
    return tx_buffers[slot] + (net->tx_layout == NET_TX_SPLIT ? TX_SPLIT_FRAME_OFFSET : net->header_bytes);
}

void net_tx_reclaim(struct net *net)
{
    uint32_t id, len;
    while (virtqueue_get_used(&net->tx, &id, &len)) {
        uint32_t slot = net->tx_layout == NET_TX_SPLIT ? id / 2 : id;
        if ((net->tx_layout == NET_TX_SPLIT && id % 2 != 0) || slot >= net->tx_slots || !net->tx_busy[slot])
            fail("%s: the transmit queue's used ring returned descriptor %u, which heads no frame in flight",
                 net->dev->where, id);
        net->tx_busy[slot] = false;
        net->tx_free[net->tx_free_count++] = (uint16_t)slot;
    }
}

bool net_tx_try_slot(struct net *net, uint32_t *slot)
{
    if (net->tx_free_count == 0)
        net_tx_reclaim(net);
    if (net->tx_free_count == 0)
        return false;
    *slot = net->tx_free[--net->tx_free_count];
    return true;
}

uint8_t *net_tx_buffer(struct net *net, uint32_t *slot)
{
    if (net->tx_free_count == 0) {
        net_tx_reclaim(net);
        if (net->tx_free_count == 0) {
            /* Every slot is with the device. Make sure it knows about the last ones, then
             * give it a moment. */
            net_flush(net);
            uint64_t start = rdtsc();
            while (net->tx_free_count == 0 && rdtsc() - start < TX_WAIT_TICKS) {
                cpu_relax();
                net_tx_reclaim(net);
            }
            if (net->tx_free_count == 0) {
                net->counters.tx_full++;
                return NULL;
            }
        }
    }
    *slot = net->tx_free[--net->tx_free_count];
    return net_tx_frame(net, *slot);
}

void net_tx_send(struct net *net, uint32_t slot, uint32_t length)
{
    /* The header: all zeros, "no offload, nothing to do" (5.1.6.2: flags 0, gso_type
     * NONE). num_buffers is unused on transmit. */
    memset(tx_buffers[slot], 0, net->header_bytes);
    struct virtq_desc *desc = net->tx.desc;
    uint16_t head;
    if (net->tx_layout == NET_TX_SPLIT) {
        head = (uint16_t)(2 * slot);
        desc[head].addr = (uint64_t)(uintptr_t)tx_buffers[slot];
        desc[head].len = net->header_bytes;
        desc[head].flags = VIRTQ_DESC_F_NEXT;
        desc[head].next = (uint16_t)(head + 1);
        desc[head + 1].addr = (uint64_t)(uintptr_t)(tx_buffers[slot] + TX_SPLIT_FRAME_OFFSET);
        desc[head + 1].len = length;
        desc[head + 1].flags = 0;
        desc[head + 1].next = 0;
    } else {
        head = (uint16_t)slot;
        desc[head].addr = (uint64_t)(uintptr_t)tx_buffers[slot];
        desc[head].len = net->header_bytes + length;
        desc[head].flags = 0;           /* device-readable, the whole chain */
        desc[head].next = 0;
    }
    net->tx_busy[slot] = true;
    virtqueue_add(&net->tx, head);
    net->tx_pending++;
    net->counters.tx_frames++;
    net->counters.tx_bytes += length;
}

void net_flush(struct net *net)
{
    if (net->tx_pending) {
        virtqueue_kick(&net->tx);
        net->tx_pending = 0;
    }
    if (net->rx_reposted) {
        virtqueue_kick(&net->rx);
        net->rx_reposted = 0;
    }
}

/* ---- initialization ------------------------------------------------------------------------ */

void net_init(struct net *net, struct virtio_device *dev, const uint8_t *mac, bool mrg_rxbuf,
              enum net_tx_layout tx_layout)
{
    memset(net, 0, sizeof(*net));
    net->dev = dev;
    net->tx_layout = tx_layout;

    /* Features this driver understands (5.1.3):
     *   VERSION_1   required (virtio_negotiate checks it);
     *   MAC         the device has an address for us (5.1.4: "If the driver negotiates
     *               VIRTIO_NET_F_MAC, it MUST use mac as its address"): taken unless the
     *               command line names one;
     *   MRG_RXBUF   frames may span several receive buffers: taken unless mrg_rxbuf=off;
     *   STATUS      the link state is in the configuration: printed.
     * No checksum or segmentation offloads: every frame is complete and checksummed. */
    uint64_t wanted = VIRTIO_F_VERSION_1 | VIRTIO_NET_F_STATUS;
    if (!mac)
        wanted |= VIRTIO_NET_F_MAC;
    if (mrg_rxbuf)
        wanted |= VIRTIO_NET_F_MRG_RXBUF;
    net->features = virtio_negotiate(dev, wanted);
    net->header_bytes = sizeof(struct virtio_net_hdr);

    /* 3.1.1 step 7: the configuration (5.1.4), then the queues. */
    if (mac) {
        memcpy(net->mac, mac, 6);
    } else if (net->features & VIRTIO_NET_F_MAC) {
        virtio_config_read_bytes(dev, VIRTIO_NET_CFG_MAC, net->mac, 6);
        net->mac_from_device = true;
    }
    bool link_up = true;                /* 5.1.4.2: without STATUS, assume the link is up */
    if (net->features & VIRTIO_NET_F_STATUS)
        link_up = (virtio_config_read16(dev, VIRTIO_NET_CFG_STATUS) & VIRTIO_NET_S_LINK_UP) != 0;

    virtqueue_setup(&net->rx, dev, VIRTIO_NET_RECEIVEQ, NET_QUEUE_LIMIT);
    virtqueue_setup(&net->tx, dev, VIRTIO_NET_TRANSMITQ, NET_QUEUE_LIMIT);

    /* 5.1.5 step 3: "Fill the receive queues with buffers". Made available before
     * DRIVER_OK, published by the first flush after it. */
    for (uint16_t i = 0; i < net->rx.size; i++)
        rx_post(net, i);
    net->tx_slots = net->tx_layout == NET_TX_SPLIT ? net->tx.size / 2u : net->tx.size;
    for (uint32_t s = 0; s < net->tx_slots; s++)
        net->tx_free[net->tx_free_count++] = (uint16_t)(net->tx_slots - 1 - s);

    virtio_driver_ok(dev);
    net_flush(net);
    kprintf("%s: header %u bytes, %s; receive queue %u entries of %u bytes, transmit queue %u entries "
            "(%u slots, %s); link %s\n",
            program_name, net->header_bytes,
            (net->features & VIRTIO_NET_F_MRG_RXBUF) ? "MRG_RXBUF negotiated" : "MRG_RXBUF not negotiated",
            net->rx.size, NET_BUFFER_BYTES, net->tx.size, net->tx_slots,
            net->tx_layout == NET_TX_SPLIT ? "header and frame in two descriptors" : "header and frame in one descriptor",
            (net->features & VIRTIO_NET_F_STATUS) ? (link_up ? "up" : "down") : "up (no STATUS feature)");
}
