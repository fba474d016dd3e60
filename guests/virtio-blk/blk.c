/*
 * blk.c: the virtio-blk driver proper (virtio 1.2, 5.2): which features it takes, the
 * device configuration, and requests as descriptor chains.
 *
 * How one request travels (5.2.6, 2.7.13, 2.7.14):
 *
 *   1. The driver fills a header {type, reserved, sector} and sets the status byte to 0xFF
 *      (not a status the device could write, so a device that forgets to write it is
 *      caught).
 *   2. It describes the request as a chain of descriptors:
 *          [header, 16 bytes, device-readable] -> [data, 1..4 descriptors] ->
 *          [status, 1 byte, device-writable]
 *      Data descriptors are device-writable for a read (the device fills them) and
 *      device-readable for a write.
 *   3. It puts the chain's first descriptor (the head) in the available ring and, once
 *      the batch is in, increments avail->idx and notifies the device (virtqueue_kick).
 *   4. The device (on another CPU thread of the host: a VMM's I/O worker) reads the
 *      header, reads or writes the disk, writes the data and the status byte, then puts
 *      {head, bytes written} in the used ring and increments used->idx.
 *   5. The driver, polling used->idx, takes the element, finds the request by its head,
 *      and checks the status byte and the length.
 *
 * Each of the slots (8 by default, up to BLK_MAX_REQUESTS) owns a fixed run of descriptors
 * (head, data..., status) and a data buffer, so several requests are in flight at once and
 * complete in whatever order the device finishes them.
 */
#include "blk.h"

/* The data buffers: 512 KiB in this ELF's .bss, shared out among the slots (8 x 64 KiB by
 * default, 32 x 16 KiB for the deepest queue a bench job asks for). */
static uint8_t data_pool[BLK_POOL_BYTES] __attribute__((aligned(4096)));

/* Descriptors per slot: a header, the data segments, a status. */
static uint32_t slot_stride(const struct blk *blk)
{
    return blk->segments + 2;
}

void blk_init(struct blk *blk, struct virtio_device *dev, uint32_t depth)
{
    memset(blk, 0, sizeof(*blk));
    blk->dev = dev;

    /* Features this driver understands. VERSION_1 is required (virtio_negotiate checks it);
     * the others only if the device offers them:
     *   FLUSH     the write job ends with a flush request;
     *   SEG_MAX   the device takes up to seg_max data segments per request: we use up to 4;
     *   SIZE_MAX  no data segment may be longer than size_max: we honour it;
     *   BLK_SIZE  the device's logical block size (we print it; requests stay 64 KiB
     *             aligned multiples of it for any block size up to 64 KiB);
     *   RO        the device is read-only: the write job refuses to run.
     * Everything else (multiple queues, discard, write-zeroes, indirect descriptors, event
     * index, packed rings...) is left out: a device must work without them. */
    uint64_t wanted = VIRTIO_F_VERSION_1 | VIRTIO_BLK_F_FLUSH | VIRTIO_BLK_F_SEG_MAX | VIRTIO_BLK_F_SIZE_MAX |
                      VIRTIO_BLK_F_BLK_SIZE | VIRTIO_BLK_F_RO;
    blk->features = virtio_negotiate(dev, wanted);

    /* 3.1.1 step 7, device-specific set-up: the configuration (5.2.4). Fields that belong
     * to a feature are read only when that feature was negotiated. */
    blk->capacity = virtio_config_read64(dev, VIRTIO_BLK_CFG_CAPACITY);
    blk->segments = 1;
    uint32_t seg_max = 1;
    if (blk->features & VIRTIO_BLK_F_SEG_MAX) {
        seg_max = virtio_config_read32(dev, VIRTIO_BLK_CFG_SEG_MAX);
        if (seg_max == 0) {
            virtio_fail_device(dev);
            fail("%s: VIRTIO_BLK_F_SEG_MAX with seg_max = 0", dev->where);
        }
        blk->segments = seg_max < BLK_MAX_SEGMENTS ? seg_max : BLK_MAX_SEGMENTS;
    }
    blk->segment_bytes = BLK_REQUEST_BYTES / blk->segments;
    if (blk->features & VIRTIO_BLK_F_SIZE_MAX) {
        uint32_t size_max = virtio_config_read32(dev, VIRTIO_BLK_CFG_SIZE_MAX);
        if (size_max < SECTOR_BYTES) {
            virtio_fail_device(dev);
            fail("%s: size_max = %u is smaller than one sector", dev->where, size_max);
        }
        size_max &= ~(uint32_t)(SECTOR_BYTES - 1); /* whole sectors per segment */
        if (blk->segment_bytes > size_max)
            blk->segment_bytes = size_max;
    }
    blk->request_bytes = blk->segments * blk->segment_bytes;
    uint32_t blk_size = SECTOR_BYTES;
    if (blk->features & VIRTIO_BLK_F_BLK_SIZE)
        blk_size = virtio_config_read32(dev, VIRTIO_BLK_CFG_BLK_SIZE);

    /* The one request queue: queue 0 (5.2.2), of up to 128 entries (8 requests of up to 6
     * descriptors need 48). */
    virtqueue_setup(&blk->vq, dev, 0, 128);

    /* How many requests fit in the queue at once: each takes slot_stride descriptors. A
     * tiny queue gets fewer segments first, then fewer requests; so does a queue that
     * cannot hold the depth the caller asked for. */
    uint32_t wanted_slots = depth ? depth : BLK_DEFAULT_REQUESTS;
    if (wanted_slots > BLK_MAX_REQUESTS)
        wanted_slots = BLK_MAX_REQUESTS;
    uint32_t fit = depth ? wanted_slots : 1;
    while (blk->segments > 1 && blk->vq.size / slot_stride(blk) < fit) {
        blk->segments--;
        blk->request_bytes = blk->segments * blk->segment_bytes;
    }
    blk->slots = blk->vq.size / slot_stride(blk);
    if (blk->slots == 0) {
        virtio_fail_device(dev);
        fail("%s: queue 0 has only %u entries, a request needs 3", dev->where, blk->vq.size);
    }
    if (blk->slots > wanted_slots)
        blk->slots = wanted_slots;
    /* Each slot's share of the pool: whole pages, at most one request's worth. */
    uint32_t buffer_bytes = (BLK_POOL_BYTES / blk->slots) & ~4095u;
    if (buffer_bytes > BLK_REQUEST_BYTES)
        buffer_bytes = BLK_REQUEST_BYTES;
    if (blk->request_bytes > buffer_bytes)
        blk->request_bytes = buffer_bytes;
    for (uint32_t i = 0; i < blk->slots; i++)
        blk->requests[i].data = data_pool + i * buffer_bytes;

    virtio_driver_ok(dev);
    kprintf("virtio-blk: %lu sectors, block size %u, seg_max %u%s, queue 0 with %u entries: %u requests of up to "
            "%u bytes (%u segments) in flight\n",
            blk->capacity, blk_size, seg_max, (blk->features & VIRTIO_BLK_F_RO) ? ", read-only" : "", blk->vq.size,
            blk->slots, blk->request_bytes, blk->segments);
}

void blk_submit(struct blk *blk, uint32_t slot, uint32_t type, uint64_t sector, uint32_t bytes)
{
    struct blk_request *r = &blk->requests[slot];
    struct virtq_desc *desc = blk->vq.desc;
    uint16_t head = (uint16_t)(slot * slot_stride(blk));
    uint16_t status_index = (uint16_t)(head + 1 + blk->segments);
    bool device_writes_data = type == VIRTIO_BLK_T_IN || type == VIRTIO_BLK_T_GET_ID;

    r->header.type = type;
    r->header.reserved = 0;
    r->header.sector = sector;
    r->status = 0xFF;
    r->busy = true;
    r->done = false;
    r->used_len = 0;
    r->data_bytes = bytes;

    /* The header: device-readable (no WRITE flag), 16 bytes. */
    desc[head].addr = (uint64_t)(uintptr_t)&r->header;
    desc[head].len = sizeof(r->header);
    desc[head].flags = VIRTQ_DESC_F_NEXT;
    uint16_t last = head;

    /* The data, cut into segments of at most segment_bytes. */
    for (uint32_t offset = 0, n = 0; offset < bytes; offset += blk->segment_bytes, n++) {
        uint16_t index = (uint16_t)(head + 1 + n);
        uint32_t length = bytes - offset < blk->segment_bytes ? bytes - offset : blk->segment_bytes;
        desc[index].addr = (uint64_t)(uintptr_t)(r->data + offset);
        desc[index].len = length;
        desc[index].flags = VIRTQ_DESC_F_NEXT | (device_writes_data ? VIRTQ_DESC_F_WRITE : 0);
        desc[last].next = index;
        last = index;
    }

    /* The status byte: device-writable, and the end of the chain (no NEXT). */
    desc[status_index].addr = (uint64_t)(uintptr_t)&r->status;
    desc[status_index].len = 1;
    desc[status_index].flags = VIRTQ_DESC_F_WRITE;
    desc[status_index].next = 0;
    desc[last].next = status_index;

    virtqueue_add(&blk->vq, head);
}

void blk_kick(struct blk *blk)
{
    virtqueue_kick(&blk->vq);
}

static const char *request_name(uint32_t type)
{
    switch (type) {
    case VIRTIO_BLK_T_IN: return "read";
    case VIRTIO_BLK_T_OUT: return "write";
    case VIRTIO_BLK_T_FLUSH: return "flush";
    case VIRTIO_BLK_T_GET_ID: return "get-id";
    default: return "request";
    }
}

/* Takes every used element the device has published and marks its request done. */
static void collect_used(struct blk *blk)
{
    uint32_t id, len;
    while (virtqueue_get_used(&blk->vq, &id, &len)) {
        /* The id must be the head of a request in flight: anything else is a device bug. */
        uint32_t stride = slot_stride(blk);
        uint32_t slot = id / stride;
        if (id % stride != 0 || slot >= blk->slots || !blk->requests[slot].busy || blk->requests[slot].done)
            fail("%s: the used ring returned descriptor %u, which is not the head of a request in flight",
                 blk->dev->where, id);
        blk->requests[slot].done = true;
        blk->requests[slot].used_len = len;
    }
}

/* The device took too long to answer request `slot`: say so and end the VM. */
__attribute__((noreturn)) static void no_answer(struct blk *blk, uint32_t slot)
{
    struct blk_request *r = &blk->requests[slot];
    fail("%s: no answer to the %s of %u bytes at sector %lu (device status 0x%02x, %u requests in flight)",
         blk->dev->where, request_name(r->header.type), r->data_bytes, r->header.sector,
         blk->dev->transport->get_status(blk->dev), blk->vq.in_flight);
}

static void check_done(struct blk *blk, uint32_t slot);

void blk_wait(struct blk *blk, uint32_t slot)
{
    struct blk_request *r = &blk->requests[slot];
    struct deadline deadline;
    deadline_start(&deadline);
    while (!r->done) {
        collect_used(blk);
        if (r->done)
            break;
        if (deadline_passed(&deadline))
            no_answer(blk, slot);
        cpu_relax();
    }
    check_done(blk, slot);
}

bool blk_take_done(struct blk *blk, uint32_t *slot)
{
    collect_used(blk);
    for (uint32_t i = 0; i < blk->slots; i++) {
        if (blk->requests[i].busy && blk->requests[i].done) {
            check_done(blk, i);
            *slot = i;
            return true;
        }
    }
    return false;
}

uint32_t blk_wait_any(struct blk *blk)
{
    uint32_t busy = 0;
    while (busy < blk->slots && !blk->requests[busy].busy)
        busy++;
    if (busy == blk->slots)
        fail("%s: waiting for a request, but none is in flight", blk->dev->where);
    uint32_t slot;
    struct deadline deadline;
    deadline_start(&deadline);
    while (!blk_take_done(blk, &slot)) {
        if (deadline_passed(&deadline))
            no_answer(blk, busy);
        cpu_relax();
    }
    return slot;
}

/* Request `slot` is done: frees the slot, and checks the status byte and the used length
 * (ending the VM with a message when either is wrong). */
static void check_done(struct blk *blk, uint32_t slot)
{
    struct blk_request *r = &blk->requests[slot];
    r->busy = false;

    /* 5.2.6: the status byte, written by the device. */
    uint8_t status = *(volatile uint8_t *)&r->status;
    if (status != VIRTIO_BLK_S_OK) {
        const char *meaning = status == VIRTIO_BLK_S_IOERR ? "VIRTIO_BLK_S_IOERR"
                            : status == VIRTIO_BLK_S_UNSUPP ? "VIRTIO_BLK_S_UNSUPP"
                            : status == 0xFF ? "never written by the device" : "not a virtio-blk status";
        fail("%s: the %s of %u bytes at sector %lu failed: status %u (%s)", blk->dev->where,
             request_name(r->header.type), r->data_bytes, r->header.sector, status, meaning);
    }

    /* 2.7.8: the used element's len is the number of bytes the device wrote into the
     * chain's device-writable buffers: for a read, all the data and the status byte; for
     * a write or a flush, the status byte alone. */
    bool device_writes_data = r->header.type == VIRTIO_BLK_T_IN || r->header.type == VIRTIO_BLK_T_GET_ID;
    uint32_t expected = (device_writes_data ? r->data_bytes : 0) + 1;
    if (r->used_len != expected)
        fail("%s: the %s of %u bytes at sector %lu completed with used length %u, expected %u",
             blk->dev->where, request_name(r->header.type), r->data_bytes, r->header.sector, r->used_len,
             expected);
}
