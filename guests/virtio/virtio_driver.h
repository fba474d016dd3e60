/*
 * virtio_driver.h: the driver-side helpers of virtio.c, shared by every device type:
 * initialization, configuration, the split virtqueue.
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
uint16_t virtio_config_read16(struct virtio_device *dev, uint32_t offset);
/* `count` bytes read one at a time (a byte array such as virtio-net's MAC address), all
 * from one configuration generation. */
void virtio_config_read_bytes(struct virtio_device *dev, uint32_t offset, uint8_t *bytes, uint32_t count);

/* The driver's view of one split virtqueue. */
struct virtqueue {
    struct virtio_device *dev;
    uint16_t index;                     /* the queue's number (virtio-blk: 0; virtio-net: 0 receive, 1 transmit) */
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

/* Chooses the size (the largest power of two the device allows, at most `max_size`, itself
 * at most QUEUE_SIZE_LIMIT), takes ring memory for it (each queue number has its own) and
 * enables queue `index`. */
void virtqueue_setup(struct virtqueue *vq, struct virtio_device *dev, uint16_t index, uint16_t max_size);
/* Makes the chain starting at descriptor `head` available (not yet visible: kick). */
void virtqueue_add(struct virtqueue *vq, uint16_t head);
/* Publishes what was added and notifies the device unless it asked not to be. */
void virtqueue_kick(struct virtqueue *vq);
/* Takes the next used element, if any: its head and the length the device wrote. */
bool virtqueue_get_used(struct virtqueue *vq, uint32_t *id, uint32_t *len);

#endif
