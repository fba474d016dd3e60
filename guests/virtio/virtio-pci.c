/*
 * virtio-pci.c: the virtio-pci transport, modern interface (virtio 1.2, 4.1).
 *
 * Finding the device
 *   PCI configuration space is reached through "configuration mechanism #1" (PCI Local Bus
 *   specification 3.0, 3.2.2.3.2): write an address to port 0xCF8,
 *       bit 31 enable | bits 23-16 bus | bits 15-11 device | bits 10-8 function |
 *       bits 7-2 register (a dword offset)
 *   then read or write the dword (or a part of it) at ports 0xCFC-0xCFF. The guest scans
 *   bus 0, devices 0-31 (functions 1-7 too for a multi-function device), for vendor 0x1AF4
 *   and device 0x1040 + the virtio device type (4.1.2: 0x1041 network, 0x1042 block), or
 *   the transitional ID of that type (0x1000 network, 0x1001 block) if it also has the
 *   modern capabilities.
 *
 *   Configuration space registers used (PCI 3.0, 6.1):
 *       0x00 vendor ID (16) and device ID (16)     0x04 command (16), 0x06 status (16)
 *       0x0E header type (bit 7: multi-function)   0x10-0x24 the six BARs
 *       0x34 capabilities pointer (when status bit 4 is set)
 *
 * Where the registers are
 *   The device lists "virtio structures" in its PCI capability list: capabilities with ID
 *   0x09 (vendor-specific) laid out as struct virtio_pci_cap (4.1.4):
 *       +0 cap_vndr (0x09)  +1 cap_next  +2 cap_len  +3 cfg_type  +4 bar  +5 id
 *       +8 offset (32)  +12 length (32)   [notify only: +16 notify_off_multiplier (32)]
 *   cfg_type 1 = common configuration, 2 = notifications, 3 = ISR status, 4 = device
 *   configuration. Each sits at `offset` bytes into the memory region of BAR `bar`.
 *
 * BARs
 *   A Base Address Register says where a device's memory region is. Firmware (a BIOS,
 *   SeaBIOS under QEMU) normally assigns the addresses; Swiftlet has no firmware, so the
 *   guest does it itself when a memory BAR still reads 0 (or lies above 4 GiB, out of
 *   reach: the page tables map only the first 4 GiB): it sizes each BAR (write all ones, read back: the bits that
 *   stay 0 are the size), and places them one after the other, each aligned to its size,
 *   from 0xE0000000, or from the address given as pci.bar=<address> on the command line
 *   (which also moves BARs the firmware did assign). Then it sets the command register's
 *   Memory Space (bit 1) and Bus Master (bit 2: the device may read and write guest memory,
 *   which a virtqueue needs) bits, and Interrupt Disable (bit 10: no INTx, we poll).
 *
 * MSI-X
 *   If the device has an MSI-X capability, MSI-X stays disabled (its enable bit is never
 *   set) and the driver writes NO_VECTOR (0xFFFF) to config_msix_vector and
 *   queue_msix_vector. The modern common configuration has the same layout either way.
 */
#include "virtio.h"

#define PCI_CONFIG_ADDRESS 0xCF8
#define PCI_CONFIG_DATA 0xCFC

#define PCI_VENDOR_ID 0x00
#define PCI_COMMAND 0x04
#define PCI_STATUS 0x06
#define PCI_HEADER_TYPE 0x0E
#define PCI_BAR0 0x10
#define PCI_CAPABILITIES 0x34

#define PCI_COMMAND_IO (1u << 0)
#define PCI_COMMAND_MEMORY (1u << 1)
#define PCI_COMMAND_BUS_MASTER (1u << 2)
#define PCI_COMMAND_INTX_DISABLE (1u << 10)
#define PCI_STATUS_CAPABILITIES (1u << 4)

#define PCI_CAP_ID_VENDOR 0x09
#define PCI_CAP_ID_MSIX 0x11

#define VIRTIO_PCI_VENDOR 0x1AF4
#define VIRTIO_PCI_DEVICE_MODERN_BASE 0x1040  /* + the virtio device type (4.1.2.1) */

/* 4.1.4: cfg_type values. */
#define VIRTIO_PCI_CAP_COMMON_CFG 1
#define VIRTIO_PCI_CAP_NOTIFY_CFG 2
#define VIRTIO_PCI_CAP_ISR_CFG 3
#define VIRTIO_PCI_CAP_DEVICE_CFG 4

/* 4.1.4.3 struct virtio_pci_common_cfg: offsets and widths. */
#define COMMON_DEVICE_FEATURE_SELECT 0x00  /* le32 */
#define COMMON_DEVICE_FEATURE 0x04         /* le32, read-only */
#define COMMON_DRIVER_FEATURE_SELECT 0x08  /* le32 */
#define COMMON_DRIVER_FEATURE 0x0C         /* le32 */
#define COMMON_CONFIG_MSIX_VECTOR 0x10     /* le16 */
#define COMMON_NUM_QUEUES 0x12             /* le16, read-only */
#define COMMON_DEVICE_STATUS 0x14          /* u8 */
#define COMMON_CONFIG_GENERATION 0x15      /* u8, read-only */
#define COMMON_QUEUE_SELECT 0x16           /* le16 */
#define COMMON_QUEUE_SIZE 0x18             /* le16: the maximum after reset; the driver may lower it */
#define COMMON_QUEUE_MSIX_VECTOR 0x1A      /* le16 */
#define COMMON_QUEUE_ENABLE 0x1C           /* le16 */
#define COMMON_QUEUE_NOTIFY_OFF 0x1E       /* le16, read-only */
#define COMMON_QUEUE_DESC 0x20             /* le64 */
#define COMMON_QUEUE_DRIVER 0x28           /* le64 */
#define COMMON_QUEUE_DEVICE 0x30           /* le64 */
#define COMMON_MIN_LENGTH 0x38             /* the fields above: all this driver needs */

#define VIRTIO_MSI_NO_VECTOR 0xFFFF

#define DEFAULT_BAR_WINDOW 0xE0000000u

/* ---- configuration space access -------------------------------------------------------- */

static uint32_t config_address(uint32_t bdf, uint32_t offset)
{
    return 0x80000000u | bdf << 8 | (offset & 0xFC);
}

static uint32_t pci_read32(uint32_t bdf, uint32_t offset)
{
    outl(PCI_CONFIG_ADDRESS, config_address(bdf, offset));
    return inl(PCI_CONFIG_DATA);
}

static uint16_t pci_read16(uint32_t bdf, uint32_t offset)
{
    return (uint16_t)(pci_read32(bdf, offset) >> (8 * (offset & 2)));
}

static uint8_t pci_read8(uint32_t bdf, uint32_t offset)
{
    return (uint8_t)(pci_read32(bdf, offset) >> (8 * (offset & 3)));
}

static void pci_write32(uint32_t bdf, uint32_t offset, uint32_t value)
{
    outl(PCI_CONFIG_ADDRESS, config_address(bdf, offset));
    outl(PCI_CONFIG_DATA, value);
}

/* A 16-bit write at the 16-bit register's own port (0xCFC or 0xCFE). Writing the whole
 * dword at 0x04 would also write the status register, whose error bits are cleared by
 * writing 1. */
static void pci_write16(uint32_t bdf, uint32_t offset, uint16_t value)
{
    outl(PCI_CONFIG_ADDRESS, config_address(bdf, offset));
    outw((uint16_t)(PCI_CONFIG_DATA + (offset & 2)), value);
}

/* ---- BARs ------------------------------------------------------------------------------- */

struct bar {
    bool present;                       /* implemented (sizing found a nonzero size) */
    bool io;                            /* an I/O-space BAR (not used by this driver) */
    bool wide;                          /* a 64-bit memory BAR (takes this slot and the next) */
    uint64_t address, size;
};

/* Sizes the six BARs (PCI 3.0, 6.2.5.1): decoding is switched off while a BAR holds all
 * ones, so the device never answers at that bogus address. */
static void read_bars(uint32_t bdf, struct bar bars[6])
{
    uint16_t command = pci_read16(bdf, PCI_COMMAND);
    pci_write16(bdf, PCI_COMMAND, command & (uint16_t)~(PCI_COMMAND_IO | PCI_COMMAND_MEMORY));
    memset(bars, 0, 6 * sizeof(struct bar));
    for (uint32_t i = 0; i < 6; i++) {
        uint32_t offset = PCI_BAR0 + 4 * i;
        uint32_t original = pci_read32(bdf, offset);
        pci_write32(bdf, offset, 0xFFFFFFFF);
        uint32_t low = pci_read32(bdf, offset);
        pci_write32(bdf, offset, original);
        struct bar *bar = &bars[i];
        if (original & 1) {             /* bit 0 = 1: I/O space; bits 31-2 the port */
            bar->io = true;
            uint32_t mask = low & ~3u;
            bar->present = mask != 0;
            bar->address = original & ~3u;
            bar->size = (uint16_t)(~mask + 1);
            continue;
        }
        /* Memory space: bits 2-1 the type (0: 32-bit, 2: 64-bit), bit 3 prefetchable,
         * bits 31-4 the address. */
        uint64_t mask = 0xFFFFFFFF00000000ull | (low & ~0xFu);
        bar->address = original & ~0xFu;
        if (((original >> 1) & 3) == 2 && i < 5) {
            bar->wide = true;
            uint32_t original_high = pci_read32(bdf, offset + 4);
            pci_write32(bdf, offset + 4, 0xFFFFFFFF);
            uint32_t high = pci_read32(bdf, offset + 4);
            pci_write32(bdf, offset + 4, original_high);
            mask = (uint64_t)high << 32 | (low & ~0xFu);
            bar->address |= (uint64_t)original_high << 32;
        }
        if ((uint32_t)mask != 0 || (bar->wide && mask != 0)) {
            bar->present = true;
            bar->size = ~mask + 1;
        }
        if (bar->wide)
            i++;                        /* the next slot is this BAR's upper half */
    }
    pci_write16(bdf, PCI_COMMAND, command);
}

/* Places every memory BAR below 4 GiB from `window`, each aligned to its size. */
static void assign_bars(uint32_t bdf, struct bar bars[6], uint64_t window)
{
    uint16_t command = pci_read16(bdf, PCI_COMMAND);
    pci_write16(bdf, PCI_COMMAND, command & (uint16_t)~(PCI_COMMAND_IO | PCI_COMMAND_MEMORY));
    uint64_t next = window;
    for (uint32_t i = 0; i < 6; i++) {
        struct bar *bar = &bars[i];
        if (!bar->present || bar->io)
            continue;
        if (bar->size & (bar->size - 1))
            fail("virtio-pci: BAR%u has a size of 0x%lx, not a power of two", i, bar->size);
        next = (next + bar->size - 1) & ~(bar->size - 1);
        if (next + bar->size > 0x100000000ull)
            fail("virtio-pci: BAR%u (0x%lx bytes) does not fit below 4 GiB from pci.bar=0x%lx", i, bar->size,
                 window);
        pci_write32(bdf, PCI_BAR0 + 4 * i, (uint32_t)next);
        if (bar->wide)
            pci_write32(bdf, PCI_BAR0 + 4 * (i + 1), 0);
        bar->address = next;
        next += bar->size;
    }
    pci_write16(bdf, PCI_COMMAND, command);
}

/* ---- the virtio structures ----------------------------------------------------------------- */

struct virtio_cap {
    bool found;
    uint8_t bar;
    uint32_t offset, length;
    uint32_t notify_multiplier;
};

/* Walks the capability list: the first usable virtio structure of each type 1-4 (4.1.4.1:
 * "The driver SHOULD use the first instance of each virtio structure type they can
 * support"), and the MSI-X table size. A structure is usable when its BAR is a memory BAR
 * of this device and offset + length lies inside it. */
static void read_capabilities(uint32_t bdf, const struct bar bars[6], struct virtio_cap caps[5], uint32_t *msix_vectors)
{
    memset(caps, 0, 5 * sizeof(struct virtio_cap));
    *msix_vectors = 0;
    if (!(pci_read16(bdf, PCI_STATUS) & PCI_STATUS_CAPABILITIES))
        return;
    uint32_t position = pci_read8(bdf, PCI_CAPABILITIES) & 0xFC;
    /* A list in a hostile device's configuration space could loop: at most 48
     * capabilities fit in the 192 bytes after the header. */
    for (int count = 0; position >= 0x40 && count < 48; count++) {
        uint8_t id = pci_read8(bdf, position);
        uint8_t next = pci_read8(bdf, position + 1);
        if (id == PCI_CAP_ID_MSIX) {
            *msix_vectors = (pci_read16(bdf, position + 2) & 0x7FF) + 1; /* message control: table size - 1 */
        } else if (id == PCI_CAP_ID_VENDOR) {
            uint8_t cap_len = pci_read8(bdf, position + 2);
            uint8_t type = pci_read8(bdf, position + 3);
            uint8_t bar = pci_read8(bdf, position + 4);
            uint32_t offset = pci_read32(bdf, position + 8);
            uint32_t length = pci_read32(bdf, position + 12);
            bool usable = type >= VIRTIO_PCI_CAP_COMMON_CFG && type <= VIRTIO_PCI_CAP_DEVICE_CFG && cap_len >= 16 &&
                          bar < 6 && bars[bar].present && !bars[bar].io &&
                          (uint64_t)offset + length <= bars[bar].size;
            if (type == VIRTIO_PCI_CAP_NOTIFY_CFG && cap_len < 20)
                usable = false;         /* struct virtio_pci_notify_cap has the multiplier */
            if (usable && !caps[type].found) {
                caps[type].found = true;
                caps[type].bar = bar;
                caps[type].offset = offset;
                caps[type].length = length;
                if (type == VIRTIO_PCI_CAP_NOTIFY_CFG)
                    caps[type].notify_multiplier = pci_read32(bdf, position + 16);
            }
        }
        position = next & 0xFC;
    }
}

/* ---- the transport operations: the common configuration structure ------------------------- */

static uint8_t pci_get_status(struct virtio_device *dev) { return mmio_read8(dev->common + COMMON_DEVICE_STATUS); }
static void pci_set_status(struct virtio_device *dev, uint8_t status) { mmio_write8(dev->common + COMMON_DEVICE_STATUS, status); }

static uint32_t pci_device_features(struct virtio_device *dev, uint32_t word)
{
    mmio_write32(dev->common + COMMON_DEVICE_FEATURE_SELECT, word);
    return mmio_read32(dev->common + COMMON_DEVICE_FEATURE);
}

static void pci_set_driver_features(struct virtio_device *dev, uint32_t word, uint32_t bits)
{
    mmio_write32(dev->common + COMMON_DRIVER_FEATURE_SELECT, word);
    mmio_write32(dev->common + COMMON_DRIVER_FEATURE, bits);
}

static uint32_t pci_config_read(struct virtio_device *dev, uint32_t offset, uint32_t width)
{
    if (offset + width > dev->device_config_length)
        fail("%s: the device configuration structure is %u bytes, too short to read offset %u", dev->where,
             dev->device_config_length, offset);
    uintptr_t address = dev->device_config + offset;
    switch (width) {
    case 1: return mmio_read8(address);
    case 2: return mmio_read16(address);
    default: return mmio_read32(address);
    }
}

static uint32_t pci_config_generation(struct virtio_device *dev) { return mmio_read8(dev->common + COMMON_CONFIG_GENERATION); }

static uint32_t pci_queue_max_size(struct virtio_device *dev, uint16_t queue)
{
    if (queue >= mmio_read16(dev->common + COMMON_NUM_QUEUES))
        return 0;
    mmio_write16(dev->common + COMMON_QUEUE_SELECT, queue);
    return mmio_read16(dev->common + COMMON_QUEUE_SIZE);
}

/* 4.1.5.1.3 "Virtqueue Configuration": select the queue, read its size (the maximum) and
 * optionally lower it, set the MSI-X vector (NO_VECTOR here), the three addresses, read
 * queue_notify_off, then queue_enable = 1. 64-bit fields are written as two 32-bit halves
 * (4.1.3.1 allows it). */
static bool pci_queue_enable(struct virtio_device *dev, uint16_t queue, uint16_t size, uint64_t desc,
                             uint64_t driver_area, uint64_t device_area)
{
    uintptr_t c = dev->common;
    if (queue >= ARRAY_SIZE(dev->queue_notify))
        return false;
    mmio_write16(c + COMMON_QUEUE_SELECT, queue);
    if (mmio_read16(c + COMMON_QUEUE_ENABLE) != 0) {
        kprintf("%s: %s: queue %u is already enabled after a reset\n", program_name, dev->where, queue);
        return false;
    }
    mmio_write16(c + COMMON_QUEUE_SIZE, size);
    mmio_write16(c + COMMON_QUEUE_MSIX_VECTOR, VIRTIO_MSI_NO_VECTOR);
    mmio_write32(c + COMMON_QUEUE_DESC, (uint32_t)desc);
    mmio_write32(c + COMMON_QUEUE_DESC + 4, (uint32_t)(desc >> 32));
    mmio_write32(c + COMMON_QUEUE_DRIVER, (uint32_t)driver_area);
    mmio_write32(c + COMMON_QUEUE_DRIVER + 4, (uint32_t)(driver_area >> 32));
    mmio_write32(c + COMMON_QUEUE_DEVICE, (uint32_t)device_area);
    mmio_write32(c + COMMON_QUEUE_DEVICE + 4, (uint32_t)(device_area >> 32));

    /* 4.1.4.4: this queue's notification address is
     *     BAR address + cap.offset + queue_notify_off * notify_off_multiplier
     * and it must lie inside the notification structure. */
    uint32_t notify_off = mmio_read16(c + COMMON_QUEUE_NOTIFY_OFF);
    uint64_t offset = (uint64_t)notify_off * dev->notify_multiplier;
    if (offset + 2 > dev->notify_length) {
        kprintf("%s: %s: queue %u's notification offset %u x %u lies outside the %u-byte notification structure\n",
                program_name, dev->where, queue, notify_off, dev->notify_multiplier, dev->notify_length);
        return false;
    }
    dev->queue_notify[queue] = dev->notify_base + (uintptr_t)offset;

    mmio_write16(c + COMMON_QUEUE_ENABLE, 1);
    return true;
}

/* 4.1.5.2: "the driver sends an available buffer notification to the device by writing
 * the 16-bit virtqueue index of this virtqueue to the Queue Notify address". */
static void pci_notify(struct virtio_device *dev, uint16_t queue) { mmio_write16(dev->queue_notify[queue], queue); }

static const struct virtio_transport virtio_pci_transport = {
    .name = "virtio-pci",
    .get_status = pci_get_status,
    .set_status = pci_set_status,
    .device_features = pci_device_features,
    .set_driver_features = pci_set_driver_features,
    .config_read = pci_config_read,
    .config_generation = pci_config_generation,
    .queue_max_size = pci_queue_max_size,
    .queue_enable = pci_queue_enable,
    .notify = pci_notify,
};

/* ---- finding the device ------------------------------------------------------------------- */

/* Sets *window from "pci.bar=<address>" on the command line; false if it is not there. */
static bool bar_window_from_cmdline(const char *cmdline, uint64_t *window)
{
    static const char key[] = "pci.bar=";
    for (const char *p = cmdline; *p; p++) {
        if ((p == cmdline || p[-1] == ' ' || p[-1] == '\t') && starts_with(p, key)) {
            const char *value = p + sizeof(key) - 1;
            size_t n = parse_u64(value, window);
            if (n == 0 || (value[n] != 0 && value[n] != ' ' && value[n] != '\t') || *window >= 0x100000000ull) {
                char word[40];
                copy_word(word, sizeof(word), p);
                fail("cannot use %s: expected pci.bar=<address below 4 GiB>", word);
            }
            return true;
        }
    }
    return false;
}

/* Sets up the device at `bdf` once its IDs say it is a virtio device of the wanted type. */
static bool setup_device(uint32_t bdf, uint16_t device_id, const char *cmdline, struct virtio_device *dev)
{
    struct bar bars[6];
    read_bars(bdf, bars);
    struct virtio_cap caps[5];
    uint32_t msix_vectors;
    read_capabilities(bdf, bars, caps, &msix_vectors);

    ksnprintf(dev->where, sizeof(dev->where), "virtio-pci %02x:%02x.%x", bdf >> 8, (bdf >> 3) & 0x1F, bdf & 7);
    if (!caps[VIRTIO_PCI_CAP_COMMON_CFG].found || !caps[VIRTIO_PCI_CAP_NOTIFY_CFG].found ||
        !caps[VIRTIO_PCI_CAP_ISR_CFG].found || !caps[VIRTIO_PCI_CAP_DEVICE_CFG].found) {
        kprintf("%s: %s (1af4:%04x) lacks a usable modern %s structure in a memory BAR, skipped\n",
                program_name, dev->where, device_id,
                !caps[VIRTIO_PCI_CAP_COMMON_CFG].found ? "common configuration"
                : !caps[VIRTIO_PCI_CAP_NOTIFY_CFG].found ? "notification"
                : !caps[VIRTIO_PCI_CAP_ISR_CFG].found ? "ISR status" : "device configuration");
        return false;
    }
    if (caps[VIRTIO_PCI_CAP_COMMON_CFG].length < COMMON_MIN_LENGTH)
        fail("%s: the common configuration structure is %u bytes, less than %u", dev->where,
             caps[VIRTIO_PCI_CAP_COMMON_CFG].length, COMMON_MIN_LENGTH);

    /* Assign the BARs if the firmware did not (or if the command line asks). */
    uint64_t window = DEFAULT_BAR_WINDOW;
    bool forced = bar_window_from_cmdline(cmdline, &window);
    bool needed = forced;
    for (int i = 0; i < 6; i++)
        if (bars[i].present && !bars[i].io && (bars[i].address == 0 || bars[i].address + bars[i].size > 0x100000000ull))
            needed = true;
    if (needed)
        assign_bars(bdf, bars, window);

    /* Memory decoding, bus mastering (DMA) on; INTx off. */
    uint16_t command = pci_read16(bdf, PCI_COMMAND);
    pci_write16(bdf, PCI_COMMAND, command | PCI_COMMAND_MEMORY | PCI_COMMAND_BUS_MASTER | PCI_COMMAND_INTX_DISABLE);

    const struct virtio_cap *common = &caps[VIRTIO_PCI_CAP_COMMON_CFG];
    const struct virtio_cap *notify = &caps[VIRTIO_PCI_CAP_NOTIFY_CFG];
    const struct virtio_cap *isr = &caps[VIRTIO_PCI_CAP_ISR_CFG];
    const struct virtio_cap *device = &caps[VIRTIO_PCI_CAP_DEVICE_CFG];
    dev->transport = &virtio_pci_transport;
    dev->common = (uintptr_t)(bars[common->bar].address + common->offset);
    dev->notify_base = (uintptr_t)(bars[notify->bar].address + notify->offset);
    dev->notify_multiplier = notify->notify_multiplier;
    dev->notify_length = notify->length;
    dev->isr = (uintptr_t)(bars[isr->bar].address + isr->offset);
    dev->device_config = (uintptr_t)(bars[device->bar].address + device->offset);
    dev->device_config_length = device->length;

    /* No MSI-X vector for configuration changes either. */
    mmio_write16(dev->common + COMMON_CONFIG_MSIX_VECTOR, VIRTIO_MSI_NO_VECTOR);

    kprintf("%s: %s: 1af4:%04x, common configuration in BAR%u at 0x%08x (%s), ", program_name, dev->where, device_id,
            common->bar, (uint32_t)bars[common->bar].address,
            needed ? (forced ? "placed here: pci.bar" : "placed here: it was unassigned") : "placed by firmware");
    if (msix_vectors)
        kprintf("MSI-X with %u vectors left disabled\n", msix_vectors);
    else
        kprintf("no MSI-X\n");
    return true;
}

/* 4.1.2.3 Legacy Interfaces: the device IDs of transitional devices, by device type. */
static uint16_t transitional_device_id(uint32_t device_type)
{
    switch (device_type) {
    case VIRTIO_ID_NET: return 0x1000;
    case VIRTIO_ID_BLOCK: return 0x1001;
    default: return 0;
    }
}

bool virtio_pci_find(const char *cmdline, uint32_t device_type, struct virtio_device *dev)
{
    uint16_t modern = (uint16_t)(VIRTIO_PCI_DEVICE_MODERN_BASE + device_type);
    uint16_t transitional = transitional_device_id(device_type);
    for (uint32_t device = 0; device < 32; device++) {
        for (uint32_t function = 0; function < 8; function++) {
            uint32_t bdf = device << 3 | function; /* bus 0 */
            uint32_t id = pci_read32(bdf, PCI_VENDOR_ID);
            uint16_t vendor = (uint16_t)id, device_id = (uint16_t)(id >> 16);
            if (vendor == 0xFFFF) {     /* nothing there: all ones, as on a real bus */
                if (function == 0)
                    break;
                continue;
            }
            if (vendor == VIRTIO_PCI_VENDOR &&
                (device_id == modern || (transitional != 0 && device_id == transitional)) &&
                setup_device(bdf, device_id, cmdline, dev))
                return true;
            if (function == 0 && !(pci_read8(bdf, PCI_HEADER_TYPE) & 0x80))
                break;                  /* not multi-function: functions 1-7 do not exist */
        }
    }
    return false;
}
