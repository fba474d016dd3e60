/*
 * virtio.h: the parts of the virtio 1.2 specification (OASIS, "Virtual I/O Device (VIRTIO)
 * Version 1.2") this guest uses: device status bits, feature bits, the split virtqueue's
 * memory layout, and the virtio-blk request format. Section numbers refer to that document.
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

/* ---- 6 Reserved Feature Bits, and 5.2.3 the block device's ---------------------------------
 * Features are a 64-bit mask, read and written 32 bits at a time (a "select" register picks
 * the half). */
#define VIRTIO_F_VERSION_1 (1ull << 32) /* the device follows virtio 1.x, not the legacy interface */
#define VIRTIO_BLK_F_SIZE_MAX (1ull << 1) /* size_max: the largest single data segment */
#define VIRTIO_BLK_F_SEG_MAX (1ull << 2)  /* seg_max: the most data segments in one request */
#define VIRTIO_BLK_F_RO (1ull << 5)       /* the device is read-only */
#define VIRTIO_BLK_F_BLK_SIZE (1ull << 6) /* blk_size: the logical block size */
#define VIRTIO_BLK_F_FLUSH (1ull << 9)    /* the flush request exists */

/* ---- 5 Device Types ------------------------------------------------------------------------- */
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

#define QUEUE_SIZE_LIMIT 128            /* this driver uses at most 128 entries */

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

/* ---- 5.2.6 virtio-blk requests --------------------------------------------------------------
 * A request is one descriptor chain:
 *     struct virtio_blk_req_header    device-readable, 16 bytes
 *     data buffers                    device-writable for a read, readable for a write
 *     u8 status                       device-writable, 1 byte
 */
#define VIRTIO_BLK_T_IN 0               /* read sectors into the data buffers */
#define VIRTIO_BLK_T_OUT 1              /* write the data buffers to sectors */
#define VIRTIO_BLK_T_FLUSH 4            /* make completed writes durable */
#define VIRTIO_BLK_T_GET_ID 8           /* the device's serial, up to 20 bytes */

#define VIRTIO_BLK_S_OK 0
#define VIRTIO_BLK_S_IOERR 1
#define VIRTIO_BLK_S_UNSUPP 2

#define VIRTIO_BLK_ID_BYTES 20

struct virtio_blk_req_header {
    uint32_t type;                      /* VIRTIO_BLK_T_* */
    uint32_t reserved;
    uint64_t sector;                    /* in 512-byte units, whatever blk_size says */
};

/* 5.2.4 Device configuration layout: the offsets of the fields this driver reads. */
#define VIRTIO_BLK_CFG_CAPACITY 0       /* le64: the disk's size in 512-byte sectors */
#define VIRTIO_BLK_CFG_SIZE_MAX 8       /* le32, with VIRTIO_BLK_F_SIZE_MAX */
#define VIRTIO_BLK_CFG_SEG_MAX 12       /* le32, with VIRTIO_BLK_F_SEG_MAX */
#define VIRTIO_BLK_CFG_BLK_SIZE 20      /* le32, with VIRTIO_BLK_F_BLK_SIZE */

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
    uintptr_t queue_notify[1];          /* queue 0's notification address (the only queue used) */
};

/* Finding devices: each returns true and fills `dev` for the first virtio block device
 * found. virtio-mmio.c, virtio-pci.c. */
bool virtio_mmio_find_block(const char *cmdline, struct virtio_device *dev);
bool virtio_pci_find_block(const char *cmdline, struct virtio_device *dev);

#endif
