/*
 * main.c: the ring 3 program of the virtio-net guest: read the command line, find the
 * network device, then answer the network until the VM is stopped (or for timeout=
 * seconds).
 *
 * Command line (words with '='; with Multiboot the first word, the kernel's file name, is
 * skipped):
 *   ip=A.B.C.D          our IPv4 address (required)
 *   mac=XX:XX:XX:XX:XX:XX  our Ethernet address; VIRTIO_NET_F_MAC is then not accepted.
 *                       Default: the device's (F_MAC), else 02:00:A:B:C:D (locally
 *                       administered, made from the IPv4 address)
 *   timeout=SECONDS     stop after that long (the time-stamp counter, calibrated against
 *                       the PIT), print the counters and exit with status 1 (code 0)
 *   mrg_rxbuf=off       do not accept VIRTIO_NET_F_MRG_RXBUF (default: accept it if offered)
 *   tx=split            transmit each frame as two descriptors, header and frame (default:
 *                       tx=one, a single descriptor holding both)
 *   virtio_mmio.device=<size>@<base>:<irq>, pci.bar=<address>: as for the virtio-blk guest
 * Other words with '=' are ignored, as Linux ignores parameters it does not know.
 *
 * What it answers (inet.c):
 *   ARP requests for ip=, ICMP echo requests (ping), UDP to port 7 (echo: the datagram goes
 *   back to its sender unchanged), UDP to port 9 (discard: counted), and text commands on
 *   UDP port 5555 (control):
 *     "stats"                      one line of counters comes back
 *     "send COUNT SIZE PORT"       COUNT frames of SIZE bytes (the whole Ethernet frame,
 *                                  50 to 1514) go to the sender's address, UDP port PORT,
 *                                  as fast as the device takes them; then one line, "sent
 *                                  ...", comes back to the command's source port. Payload:
 *                                  a 64-bit big-endian sequence number from 0, then bytes
 *                                  i & 0xFF for i = 8, 9, ... (i the payload offset).
 *
 * The device is looked for on the virtio-mmio windows of the command line first, then on
 * PCI bus 0. Errors print one "virtio-net: error: ..." line and exit with code 1 (status 3).
 */
#include "inet.h"
#include "kernel.h"

const char program_name[] = "virtio-net";

/* ---- the command line ----------------------------------------------------------------------- */

/* The value of option `key` ("ip="), or NULL. Words are separated by spaces or tabs. */
static const char *option(const char *cmdline, const char *key)
{
    for (const char *p = cmdline; *p; p++)
        if ((p == cmdline || p[-1] == ' ' || p[-1] == '\t') && starts_with(p, key))
            return p + strlen(key);
    return NULL;
}

static bool word_end(char c) { return c == 0 || c == ' ' || c == '\t'; }

static bool word_is(const char *value, const char *text)
{
    size_t n = strlen(text);
    for (size_t i = 0; i < n; i++)
        if (value[i] != text[i])
            return false;
    return word_end(value[n]);
}

/* "192.0.2.2" -> 0xC0000202. */
static bool parse_ipv4(const char *s, uint32_t *address)
{
    uint32_t result = 0;
    for (int i = 0; i < 4; i++) {
        uint64_t part;
        size_t n = parse_u64(s, &part);
        if (n == 0 || part > 255 || (s[0] == '0' && n > 1))
            return false;
        s += n;
        result = result << 8 | (uint32_t)part;
        if (i < 3 && *s++ != '.')
            return false;
    }
    *address = result;
    return word_end(*s);
}

static int hex_digit(char c)
{
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
}

/* "52:54:00:12:34:56" -> 6 bytes. A multicast address (bit 0 of the first byte) is refused:
 * no station may have one. */
static bool parse_mac(const char *s, uint8_t mac[6])
{
    for (int i = 0; i < 6; i++) {
        int high = hex_digit(s[0]), low = high < 0 ? -1 : hex_digit(s[1]);
        if (low < 0)
            return false;
        mac[i] = (uint8_t)(high << 4 | low);
        s += 2;
        if (i < 5 && *s++ != ':')
            return false;
    }
    return word_end(*s) && !(mac[0] & 1);
}

/* Parses a decimal number in the word at `s`; false if the word is anything else. */
static bool parse_word_u64(const char *s, uint64_t *value)
{
    size_t n = parse_u64(s, value);
    return n > 0 && word_end(s[n]);
}

/* Every word must be an option (key=value): a bare word is probably a typo. */
static void check_words(const char *cmdline, bool skip_first)
{
    bool first = true;
    for (const char *p = cmdline; *p;) {
        while (*p == ' ' || *p == '\t')
            p++;
        if (!*p)
            break;
        const char *word = p;
        bool has_equals = false;
        while (*p && *p != ' ' && *p != '\t')
            has_equals |= *p++ == '=';
        if (first && skip_first) {
            first = false;
            continue;
        }
        first = false;
        if (!has_equals) {
            char text[40];
            copy_word(text, sizeof(text), word);
            fail("unexpected word \"%s\" on the command line: this guest takes only options (ip=, mac=, timeout=, "
                 "mrg_rxbuf=, tx=)", text);
        }
    }
}

/* ---- time: the TSC, calibrated against the PIT ----------------------------------------------
 * The time-stamp counter counts at a constant rate, but which rate is not architectural.
 * The 8254 PIT counts at 1 193 182 Hz everywhere. Its channel 2 (whose gate and output are
 * bits 0 and 5 of port 0x61, for the PC speaker) is free for this: load it with N in mode 0
 * ("interrupt on terminal count": the output goes high after N ticks), and count TSC ticks
 * until the output goes high. Linux does the same (pit_calibrate_tsc). */
#define PIT_HZ 1193182u
#define PIT_CALIBRATION_TICKS 59659u    /* 50 ms */

static uint64_t tsc_hz;                 /* 0: unknown (no PIT) */

static void calibrate_tsc(void)
{
    outb(0x61, (uint8_t)((inb(0x61) & ~0x02) | 0x01)); /* gate 2 on, speaker off */
    outb(0x43, 0xB0);                   /* channel 2, low byte then high byte, mode 0, binary */
    outb(0x42, PIT_CALIBRATION_TICKS & 0xFF);
    uint64_t start = rdtsc();
    outb(0x42, PIT_CALIBRATION_TICKS >> 8); /* counting starts with the high byte */
    /* In mode 0 the output is low from the mode write until the count runs out. High
     * already: nothing answers at port 0x61 (a read of all ones), so there is no clock. */
    if (inb(0x61) & 0x20)
        return;
    while (!(inb(0x61) & 0x20)) {       /* output 2 high: terminal count */
        if (rdtsc() - start > (1ull << 36))
            return;                     /* never: the PIT does not count */
    }
    uint64_t ticks = rdtsc() - start;
    tsc_hz = ticks * PIT_HZ / PIT_CALIBRATION_TICKS;
}

/* ---- the services ---------------------------------------------------------------------------- */

static struct net net;
static struct inet inet;

/* One line of counters (the "stats" command, and the exit). */
static void format_counters(char *out, size_t capacity)
{
    const struct net_counters *n = &net.counters;
    const struct inet_counters *c = &inet.counters;
    ksnprintf(out, capacity,
              "rx %lu frames %lu bytes, tx %lu frames %lu bytes, arp %lu, ping %lu, echo %lu, discard %lu "
              "(%lu bytes), control %lu; dropped: not-for-us %lu, unsupported %lu, malformed %lu, checksum %lu, "
              "device-header %lu, oversize %lu, tx-full %lu; merged %lu, num_buffers-not-1 %lu; "
              "notifications rx %u tx %u, suppressed rx %u tx %u",
              n->rx_frames, n->rx_bytes, n->tx_frames, n->tx_bytes, c->arp_replies, c->ping_replies, c->udp_echoed,
              c->udp_discarded, c->udp_discarded_bytes, c->control, c->not_for_us, c->unsupported, c->malformed,
              c->bad_checksum, n->rx_bad, n->rx_oversize, n->tx_full, n->rx_merged, n->rx_num_buffers,
              net.rx.notifications, net.tx.notifications, net.rx.suppressed, net.tx.suppressed);
}

/* "send COUNT SIZE PORT": COUNT frames of SIZE bytes to the requester, as fast as the
 * device takes them. Every transmit slot gets the same frame first (the headers and the
 * payload pattern); then each frame only needs its sequence number and UDP checksum. The
 * checksum is updated, not recomputed: the sum over everything but the sequence number
 * is the same for every frame (RFC 1624's incremental update). */
static void blast(const struct udp_datagram *request, uint64_t count, uint32_t size, uint16_t port)
{
    uint32_t length = size - UDP_PAYLOAD_OFFSET;
    /* Wait until every slot is back: they are about to be overwritten. */
    struct deadline deadline;
    deadline_start(&deadline);
    while (net_tx_reclaim(&net), net.tx_free_count < net.tx_slots) {
        net_flush(&net);
        if (deadline_passed(&deadline))
            fail("%s: %u transmit slots never came back", net.dev->where, net.tx_slots - net.tx_free_count);
        cpu_relax();
    }
    uint32_t base_sum = 0;
    for (uint32_t slot = 0; slot < net.tx_slots; slot++) {
        uint8_t *frame = net_tx_frame(&net, slot);
        uint8_t *payload = frame + UDP_PAYLOAD_OFFSET;
        for (uint32_t i = 0; i < length; i++)
            payload[i] = i < 8 ? 0 : (uint8_t)i;
        inet_build_udp(&inet, frame, request->src_mac, request->src_ip, UDP_PORT_CONTROL, port, length);
        if (slot == 0) {
            /* The checksum field holds ~sum, the sum of everything else (sequence number
             * 0): so ~field is that sum, and adding a sequence number's two words to it
             * gives the sum of that frame. */
            uint8_t *udp = frame + ETH_HEADER_BYTES + IPV4_HEADER_BYTES;
            base_sum = (uint16_t)~get_be16(udp + 6);
        }
    }

    uint64_t start = rdtsc(), sent = 0;
    deadline_start(&deadline);
    while (sent < count) {
        uint32_t slot;
        bool queued = false;
        while (sent < count && net_tx_try_slot(&net, &slot)) {
            uint8_t *frame = net_tx_frame(&net, slot);
            uint8_t *udp = frame + ETH_HEADER_BYTES + IPV4_HEADER_BYTES;
            put_be32(udp + UDP_HEADER_BYTES + 4, (uint32_t)sent); /* bytes 0-3 stay 0 */
            uint32_t sum = base_sum + (uint32_t)(sent >> 16 & 0xFFFF) + (uint32_t)(sent & 0xFFFF);
            uint16_t checksum = checksum_finish(sum);
            put_be16(udp + 6, checksum == 0 ? 0xFFFF : checksum);
            net_tx_send(&net, slot, size);
            sent++;
            queued = true;
            if (net.tx_pending == 64)   /* let the device start on a long batch early */
                net_flush(&net);
        }
        net_flush(&net);
        if (queued) {
            deadline_start(&deadline);
        } else {
            if (deadline_passed(&deadline))
                fail("%s: the device took no transmit buffer for 10 s (sent %lu of %lu)", net.dev->where, sent, count);
            cpu_relax();
        }
    }
    deadline_start(&deadline);
    while (net_tx_reclaim(&net), net.tx_free_count < net.tx_slots) {
        if (deadline_passed(&deadline))  /* until the device has sent the last one */
            fail("%s: %u transmit slots never came back", net.dev->where, net.tx_slots - net.tx_free_count);
        cpu_relax();
    }
    uint64_t ticks = rdtsc() - start;

    char line[160];
    ksnprintf(line, sizeof(line), "sent %lu frames of %u bytes in %lu TSC ticks, TSC %lu Hz", count, size, ticks, tsc_hz);
    inet_send_udp(&inet, request->src_mac, request->src_ip, UDP_PORT_CONTROL, request->src_port, (const uint8_t *)line,
                  (uint32_t)strlen(line));
}

static void control(const struct udp_datagram *d)
{
    inet.counters.control++;
    char command[96];
    uint32_t n = d->length < sizeof(command) - 1 ? d->length : (uint32_t)sizeof(command) - 1;
    memcpy(command, d->payload, n);
    command[n] = 0;
    while (n > 0 && (command[n - 1] == '\n' || command[n - 1] == '\r'))
        command[--n] = 0;

    char reply[600];
    if (word_is(command, "stats")) {
        format_counters(reply, sizeof(reply));
    } else if (starts_with(command, "send ")) {
        /* send COUNT SIZE PORT */
        const char *p = command + 5;
        uint64_t values[3];
        int i = 0;
        for (; i < 3; i++) {
            while (*p == ' ')
                p++;
            size_t used = parse_u64(p, &values[i]);
            if (used == 0 || !(p[used] == ' ' || p[used] == 0))
                break;
            p += used;
        }
        if (i == 3 && values[0] >= 1 && values[0] <= 1000000000ull && values[1] >= UDP_PAYLOAD_OFFSET + 8 &&
            values[1] <= 1514 && values[2] >= 1 && values[2] <= 65535) {
            blast(d, values[0], (uint32_t)values[1], (uint16_t)values[2]);
            return;
        }
        ksnprintf(reply, sizeof(reply), "error: expected send COUNT SIZE PORT (COUNT 1-1000000000, SIZE %u-1514)",
                  UDP_PAYLOAD_OFFSET + 8);
    } else {
        ksnprintf(reply, sizeof(reply), "error: unknown command (stats, send COUNT SIZE PORT)");
    }
    inet_send_udp(&inet, d->src_mac, d->src_ip, UDP_PORT_CONTROL, d->src_port, (const uint8_t *)reply,
                  (uint32_t)strlen(reply));
}

void udp_deliver(struct inet *in, const struct udp_datagram *d)
{
    switch (d->dst_port) {
    case UDP_PORT_ECHO:
        /* Back to where it came from, from port 7: swap the addresses and ports, keep the
         * payload. (The UDP checksum would even stay the same: swapping two 16-bit words
         * does not change a ones' complement sum. inet_build_udp computes it anyway.) */
        if (inet_send_udp(in, d->src_mac, d->src_ip, UDP_PORT_ECHO, d->src_port, d->payload, d->length))
            in->counters.udp_echoed++;
        break;
    case UDP_PORT_DISCARD:
        in->counters.udp_discarded++;
        in->counters.udp_discarded_bytes += d->length;
        break;
    case UDP_PORT_CONTROL:
        control(d);
        break;
    default:
        in->counters.unsupported++;
        break;
    }
}

/* ---- the program ------------------------------------------------------------------------------ */

void user_main(void)
{
    const char *cmdline = boot_info.cmdline;
    bool multiboot = boot_info.protocol == BOOT_MULTIBOOT;
    check_words(cmdline, multiboot);

    /* Check the options before touching any device. */
    const char *value = option(cmdline, "ip=");
    uint32_t ip;
    if (!value || !parse_ipv4(value, &ip))
        fail("the command line needs ip=A.B.C.D, our IPv4 address (\"%s\")", cmdline);
    uint8_t mac[6];
    bool mac_given = false;
    if ((value = option(cmdline, "mac=")) != NULL) {
        if (!parse_mac(value, mac))
            fail("mac= needs six hexadecimal bytes separated by ':', not a multicast address");
        mac_given = true;
    }
    uint64_t timeout_seconds = 0;
    if ((value = option(cmdline, "timeout=")) != NULL && (!parse_word_u64(value, &timeout_seconds) || timeout_seconds == 0))
        fail("timeout= needs a number of seconds, at least 1");
    bool mrg_rxbuf = true;
    if ((value = option(cmdline, "mrg_rxbuf=")) != NULL) {
        if (word_is(value, "off"))
            mrg_rxbuf = false;
        else if (!word_is(value, "on"))
            fail("mrg_rxbuf= takes on or off");
    }
    enum net_tx_layout layout = NET_TX_ONE;
    if ((value = option(cmdline, "tx=")) != NULL) {
        if (word_is(value, "split"))
            layout = NET_TX_SPLIT;
        else if (!word_is(value, "one"))
            fail("tx= takes one or split");
    }

    uint16_t cs;
    __asm__("mov %%cs, %0" : "=r"(cs));  /* the low two bits of CS: the privilege level */
    kprintf("virtio-net: booted by %s, running at CPL %u, command line \"%s\"\n", multiboot ? "Multiboot" : "PVH",
            cs & 3u, cmdline);
    calibrate_tsc();
    if (timeout_seconds && !tsc_hz)
        fail("timeout= needs the PIT to measure the TSC's rate, and port 0x61 does not answer like one");

    static struct virtio_device device;
    if (!virtio_mmio_find(cmdline, VIRTIO_ID_NET, &device) && !virtio_pci_find(cmdline, VIRTIO_ID_NET, &device))
        fail("no virtio network device found (looked at the virtio_mmio.device= windows of the command line, "
             "then PCI bus 0 for 1af4:1041 and 1af4:1000)");
    net_init(&net, &device, mac_given ? mac : NULL, mrg_rxbuf, layout);
    if (!mac_given && !net.mac_from_device) {
        /* 5.1.5: without VIRTIO_NET_F_MAC the driver picks its own address: 02 (locally
         * administered, unicast), 00, then the IPv4 address. */
        uint8_t own[6] = { 0x02, 0x00, (uint8_t)(ip >> 24), (uint8_t)(ip >> 16), (uint8_t)(ip >> 8), (uint8_t)ip };
        memcpy(net.mac, own, 6);
    }
    inet.net = &net;
    inet.ip = ip;

    const uint8_t *m = net.mac;
    kprintf("virtio-net: mac %02x:%02x:%02x:%02x:%02x:%02x (%s), ip %u.%u.%u.%u, on %s\n", m[0], m[1], m[2], m[3],
            m[4], m[5], mac_given ? "from the command line" : net.mac_from_device ? "from the device" : "made up",
            ip >> 24, (ip >> 16) & 0xFF, (ip >> 8) & 0xFF, ip & 0xFF, device.where);
    if (tsc_hz)
        kprintf("virtio-net: TSC at %lu MHz (measured against the PIT)%s\n", tsc_hz / 1000000,
                timeout_seconds ? ", stopping after timeout=" : "");
    kprintf("virtio-net: ready: answering ARP, ICMP echo, UDP echo (port 7), discard (9) and control (5555)\n");

    /* The loop: take every frame the device has delivered (up to a queue's worth), answer
     * it into a transmit slot, give its buffer back; then publish both queues at once
     * (one notification each, at most), and collect the transmit slots the device
     * returned. */
    uint64_t end = timeout_seconds ? rdtsc() + timeout_seconds * tsc_hz : 0;
    for (uint32_t spins = 0;; spins++) {
        bool busy = false;
        const uint8_t *frame;
        uint32_t length;
        for (uint32_t n = 0; n < net.rx.size && net_rx_next(&net, &frame, &length); n++) {
            inet_handle_frame(&inet, frame, length);
            net_rx_done(&net);
            busy = true;
        }
        net_flush(&net);
        net_tx_reclaim(&net);
        if (end && (spins & 1023) == 0 && rdtsc() >= end)
            break;
        if (!busy)
            cpu_relax();
    }
    char line[600];
    format_counters(line, sizeof(line));
    kprintf("virtio-net: %s\n", line);
    exit_vm(0);
}
