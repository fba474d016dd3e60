/*
 * virtio.c: what every virtio driver does, whatever the device and the transport:
 * initialization and feature negotiation (3.1.1), reading the device configuration
 * (2.5.1), and the driver's half of a split virtqueue (2.7).
 */
#include "virtio_driver.h"

/* How long to wait for a device before giving up: 2^35 time-stamp counter ticks, 10 to 20
 * seconds at the 2-3.5 GHz a TSC ticks at. A driver must not trust a device to answer: a
 * broken one would otherwise hang the guest, and the test, silently. */
#define DEVICE_TIMEOUT_TICKS (1ull << 35)

void deadline_start(struct deadline *d)
{
    d->start = rdtsc();
    d->spins = 0;
}

bool deadline_passed(struct deadline *d)
{
    /* Reading the TSC is cheap but not free; look at it once every 4096 spins. */
    if ((++d->spins & 4095) != 0)
        return false;
    return rdtsc() - d->start > DEVICE_TIMEOUT_TICKS;
}

/* ---- 3.1.1 Driver Requirements: Device Initialization -------------------------------------
 *
 *   1. Reset the device.
 *   2. Set the ACKNOWLEDGE status bit: the guest OS has noticed the device.
 *   3. Set the DRIVER status bit: the guest OS knows how to drive the device.
 *   4. Read the device feature bits, and write the subset understood by the OS and driver.
 *   5. Set the FEATURES_OK status bit. The driver MUST NOT accept new feature bits after
 *      this step.
 *   6. Re-read device status to ensure the FEATURES_OK bit is still set: otherwise, the
 *      device does not support our subset of features and the device is unusable.
 *   7. Perform device-specific setup: discover the virtqueues, read the configuration...
 *   8. Set the DRIVER_OK status bit. At this point the device is "live".
 *
 * Steps 1-6 are virtio_negotiate(), step 8 virtio_driver_ok(); step 7 is the caller's. */

static void set_status_bits(struct virtio_device *dev, uint8_t bits)
{
    dev->transport->set_status(dev, dev->transport->get_status(dev) | bits);
}

const char *virtio_device_type_name(uint32_t device_type)
{
    switch (device_type) {
    case VIRTIO_ID_NET: return "network";
    case VIRTIO_ID_BLOCK: return "block";
    default: return "virtio";
    }
}

void virtio_fail_device(struct virtio_device *dev)
{
    /* 3.1.1: "If any of these steps go irrecoverably wrong, the driver SHOULD set the
     * FAILED status bit to indicate that it has given up on the device." */
    set_status_bits(dev, VIRTIO_STATUS_FAILED);
}

uint64_t virtio_negotiate(struct virtio_device *dev, uint64_t wanted)
{
    const struct virtio_transport *t = dev->transport;

    /* 1. Reset: writing 0 to the status. 4.1.4.3.2 (PCI): "After writing 0 to
     * device_status, the driver MUST wait for a read of device_status to return 0 before
     * reinitializing the device." virtio-mmio says the same of its Status register. */
    t->set_status(dev, 0);
    struct deadline deadline;
    deadline_start(&deadline);
    while (t->get_status(dev) != 0) {
        if (deadline_passed(&deadline))
            fail("%s: the device status did not read 0 after a reset", dev->where);
        cpu_relax();
    }

    /* 2, 3. */
    set_status_bits(dev, VIRTIO_STATUS_ACKNOWLEDGE);
    set_status_bits(dev, VIRTIO_STATUS_DRIVER);

    /* 4. Features: two 32-bit words. A device that is not virtio 1.x (it does not offer
     * VERSION_1) speaks the legacy interface, which this driver does not (6.1: a driver
     * MUST accept VERSION_1 if it is offered; it is the only way to get 1.x behaviour). */
    uint64_t offered = (uint64_t)t->device_features(dev, 1) << 32 | t->device_features(dev, 0);
    if (!(offered & VIRTIO_F_VERSION_1)) {
        virtio_fail_device(dev);
        fail("%s: the device does not offer VIRTIO_F_VERSION_1 (features 0x%016lx): a legacy device",
             dev->where, offered);
    }
    uint64_t accepted = offered & wanted;
    t->set_driver_features(dev, 0, (uint32_t)accepted);
    t->set_driver_features(dev, 1, (uint32_t)(accepted >> 32));

    /* 5, 6. */
    set_status_bits(dev, VIRTIO_STATUS_FEATURES_OK);
    uint8_t status = t->get_status(dev);
    if (!(status & VIRTIO_STATUS_FEATURES_OK)) {
        virtio_fail_device(dev);
        fail("%s: the device refused the features 0x%016lx (offered 0x%016lx): FEATURES_OK did not stay set (status 0x%02x)",
             dev->where, accepted, offered, status);
    }
    kprintf("%s: features offered 0x%016lx, accepted 0x%016lx\n", program_name, offered, accepted);
    return accepted;
}

void virtio_driver_ok(struct virtio_device *dev)
{
    set_status_bits(dev, VIRTIO_STATUS_DRIVER_OK);
    uint8_t status = dev->transport->get_status(dev);
    if (status & VIRTIO_STATUS_DEVICE_NEEDS_RESET)
        fail("%s: the device set DEVICE_NEEDS_RESET right after DRIVER_OK (status 0x%02x)", dev->where, status);
}

/* ---- 2.5.1 Driver Requirements: Device Configuration Space --------------------------------
 * A device may change its configuration at any time (a disk that is resized). A field
 * wider than one access (the 64-bit capacity, read as two 32-bit halves) could then be
 * torn: half old, half new. The configuration generation counter changes whenever the
 * configuration does, so: read it, read the fields, read it again, and start over if it
 * moved. */
uint64_t virtio_config_read64(struct virtio_device *dev, uint32_t offset)
{
    const struct virtio_transport *t = dev->transport;
    for (int attempt = 0; attempt < 1000; attempt++) {
        uint32_t before = t->config_generation(dev);
        uint32_t lo = t->config_read(dev, offset, 4);
        uint32_t hi = t->config_read(dev, offset + 4, 4);
        if (t->config_generation(dev) == before)
            return (uint64_t)hi << 32 | lo;
    }
    fail("%s: the configuration generation changed on each of 1000 reads", dev->where);
}

uint32_t virtio_config_read32(struct virtio_device *dev, uint32_t offset)
{
    return dev->transport->config_read(dev, offset, 4);
}

uint16_t virtio_config_read16(struct virtio_device *dev, uint32_t offset)
{
    return (uint16_t)dev->transport->config_read(dev, offset, 2);
}

void virtio_config_read_bytes(struct virtio_device *dev, uint32_t offset, uint8_t *bytes, uint32_t count)
{
    const struct virtio_transport *t = dev->transport;
    for (int attempt = 0; attempt < 1000; attempt++) {
        uint32_t before = t->config_generation(dev);
        for (uint32_t i = 0; i < count; i++)
            bytes[i] = (uint8_t)t->config_read(dev, offset + i, 1);
        if (t->config_generation(dev) == before)
            return;
    }
    fail("%s: the configuration generation changed on each of 1000 reads", dev->where);
}

/* ---- 2.7 the driver's side of a split virtqueue ----------------------------------------------
 * The three areas live here, in the guest's own RAM (this ELF's .bss), one set per queue
 * number. The spec asks for 16-byte (descriptor table), 2-byte (available ring) and 4-byte
 * (used ring) alignment (2.7, table "Virtqueue Part Alignment"); each gets a page of its
 * own, which is more than enough and keeps the areas apart. The page tables map every
 * address to itself, so the address the program sees is the guest-physical address the
 * device needs. */
struct queue_memory {
    struct virtq_desc desc[QUEUE_SIZE_LIMIT] __attribute__((aligned(4096)));
    struct virtq_avail avail __attribute__((aligned(4096)));
    struct virtq_used used __attribute__((aligned(4096)));
};
static struct queue_memory queue_memory[VIRTIO_MAX_QUEUES];

void virtqueue_setup(struct virtqueue *vq, struct virtio_device *dev, uint16_t index, uint16_t max_size)
{
    const struct virtio_transport *t = dev->transport;
    if (index >= VIRTIO_MAX_QUEUES)
        fail("%s: queue %u: this driver has ring memory for %u queues only", dev->where, index, VIRTIO_MAX_QUEUES);
    uint32_t max = t->queue_max_size(dev, index);
    if (max == 0)
        fail("%s: queue %u is not available (its maximum size reads 0)", dev->where, index);

    /* A split virtqueue's size is a power of two (2.7). Take the largest one that both the
     * device (max) and this driver (max_size, QUEUE_SIZE_LIMIT) allow. */
    uint32_t size = QUEUE_SIZE_LIMIT;
    while (size > max || size > max_size)
        size >>= 1;
    if (size == 0)
        fail("%s: queue %u: no power of two fits both the device's maximum %u and the driver's %u", dev->where, index,
             max, max_size);

    struct queue_memory *m = &queue_memory[index];
    memset(m, 0, sizeof(*m));
    /* We poll the used ring, so we ask the device not to interrupt us (2.7.7: without
     * VIRTIO_F_EVENT_IDX, flags = VIRTQ_AVAIL_F_NO_INTERRUPT; the device SHOULD NOT then
     * send used buffer notifications). It is a hint: interrupts are masked anyway. */
    m->avail.flags = VIRTQ_AVAIL_F_NO_INTERRUPT;

    vq->dev = dev;
    vq->index = index;
    vq->size = (uint16_t)size;
    vq->desc = m->desc;
    vq->avail = &m->avail;
    vq->used = &m->used;
    vq->next_avail = 0;
    vq->last_used = 0;
    vq->in_flight = 0;
    vq->notifications = 0;
    vq->suppressed = 0;
    vq->notify_ticks = 0;
    if (!t->queue_enable(dev, index, vq->size, (uint64_t)(uintptr_t)m->desc, (uint64_t)(uintptr_t)&m->avail,
                         (uint64_t)(uintptr_t)&m->used))
        fail("%s: could not enable queue %u", dev->where, index);
}

void virtqueue_add(struct virtqueue *vq, uint16_t head)
{
    /* 2.7.13.2: put the head in the next free slot of the available ring. The device does
     * not look at this slot until idx says so (virtqueue_kick). */
    vq->avail->ring[vq->next_avail % vq->size] = head;
    vq->next_avail++;
    vq->in_flight++;
}

void virtqueue_kick(struct virtqueue *vq)
{
    /* 2.7.13.3 "Updating idx": "The driver MUST perform a suitable memory barrier before
     * the idx update, to ensure the device sees the most up-to-date copy" of the
     * descriptors and ring entries. On x86 stores become visible in program order, so only
     * the compiler has to be stopped from moving the stores: a compiler barrier. The store
     * itself goes through a volatile pointer so that it happens exactly once, whole. */
    compiler_barrier();
    *(volatile uint16_t *)&vq->avail->idx = vq->next_avail;

    /* 2.7.13.4 "Notifying The Device" and 2.7.10 (no VIRTIO_F_EVENT_IDX): "If flags is 1
     * [VIRTQ_USED_F_NO_NOTIFY], the driver SHOULD NOT send a notification. If flags is 0,
     * the driver MUST send a notification." The device sets the flag while it is busy
     * draining the ring and clears it before it looks at idx one last time. Our store to
     * idx and our load of flags must therefore not be reordered, or both sides could miss
     * each other (the driver sees the old flag 1, the device the old idx): exactly the
     * store-then-load case x86 does reorder. A full fence (MFENCE) is needed here, and only
     * here. */
    full_fence();
    uint16_t flags = *(volatile uint16_t *)&vq->used->flags;
    if (flags & VIRTQ_USED_F_NO_NOTIFY) {
        vq->suppressed++;
        return;
    }
    /* The notification itself is a write to a device register: an MMIO or port write
     * that leaves the guest. x86 does not let it overtake the earlier stores to RAM. */
    uint64_t start = rdtsc();
    vq->dev->transport->notify(vq->dev, vq->index);
    vq->notify_ticks += rdtsc() - start;
    vq->notifications++;
}

bool virtqueue_get_used(struct virtqueue *vq, uint32_t *id, uint32_t *len)
{
    /* 2.7.14 "Receiving Used Buffers From The Device": the device writes the used element,
     * then (after its own barrier) increments used->idx. We read idx (volatile: from
     * memory, every time), then the element. x86 does not reorder loads with loads; the
     * compiler barrier keeps the compiler from reading the element, or the data buffers
     * the device filled, before idx. */
    uint16_t used_idx = *(volatile uint16_t *)&vq->used->idx;
    if (used_idx == vq->last_used)
        return false;
    uint16_t new_entries = (uint16_t)(used_idx - vq->last_used);
    if (new_entries > vq->in_flight)
        fail("%s: the used ring's idx went from %u to %u, but only %u chains were in flight",
             vq->dev->where, vq->last_used, used_idx, vq->in_flight);
    compiler_barrier();
    volatile struct virtq_used_elem *elem = &vq->used->ring[vq->last_used % vq->size];
    *id = elem->id;
    *len = elem->len;
    vq->last_used++;
    vq->in_flight--;
    return true;
}
