/*
 * virtio.h: the parts of the virtio 1.2 specification (OASIS, "Virtual I/O Device (VIRTIO)
 * Version 1.2") that every device type shares: device status bits, the reserved feature
 * bits, the split virtqueue's memory layout, and the transport interface. Section numbers
 * refer to that document. The device types' own parts are in ../virtio-blk/blk.h and
 * ../virtio-net/net.h.
 *
 * Everything a device and a driver share in memory is little-endian; x86 is too, so the
 * structures below are used as they are.
 */
#ifndef VIRTIO_H
#define VIRTIO_H

#include "lib.h"

/* ---- 2.1 Device Status Field ------------------------------------------------------------
 * The driver writes these bits, one more at each step of initialization (3.1.1). */
#define VIRTIO_STATUS_ACKNOWLEDGE 1     /* the guest has noticed the device */
#define VIRTIO_STATUS_DRIVER 2          /* the guest knows how to drive it */
#define VIRTIO_STATUS_DRIVER_OK 4       /* the driver is set up and ready */
#define VIRTIO_STATUS_FEATURES_OK 8     /* feature negotiation is complete */
#define VIRTIO_STATUS_DEVICE_NEEDS_RESET 64 /* the device hit an error it cannot recover from */
#define VIRTIO_STATUS_FAILED 128        /* the driver gave up on the device */

/* ---- 6 Reserved Feature Bits ----------------------------------------------------------------
 * Features are a 64-bit mask, read and written 32 bits at a time (a "select" register picks
 * the half). Bits 0-23 belong to the device type, 24-40 (and 50-127) to the transport and
 * the queues; each device type's header lists its own. */
#define VIRTIO_F_VERSION_1 (1ull << 32) /* the device follows virtio 1.x, not the legacy interface */

/* ---- 5 Device Types ------------------------------------------------------------------------- */
#define VIRTIO_ID_NET 1
#define VIRTIO_ID_BLOCK 2

/* ---- 2.7 Split Virtqueues ----------------------------------------------------------------------
 * Three areas in guest memory, which the driver allocates and tells the device about:
 *
 *   descriptor table (2.7.5), 16 bytes per entry, 16-byte aligned: each entry names one
 *       buffer (guest-physical address, length) and, with the NEXT flag, the entry that
 *       continues the chain. WRITE marks a buffer the device writes (else it reads it).
 *   available ring (2.7.6, the "driver area"), 2-byte aligned: the driver puts the index
 *       of a chain's first descriptor (its "head") in ring[idx % size], then increments
 *       idx. Only the driver writes it.
 *   used ring (2.7.8, the "device area"), 4-byte aligned: the device puts {head, number
 *       of bytes it wrote} in ring[idx % size] when it is done with a chain, then
 *       increments idx. Only the device writes it.
 *
 * idx is free-running: it counts up and wraps at 65536, and the slot is idx % size (size
 * is a power of two, so the wrap is seamless). */
#define VIRTQ_DESC_F_NEXT 1             /* the chain continues at `next` */
#define VIRTQ_DESC_F_WRITE 2            /* device-writable (else device-readable) */
#define VIRTQ_AVAIL_F_NO_INTERRUPT 1    /* driver to device: do not interrupt me (2.7.7) */
#define VIRTQ_USED_F_NO_NOTIFY 1        /* device to driver: no need to notify me (2.7.7) */

struct virtq_desc {
    uint64_t addr;                      /* guest-physical address of the buffer */
    uint32_t len;                       /* its length in bytes */
    uint16_t flags;                     /* VIRTQ_DESC_F_* */
    uint16_t next;                      /* the next descriptor, if flags has NEXT */
};

#define QUEUE_SIZE_LIMIT 256            /* these drivers use at most 256 entries per queue */
#define VIRTIO_MAX_QUEUES 2             /* and at most two queues (virtio-net: receive, transmit) */

struct virtq_avail {
    uint16_t flags;                     /* VIRTQ_AVAIL_F_NO_INTERRUPT */
    uint16_t idx;                       /* where the driver puts the next entry */
    uint16_t ring[QUEUE_SIZE_LIMIT];    /* heads of available chains */
    uint16_t used_event;                /* only with VIRTIO_F_EVENT_IDX (not negotiated) */
};

struct virtq_used_elem {
    uint32_t id;                        /* head of the chain the device is done with */
    uint32_t len;                       /* bytes the device wrote into its WRITE buffers */
};

struct virtq_used {
    uint16_t flags;                     /* VIRTQ_USED_F_NO_NOTIFY */
    uint16_t idx;                       /* where the device puts the next entry */
    struct virtq_used_elem ring[QUEUE_SIZE_LIMIT];
    uint16_t avail_event;               /* only with VIRTIO_F_EVENT_IDX */
};
/* With a queue smaller than QUEUE_SIZE_LIMIT, the device uses ring[0..size-1] and would
 * put the event fields at ring[size]: still inside these structures. */

/* ---- a transport ------------------------------------------------------------------------------
 * virtio defines what a device does once, and several ways to reach its registers: PCI
 * (4.1), MMIO (4.2), channel I/O (4.3). A transport supplies the same operations in its
 * own way; struct virtio_transport lists them (Linux calls its version virtio_config_ops). */
struct virtio_device;

struct virtio_transport {
    const char *name;
    uint8_t (*get_status)(struct virtio_device *);
    void (*set_status)(struct virtio_device *, uint8_t status);
    /* 32 feature bits: bits 0-31 for word 0, 32-63 for word 1. */
    uint32_t (*device_features)(struct virtio_device *, uint32_t word);
    void (*set_driver_features)(struct virtio_device *, uint32_t word, uint32_t bits);
    /* The device configuration space (the device-specific fields, e.g. capacity), read
     * with an access of `width` bytes (1, 2 or 4) at `offset`; and the generation counter
     * that tells whether it changed in between (2.4.1). */
    uint32_t (*config_read)(struct virtio_device *, uint32_t offset, uint32_t width);
    uint32_t (*config_generation)(struct virtio_device *);
    /* Queue set-up: the largest size the device allows (0: no such queue), then the size
     * chosen and where the three areas are; returns false with a message printed when the
     * device is not in the state the spec requires. */
    uint32_t (*queue_max_size)(struct virtio_device *, uint16_t queue);
    bool (*queue_enable)(struct virtio_device *, uint16_t queue, uint16_t size,
                         uint64_t desc, uint64_t driver_area, uint64_t device_area);
    /* Tell the device that `queue` has new available buffers (an "available buffer
     * notification", 2.7.13). */
    void (*notify)(struct virtio_device *, uint16_t queue);
};

struct virtio_device {
    const struct virtio_transport *transport;
    char where[64];                     /* for messages: "virtio-mmio at 0x..." */
    /* virtio-mmio: the register block. */
    uintptr_t mmio_base;
    /* virtio-pci: the four structures' addresses and the notification parameters. */
    uintptr_t common, isr, device_config, notify_base;
    uint32_t device_config_length;
    uint32_t notify_multiplier, notify_length;
    uintptr_t queue_notify[VIRTIO_MAX_QUEUES]; /* each queue's notification address */
};

/* Finding devices: each returns true and fills `dev` for the first virtio device of type
 * `device_type` (VIRTIO_ID_*) found. virtio-mmio.c, virtio-pci.c. */
bool virtio_mmio_find(const char *cmdline, uint32_t device_type, struct virtio_device *dev);
bool virtio_pci_find(const char *cmdline, uint32_t device_type, struct virtio_device *dev);
/* "block", "network", ...: for messages. */
const char *virtio_device_type_name(uint32_t device_type);

#endif
