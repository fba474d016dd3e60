/*
 * virtio_driver.h: the driver-side helpers of virtio.c (initialization, configuration,
 * split virtqueue) and blk.c (virtio-blk requests).
 */
#ifndef VIRTIO_DRIVER_H
#define VIRTIO_DRIVER_H

#include "virtio.h"

/* A time limit for waiting on the device (virtio.c). */
struct deadline {
    uint64_t start;
    uint32_t spins;
};
void deadline_start(struct deadline *d);
bool deadline_passed(struct deadline *d);

/* 3.1.1 steps 1-6: reset, ACKNOWLEDGE, DRIVER, features (the offered ones that are also
 * in `wanted`), FEATURES_OK and its check. Returns the accepted features; ends the VM with
 * a message when the device refuses. */
uint64_t virtio_negotiate(struct virtio_device *dev, uint64_t wanted);
/* 3.1.1 step 8. */
void virtio_driver_ok(struct virtio_device *dev);
/* Sets the FAILED status bit. */
void virtio_fail_device(struct virtio_device *dev);
uint64_t virtio_config_read64(struct virtio_device *dev, uint32_t offset);
uint32_t virtio_config_read32(struct virtio_device *dev, uint32_t offset);

/* The driver's view of one split virtqueue. */
struct virtqueue {
    struct virtio_device *dev;
    uint16_t index;                     /* the queue's number (0 for virtio-blk's only queue) */
    uint16_t size;                      /* entries: a power of two */
    struct virtq_desc *desc;
    struct virtq_avail *avail;
    struct virtq_used *used;
    uint16_t next_avail;                /* our copy of avail->idx (published by kick) */
    uint16_t last_used;                 /* the next used->ring entry we have not read */
    uint16_t in_flight;                 /* chains made available and not yet used */
    uint32_t notifications, suppressed; /* statistics: notifications sent and skipped */
    uint64_t notify_ticks;              /* statistics: TSC ticks spent in the notifications */
};

/* Chooses the size, allocates and enables queue `index`. */
void virtqueue_setup(struct virtqueue *vq, struct virtio_device *dev, uint16_t index);
/* Makes the chain starting at descriptor `head` available (not yet visible: kick). */
void virtqueue_add(struct virtqueue *vq, uint16_t head);
/* Publishes what was added and notifies the device unless it asked not to be. */
void virtqueue_kick(struct virtqueue *vq);
/* Takes the next used element, if any: its head and the length the device wrote. */
bool virtqueue_get_used(struct virtqueue *vq, uint32_t *id, uint32_t *len);

/* ---- virtio-blk (blk.c) ------------------------------------------------------------------ */

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
