/*
 * virtio-mmio.c: the virtio-mmio transport, version 2 register layout (virtio 1.2, 4.2).
 *
 * A virtio-mmio device is a block of 32-bit registers at a fixed guest-physical address,
 * with one interrupt line. Nothing on the bus says where it is: the platform tells the
 * kernel, either in a device tree, in ACPI, or, as here, on the command line, in the
 * syntax of Linux's virtio_mmio driver (drivers/virtio/virtio_mmio.c):
 *
 *     virtio_mmio.device=<size>@<baseaddr>:<irq>[:<id>]
 *
 * size and baseaddr are numbers ("0x" hexadecimal or decimal; size may end in K, M or G),
 * irq is decimal. Several may be given: the first one holding a device of the type the
 * driver wants (block, network) is used.
 *
 * The registers used (offsets from the base, all 32-bit, 4.2.2):
 *
 *     0x000 MagicValue        reads 0x74726976, "virt" in ASCII, little-endian
 *     0x004 Version           2 (1 is the legacy layout, not supported here)
 *     0x008 DeviceID          1 network, 2 block, ... (5); 0 means "no device in this slot"
 *     0x00c VendorID
 *     0x010 DeviceFeatures    32 feature bits, selected by:
 *     0x014 DeviceFeaturesSel   0: bits 0-31, 1: bits 32-63
 *     0x020 DriverFeatures    the features the driver accepts, selected by:
 *     0x024 DriverFeaturesSel
 *     0x030 QueueSel          which queue the Queue* registers below are about
 *     0x034 QueueNumMax       the largest size the device allows (0: no such queue)
 *     0x038 QueueNum          the size the driver chose
 *     0x044 QueueReady        1: the queue is set up and in use
 *     0x050 QueueNotify       writing a queue number: "new buffers in this queue"
 *     0x060 InterruptStatus   (unused: we poll)
 *     0x070 Status            the device status (2.1)
 *     0x080/0x084 QueueDescLow/High      descriptor table address
 *     0x090/0x094 QueueDriverLow/High    available ring address
 *     0x0a0/0x0a4 QueueDeviceLow/High    used ring address
 *     0x0fc ConfigGeneration
 *     0x100 ...               the device configuration (5.1.4 network, 5.2.4 block)
 *
 * 4.2.2.2: the driver MUST use only 32-bit wide and aligned reads and writes for the
 * registers; in the device configuration it uses the width of each field.
 */
#include "virtio.h"

#define MMIO_MAGIC 0x000
#define MMIO_VERSION 0x004
#define MMIO_DEVICE_ID 0x008
#define MMIO_VENDOR_ID 0x00c
#define MMIO_DEVICE_FEATURES 0x010
#define MMIO_DEVICE_FEATURES_SEL 0x014
#define MMIO_DRIVER_FEATURES 0x020
#define MMIO_DRIVER_FEATURES_SEL 0x024
#define MMIO_QUEUE_SEL 0x030
#define MMIO_QUEUE_NUM_MAX 0x034
#define MMIO_QUEUE_NUM 0x038
#define MMIO_QUEUE_READY 0x044
#define MMIO_QUEUE_NOTIFY 0x050
#define MMIO_STATUS 0x070
#define MMIO_QUEUE_DESC_LOW 0x080
#define MMIO_QUEUE_DESC_HIGH 0x084
#define MMIO_QUEUE_DRIVER_LOW 0x090
#define MMIO_QUEUE_DRIVER_HIGH 0x094
#define MMIO_QUEUE_DEVICE_LOW 0x0a0
#define MMIO_QUEUE_DEVICE_HIGH 0x0a4
#define MMIO_CONFIG_GENERATION 0x0fc
#define MMIO_CONFIG 0x100

#define MMIO_MAGIC_VALUE 0x74726976     /* "virt" */

static uint32_t reg_read(struct virtio_device *dev, uint32_t offset) { return mmio_read32(dev->mmio_base + offset); }
static void reg_write(struct virtio_device *dev, uint32_t offset, uint32_t value) { mmio_write32(dev->mmio_base + offset, value); }

static uint8_t mmio_get_status(struct virtio_device *dev) { return (uint8_t)reg_read(dev, MMIO_STATUS); }
static void mmio_set_status(struct virtio_device *dev, uint8_t status) { reg_write(dev, MMIO_STATUS, status); }

static uint32_t mmio_device_features(struct virtio_device *dev, uint32_t word)
{
    reg_write(dev, MMIO_DEVICE_FEATURES_SEL, word);
    return reg_read(dev, MMIO_DEVICE_FEATURES);
}

static void mmio_set_driver_features(struct virtio_device *dev, uint32_t word, uint32_t bits)
{
    reg_write(dev, MMIO_DRIVER_FEATURES_SEL, word);
    reg_write(dev, MMIO_DRIVER_FEATURES, bits);
}

static uint32_t mmio_config_read(struct virtio_device *dev, uint32_t offset, uint32_t width)
{
    uintptr_t address = dev->mmio_base + MMIO_CONFIG + offset;
    switch (width) {
    case 1: return mmio_read8(address);
    case 2: return mmio_read16(address);
    default: return mmio_read32(address);
    }
}

static uint32_t mmio_config_generation(struct virtio_device *dev) { return reg_read(dev, MMIO_CONFIG_GENERATION); }

static uint32_t mmio_queue_max_size(struct virtio_device *dev, uint16_t queue)
{
    reg_write(dev, MMIO_QUEUE_SEL, queue);
    return reg_read(dev, MMIO_QUEUE_NUM_MAX);
}

/* 4.2.3.2 "Virtqueue Configuration": select the queue, check it is not in use, read the
 * maximum, write the size, the three addresses, then QueueReady = 1. */
static bool mmio_queue_enable(struct virtio_device *dev, uint16_t queue, uint16_t size, uint64_t desc,
                              uint64_t driver_area, uint64_t device_area)
{
    reg_write(dev, MMIO_QUEUE_SEL, queue);
    if (reg_read(dev, MMIO_QUEUE_READY) != 0) {
        kprintf("%s: %s: queue %u is already in use (QueueReady reads 1 after a reset)\n", program_name, dev->where,
                queue);
        return false;
    }
    reg_write(dev, MMIO_QUEUE_NUM, size);
    reg_write(dev, MMIO_QUEUE_DESC_LOW, (uint32_t)desc);
    reg_write(dev, MMIO_QUEUE_DESC_HIGH, (uint32_t)(desc >> 32));
    reg_write(dev, MMIO_QUEUE_DRIVER_LOW, (uint32_t)driver_area);
    reg_write(dev, MMIO_QUEUE_DRIVER_HIGH, (uint32_t)(driver_area >> 32));
    reg_write(dev, MMIO_QUEUE_DEVICE_LOW, (uint32_t)device_area);
    reg_write(dev, MMIO_QUEUE_DEVICE_HIGH, (uint32_t)(device_area >> 32));
    reg_write(dev, MMIO_QUEUE_READY, 1);
    if (reg_read(dev, MMIO_QUEUE_READY) != 1) {
        kprintf("%s: %s: QueueReady did not read 1 after writing 1\n", program_name, dev->where);
        return false;
    }
    return true;
}

static void mmio_notify(struct virtio_device *dev, uint16_t queue) { reg_write(dev, MMIO_QUEUE_NOTIFY, queue); }

static const struct virtio_transport virtio_mmio_transport = {
    .name = "virtio-mmio",
    .get_status = mmio_get_status,
    .set_status = mmio_set_status,
    .device_features = mmio_device_features,
    .set_driver_features = mmio_set_driver_features,
    .config_read = mmio_config_read,
    .config_generation = mmio_config_generation,
    .queue_max_size = mmio_queue_max_size,
    .queue_enable = mmio_queue_enable,
    .notify = mmio_notify,
};

/* Parses "<size>@<baseaddr>:<irq>[:<id>]" (the text after "virtio_mmio.device="), up to
 * the end of the token (a space or the end of the string). */
static bool parse_device(const char *s, uint64_t *size, uint64_t *base, uint64_t *irq)
{
    size_t n = parse_u64(s, size);
    if (n == 0)
        return false;
    s += n;
    /* Linux's memparse suffixes. */
    if (*s == 'K' || *s == 'k') { *size <<= 10; s++; }
    else if (*s == 'M' || *s == 'm') { *size <<= 20; s++; }
    else if (*s == 'G' || *s == 'g') { *size <<= 30; s++; }
    if (*s++ != '@')
        return false;
    if ((n = parse_u64(s, base)) == 0)
        return false;
    s += n;
    if (*s++ != ':')
        return false;
    if ((n = parse_u64(s, irq)) == 0)
        return false;
    s += n;
    if (*s == ':') {                    /* an optional platform device id: ignored */
        uint64_t id;
        if ((n = parse_u64(s + 1, &id)) == 0)
            return false;
        s += 1 + n;
    }
    return *s == 0 || *s == ' ' || *s == '\t';
}

bool virtio_mmio_find(const char *cmdline, uint32_t device_type, struct virtio_device *dev)
{
    static const char key[] = "virtio_mmio.device=";
    for (const char *p = cmdline; *p;) {
        /* One token: from here to the next space. */
        while (*p == ' ' || *p == '\t')
            p++;
        const char *token = p;
        while (*p && *p != ' ' && *p != '\t')
            p++;
        if (!starts_with(token, key))
            continue;

        uint64_t size, base, irq;
        if (!parse_device(token + sizeof(key) - 1, &size, &base, &irq)) {
            char word[80];
            copy_word(word, sizeof(word), token);
            fail("cannot parse %s: expected virtio_mmio.device=<size>@<baseaddr>:<irq>", word);
        }
        /* The registers go up to 0x100 and the device configuration follows: with a
         * smaller window, or one that crosses 4 GiB (outside the identity map), skip it. */
        if (size < 0x200 || base > 0x100000000ull - size || (base & 3) != 0) {
            kprintf("%s: virtio_mmio.device=0x%lx@0x%lx: not a usable register window, skipped\n", program_name,
                    size, base);
            continue;
        }

        dev->mmio_base = (uintptr_t)base;
        uint32_t magic = reg_read(dev, MMIO_MAGIC);
        if (magic != MMIO_MAGIC_VALUE) {
            kprintf("%s: no virtio-mmio device at 0x%lx (magic reads 0x%08x), skipped\n", program_name, base, magic);
            continue;
        }
        uint32_t version = reg_read(dev, MMIO_VERSION);
        uint32_t device_id = reg_read(dev, MMIO_DEVICE_ID);
        if (device_id != device_type)
            continue;                   /* 0 is an empty slot; others are other devices */
        if (version != 2) {
            kprintf("%s: virtio-mmio %s device at 0x%lx has version %u, this driver needs 2%s, skipped\n",
                    program_name, virtio_device_type_name(device_type), base, version, version == 1 ? " (1 is legacy; QEMU: -global virtio-mmio.force-legacy=false)" : "");
            continue;
        }
        dev->transport = &virtio_mmio_transport;
        ksnprintf(dev->where, sizeof(dev->where), "virtio-mmio at 0x%08x", (uint32_t)base);
        kprintf("%s: virtio-mmio %s device at 0x%lx (IRQ %lu, polled), version 2, vendor 0x%08x\n", program_name,
                virtio_device_type_name(device_type), base, irq, reg_read(dev, MMIO_VENDOR_ID));
        return true;
    }
    return false;
}
