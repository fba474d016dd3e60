/*
 * main.c: the ring 3 program: read the job from the command line, find the disk, do the
 * job, report, exit.
 *
 * Jobs (the first word of the command line that is not a key=value option; with Multiboot,
 * the first word is the kernel's file name and is skipped):
 *
 *   crc          read the whole disk and print  "disk: N sectors, crc32 xxxxxxxx"
 *                N in decimal, the CRC-32 of all N*512 bytes in 8 lowercase hex digits,
 *                the CRC zlib's crc32() computes (polynomial 0x04C11DB7 reflected, i.e.
 *                0xEDB88320, initial value and final XOR 0xFFFFFFFF).
 *   write SEED [FLUSH_EVERY]
 *                fill the whole disk with the pattern below, flush (if the device offers
 *                VIRTIO_BLK_F_FLUSH), and print  "written: N sectors"; with FLUSH_EVERY,
 *                also flush after every FLUSH_EVERY requests (each such flush waits for
 *                the writes before it), so a host sees many flushes during the job
 *   id           ask for the device's serial (VIRTIO_BLK_T_GET_ID), print  serial: "..."
 *   bench KIND [DEPTH [SECONDS]]
 *                time the disk: KIND is seqread, seqwrite or randread, with DEPTH requests
 *                in flight (default 8, at most 32) for SECONDS seconds (default 3); one
 *                result line "bench KIND: ..." (bench.c says what each does and prints)
 *
 * Options (anywhere on the command line):
 *   virtio_mmio.device=<size>@<base>:<irq>   a virtio-mmio device (virtio-mmio.c)
 *   pci.bar=<address>                        where to place PCI BARs (virtio-pci.c)
 * Any other word with an '=' is ignored, as Linux ignores parameters it does not know.
 *
 * The write pattern. SEED is a 32-bit number ("0x" hexadecimal or decimal). Sector s (its
 * number taken modulo 2^32) holds 128 little-endian 32-bit words w[0..127]:
 *
 *     x = SEED XOR (s * 0x9E3779B9 mod 2^32);  if x == 0 then x = 0x9E3779B9
 *     for i in 0..127:
 *         x ^= x << 13 (mod 2^32);  x ^= x >> 17;  x ^= x << 5 (mod 2^32)     (xorshift32)
 *         w[i] = x
 *
 * The multiplier is odd, so every sector of a disk below 2 TiB starts from a different x:
 * a sector written to the wrong place shows up.
 *
 * The device is looked for on the virtio-mmio windows of the command line first, then on
 * PCI bus 0; the first block device found is used. Success ends the VM with exit code 0
 * (status 1); any error prints one "virtio-blk: error: ..." line and exits with 1
 * (status 3).
 */
#include "blk.h"
#include "kernel.h"
#include "bench.h"

const char program_name[] = "virtio-blk";

/* ---- CRC-32 (the one of zlib, gzip, PNG, Ethernet) --------------------------------------------
 * A CRC is the remainder of the message, as a polynomial over GF(2), divided by a fixed
 * polynomial. The "reflected" form processes the least significant bit of each byte first;
 * the table holds the remainder for each possible byte, so the loop does one byte per step. */
static uint32_t crc_table[256];

static void crc32_init(void)
{
    for (uint32_t n = 0; n < 256; n++) {
        uint32_t c = n;
        for (int k = 0; k < 8; k++)
            c = (c & 1) ? 0xEDB88320u ^ (c >> 1) : c >> 1;
        crc_table[n] = c;
    }
}

/* Like zlib's crc32(crc, buffer, length): start with crc = 0, feed the pieces in order. */
static uint32_t crc32_update(uint32_t crc, const uint8_t *p, uint32_t length)
{
    uint32_t c = crc ^ 0xFFFFFFFFu;
    while (length--)
        c = crc_table[(c ^ *p++) & 0xFF] ^ (c >> 8);
    return c ^ 0xFFFFFFFFu;
}

/* ---- the write pattern (see the top of this file) -------------------------------------------- */
static void fill_sector(uint32_t *words, uint32_t seed, uint64_t sector)
{
    uint32_t x = seed ^ ((uint32_t)sector * 0x9E3779B9u);
    if (x == 0)
        x = 0x9E3779B9u;
    for (int i = 0; i < SECTOR_BYTES / 4; i++) {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        words[i] = x;
    }
}

/* ---- the command line ------------------------------------------------------------------------- */

/* Finds the job words: the words of `cmdline` without an '=' (skipping the first word when
 * it is Multiboot's kernel name). Up to `max` of them, each copied into words[i]. */
static int job_words(const char *cmdline, bool skip_first, char words[][32], int max)
{
    int count = 0;
    bool first = true;
    for (const char *p = cmdline; *p;) {
        while (*p == ' ' || *p == '\t')
            p++;
        if (!*p)
            break;
        const char *word = p;
        bool option = false;
        while (*p && *p != ' ' && *p != '\t')
            option |= *p++ == '=';
        if (first && skip_first) {
            first = false;
            continue;
        }
        first = false;
        if (option)
            continue;
        if (count < max)
            copy_word(words[count], sizeof(words[count]), word);
        count++;
    }
    return count;
}

static bool equal(const char *a, const char *b)
{
    while (*a && *a == *b)
        a++, b++;
    return *a == *b;
}

/* ---- jobs ------------------------------------------------------------------------------------- */

static struct blk blk;

/* The disk is read (or written) in chunks of blk.request_bytes. Chunk c goes to slot
 * c mod slots, so up to `slots` chunks are in flight; the oldest chunk is always waited
 * for first, which keeps the CRC in disk order while the device works on the next ones. */
static uint32_t slot_of(uint64_t chunk)
{
    return (uint32_t)(chunk % blk.slots);
}

/* How often the driver notified the device, and how often it could skip it because the
 * device had set VIRTQ_USED_F_NO_NOTIFY (it was still working through the ring). */

static void print_statistics(uint64_t requests)
{

    kprintf("virtio-blk: %lu requests, %u notifications sent, %u skipped (VIRTQ_USED_F_NO_NOTIFY)\n", requests,
            blk.vq.notifications, blk.vq.suppressed);
}

static void job_crc(void)
{
    crc32_init();
    uint32_t chunk_sectors = blk.request_bytes / SECTOR_BYTES;
    uint64_t chunks = (blk.capacity + chunk_sectors - 1) / chunk_sectors;
    uint64_t submitted = 0, finished = 0;
    uint32_t crc = 0;
    while (finished < chunks) {
        /* Keep every slot busy. */
        bool added = false;
        while (submitted < chunks && submitted - finished < blk.slots) {
            uint64_t sector = submitted * chunk_sectors;
            uint64_t left = blk.capacity - sector;
            uint32_t sectors = left < chunk_sectors ? (uint32_t)left : chunk_sectors;
            blk_submit(&blk, slot_of(submitted), VIRTIO_BLK_T_IN, sector, sectors * SECTOR_BYTES);
            submitted++;
            added = true;
        }
        if (added)
            blk_kick(&blk);
        /* Wait for the oldest, and fold it into the CRC. */
        uint32_t slot = slot_of(finished);
        blk_wait(&blk, slot);
        crc = crc32_update(crc, blk.requests[slot].data, blk.requests[slot].data_bytes);
        finished++;
    }
    print_statistics(chunks);
    kprintf("disk: %lu sectors, crc32 %08x\n", blk.capacity, crc);
}

/* Sends a flush and waits for it (slot 0 must be free). */
static void flush_disk(void)
{
    blk_submit(&blk, 0, VIRTIO_BLK_T_FLUSH, 0, 0);
    blk_kick(&blk);
    blk_wait(&blk, 0);
}

static void job_write(uint32_t seed, uint64_t flush_every)
{
    if (blk.features & VIRTIO_BLK_F_RO)
        fail("%s: the device is read-only (VIRTIO_BLK_F_RO): nothing written", blk.dev->where);
    uint32_t chunk_sectors = blk.request_bytes / SECTOR_BYTES;
    uint64_t chunks = (blk.capacity + chunk_sectors - 1) / chunk_sectors;
    uint64_t submitted = 0, finished = 0, flushes = 0;
    bool can_flush = (blk.features & VIRTIO_BLK_F_FLUSH) != 0;
    /* Requests up to here go out before the next intermediate flush. */
    uint64_t stop = flush_every && can_flush && flush_every < chunks ? flush_every : chunks;
    while (finished < chunks) {
        bool added = false;
        while (submitted < stop && submitted - finished < blk.slots) {
            uint64_t sector = submitted * chunk_sectors;
            uint64_t left = blk.capacity - sector;
            uint32_t sectors = left < chunk_sectors ? (uint32_t)left : chunk_sectors;
            struct blk_request *r = &blk.requests[slot_of(submitted)];
            for (uint32_t i = 0; i < sectors; i++)
                fill_sector((uint32_t *)(r->data + i * SECTOR_BYTES), seed, sector + i);
            blk_submit(&blk, slot_of(submitted), VIRTIO_BLK_T_OUT, sector, sectors * SECTOR_BYTES);
            submitted++;
            added = true;
        }
        if (added)
            blk_kick(&blk);
        blk_wait(&blk, slot_of(finished));
        finished++;
        if (finished == stop && stop < chunks) {
            /* Every request before the flush is done, so every slot is free. */
            flush_disk();
            flushes++;
            stop = stop + flush_every < chunks ? stop + flush_every : chunks;
        }
    }
    /* Every write has completed; a flush makes them durable (5.2.6: "A flush ... commits
     * the writes that have completed"). Without VIRTIO_BLK_F_FLUSH, the device has no flush
     * request, and a write is durable when it completes. */
    if (can_flush) {
        flush_disk();
    } else {
        kprintf("virtio-blk: the device does not offer VIRTIO_BLK_F_FLUSH: no flush sent\n");
    }
    print_statistics(chunks + flushes + (can_flush ? 1 : 0));
    kprintf("written: %lu sectors\n", blk.capacity);
}

static void job_id(void)
{
    blk_submit(&blk, 0, VIRTIO_BLK_T_GET_ID, 0, VIRTIO_BLK_ID_BYTES);
    blk_kick(&blk);
    blk_wait(&blk, 0);
    /* Up to 20 bytes, NUL-padded; no NUL when it is 20 bytes long (5.2.6). */
    const uint8_t *id = blk.requests[0].data;
    kprintf("serial: \"");
    for (int i = 0; i < VIRTIO_BLK_ID_BYTES && id[i]; i++) {
        if (id[i] >= 0x20 && id[i] < 0x7F && id[i] != '"' && id[i] != '\\')
            kprintf("%c", id[i]);
        else
            kprintf("\\x%02x", id[i]);
    }
    kprintf("\"\n");
}

void user_main(void)
{
    const char *cmdline = boot_info.cmdline;
    char words[4][32];
    int count = job_words(cmdline, boot_info.protocol == BOOT_MULTIBOOT, words, 4);
    if (count == 0)
        fail("no job on the command line (\"%s\"): expected crc, write SEED, id or bench KIND", cmdline);

    /* Check the job before touching any device. */
    uint64_t seed = 0, flush_every = 0;
    enum bench_kind bench_kind = BENCH_SEQREAD;
    uint64_t bench_depth = BENCH_DEFAULT_DEPTH, bench_seconds = BENCH_DEFAULT_SECONDS;
    if (equal(words[0], "bench")) {
        if (count < 2 || count > 4 || !bench_kind_from_name(words[1], &bench_kind))
            fail("bench needs a KIND (seqread, seqwrite or randread), then optionally DEPTH and SECONDS");
        size_t n;
        if (count >= 3 && ((n = parse_u64(words[2], &bench_depth)) == 0 || words[2][n] != 0 || bench_depth == 0 ||
                           bench_depth > BLK_MAX_REQUESTS))
            fail("bench: DEPTH \"%s\" must be a number from 1 to %u", words[2], BLK_MAX_REQUESTS);
        if (count == 4 && ((n = parse_u64(words[3], &bench_seconds)) == 0 || words[3][n] != 0 ||
                           bench_seconds == 0 || bench_seconds > BENCH_MAX_SECONDS))
            fail("bench: SECONDS \"%s\" must be a number from 1 to %u", words[3], BENCH_MAX_SECONDS);
    } else if (equal(words[0], "write")) {
        size_t n = count >= 2 ? parse_u64(words[1], &seed) : 0;
        if (count < 2 || count > 3 || n == 0 || words[1][n] != 0 || seed > 0xFFFFFFFFu)
            fail("write needs one SEED, a 32-bit number (decimal or 0x hexadecimal), then optionally FLUSH_EVERY");
        if (count == 3 && ((n = parse_u64(words[2], &flush_every)) == 0 || words[2][n] != 0 || flush_every == 0))
            fail("write: FLUSH_EVERY \"%s\" must be a number of requests, at least 1", words[2]);
    } else if (equal(words[0], "crc") || equal(words[0], "id")) {
        if (count != 1)
            fail("%s takes no argument, but the command line has %d words for the job", words[0], count);
    } else {
        fail("unknown job \"%s\": expected crc, write SEED, id or bench KIND", words[0]);
    }
    uint16_t cs;
    __asm__("mov %%cs, %0" : "=r"(cs));  /* the low two bits of CS: the privilege level */
    kprintf("virtio-blk: booted by %s, running at CPL %u, command line \"%s\"\n",
            boot_info.protocol == BOOT_MULTIBOOT ? "Multiboot" : "PVH", cs & 3u, cmdline);

    static struct virtio_device device;
    if (!virtio_mmio_find(cmdline, VIRTIO_ID_BLOCK, &device) && !virtio_pci_find(cmdline, VIRTIO_ID_BLOCK, &device))
        fail("no virtio block device found (looked at the virtio_mmio.device= windows of the command line, "
             "then PCI bus 0 for 1af4:1042 and 1af4:1001)");
    bool bench = equal(words[0], "bench");
    blk_init(&blk, &device, bench ? (uint32_t)bench_depth : 0);

    if (bench)
        bench_run(&blk, bench_kind, (uint32_t)bench_depth, (uint32_t)bench_seconds);
    else if (equal(words[0], "crc"))
        job_crc();
    else if (equal(words[0], "write"))
        job_write((uint32_t)seed, flush_every);
    else
        job_id();
    exit_vm(0);
}
