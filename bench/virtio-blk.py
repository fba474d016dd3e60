#!/usr/bin/env python3
"""virtio-blk benchmark: the disk as a guest sees it, against the same file on the host.

The guest is guests/build/virtio-blk.elf, a polled virtio-blk driver running at CPL 3,
with its `bench` jobs (guests/README.md, section (k)); it times itself with the TSC and
prints one line per job. The yardstick is Debian's `fio` on the host, run on the same file
in the same run with the same access pattern:

  seqread    64 KiB reads in file order, 8 in flight          MiB/s
  seqwrite   64 KiB writes in file order, 8 in flight         MiB/s
  randread   4 KiB reads at random 4 KiB offsets, 8 in flight IOPS

fio: --ioengine=io_uring (libaio if io_uring is unavailable) --iodepth=DEPTH --direct=0
--invalidate=0 --time_based: buffered I/O like Swiftlet's device, which calls pread and
pwrite on the image file. Both sides run warm: before every run the file is read once
(into the page cache) and fsync'ed (no dirty pages left from the run before); neither
side's writes include a flush (the guest times its flush separately and prints it).
Sequential jobs wrap around at the end of the disk; each job runs SECONDS seconds.

Images: raw (qemu-img create -o preallocation=full) and qcow2 (qemu-img create
-o preallocation=full: every cluster allocated, so reads and writes go through the L1/L2
tables but never allocate). fio reads the image file itself; for writes on qcow2 it writes
a raw file of the same size in the same folder instead (writing the qcow2 file would
destroy its metadata); on raw it writes the image itself.

qcow2-alloc: seqwrite only, on an empty qcow2 image (64 KiB clusters, made anew before
every guest run, virtual size 8 GiB so a run never wraps onto clusters it allocated), so
every guest write allocates: new data clusters, L2 tables and refcounts, the metadata
updates ordered as docs/disk-images.md says. Its yardstick is the same fio seqwrite on the
preallocated raw file as for qcow2.

For reference, the same guest also runs under QEMU (pc machine with qboot, virtio-blk-pci,
cache=writeback and aio=threads) on the same file: a second VMM on the same host.

Runs alternate guest and host (A B A B ...): for each image and job, REPS rounds of
[swiftlet pci, swiftlet mmio, qemu pci, fio]. A ratio is guest / host, taken round by round (so a
change in the machine's load hits both) and reported as the median over the rounds, next
to the median figures. Targets (issue 7, item 11): raw at least 0.70 of the host figure,
qcow2 at least 0.60.

Then, once per transport, a seqread run under `--trace-exits` (exits that reach user
space) and, when `perf` can read KVM's tracepoints (root), under `perf stat -e kvm:...`
(MMIO exits handled in the kernel, i.e. ioeventfd notifications, and interrupts injected):
where the time goes.

Usage:
  bench/virtio-blk.py [SWIFTLET] [--guest ELF] [--reps N] [--seconds S] [--size-mib N]
                      [--depth N] [--transports pci,mmio] [--formats raw,qcow2]
                      [--jobs seqread,seqwrite,randread] [--scratch DIR] [--markdown FILE]
                      [--strict] [--no-trace] [--no-qemu]

SWIFTLET defaults to .build/release/swiftlet, the guest to guests/build/virtio-blk.elf
(`make guests`). The images go to a temporary folder (under --scratch, default $TMPDIR),
removed at the end. About 5 minutes with the defaults.

Exit status: 0 when every measurement ran (targets met or not), 1 when one failed,
2 for usage errors, 3 with --strict when a target was missed.

Python 3.8+, standard library only. Needs /dev/kvm, qemu-img and fio.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import select
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GUEST_OK_STATUS = 1  # the guest writes 0 to port 0xF4: status (0 << 1) | 1
TARGETS = {"raw": 0.70, "qcow2": 0.60, "qcow2-alloc": 0.60}
# Formats that only make sense for some jobs: an empty image has nothing to read.
FORMAT_JOBS = {"qcow2-alloc": ("seqwrite",)}
ALLOC_VIRTUAL_MIB = 8192
RESULT_RE = re.compile(r"^bench (\w+): depth (\d+), (\d+) requests of (\d+) bytes, (\d+) bytes in (\d+) us"
                       r"(?:, flush (\d+) us)?", re.MULTILINE)
NOTIFY_RE = re.compile(r"bench \w+: (\d+) notifications sent, (\d+) skipped \(VIRTQ_USED_F_NO_NOTIFY\), (\d+) ns each")
TSC_RE = re.compile(r"TSC at ([0-9.]+) MHz \(([^)]*)\)")
JOBS = {
    # name: (fio --rw, request bytes, unit)
    "seqread": ("read", 65536, "MiB/s"),
    "seqwrite": ("write", 65536, "MiB/s"),
    "randread": ("randread", 4096, "IOPS"),
}
KVM_EVENTS = ["kvm:kvm_mmio", "kvm:kvm_userspace_exit", "kvm:kvm_pio", "kvm:kvm_set_irq",
              "kvm:kvm_msi_set_irq", "kvm:kvm_inj_virq"]


class BenchError(Exception):
    """A measurement could not be taken; the message says why."""


def run(argv, timeout, check_status=0):
    try:
        proc = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        raise BenchError(f"did not finish within {timeout} s: {' '.join(argv)}")
    except OSError as error:
        raise BenchError(f"cannot run {argv[0]}: {error}")
    out = proc.stdout.decode("utf-8", "replace")
    err = proc.stderr.decode("utf-8", "replace")
    if check_status is not None and proc.returncode != check_status:
        raise BenchError(f"{' '.join(argv)} exited with status {proc.returncode}, expected {check_status}\n"
                         f"  stdout: {out[-600:]!r}\n  stderr: {err[-600:]!r}")
    return out, err


VCPU_THREAD = re.compile(r"^(vcpu\d+|CPU \d+/KVM)$")  # Swiftlet's and QEMU's vCPU threads
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def device_cpu(pid):
    """CPU seconds (user + system) so far of the process `pid` less its vCPU threads: the
    VMM's own work (device threads, event loop, threads that already ended), or None once
    the process is gone."""
    def times(path):
        with open(path) as f:
            stat = f.read()
        fields = stat[stat.rindex(")") + 2:].split()
        # utime and stime: fields 14 and 15 of stat(5); the name is field 2.
        return stat[stat.index("(") + 1:stat.rindex(")")], int(fields[11]) + int(fields[12])

    try:
        _, ticks = times(f"/proc/{pid}/stat")
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return None
    for tid in tasks:
        try:
            name, used = times(f"/proc/{pid}/task/{tid}/stat")
        except OSError:
            continue
        if VCPU_THREAD.match(name):
            ticks -= used
    return ticks / CLOCK_TICKS


def run_watched(argv, timeout, marker, check_status):
    """Runs a VMM like run() and, while it runs, samples device_cpu() every 50 ms. Returns
    (stdout, stderr, CPU seconds of its non-vCPU threads from the moment `marker` appeared
    on stdout to the last sample before the process ended, or None)."""
    with tempfile.TemporaryFile() as err_file:
        try:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err_file)
        except OSError as error:
            raise BenchError(f"cannot run {argv[0]}: {error}")
        out = b""
        start_cpu = last_cpu = None
        deadline = time.monotonic() + timeout
        try:
            while True:
                ready, _, _ = select.select([proc.stdout], [], [], 0.05)
                if ready:
                    chunk = os.read(proc.stdout.fileno(), 65536)
                    if not chunk:
                        break
                    out += chunk
                sample = device_cpu(proc.pid)
                if sample is not None and proc.poll() is None:
                    last_cpu = sample
                    if start_cpu is None and marker.encode() in out:
                        start_cpu = sample
                if time.monotonic() > deadline:
                    raise BenchError(f"did not finish within {timeout} s: {' '.join(argv)}")
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
        err_file.seek(0)
        err = err_file.read().decode("utf-8", "replace")
    text = out.decode("utf-8", "replace")
    if check_status is not None and proc.returncode != check_status:
        raise BenchError(f"{' '.join(argv)} exited with status {proc.returncode}, expected {check_status}\n"
                         f"  stdout: {text[-600:]!r}\n  stderr: {err[-600:]!r}")
    cpu = last_cpu - start_cpu if start_cpu is not None and last_cpu is not None else None
    return text, err, cpu


def median(values):
    return statistics.median(values) if values else float("nan")


# ---------------------------------------------------------------------------------------
# Files

def warm(path):
    """Reads `path` once (into the page cache) and fsyncs it: every run starts from a
    cached file without dirty pages."""
    fd = os.open(path, os.O_RDWR)
    try:
        while os.read(fd, 1 << 20):
            pass
        os.fsync(fd)
    finally:
        os.close(fd)


def make_images(workdir, size_mib):
    """The raw and qcow2 images (fully allocated) and the host's write target for qcow2."""
    images = {}
    raw = os.path.join(workdir, "disk.raw")
    run(["qemu-img", "create", "-q", "-f", "raw", "-o", "preallocation=full", raw, f"{size_mib}M"], 300)
    images["raw"] = {"path": raw, "format": "raw", "host_write": raw}
    qcow2 = os.path.join(workdir, "disk.qcow2")
    run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "preallocation=full", qcow2, f"{size_mib}M"], 300)
    scratch = os.path.join(workdir, "host-write.raw")
    run(["qemu-img", "create", "-q", "-f", "raw", "-o", "preallocation=full", scratch,
         str(os.path.getsize(qcow2))], 300)
    images["qcow2"] = {"path": qcow2, "format": "qcow2", "host_write": scratch}
    alloc = os.path.join(workdir, "alloc.qcow2")
    images["qcow2-alloc"] = {"path": alloc, "format": "qcow2", "host_write": scratch, "fresh": True}
    renew(images["qcow2-alloc"])
    return images


def renew(image):
    """Makes an image that is made anew before every guest run (`fresh`) empty again."""
    if os.path.exists(image["path"]):
        os.unlink(image["path"])
    run(["qemu-img", "create", "-q", "-f", "qcow2", image["path"], f"{ALLOC_VIRTUAL_MIB}M"], 300)


# ---------------------------------------------------------------------------------------
# The two sides

class Guest:
    def __init__(self, swiftlet, elf):
        self.swiftlet, self.elf = swiftlet, elf

    def argv(self, image, transport, job, depth, seconds, trace=False):
        argv = [self.swiftlet, "run", "--kernel", self.elf, "--disk", f"{image['path']},format={image['format']}",
                "--virtio-transport", transport, "--cmdline", f"bench {job} {depth} {seconds}"]
        return argv + (["--trace-exits"] if trace else [])

    def measure(self, image, transport, job, depth, seconds, trace=False, prefix=()):
        argv = list(prefix) + self.argv(image, transport, job, depth, seconds, trace)
        if prefix:
            out, err = run(argv, seconds + 120, check_status=GUEST_OK_STATUS)
            cpu = None
        else:
            # The guest prints its TSC line just before its warm-up and the timed part.
            out, err, cpu = run_watched(argv, seconds + 120, "TSC at", GUEST_OK_STATUS)
        match = RESULT_RE.search(out)
        if not match or match.group(1) != job:
            raise BenchError(f"the guest printed no 'bench {job}:' line\n  stdout: {out[-600:]!r}")
        got_depth, requests, size, total, micros = (int(match.group(i)) for i in range(2, 7))
        if size != JOBS[job][1] or got_depth != depth:
            raise BenchError(f"the guest ran {job} with depth {got_depth} and {size}-byte requests, "
                             f"not {depth} and {JOBS[job][1]}: {match.group(0)}")
        notify = NOTIFY_RE.search(out)
        tsc = TSC_RE.search(out)
        return {
            "value": figure(job, total, requests, micros / 1e6),
            "requests": requests,
            "device_us": cpu * 1e6 / requests if cpu is not None and requests else None,
            "notifications": int(notify.group(1)) if notify else None,
            "notify_ns": int(notify.group(3)) if notify and int(notify.group(1)) else None,
            "flush_us": int(match.group(7)) if match.group(7) else None,
            "tsc": (tsc.group(2), float(tsc.group(1))) if tsc else ("not printed", 0.0),
            "out": out, "err": err,
        }


class QemuGuest(Guest):
    """The same guest under QEMU (pc machine, qboot firmware, virtio-blk-pci with
    cache=writeback and aio=threads: buffered I/O on a thread pool, as Swiftlet does): a
    second VMM on the same host, to tell what the host costs from what Swiftlet costs."""

    def __init__(self, qemu, elf):
        super().__init__(None, elf)
        self.qemu = qemu

    def argv(self, image, transport, job, depth, seconds, trace=False):
        return [self.qemu, "-accel", "kvm", "-M", "pc", "-bios", "qboot.rom", "-m", "64M", "-nodefaults",
                "-display", "none", "-serial", "stdio", "-device", "isa-debug-exit,iobase=0xf4,iosize=0x04",
                "-drive", f"file={image['path']},format={image['format']},if=none,id=d0,cache=writeback,aio=threads",
                "-device", "virtio-blk-pci,drive=d0,disable-legacy=on", "-kernel", self.elf,
                "-append", f"bench {job} {depth} {seconds}"]

    @staticmethod
    def find():
        """qemu-system-x86_64 with its qboot firmware, or None."""
        qemu = shutil.which("qemu-system-x86_64")
        if not qemu:
            return None
        for folder in ("/usr/share/qemu", "/usr/share/seabios", "/usr/local/share/qemu"):
            if os.path.exists(os.path.join(folder, "qboot.rom")):
                return qemu
        return None


def figure(job, total_bytes, requests, seconds):
    if JOBS[job][2] == "IOPS":
        return requests / seconds
    return total_bytes / seconds / (1 << 20)


class Fio:
    def __init__(self, engine):
        self.engine = engine

    @staticmethod
    def choose_engine(workdir):
        """io_uring if this kernel lets fio use it, else libaio."""
        probe = os.path.join(workdir, "fio-probe")
        with open(probe, "wb") as f:
            f.write(b"\0" * 65536)
        for engine in ("io_uring", "libaio"):
            try:
                run(["fio", "--name=probe", f"--filename={probe}", "--rw=read", "--bs=4k", f"--ioengine={engine}",
                     "--size=64k", "--output-format=json"], 60)
                return engine
            except BenchError:
                continue
        raise BenchError("fio runs with neither io_uring nor libaio")

    def argv(self, path, job, depth, seconds):
        rw, size, _ = JOBS[job]
        return ["fio", f"--name={job}", f"--filename={path}", f"--rw={rw}", f"--bs={size}",
                f"--iodepth={depth}", f"--ioengine={self.engine}", "--direct=0", "--invalidate=0",
                "--time_based", f"--runtime={seconds}", "--randrepeat=1", "--output-format=json"]

    def measure(self, image, job, depth, seconds):
        path = image["host_write"] if job == "seqwrite" else image["path"]
        out, _ = run(self.argv(path, job, depth, seconds), seconds + 120)
        try:
            result = json.loads(out[out.index("{"):])["jobs"][0]
        except (ValueError, KeyError, IndexError) as error:
            raise BenchError(f"cannot read fio's JSON output ({error}): {out[-600:]!r}")
        side = result["write" if job == "seqwrite" else "read"]
        seconds_run = side["runtime"] / 1000.0
        if seconds_run <= 0:
            raise BenchError(f"fio ran {job} for 0 ms")
        return {"value": figure(job, side["io_bytes"], side["total_ios"], seconds_run)}


# ---------------------------------------------------------------------------------------
# Where the time goes

def trace_exits(guest, image, transport, depth, seconds):
    """One seqread run with --trace-exits: (total exits in user space, the table's rows
    that are not the console)."""
    result = guest.measure(image, transport, "seqread", depth, seconds, trace=True)
    rows, total = [], None
    for line in result["err"].splitlines():
        fields = line.split()
        if line.startswith("total"):
            total = int(fields[1])
        elif re.match(r"^(port|MMIO)", line):
            rows.append(line.strip())
    return result, total, rows


def perf_kvm_events(guest, image, transport, depth, seconds):
    """One seqread run under perf stat with KVM's tracepoints, or None if perf cannot."""
    perf = shutil.which("perf")
    if not perf:
        return None
    output = tempfile.NamedTemporaryFile(prefix="perf-", suffix=".txt", delete=False)
    output.close()
    try:
        prefix = [perf, "stat", "-x", ",", "-o", output.name, "-e", ",".join(KVM_EVENTS), "--"]
        try:
            result = guest.measure(image, transport, "seqread", depth, seconds, prefix=prefix)
        except BenchError:
            return None
        counts = {}
        with open(output.name) as f:
            for line in f:
                fields = line.strip().split(",")
                if len(fields) >= 3 and fields[2].startswith("kvm:"):
                    counts[fields[2]] = int(fields[0]) if fields[0].isdigit() else None
        if not counts or all(v is None for v in counts.values()):
            return None
        return result, counts
    finally:
        os.unlink(output.name)


# ---------------------------------------------------------------------------------------
# Report

class Report:
    def __init__(self):
        self.sections = []

    def section(self, title, header, rows, notes=()):
        self.sections.append((title, header, rows, list(notes)))
        print(f"\n{title}")
        widths = [max(len(str(c)) for c in column) for column in zip(header, *rows)]
        print("  " + "  ".join(str(h).ljust(w) for h, w in zip(header, widths)).rstrip())
        print("  " + "  ".join("-" * w for w in widths))
        for row in rows:
            print("  " + "  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip())
        for note in notes:
            print(f"  {note}")
        sys.stdout.flush()

    def markdown(self, preamble):
        lines = ["# Swiftlet virtio-blk benchmark", ""] + [f"- {p}" for p in preamble] + [""]
        for title, header, rows, notes in self.sections:
            lines += [f"## {title}", "", "| " + " | ".join(map(str, header)) + " |",
                      "|" + "|".join(" --- " for _ in header) + "|"]
            lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
            lines += [""] + [f"{n}  " for n in notes] + [""]
        return "\n".join(lines)


def fmt(value, unit):
    if value != value:
        return "n/a"
    return f"{value:,.0f}" if unit == "IOPS" else f"{value:,.1f}"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("swiftlet", nargs="?", default=os.path.join(ROOT, ".build/release/swiftlet"))
    parser.add_argument("--guest", default=os.path.join(ROOT, "guests/build/virtio-blk.elf"))
    parser.add_argument("--reps", type=int, default=3, help="rounds of guest and host runs per job (default 3)")
    parser.add_argument("--seconds", type=int, default=2, help="length of each run (default 2)")
    parser.add_argument("--size-mib", type=int, default=512, help="image size (default 512)")
    parser.add_argument("--depth", type=int, default=8, help="requests in flight, both sides (default 8)")
    parser.add_argument("--transports", default="pci,mmio")
    parser.add_argument("--formats", default="raw,qcow2,qcow2-alloc")
    parser.add_argument("--jobs", default="seqread,seqwrite,randread")
    parser.add_argument("--scratch", default=None, help="folder for the images (default $TMPDIR)")
    parser.add_argument("--markdown", default=None, help="also write the report as markdown here")
    parser.add_argument("--strict", action="store_true", help="exit 3 when a target is missed")
    parser.add_argument("--no-trace", action="store_true", help="skip the exit and interrupt counts")
    parser.add_argument("--no-qemu", action="store_true", help="skip the same guest under QEMU")
    args = parser.parse_args()

    transports = [t for t in args.transports.split(",") if t]
    formats = [f for f in args.formats.split(",") if f]
    jobs = [j for j in args.jobs.split(",") if j]
    if (any(t not in ("pci", "mmio") for t in transports) or any(f not in TARGETS for f in formats)
            or any(j not in JOBS for j in jobs) or not (transports and formats and jobs)
            or args.reps < 1 or args.seconds < 1 or not 1 <= args.depth <= 32 or args.size_mib < 16):
        parser.error("transports are pci and mmio, formats raw, qcow2 and qcow2-alloc, jobs seqread, seqwrite and randread; "
                     "reps, seconds >= 1, depth 1..32, size >= 16 MiB")
    for path, what in ((args.swiftlet, "swiftlet (make release)"), (args.guest, "the guest (make guests)")):
        if not os.access(path, os.X_OK if what.startswith("swiftlet") else os.R_OK):
            print(f"virtio-blk.py: {path} not found: build {what}", file=sys.stderr)
            return 2
    for tool, package in (("fio", "fio"), ("qemu-img", "qemu-utils")):
        if not shutil.which(tool):
            print(f"virtio-blk.py: {tool} not found (apt-get install {package})", file=sys.stderr)
            return 1

    started = datetime.datetime.now(datetime.timezone.utc)
    workdir = tempfile.mkdtemp(prefix="swiftlet-blk-bench.", dir=args.scratch)
    report = Report()
    failed = False
    missed = []
    try:
        print(f"== making {args.size_mib} MiB images in {workdir}")
        images = {name: image for name, image in make_images(workdir, args.size_mib).items() if name in formats}
        fio = Fio(Fio.choose_engine(workdir))
        guest = Guest(args.swiftlet, args.guest)
        qemu_path = None if args.no_qemu else QemuGuest.find()
        qemu = QemuGuest(qemu_path, args.guest) if qemu_path else None
        sides = [(t, guest, t) for t in transports] + ([("qemu pci", qemu, "pci")] if qemu else [])
        tsc_seen = set()
        results = {}  # (format, job, side) -> [values]; side: "pci", "mmio", "host"
        ratios = {}   # (format, job, transport) -> [paired ratios]
        notifications = {}  # (format, job, transport) -> [per request]
        notify_cost = {}  # (format, job, transport) -> [ns per notification, as the guest timed it]
        device_cost = {}  # (format, job, transport) -> [µs of VMM CPU (not vCPU threads) per request]
        flushes = {}  # (format, transport) -> [us]
        for fmt_name, image in images.items():
            for job in jobs:
                if job not in FORMAT_JOBS.get(fmt_name, (job,)):
                    continue
                print(f"== {fmt_name} {job}: {args.reps} rounds of " + ", ".join(
                    [f"swiftlet {t}" for t in transports] + (["qemu pci"] if qemu else [])
                    + [f"fio ({fio.engine})"]), flush=True)
                for _ in range(args.reps):
                    guest_values = {}
                    for transport, runner, bus in sides:
                        if image.get("fresh"):
                            renew(image)
                        warm(image["path"])
                        try:
                            result = runner.measure(image, bus, job, args.depth, args.seconds)
                        except BenchError as error:
                            print(f"[{fmt_name} {job} {transport}] {error}", file=sys.stderr)
                            failed = True
                            continue
                        tsc_seen.add(result["tsc"])
                        guest_values[transport] = result["value"]
                        results.setdefault((fmt_name, job, transport), []).append(result["value"])
                        if result["notifications"] is not None and result["requests"]:
                            notifications.setdefault((fmt_name, job, transport), []).append(
                                result["notifications"] / result["requests"])
                        if result["device_us"] is not None:
                            device_cost.setdefault((fmt_name, job, transport), []).append(result["device_us"])
                        if result["notify_ns"] is not None:
                            notify_cost.setdefault((fmt_name, job, transport), []).append(result["notify_ns"])
                        if result["flush_us"] is not None:
                            flushes.setdefault((fmt_name, transport), []).append(result["flush_us"])
                    target = image["host_write"] if job == "seqwrite" else image["path"]
                    warm(target)
                    try:
                        host = fio.measure(image, job, args.depth, args.seconds)["value"]
                    except BenchError as error:
                        print(f"[{fmt_name} {job} fio] {error}", file=sys.stderr)
                        failed = True
                        continue
                    results.setdefault((fmt_name, job, "host"), []).append(host)
                    for transport, value in guest_values.items():
                        ratios.setdefault((fmt_name, job, transport), []).append(value / host)

        rows = []
        for fmt_name in images:
            for job in jobs:
                if job not in FORMAT_JOBS.get(fmt_name, (job,)):
                    continue
                unit = JOBS[job][2]
                host = median(results.get((fmt_name, job, "host"), []))
                for transport, _, _ in sides:
                    value = median(results.get((fmt_name, job, transport), []))
                    pair = ratios.get((fmt_name, job, transport), [])
                    ratio = median(pair)
                    target = TARGETS[fmt_name]
                    if ratio != ratio:
                        verdict = "n/a"
                    elif transport.startswith("qemu"):
                        verdict = "(reference)"
                    elif ratio >= target:
                        verdict = "met"
                    else:
                        verdict = "MISSED"
                        missed.append(f"{fmt_name} {job} {transport}")
                    per_request = median(notifications.get((fmt_name, job, transport), []))
                    cost = median(notify_cost.get((fmt_name, job, transport), []))
                    device = median(device_cost.get((fmt_name, job, transport), []))
                    rows.append([fmt_name, f"{job} ({unit})", transport, fmt(value, unit), fmt(host, unit),
                                 "n/a" if ratio != ratio else f"{ratio:.2f}",
                                 " ".join(f"{r:.2f}" for r in pair), f">= {target:.2f}: {verdict}",
                                 "n/a" if per_request != per_request else f"{per_request:.2f}",
                                 "n/a" if cost != cost else f"{cost / 1000:.0f}",
                                 "n/a" if device != device else f"{device:.1f}"])
        clocks = {}
        for source, mhz in tsc_seen:
            clocks.setdefault(source, []).append(mhz)
        notes = [f"guest: swiftlet run --kernel virtio-blk.elf --disk IMAGE,format=F --virtio-transport T "
                 f"--cmdline 'bench JOB {args.depth} {args.seconds}'; TSC " + "; ".join(
                     f"{source}: " + (f"{min(v):.3f} MHz" if min(v) == max(v) else f"{min(v):.3f} to {max(v):.3f} MHz")
                     for source, v in sorted(clocks.items())),
                 "host: fio " + " ".join(fio.argv("IMAGE", "seqread", args.depth, args.seconds)[1:]).replace(
                     "--name=seqread ", "").replace("--rw=read --bs=65536", "--rw=read|write|randread --bs=65536|4096"),
                 f"ratio: guest / host per round, median over {args.reps} rounds (the rounds' ratios follow); "
                 f"figures are medians; {args.size_mib} MiB images, page cache warm, raw and qcow2 fully allocated, "
                 f"qcow2-alloc empty at the start of every guest run (every write allocates)",
                 "notify/req: the guest's notifications to the device (each an MMIO write that an "
                 "ioeventfd handles in the kernel) per request completed; µs/notify: how long the guest's "
                 "notifying write took, as the guest timed it (the exit, and the time the vCPU was off its "
                 "CPU while the thread it woke ran), medians; VMM CPU µs/req: CPU time (user + system) of "
                 "the VMM's threads other than the vCPU's (device threads, event loop) during the timed "
                 "part, per request, sampled from /proc every 50 ms: what the device costs the host, "
                 "less disturbed by other load than the throughput"]
        if qemu:
            notes.append("qemu pci: " + " ".join(qemu.argv({"path": "IMAGE", "format": "F"}, "pci", "JOB",
                                                           args.depth, args.seconds)[1:])
                         + " (the guest calibrates its TSC against the PIT there)")
        elif not args.no_qemu:
            notes.append("QEMU comparison skipped: qemu-system-x86_64 or its qboot.rom not found")
        if flushes:
            notes.append("the guest's flush after seqwrite (not in the figures), median: " + ", ".join(
                f"{f} {t} {median(v) / 1000:.0f} ms" for (f, t), v in sorted(flushes.items())))
        report.section("virtio-blk from the guest against fio on the host", [
            "image", "job", "transport", "guest", "host (fio)", "ratio", "rounds", "target", "notify/req",
            "µs/notify", "VMM CPU µs/req"],
            rows, notes)

        if not args.no_trace and "raw" in images:
            rows, notes = [], []
            for transport in transports:
                try:
                    result, total, table = trace_exits(guest, images["raw"], transport, args.depth, args.seconds)
                except BenchError as error:
                    print(f"[trace {transport}] {error}", file=sys.stderr)
                    failed = True
                    continue
                perf = perf_kvm_events(guest, images["raw"], transport, args.depth, args.seconds)
                row = [transport, "--trace-exits", result["requests"], result["notifications"], total,
                       "", "", ""]
                rows.append(row)
                if perf:
                    counted, counts = perf
                    rows.append([transport, "perf stat", counted["requests"], counted["notifications"], "",
                                 counts.get("kvm:kvm_mmio"), counts.get("kvm:kvm_userspace_exit"),
                                 sum(counts.get(e) or 0 for e in ("kvm:kvm_set_irq", "kvm:kvm_msi_set_irq",
                                                                   "kvm:kvm_inj_virq"))])
                kinds = {}
                for line in table:
                    words = line.split()
                    key = " ".join(words[:2]) + (f" {words[2]}" if words[0] == "port" else "")
                    kinds[key] = kinds.get(key, 0) + int(words[-3])
                notes.append(f"{transport}, exits to user space by kind: " + "; ".join(
                    f"{kind} x{count}" for kind, count in kinds.items()))
            notes.append("two runs per transport: one with --trace-exits (exits that reach Swiftlet), one "
                         "under perf stat with KVM's tracepoints (when perf may read them: root). kvm_mmio "
                         "counts every MMIO write or read KVM handled, the ioeventfd notifications among "
                         "them; interrupts = kvm_set_irq + kvm_msi_set_irq + kvm_inj_virq (the guest polls "
                         "with VIRTQ_AVAIL_F_NO_INTERRUPT: 0 expected); the exits to user space are the "
                         "console, the PCI set-up and the exit port")
            report.section(f"Exits and interrupts during a raw seqread run ({args.seconds} s, depth {args.depth})",
                           ["transport", "run", "requests", "notifications", "exits to user space",
                            "kvm_mmio (kernel)", "kvm_userspace_exit", "interrupts"], rows, notes)
    except BenchError as error:
        print(f"virtio-blk.py: {error}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    if missed:
        print(f"\ntargets missed: {', '.join(missed)}")
    elif report.sections:
        print("\nevery target met")
    if args.markdown:
        load = os.getloadavg()
        preamble = [f"{started:%Y-%m-%d %H:%M} UTC, {platform.node()}, {os.cpu_count()} CPUs, "
                    f"kernel {platform.release()}, load average {load[0]:.1f} at the end",
                    f"swiftlet: {args.swiftlet}; guest: {args.guest}"]
        with open(args.markdown, "w") as f:
            f.write(report.markdown(preamble))
    if failed:
        return 1
    return 3 if args.strict and missed else 0


if __name__ == "__main__":
    sys.exit(main())
