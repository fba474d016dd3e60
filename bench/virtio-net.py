#!/usr/bin/env python3
"""virtio-net benchmark: UDP throughput through a VMM's virtio-net device and a TAP device.

The teaching guest guests/build/virtio-net.elf (a polled driver at CPL 3) runs under a VMM
whose virtio-net device is backed by a TAP device in a network namespace made for the run
(192.0.2.1/24 on the host side, the guest at 192.0.2.2; nothing is routed out). Measured,
for Ethernet frames of 64 and 1400 bytes (Ethernet, IPv4 and UDP headers included, no FCS),
side by side in the same run (timings on a shared or nested host drift; only ratios taken
in one run mean much):

  guest to host  The guest's "send COUNT SIZE PORT" command (UDP control port 5555) makes
                 it send COUNT frames as fast as the device takes them, to a UDP socket of
                 the host that is never read (the kernel takes each datagram through IP and
                 UDP, then drops it at the full socket). Rate: the frames counted by the
                 TAP's receive counter in /proc/net/dev (polled every 0.5 ms) between the
                 first poll that sees some and the one that sees all COUNT.
                 Floor: bench/tap-floor.c writes the same frames into the same TAP (opened
                 as a VMM opens it: IFF_VNET_HDR, 12-byte header, no offloads), one write(2)
                 each, measured the same way: the cost of a TAP write and of the host's
                 network stack, with no guest and no device.
  host to guest  tap-floor's sender sends UDP datagrams of the same frame size to the
                 guest's discard port (9) for SECONDS seconds, 64 per sendmmsg(2), as fast as
                 it can; the guest counts them (its "stats" command). Rate: datagrams counted
                 over the sender's time. The host drops what the TAP's queue cannot hold.
                 Floor: tap-floor reads the TAP (one read(2) per frame) while the same
                 sender runs, and counts the datagrams to port 9.
  Both directions report packets/s and Mbit/s (frame bytes x 8), the ratio VMM / floor,
  and where the time goes: the CPU time per frame of the floor program (getrusage) and of
  the VMM's threads other than its vCPUs (the device's cost, from /proc/PID/task/*/stat;
  the guest's vCPU spins at 100% anyway, it polls), each VMM thread's share of a CPU, and
  the guest's own view of its sending rate (its TSC, calibrated against the PIT: not on
  microvm, which has no port 0x61). The CPU per frame is steadier than the rates on a
  loaded host: a rate drops when a thread is preempted, its CPU cost does not.
  Target: at least 50% of the floor for 1400-byte frames, in each direction, for Swiftlet.

VMMs: QEMU (pc + virtio-net-pci and microvm + virtio-net-device, TAP netdev, the
reference), and Swiftlet (--net tap=NAME, both transports) when `swiftlet run --help`
lists --net. Each repetition runs the floor first, then boots each VMM once for all its
measurements; medians over the repetitions.

Usage:
  bench/virtio-net.py [SWIFTLET] [--reps N] [--frames N] [--seconds S] [--guests DIR]
                      [--markdown FILE] [--no-qemu] [--strict]

Needs root (a network namespace and a TAP device), ip (iproute2), gcc, /dev/kvm, and
qemu-system-x86_64 for the QEMU rows. Without root or ip it says why and exits with 0
(nothing measured). Exit status: 0 when every measurement ran, 1 when one failed, 2 for
usage errors, 3 with --strict when Swiftlet missed a target.

Python 3.8+, standard library only.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZES = (64, 1400)
TARGET = 0.50  # of the floor, for 1400-byte frames
HOST_IP, GUEST_IP = "192.0.2.1", "192.0.2.2"
GUEST_MAC = "52:54:00:53:57:02"  # given to the device by each VMM (VIRTIO_NET_F_MAC)
SINK_PORT, CONTROL_PORT, DISCARD_PORT = 7000, 5555, 9
UDP_OVERHEAD = 14 + 20 + 8  # Ethernet, IPv4, UDP headers


class BenchError(Exception):
    """A measurement could not be taken; the message says why."""


# ---------------------------------------------------------------------------------------
# Inside the namespace: counters, the sink, the guest's control port


def tap_counters(tap):
    """(rx_packets, tx_packets, tx_dropped) of the TAP, from /proc/net/dev."""
    with open("/proc/net/dev") as f:
        for line in f:
            name, _, rest = line.partition(":")
            if name.strip() == tap:
                v = rest.split()
                return int(v[1]), int(v[9]), int(v[11])
    raise BenchError(f"no {tap} in /proc/net/dev")


def thread_cpu(pid):
    """{thread name: CPU seconds (user + system)} over the threads of pid, threads of the
    same name added up."""
    ticks = os.sysconf("SC_CLK_TCK")
    result = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return result
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                stat = f.read()
        except OSError:
            continue  # the thread ended meanwhile
        name = stat[stat.index("(") + 1:stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2:].split()
        result[name] = result.get(name, 0) + (int(fields[11]) + int(fields[12])) / ticks
    return result


def cpu_share(before, after, elapsed):
    """'name 97%, name 41%' for the threads that used at least 5% of a CPU."""
    parts = []
    for name, seconds in sorted(after.items(), key=lambda item: -(item[1] - before.get(item[0], 0))):
        share = (seconds - before.get(name, 0)) / elapsed if elapsed > 0 else 0
        if share >= 0.05:
            parts.append(f"{name} {share * 100:.0f}%")
    return ", ".join(parts) or "-"


class Guest:
    """The guest's control port, from the host side."""

    def __init__(self):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((HOST_IP, 0))

    def ask(self, command, timeout=60.0):
        """Sends command and returns the answer. UDP may lose either (a TAP queue still
        full from a flood, a transmit ring full in the guest), so the command is sent again
        every second; of several answers, the last one counts."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.sock.sendto(command.encode(), (GUEST_IP, CONTROL_PORT))
            self.sock.settimeout(1.0)
            try:
                answer = self.sock.recvfrom(4096)[0]
            except socket.timeout:
                continue
            self.sock.settimeout(0.05)
            try:
                while True:
                    answer = self.sock.recvfrom(4096)[0]
            except socket.timeout:
                return answer.decode()
        raise BenchError(f"the guest did not answer {command!r} within {timeout:.0f} s")

    def counter(self, name):
        stats = self.ask("stats")
        match = re.search(rf"{name} (\d+)", stats)
        if not match:
            raise BenchError(f"no {name!r} in the guest's counters: {stats}")
        return int(match.group(1))

    def close(self):
        self.sock.close()


def wait_for_frames(tap, base, count, timeout):
    """Polls the TAP's receive counter until count frames past base arrived; returns the
    rate between the first poll that saw frames and the one that saw them all."""
    first = None
    deadline = time.monotonic() + timeout
    while True:
        now = time.monotonic()
        arrived = tap_counters(tap)[0] - base
        if first is None and arrived > 0:
            first = (now, arrived)
        if arrived >= count:
            if now <= first[0]:
                raise BenchError(f"{count} frames arrived between two polls: too few to time (--frames)")
            return (arrived - first[1]) / (now - first[0])
        if now > deadline:
            raise BenchError(f"only {arrived} of {count} frames reached the TAP within {timeout:.0f} s")
        time.sleep(0.0005)


def children_cpu():
    """CPU seconds (user + system) of this process's children reaped so far."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


class Measurement:
    """One run: the rate, and the CPU the mover spent per frame (the floor program, or the
    VMM's threads other than its vCPUs: what the device costs), with notes."""

    def __init__(self, pps, cpu_per_frame=None, note=""):
        self.pps, self.cpu_per_frame, self.note = pps, cpu_per_frame, note


# ---------------------------------------------------------------------------------------
# The floor


def floor_g2h(floor, tap, tap_mac, size, frames):
    base = tap_counters(tap)[0]
    cpu = children_cpu()
    proc = subprocess.Popen([floor, "write", tap, str(frames), str(size), GUEST_MAC, tap_mac, GUEST_IP, HOST_IP,
                             str(CONTROL_PORT), str(SINK_PORT)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        pps = wait_for_frames(tap, base, frames, 120)
    finally:
        out, err = proc.communicate(timeout=120)
    if proc.returncode != 0:
        raise BenchError(f"tap-floor write: {err.decode(errors='replace')}")
    return Measurement(pps, (children_cpu() - cpu) / frames)


def run_sender(floor, size, seconds):
    result = subprocess.run([floor, "send", GUEST_IP, str(DISCARD_PORT), str(size), str(seconds)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=seconds + 60)
    match = re.search(rb"sent (\d+) datagrams in ([\d.]+) s", result.stdout)
    if result.returncode != 0 or not match:
        raise BenchError(f"tap-floor send: {result.stdout!r} {result.stderr!r}")
    return int(match.group(1)), float(match.group(2))


def floor_h2g(floor, tap, size, seconds):
    reader = subprocess.Popen([floor, "read", tap, str(DISCARD_PORT), "300"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE)
    try:
        if reader.stdout.readline().strip() != b"ready":
            raise BenchError(f"tap-floor read did not start: {reader.stderr.read()!r}")
        sent, elapsed = run_sender(floor, size, seconds)
        cpu = children_cpu()  # the sender's is in; the reader's comes when it is reaped
        out, err = reader.communicate(timeout=60)
        reader_cpu = children_cpu() - cpu
    finally:
        if reader.poll() is None:
            reader.kill()
            reader.wait()
    match = re.search(rb"read \d+ frames, (\d+) to port", out)
    if not match or int(match.group(1)) == 0:
        raise BenchError(f"tap-floor read: {out!r} {err!r}")
    received = int(match.group(1))
    return Measurement(received / elapsed, reader_cpu / received, f"sender offered {sent / elapsed / 1000:.0f} kpps")


# ---------------------------------------------------------------------------------------
# VMMs


class VMM:
    """One way to run the guest on the TAP."""

    def __init__(self, name, argv):
        self.name = name
        self.argv = argv  # (kernel, tap) -> argv


def qemu_vmm(qemu, machine):
    def argv(kernel, tap):
        device = "virtio-net-pci,netdev=n0,disable-legacy=on" if machine == "pc" else "virtio-net-device,netdev=n0"
        line = f"ip={GUEST_IP}"
        # debug-threads=on names QEMU's threads ("CPU 0/KVM", "worker"), for the CPU column.
        common = [qemu, "-accel", "kvm", "-name", "bench,debug-threads=on", "-m", "64M", "-nodefaults",
                  "-no-user-config", "-display", "none", "-serial", "stdio",
                  "-device", "isa-debug-exit,iobase=0xf4,iosize=0x04",
                  "-netdev", f"tap,id=n0,ifname={tap},script=no,downscript=no", "-device", f"{device},mac={GUEST_MAC}",
                  "-kernel", kernel]
        if machine == "pc":
            return common + ["-M", "pc", "-bios", "qboot.rom", "-append", line]
        return common + ["-M", "microvm,acpi=off", "-global", "virtio-mmio.force-legacy=false",
                         "-append", line + " virtio_mmio.device=512@0xfeb00e00:12"]
    label = "QEMU 7.2, pc, virtio-net-pci" if machine == "pc" else "QEMU 7.2, microvm, virtio-net-device"
    return VMM(label, argv)


def swiftlet_vmm(swiftlet, transport):
    def argv(kernel, tap):
        return [swiftlet, "run", "--kernel", kernel, "--net", f"tap={tap},mac={GUEST_MAC}", "--virtio-transport",
                transport, "--memory", "64M", "--cmdline", f"ip={GUEST_IP}"]
    return VMM(f"Swiftlet, virtio-{transport}", argv)


class Running:
    """A VMM process with the guest booted and ready."""

    def __init__(self, vmm, kernel, tap, workdir):
        self.log = open(os.path.join(workdir, "vmm.log"), "w+b")
        self.proc = subprocess.Popen(vmm.argv(kernel, tap), stdin=subprocess.DEVNULL, stdout=self.log,
                                     stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while b"virtio-net: ready" not in self.output():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                text = self.output().decode(errors="replace")
                self.stop()
                raise BenchError(f"{vmm.name}: the guest did not become ready:\n{text[-2000:]}")
            time.sleep(0.05)

    def output(self):
        self.log.seek(0)
        return self.log.read()

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


VCPU_THREAD = re.compile(r"^(CPU \d+/KVM|vcpu\d+)$")  # QEMU's and Swiftlet's vCPU threads


def device_cpu(before, after):
    """CPU seconds of the threads that are not vCPUs, between two thread_cpu samples."""
    return sum(seconds - before.get(name, 0) for name, seconds in after.items() if not VCPU_THREAD.match(name))


def vmm_g2h(running, guest, tap, size, frames):
    guest.ask("stats")  # the guest answers: the link is quiet, the command will not be lost
    base = tap_counters(tap)[0]
    cpu_before = thread_cpu(running.proc.pid)
    guest.sock.sendto(f"send {frames} {size} {SINK_PORT}".encode(), (GUEST_IP, CONTROL_PORT))
    start = time.monotonic()
    pps = wait_for_frames(tap, base, frames, 300)
    cpu_after = thread_cpu(running.proc.pid)
    wall = time.monotonic() - start
    guest.sock.settimeout(60)
    reply = guest.sock.recvfrom(4096)[0].decode()
    match = re.match(r"sent (\d+) frames of \d+ bytes in (\d+) TSC ticks, TSC (\d+) Hz", reply)
    note = ""
    if match and int(match.group(3)) > 0:
        note = f"guest's TSC: {int(match.group(1)) / (int(match.group(2)) / int(match.group(3))) / 1000:.1f} kpps; "
    note += "CPU: " + cpu_share(cpu_before, cpu_after, wall)
    return Measurement(pps, device_cpu(cpu_before, cpu_after) / frames, note)


def vmm_h2g(running, guest, floor, size, seconds):
    before = guest.counter("discard")
    cpu_before = thread_cpu(running.proc.pid)
    start = time.monotonic()
    sent, elapsed = run_sender(floor, size, seconds)
    # Let the guest finish what is queued, until its count stands still.
    count = guest.counter("discard")
    while True:
        time.sleep(0.2)
        again = guest.counter("discard")
        if again == count:
            break
        count = again
    cpu_after = thread_cpu(running.proc.pid)
    wall = time.monotonic() - start
    received = count - before
    if received == 0:
        raise BenchError(f"{size}-byte frames: the guest counted none of {sent}")
    shares = cpu_share(cpu_before, cpu_after, wall)
    return Measurement(received / elapsed, device_cpu(cpu_before, cpu_after) / received,
                       f"sender offered {sent / elapsed / 1000:.0f} kpps; CPU: {shares}")


# ---------------------------------------------------------------------------------------
# Reporting


def mbit(pps, size):
    return pps * size * 8 / 1e6


def fmt_rate(pps, size):
    if pps is None or pps != pps:
        return "n/a"
    return f"{pps / 1000:.1f} kpps, {mbit(pps, size):.0f} Mbit/s"


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def table(title, header, rows):
    lines = [f"\n{title}"]
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]
    lines.append("  " + "  ".join(str(h).ljust(w) for h, w in zip(header, widths)).rstrip())
    lines.append("  " + "  ".join("-" * w for w in widths))
    for row in rows:
        lines.append("  " + "  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip())
    print("\n".join(lines))
    sys.stdout.flush()
    md = [f"### {title}", "", "| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    md += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(md) + "\n"


# ---------------------------------------------------------------------------------------
# The inner run (inside the namespace)


def inner(args):
    tap, floor, kernel, workdir = args.inside
    with open(f"/sys/class/net/{tap}/address") as f:
        tap_mac = f.read().strip()
    sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sink.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
    sink.bind((HOST_IP, SINK_PORT))

    vmms = []
    if not args.no_qemu and shutil.which("qemu-system-x86_64"):
        qemu = shutil.which("qemu-system-x86_64")
        vmms += [qemu_vmm(qemu, "pc"), qemu_vmm(qemu, "microvm")]
    if args.swiftlet_has_net:
        vmms += [swiftlet_vmm(args.swiftlet, "pci"), swiftlet_vmm(args.swiftlet, "mmio")]

    # runs[(direction, size)][who] = [Measurement, one per repetition]
    runs = {}

    def record(direction, size, who, measurement):
        runs.setdefault((direction, size), {}).setdefault(who, []).append(measurement)

    for rep in range(args.reps):
        print(f"repetition {rep + 1} of {args.reps}", flush=True)
        for size in SIZES:
            record("g2h", size, "floor", floor_g2h(floor, tap, tap_mac, size, args.frames))
            record("h2g", size, "floor", floor_h2g(floor, tap, size, args.seconds))
        for vmm in vmms:
            running = Running(vmm, kernel, tap, workdir)
            guest = Guest()
            try:
                for size in SIZES:
                    record("g2h", size, vmm.name, vmm_g2h(running, guest, tap, size, args.frames))
                    record("h2g", size, vmm.name, vmm_h2g(running, guest, floor, size, args.seconds))
                stats = guest.ask("stats")
            finally:
                guest.close()
                running.stop()
            print(f"  {vmm.name}: guest counters: {stats}", flush=True)

    markdown = []
    names = ["floor"] + [v.name for v in vmms]
    for direction, title in (("g2h", "guest to host"), ("h2g", "host to guest")):
        rows = []
        for size in SIZES:
            floor_runs = runs[(direction, size)]["floor"]
            floor_pps = median([m.pps for m in floor_runs])
            floor_cpu = median([m.cpu_per_frame for m in floor_runs])
            for who in names:
                measured = runs[(direction, size)].get(who)
                if not measured:
                    continue
                pps = median([m.pps for m in measured])
                cpu = median([m.cpu_per_frame for m in measured])
                ratio = pps / floor_pps if floor_pps else None
                target = ""
                if size == 1400 and who.startswith("Swiftlet"):
                    target = "met" if ratio is not None and ratio >= TARGET else "MISSED"
                    if target == "MISSED":
                        args.missed.append(f"{who} {title} {size} B: {ratio:.2f} of the floor")
                cpu_text = "n/a" if cpu is None else f"{cpu * 1e6:.2f} µs"
                if who != "floor" and cpu is not None and floor_cpu:
                    cpu_text += f" ({cpu / floor_cpu:.1f}x)"
                rows.append([f"{size} B", who, fmt_rate(pps, size), "" if who == "floor" else f"{ratio:.2f}",
                             target, cpu_text, measured[-1].note])
        markdown.append(table(f"virtio-net, {title} (UDP, medians of {args.reps}; notes from the last)",
                              ["frame", "who", "rate", "ratio to floor", "target (1400 B: >= 0.50)",
                               "CPU per frame (floor's process; VMM's threads but vCPUs)", "notes"], rows))
    if args.markdown:
        with open(args.markdown, "w") as out:
            out.write("\n".join(markdown))
    with open(os.path.join(workdir, "missed.json"), "w") as out:
        json.dump(args.missed, out)
    return 0


# ---------------------------------------------------------------------------------------
# The outer run: build, make the namespace, run inside it, clean up


def build(workdir, guests_dir):
    floor = os.path.join(workdir, "tap-floor")
    result = subprocess.run([os.environ.get("CC", "gcc"), "-O2", "-Wall", "-Wextra", "-o", floor,
                             os.path.join(ROOT, "bench", "tap-floor.c")],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    if result.returncode != 0:
        raise BenchError("cannot build tap-floor:\n" + result.stdout.decode(errors="replace"))
    if guests_dir is None:
        guests_dir = os.path.join(workdir, "guests")
        result = subprocess.run(["make", "-s", "-C", os.path.join(ROOT, "guests"), f"BUILD={guests_dir}",
                                 f"{guests_dir}/virtio-net.elf"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        if result.returncode != 0:
            raise BenchError("cannot build the guest:\n" + result.stdout.decode(errors="replace"))
    kernel = os.path.join(guests_dir, "virtio-net.elf")
    if not os.path.isfile(kernel):
        raise BenchError(f"{guests_dir} has no virtio-net.elf")
    return floor, kernel


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="See the top of bench/virtio-net.py for what is measured and how.")
    parser.add_argument("swiftlet", nargs="?", default=os.path.join(ROOT, ".build", "release", "swiftlet"),
                        help="the swiftlet binary (default: .build/release/swiftlet)")
    parser.add_argument("--reps", type=int, default=5, help="repetitions (default 5)")
    parser.add_argument("--frames", type=int, default=200000,
                        help="frames per guest-to-host measurement (default 200000)")
    parser.add_argument("--seconds", type=int, default=2, help="seconds per host-to-guest measurement (default 2)")
    parser.add_argument("--guests", help="use a prebuilt virtio-net.elf from this directory")
    parser.add_argument("--markdown", metavar="FILE", help="also write the tables as markdown to FILE")
    parser.add_argument("--no-qemu", action="store_true", help="leave out the QEMU rows")
    parser.add_argument("--strict", action="store_true", help="exit with status 3 when Swiftlet misses a target")
    parser.add_argument("--inside", nargs=4, metavar=("TAP", "FLOOR", "KERNEL", "WORKDIR"), help=argparse.SUPPRESS)
    parser.add_argument("--swiftlet-has-net", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.missed = []
    if args.reps < 1 or args.frames < 1000 or args.seconds < 1:
        parser.error("--reps >= 1, --frames >= 1000, --seconds >= 1")
    args.swiftlet = os.path.abspath(args.swiftlet)
    if args.inside:
        try:
            return inner(args)
        except BenchError as error:
            print(f"virtio-net.py: {error}", file=sys.stderr)
            return 1

    ip = shutil.which("ip") or next((p for p in ("/usr/sbin/ip", "/sbin/ip") if os.access(p, os.X_OK)), None)
    if os.geteuid() != 0 or ip is None or not os.path.exists("/dev/net/tun"):
        print("virtio-net.py: skipped: needs root, ip (iproute2) and /dev/net/tun to make a network namespace "
              "with a TAP device")
        return 0
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        print("virtio-net.py: /dev/kvm is not accessible", file=sys.stderr)
        return 2
    has_net = False
    if os.access(args.swiftlet, os.X_OK):
        help_text = subprocess.run([args.swiftlet, "run", "--help"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        has_net = b"--net" in help_text.stdout
    print("Swiftlet virtio-net benchmark")
    print(f"  swiftlet: {args.swiftlet} ({'has --net' if has_net else 'no --net yet: QEMU and the floor only'})")
    print(f"  host: {os.uname().release}, {os.cpu_count()} CPUs; {args.reps} repetitions, medians; "
          f"{args.frames} frames guest to host, {args.seconds} s host to guest")
    print(time.strftime("  run at %Y-%m-%d %H:%M:%S UTC", time.gmtime()), flush=True)

    tag = os.urandom(4).hex()
    namespace, tap = f"swiftlet-bench-{tag}", f"swb{tag}"

    def ipx(*words, check=True):
        result = subprocess.run([ip] + list(words), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        if check and result.returncode != 0:
            raise BenchError(f"ip {' '.join(words)}: {result.stderr.decode(errors='replace').strip()}")

    with tempfile.TemporaryDirectory(prefix="swiftlet-net-bench-") as workdir:
        try:
            floor, kernel = build(workdir, os.path.abspath(args.guests) if args.guests else None)
            ipx("netns", "add", namespace)
            try:
                inside = ["netns", "exec", namespace]
                ipx(*inside, ip, "link", "set", "lo", "up")
                ipx(*inside, ip, "tuntap", "add", "dev", tap, "mode", "tap")
                ipx(*inside, ip, "address", "add", f"{HOST_IP}/24", "dev", tap)
                ipx(*inside, ip, "link", "set", tap, "up")
                # The guest's address is fixed, so the floor's reader (which answers no ARP)
                # and the guests are reached the same way.
                ipx(*inside, ip, "neigh", "replace", GUEST_IP, "lladdr", GUEST_MAC, "dev", tap, "nud", "permanent")
                command = [ip, "netns", "exec", namespace, sys.executable, os.path.abspath(__file__), args.swiftlet,
                           "--reps", str(args.reps), "--frames", str(args.frames), "--seconds", str(args.seconds),
                           "--inside", tap, floor, kernel, workdir]
                if args.markdown:
                    command += ["--markdown", os.path.abspath(args.markdown)]
                if args.no_qemu:
                    command.append("--no-qemu")
                if has_net:
                    command.append("--swiftlet-has-net")
                status = subprocess.run(command).returncode
            finally:
                ipx("netns", "exec", namespace, ip, "link", "delete", tap, check=False)
                ipx("netns", "delete", namespace, check=False)
        except BenchError as error:
            print(f"virtio-net.py: {error}", file=sys.stderr)
            return 1
        if status != 0:
            return 1
        missed = []
        try:
            with open(os.path.join(workdir, "missed.json")) as f:
                missed = json.load(f)
        except (OSError, ValueError):
            pass
    for line in missed:
        print(f"target missed: {line}")
    return 3 if args.strict and missed else 0


if __name__ == "__main__":
    sys.exit(main())
