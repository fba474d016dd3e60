/*
 * blk.h: the virtio-blk device type (virtio 1.2, 5.2): its feature bits, configuration
 * layout and request format, and the driver's interface (blk.c).
 */
#ifndef BLK_H
#define BLK_H

#include "virtio_driver.h"

/* ---- 5.2.3 Feature bits ----------------------------------------------------------------------- */
#define VIRTIO_BLK_F_SIZE_MAX (1ull << 1) /* size_max: the largest single data segment */
#define VIRTIO_BLK_F_SEG_MAX (1ull << 2)  /* seg_max: the most data segments in one request */
#define VIRTIO_BLK_F_RO (1ull << 5)       /* the device is read-only */
#define VIRTIO_BLK_F_BLK_SIZE (1ull << 6) /* blk_size: the logical block size */
#define VIRTIO_BLK_F_FLUSH (1ull << 9)    /* the flush request exists */

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

/* ---- the driver (blk.c) ------------------------------------------------------------------------ */

#define BLK_DEFAULT_REQUESTS 8          /* requests in flight at once, unless asked otherwise */
#define BLK_MAX_REQUESTS 32             /* requests in flight at once, at most (bench jobs) */
#define BLK_MAX_SEGMENTS 4              /* data descriptors per request */
#define BLK_REQUEST_BYTES 65536         /* data bytes per request, at most */
#define BLK_POOL_BYTES (BLK_DEFAULT_REQUESTS * BLK_REQUEST_BYTES) /* all the slots' data buffers */
#define SECTOR_BYTES 512

struct blk_request {
    struct virtio_blk_req_header header; /* device-readable */
    uint8_t status;                     /* device-writable */
    bool busy;                          /* made available, not yet used */
    bool done;                          /* used: used_len is valid */
    uint32_t used_len;
    uint32_t data_bytes;
    uint8_t *data;                      /* this slot's data buffer, BLK_REQUEST_BYTES */
};

struct blk {
    struct virtio_device *dev;
    struct virtqueue vq;
    uint64_t features;                  /* accepted */
    uint64_t capacity;                  /* sectors of 512 bytes */
    uint32_t segments;                  /* data descriptors per request */
    uint32_t segment_bytes;             /* bytes per data descriptor, at most */
    uint32_t request_bytes;             /* at most segments * segment_bytes, and the slot's buffer */
    uint32_t slots;                     /* requests in flight at once */
    struct blk_request requests[BLK_MAX_REQUESTS];
};

/* Initializes the device as a block device: negotiation, configuration, queue 0, DRIVER_OK.
 * `depth` is how many requests the caller wants in flight at once (1 to BLK_MAX_REQUESTS;
 * fewer when the queue is too small), or 0 for the default: up to BLK_DEFAULT_REQUESTS
 * requests of 64 KiB. With a depth, requests get fewer data segments when that lets more
 * of them fit in the queue, and the slots share the 512 KiB of data buffers (more than 8
 * slots: smaller requests). */
void blk_init(struct blk *blk, struct virtio_device *dev, uint32_t depth);
/* Starts request `slot`: `type` (VIRTIO_BLK_T_*) on `bytes` bytes from `sector` (a multiple
 * of 512, at most request_bytes; 0 for a flush), using the slot's data buffer. Call
 * blk_kick to publish. */
void blk_submit(struct blk *blk, uint32_t slot, uint32_t type, uint64_t sector, uint32_t bytes);
void blk_kick(struct blk *blk);
/* Polls until request `slot` is done and checks its status and used length. */
void blk_wait(struct blk *blk, uint32_t slot);
/* Polls until some request in flight is done, checks it as blk_wait does, and returns its
 * slot. */
uint32_t blk_wait_any(struct blk *blk);
/* Like blk_wait_any without the waiting: false when no request in flight is done yet. */
bool blk_take_done(struct blk *blk, uint32_t *slot);

#endif
