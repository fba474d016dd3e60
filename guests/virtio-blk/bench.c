/*
 * bench.c: the benchmark jobs. They keep the device busy for a few seconds with a fixed
 * access pattern and time it with the time-stamp counter, from ring 3, so that what is
 * measured is the device and the VMM, not the guest (on the project's nested build hosts
 * ring 0 code is emulated; ring 3 code runs natively).
 *
 *   bench seqread  [DEPTH [SECONDS]]   64 KiB reads in disk order, wrapping at the end
 *   bench seqwrite [DEPTH [SECONDS]]   64 KiB writes in disk order, wrapping at the end,
 *                                      then one flush (timed on its own)
 *   bench randread [DEPTH [SECONDS]]   4 KiB reads at random 4 KiB-aligned offsets
 *
 * DEPTH requests are kept in flight (default 8, at most 32: fewer if the queue cannot hold
 * them), for SECONDS seconds (default 3). Each completion is checked (status byte, used
 * length) and its slot refilled at once; what completes together is published with one
 * notification. Once the time is up no new request is started, and the clock stops when
 * the last one in flight completes. Before the clock starts, one request per slot is done
 * untimed (a warm-up: the buffers' pages are touched, the device's threads are awake).
 *
 * The result, one line:
 *   bench seqread: depth 8, 41201 requests of 65536 bytes, 2700148736 bytes in 3000127 us
 * and for seqwrite also ", flush N us" at its end (", no flush ..." if the device offers no
 * VIRTIO_BLK_F_FLUSH).
 *
 * The clock: the TSC, read with RDTSC (allowed at CPL 3). Its frequency comes from the
 * hypervisor's timing leaf, CPUID 0x40000010 EAX (kHz; KVM-based VMMs and VMware set it
 * when the TSC rate is known), and when that is missing from a calibration against the
 * 8254 PIT: channel 0 counts down at 1.193182 MHz; we program it (mode 2, the full 65536
 * count), latch and read it through ports 0x40/0x43 until 20 ms of PIT time have passed,
 * and divide the TSC ticks by that time; five such windows, and the median counts. Each
 * PIT access leaves the guest; a window's two end points are the quickest of 5 reads each,
 * so a vCPU descheduled in the middle of one does not skew it, and the median drops a
 * window in which the vCPU lost the CPU for longer than the PIT's 55 ms wrap.
 */
#include "bench.h"

/* ---- the clock --------------------------------------------------------------------------- */

static void cpuid(uint32_t leaf, uint32_t *a, uint32_t *b, uint32_t *c, uint32_t *d)
{
    __asm__ volatile("cpuid" : "=a"(*a), "=b"(*b), "=c"(*c), "=d"(*d) : "a"(leaf), "c"(0));
}

/* The TSC frequency in Hz from CPUID 0x40000010, or 0. The hypervisor leaves (from
 * 0x40000000) mean something only when leaf 1 ECX bit 31 says a hypervisor is present. */
static uint64_t tsc_hz_from_cpuid(void)
{
    uint32_t a, b, c, d;
    cpuid(1, &a, &b, &c, &d);
    if (!(c & (1u << 31)))
        return 0;
    cpuid(0x40000000, &a, &b, &c, &d);
    if (a < 0x40000010 || a > 0x400000FF)
        return 0;
    cpuid(0x40000010, &a, &b, &c, &d);
    return (uint64_t)a * 1000;
}

#define PIT_HZ 1193182u
#define PIT_CHANNEL0 0x40
#define PIT_COMMAND 0x43

/* Latches channel 0's count (command 0x00: channel 0, latch) and reads it, low byte first. */
static uint16_t pit_count(void)
{
    outb(PIT_COMMAND, 0x00);
    uint8_t low = inb(PIT_CHANNEL0);
    uint8_t high = inb(PIT_CHANNEL0);
    return (uint16_t)(low | high << 8);
}

/* One PIT reading and the TSC at that moment: the quickest of 5 reads (a read that took
 * long, because the vCPU was descheduled in the middle, says little about when the count
 * was latched), its TSC taken halfway. */
static void pit_sample(uint16_t *count, uint64_t *tsc)
{
    uint64_t best = ~0ull;
    for (int i = 0; i < 5; i++) {
        uint64_t before = rdtsc();
        uint16_t value = pit_count();
        uint64_t took = rdtsc() - before;
        if (took < best) {
            best = took;
            *count = value;
            *tsc = before + took / 2;
        }
    }
}

/* One measurement: TSC ticks per PIT tick over 20 ms of PIT time, in Hz; 0 if the PIT
 * does not count. The count wraps every 55 ms; reading it far more often than that, the
 * difference of two reads modulo 65536 is the time between them. A vCPU descheduled for
 * longer than 55 ms in between loses a wrap and makes the window's figure too high. */
static uint64_t pit_window(void)
{
    uint16_t last, count;
    uint64_t start, end;
    pit_sample(&last, &start);
    uint64_t ticks = 0;
    while (ticks < PIT_HZ / 50) {
        count = pit_count();
        ticks += (uint16_t)(last - count);
        last = count;
        if (rdtsc() - start > (1ull << 34))    /* 5 s or more of TSC and no 20 ms of PIT */
            return 0;
    }
    /* The end point, read carefully too: the ticks from the last loop read to it. */
    pit_sample(&count, &end);
    ticks += (uint16_t)(last - count);
    return (end - start) * PIT_HZ / ticks;
}

/* The TSC frequency in Hz measured against the PIT: the median of 5 windows of 20 ms, so
 * that one or two windows spoilt by a descheduled vCPU do not count; 0 if the PIT does not
 * count. */
static uint64_t tsc_hz_from_pit(void)
{
    /* Channel 0, low then high byte, mode 2 (rate generator), binary; reload 0 = 65536. */
    outb(PIT_COMMAND, 0x34);
    outb(PIT_CHANNEL0, 0);
    outb(PIT_CHANNEL0, 0);
    uint64_t windows[5];
    for (int i = 0; i < 5; i++) {
        windows[i] = pit_window();
        if (windows[i] == 0)
            return 0;
        for (int j = i; j > 0 && windows[j] < windows[j - 1]; j--) {
            uint64_t t = windows[j];
            windows[j] = windows[j - 1];
            windows[j - 1] = t;
        }
    }
    return windows[2];
}

static uint64_t tsc_hz;

static void clock_init(void)
{
    const char *source = "CPUID 0x40000010";
    tsc_hz = tsc_hz_from_cpuid();
    if (tsc_hz == 0) {
        source = "calibrated against the PIT";
        tsc_hz = tsc_hz_from_pit();
    }
    if (tsc_hz == 0)
        fail("bench: no TSC frequency: CPUID 0x40000010 has none and the PIT (ports 0x40, 0x43) does not count");
    kprintf("virtio-blk: TSC at %lu.%03lu MHz (%s)\n", tsc_hz / 1000000, tsc_hz / 1000 % 1000, source);
}

static uint64_t ticks_to_us(uint64_t ticks)
{
    /* ticks * 10^6 overflows 64 bits only after 5 hours at 1 GHz. */
    return ticks * 1000000 / tsc_hz;
}

/* ---- the access patterns ------------------------------------------------------------------- */

static const char *const kind_names[] = {
    [BENCH_SEQREAD] = "seqread",
    [BENCH_SEQWRITE] = "seqwrite",
    [BENCH_RANDREAD] = "randread",
};

static bool same(const char *a, const char *b)
{
    while (*a && *a == *b)
        a++, b++;
    return *a == *b;
}

bool bench_kind_from_name(const char *name, enum bench_kind *kind)
{
    for (uint32_t i = 0; i < ARRAY_SIZE(kind_names); i++) {
        if (same(name, kind_names[i])) {
            *kind = (enum bench_kind)i;
            return true;
        }
    }
    return false;
}

/* Where the next request goes: in disk order for the sequential jobs, uniformly at random
 * (xorshift64*, a fixed seed: every run reads the same offsets) for randread. */
struct pattern {
    enum bench_kind kind;
    uint64_t requests_per_disk;         /* whole requests that fit on the disk */
    uint64_t next;                      /* sequential: the next request's index */
    uint64_t random;                    /* randread: the generator's state */
};

static uint64_t next_request(struct pattern *p)
{
    if (p->kind != BENCH_RANDREAD) {
        uint64_t index = p->next;
        p->next = index + 1 == p->requests_per_disk ? 0 : index + 1;
        return index;
    }
    p->random ^= p->random >> 12;
    p->random ^= p->random << 25;
    p->random ^= p->random >> 27;
    return (p->random * 0x2545F4914F6CDD1Dull >> 11) % p->requests_per_disk;
}

/* ---- the job ------------------------------------------------------------------------------- */

void bench_run(struct blk *blk, enum bench_kind kind, uint32_t depth, uint32_t seconds)
{
    const char *name = kind_names[kind];
    uint32_t type = kind == BENCH_SEQWRITE ? VIRTIO_BLK_T_OUT : VIRTIO_BLK_T_IN;
    uint32_t bytes = kind == BENCH_RANDREAD ? 4096 : blk->request_bytes;
    if (kind == BENCH_SEQWRITE && (blk->features & VIRTIO_BLK_F_RO))
        fail("%s: the device is read-only (VIRTIO_BLK_F_RO): no bench %s", blk->dev->where, name);
    if (bytes > blk->request_bytes)
        fail("bench %s: requests of %u bytes, but the device takes at most %u", name, bytes, blk->request_bytes);
    if (depth > blk->slots)
        kprintf("virtio-blk: bench %s: depth %u asked, the queue holds %u requests: depth %u\n", name, depth,
                blk->slots, blk->slots);
    depth = blk->slots;

    struct pattern pattern = { kind, blk->capacity * SECTOR_BYTES / bytes, 0, 0x9E3779B97F4A7C15ull };
    if (pattern.requests_per_disk == 0)
        fail("bench %s: the disk (%lu sectors) is smaller than one request of %u bytes", name, blk->capacity, bytes);
    /* What the writes write: a fixed pattern (not zeros, which a disk layer might treat
     * specially), made once, outside the timed loop. */
    if (type == VIRTIO_BLK_T_OUT)
        for (uint32_t slot = 0; slot < depth; slot++)
            for (uint32_t i = 0; i < bytes / 4; i++)
                ((uint32_t *)blk->requests[slot].data)[i] = 0x9E3779B9u * (slot * (bytes / 4) + i + 1);

    clock_init();

    /* Warm-up: one request per slot, untimed. */
    for (uint32_t slot = 0; slot < depth; slot++)
        blk_submit(blk, slot, type, next_request(&pattern) * (bytes / SECTOR_BYTES), bytes);
    blk_kick(blk);
    for (uint32_t slot = 0; slot < depth; slot++)
        blk_wait(blk, slot);

    uint32_t notifications = blk->vq.notifications, suppressed = blk->vq.suppressed;
    uint64_t notify_ticks = blk->vq.notify_ticks;
    uint64_t completed = 0, in_flight = 0;
    uint64_t start = rdtsc();
    uint64_t stop_at = start + (uint64_t)seconds * tsc_hz;
    bool stopping = false;
    for (uint32_t slot = 0; slot < depth; slot++, in_flight++)
        blk_submit(blk, slot, type, next_request(&pattern) * (bytes / SECTOR_BYTES), bytes);
    blk_kick(blk);
    while (in_flight > 0) {
        uint32_t slot = blk_wait_any(blk);
        bool added = false;
        do {
            in_flight--;
            completed++;
            if (!stopping && rdtsc() >= stop_at)
                stopping = true;
            if (!stopping) {
                blk_submit(blk, slot, type, next_request(&pattern) * (bytes / SECTOR_BYTES), bytes);
                in_flight++;
                added = true;
            }
        } while (blk_take_done(blk, &slot));
        if (added)
            blk_kick(blk);
    }
    uint64_t elapsed = rdtsc() - start;

    uint64_t flush_ticks = 0;
    if (type == VIRTIO_BLK_T_OUT && (blk->features & VIRTIO_BLK_F_FLUSH)) {
        uint64_t flush_start = rdtsc();
        blk_submit(blk, 0, VIRTIO_BLK_T_FLUSH, 0, 0);
        blk_kick(blk);
        blk_wait(blk, 0);
        flush_ticks = rdtsc() - flush_start;
    }

    uint32_t sent = blk->vq.notifications - notifications;
    kprintf("virtio-blk: bench %s: %u notifications sent, %u skipped (VIRTQ_USED_F_NO_NOTIFY), %lu ns each\n",
            name, sent, blk->vq.suppressed - suppressed,
            sent ? ticks_to_us((blk->vq.notify_ticks - notify_ticks) * 1000 / sent) : 0);
    kprintf("bench %s: depth %u, %lu requests of %u bytes, %lu bytes in %lu us", name, depth, completed, bytes,
            completed * bytes, ticks_to_us(elapsed));
    if (type == VIRTIO_BLK_T_OUT && (blk->features & VIRTIO_BLK_F_FLUSH))
        kprintf(", flush %lu us", ticks_to_us(flush_ticks));
    else if (type == VIRTIO_BLK_T_OUT)
        kprintf(", no flush (VIRTIO_BLK_F_FLUSH not offered)");
    kprintf("\n");
}
