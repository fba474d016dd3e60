#!/usr/bin/env python3
"""Linux boot benchmark: time to the Debian kernel's first serial output, Swiftlet vs QEMU.

Boots Debian's cloud kernel (cached by guests/linux/fetch-debian-kernel.sh as
`vmlinuz`, the bzImage, and `vmlinux`, the ELF inside it) with the same guest RAM and
command line in every VMM, and measures, from the spawn of the VMM process:

  first byte   the first byte on the VMM's stdout (the serial console);
  banner       the arrival of "Linux version" (the kernel's banner);
  cmdline      the arrival of "Command line:".

The banner and the command line usually arrive together: printk buffers them until
the early console starts, then replays the buffer. As soon as both are seen, the VM is
ended (SIGTERM for Swiftlet, SIGKILL for QEMU); nothing later is measured (on a host
whose KVM emulates CPL 0 code the kernel cannot boot much further, see
docs/host-kvm.md).

Variants:

  swiftlet bzImage, guest decompressor  swiftlet run --kernel vmlinuz --no-decompress-on-host
  swiftlet bzImage, host decompression  swiftlet run --kernel vmlinuz   (the default)
  swiftlet vmlinux, PVH entry           swiftlet run --kernel vmlinux   (auto: PVH note)
  swiftlet vmlinux, 64-bit entry        swiftlet run --kernel vmlinux --linux-entry linux64
  qemu microvm vmlinux                  qemu-system-x86_64 -M microvm -accel kvm -kernel vmlinux
                                        (PVH entry, through qboot), skipped without QEMU

Ratios: each Swiftlet variant / QEMU microvm (same vmlinux; read as "how much longer
than QEMU"), and host decompression / guest decompressor (same bzImage).

Swiftlet runs with --trace-exits (a clock read and a counter per exit), which prints
the CLOCK_MONOTONIC time of the first KVM_RUN on stderr: spawn -> first KVM_RUN is the
host-side preparation (reading, decompressing and loading the kernel), the rest is the
guest's own time.

The guest-decompressor variant takes minutes on a host that emulates CPL 0 code, so it
runs --reps-slow times (default 1) with --timeout-slow; the others --reps times
(default 3), interleaved (order alternating between rounds) so that a change in the
host's load hits every series alike. --budget bounds the whole run: a repetition that
would probably not finish in time is left out (the table says how many runs each
median is of).

Usage:
  bench/linux-boot.py [SWIFTLET] [--kernel-dir DIR] [--memory SIZE] [--reps N]
                      [--reps-slow N] [--timeout S] [--timeout-slow S] [--budget S]
                      [--no-qemu] [--only-fast] [--markdown FILE]

SWIFTLET defaults to .build/release/swiftlet. The kernel directory defaults to
$SWIFTLET_KERNEL_CACHE or /var/cache/swiftlet/linux; when it lacks vmlinuz or vmlinux
the script says how to fetch them and exits 0 (skipped), so `make bench` passes on a
machine without them.

Exit status: 0 when every measurement ran or the kernel is missing, 1 when a run failed
(no output before its timeout, the VMM exited early), 2 for usage errors.

Python 3.8+, standard library only. Linux only (needs /dev/kvm).
"""

from __future__ import annotations

import argparse
import os
import re
import select
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CACHE = "/var/cache/swiftlet/linux"
CMDLINE = "console=ttyS0 earlyprintk=serial noxsave"
BANNER = b"Linux version"
CMDLINE_MARK = b"Command line:"
FIRST_RUN_RE = re.compile(r"first KVM_RUN: monotonic (\d+) ns")


class BenchError(Exception):
    """A run did not produce what was expected; the message says why."""


class Variant:
    def __init__(self, key, label, argv, kind, slow=False):
        self.key, self.label, self.argv, self.kind, self.slow = key, label, argv, kind, slow
        self.runs = []       # Sample per successful run
        self.errors = []     # messages


class Sample:
    def __init__(self, first, banner, cmdline, prepare, wall, status):
        self.first, self.banner, self.cmdline = first, banner, cmdline
        self.prepare = prepare  # spawn -> first KVM_RUN (Swiftlet only), or None
        self.wall = wall        # spawn -> process reaped
        self.status = status    # exit status after the signal


def boot_once(variant: Variant, timeout: float, workdir: str) -> Sample:
    """Starts the VMM, waits for the banner and the command line, ends it."""
    err_path = os.path.join(workdir, f"{variant.key}.stderr")
    with open(err_path, "wb") as err:
        start_mono = time.monotonic_ns()
        try:
            proc = subprocess.Popen(variant.argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                    stderr=err)
        except OSError as error:
            raise BenchError(f"cannot run {variant.argv[0]}: {error}")
    seen = b""
    first = banner = cmdline = None
    exited = None
    fd = proc.stdout.fileno()
    deadline = start_mono + int(timeout * 1e9)
    try:
        while banner is None or cmdline is None:
            remaining = (deadline - time.monotonic_ns()) / 1e9
            if remaining <= 0:
                break
            ready, _, _ = select.select([fd], [], [], min(remaining, 1.0))
            if not ready:
                continue
            chunk = os.read(fd, 65536)
            now = time.monotonic_ns()
            if not chunk:  # the VMM closed its stdout: it has exited
                exited = proc.wait()
                break
            if first is None:
                first = now
            # Search the tail of what came before too: a marker can straddle two reads.
            tail = len(seen)
            seen += chunk
            if banner is None and BANNER in seen[max(0, tail - len(BANNER)):]:
                banner = now
            if cmdline is None and CMDLINE_MARK in seen[max(0, tail - len(CMDLINE_MARK)):]:
                cmdline = now
    finally:
        if proc.poll() is None:
            if variant.kind == "swiftlet":
                proc.send_signal(signal.SIGTERM)
            else:
                proc.kill()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        proc.stdout.close()
    wall = (time.monotonic_ns() - start_mono) / 1e9
    with open(err_path, "rb") as err:
        stderr = err.read().decode("utf-8", "replace")
    if banner is None or cmdline is None:
        what = "exited with status %d" % exited if exited is not None else f"timed out after {timeout:g} s"
        missing = "'Linux version'" if banner is None else "'Command line:'"
        raise BenchError(
            f"{variant.label}: {what} without printing {missing}; {len(seen)} bytes of output"
            + (f" (first after {(first - start_mono) / 1e9:.1f} s)" if first else "")
            + f"\n  stdout tail: {seen[-300:]!r}\n  stderr tail: {stderr[-1500:]!r}")
    prepare = None
    match = FIRST_RUN_RE.search(stderr)
    if match:
        prepare = (int(match.group(1)) - start_mono) / 1e9
    status = proc.returncode
    if variant.kind == "swiftlet" and status != 143:
        # Not a measurement failure, but worth saying: Swiftlet documents 143 for SIGTERM.
        print(f"  note: {variant.label} exited with status {status} after SIGTERM (expected 143); "
              f"stderr tail: {stderr[-300:]!r}", file=sys.stderr)
    return Sample((first - start_mono) / 1e9, (banner - start_mono) / 1e9,
                  (cmdline - start_mono) / 1e9, prepare, wall, status)


# ---------------------------------------------------------------------------------------
# Formatting (as bench/vm.py)

def median(values):
    return statistics.median(values) if values else float("nan")


def fmt_time(seconds) -> str:
    if seconds is None or seconds != seconds:
        return "n/a"
    if seconds >= 1:
        return f"{seconds:.1f} s"
    return f"{seconds * 1e3:.0f} ms"


def fmt_ratio(value) -> str:
    return "n/a" if value is None or value != value else f"{value:.2f}"


def table_text(header, rows):
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]
    lines = ["  " + "  ".join(str(h).ljust(w) for h, w in zip(header, widths)).rstrip(),
             "  " + "  ".join("-" * w for w in widths)]
    lines += ["  " + "  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    return "\n".join(lines)


def table_markdown(header, rows):
    lines = ["| " + " | ".join(str(h) for h in header) + " |",
             "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join(lines)


def swiftlet_version(swiftlet):
    try:
        out = subprocess.run(["git", "-C", ROOT, "log", "-1", "--format=%h %s"], stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL, timeout=10).stdout.decode().strip()
        return (out[:70] + "...") if len(out) > 73 else (out or "unknown commit")
    except (OSError, subprocess.TimeoutExpired):
        return "unknown commit"


def qemu_version(qemu):
    try:
        out = subprocess.run([qemu, "--version"], stdout=subprocess.PIPE, timeout=20).stdout.decode()
        return out.splitlines()[0].strip()
    except (OSError, subprocess.TimeoutExpired, IndexError):
        return "qemu"


# ---------------------------------------------------------------------------------------

def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="See the top of bench/linux-boot.py for what is measured and how.")
    parser.add_argument("swiftlet", nargs="?", default=os.path.join(ROOT, ".build", "release", "swiftlet"),
                        help="the swiftlet binary (default: .build/release/swiftlet)")
    parser.add_argument("--kernel-dir", default=os.environ.get("SWIFTLET_KERNEL_CACHE", DEFAULT_CACHE),
                        help="directory holding vmlinuz and vmlinux (default: $SWIFTLET_KERNEL_CACHE "
                             f"or {DEFAULT_CACHE})")
    parser.add_argument("--memory", default="512M", help="guest RAM for every VMM (default 512M)")
    parser.add_argument("--reps", type=int, default=3, help="runs of each fast variant (default 3)")
    parser.add_argument("--reps-slow", type=int, default=1,
                        help="runs of the guest-decompressor variant (default 1)")
    parser.add_argument("--timeout", type=float, default=240,
                        help="seconds a fast variant may take to print the command line (default 240)")
    parser.add_argument("--timeout-slow", type=float, default=480,
                        help="the same for the guest-decompressor variant (default 480)")
    parser.add_argument("--budget", type=float, default=840,
                        help="seconds for the whole benchmark; repetitions that would overrun it are "
                             "left out (default 840)")
    parser.add_argument("--no-qemu", action="store_true", help="skip the QEMU microvm row")
    parser.add_argument("--only-fast", action="store_true",
                        help="skip the guest-decompressor variant (minutes on a nested host)")
    parser.add_argument("--markdown", metavar="FILE", help="also write the results as markdown to FILE")
    args = parser.parse_args(argv)
    if args.reps < 1 or args.reps_slow < 1 or args.timeout <= 0 or args.timeout_slow <= 0:
        parser.error("--reps and --reps-slow must be >= 1, timeouts > 0")

    vmlinuz = os.path.join(args.kernel_dir, "vmlinuz")
    vmlinux = os.path.join(args.kernel_dir, "vmlinux")
    if not (os.path.isfile(vmlinuz) and os.path.isfile(vmlinux)):
        print(f"linux-boot.py: skipped: no Debian kernel in {args.kernel_dir} (needs vmlinuz and vmlinux).\n"
              "  Fetch it with: sh guests/linux/fetch-debian-kernel.sh   (as root, or with\n"
              "  SWIFTLET_KERNEL_CACHE=DIR set to a writable directory, then --kernel-dir DIR)")
        return 0
    swiftlet = os.path.abspath(args.swiftlet)
    if not (os.path.isfile(swiftlet) and os.access(swiftlet, os.X_OK)):
        print(f"linux-boot.py: no swiftlet binary at {swiftlet}; build one with "
              "`swift build -c release` or pass its path", file=sys.stderr)
        return 2
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        print("linux-boot.py: /dev/kvm is not accessible", file=sys.stderr)
        return 2

    common = ["--memory", args.memory, "--cmdline", CMDLINE, "--trace-exits"]
    variants = []
    if not args.only_fast:
        variants.append(Variant("guest-decomp", "swiftlet bzImage, guest decompressor",
                                [swiftlet, "run", "--kernel", vmlinuz, "--no-decompress-on-host"] + common,
                                "swiftlet", slow=True))
    variants += [
        Variant("host-decomp", "swiftlet bzImage, host decompression (default)",
                [swiftlet, "run", "--kernel", vmlinuz] + common, "swiftlet"),
        Variant("vmlinux-pvh", "swiftlet vmlinux, PVH entry (auto)",
                [swiftlet, "run", "--kernel", vmlinux] + common, "swiftlet"),
        Variant("vmlinux-64", "swiftlet vmlinux, 64-bit entry (--linux-entry linux64)",
                [swiftlet, "run", "--kernel", vmlinux, "--linux-entry", "linux64"] + common, "swiftlet"),
    ]
    notes = []
    qemu = shutil.which("qemu-system-x86_64")
    qemu_argv = None
    if args.no_qemu:
        notes.append("QEMU row skipped (--no-qemu)")
    elif not qemu:
        notes.append("QEMU row skipped: qemu-system-x86_64 not found")
    else:
        # Default CPU model (qemu64): `-cpu host` and `-cpu max` abort on this kind of
        # nested host (KVM refuses MSR 0x10a, IA32_ARCH_CAPABILITIES).
        qemu_argv = [qemu, "-M", "microvm", "-accel", "kvm", "-m", args.memory, "-nodefaults",
                     "-no-user-config", "-nographic", "-serial", "stdio", "-kernel", vmlinux,
                     "-append", CMDLINE]
        variants.append(Variant("qemu", "qemu microvm vmlinux (PVH)", qemu_argv, "qemu"))
    fast = [v for v in variants if not v.slow]
    slow = [v for v in variants if v.slow]

    package = ""
    try:
        with open(os.path.join(args.kernel_dir, "package")) as f:
            package = f.read().strip()
    except OSError:
        pass
    preamble = [
        time.strftime("run at %Y-%m-%d %H:%M UTC", time.gmtime()),
        f"host: {os.uname().release}, {os.cpu_count()} CPUs, load average "
        + " ".join(f"{x:.1f}" for x in os.getloadavg()) + " at the start",
        f"swiftlet: {swiftlet} (checkout at {swiftlet_version(swiftlet)})",
        f"kernel: {package or 'Debian kernel'} from {args.kernel_dir}: vmlinuz {os.path.getsize(vmlinuz)} "
        f"bytes, vmlinux {os.path.getsize(vmlinux)} bytes",
        f"guest RAM {args.memory}, 1 vCPU, command line '{CMDLINE}'",
    ]
    if qemu_argv:
        preamble.append(f"qemu: {qemu_version(qemu)}: "
                        + " ".join(a if a != CMDLINE else f"'{a}'" for a in qemu_argv[1:]).replace(vmlinux, "vmlinux"))
    print("Swiftlet Linux boot benchmark")
    for line in preamble:
        print(f"  {line}")
    sys.stdout.flush()

    # The kernel files into the page cache, so that the first run does not pay for the disk.
    for path in (vmlinuz, vmlinux):
        with open(path, "rb") as f:
            while f.read(1 << 20):
                pass

    began = time.monotonic()

    def one(variant, timeout):
        print(f"  [{time.monotonic() - began:6.0f} s] {variant.label} ...", end="", flush=True)
        try:
            with tempfile.TemporaryDirectory(prefix="swiftlet-linux-bench-") as workdir:
                sample = boot_once(variant, timeout, workdir)
            variant.runs.append(sample)
            extra = f", first KVM_RUN {sample.prepare:.2f} s" if sample.prepare is not None else ""
            print(f" first byte {sample.first:.1f} s, banner {sample.banner:.1f} s, "
                  f"command line {sample.cmdline:.1f} s{extra}", flush=True)
        except BenchError as error:
            variant.errors.append(str(error))
            print(f" FAILED\n{error}", flush=True)

    def fits(variant, timeout):
        """Whether another run of variant probably ends within the budget."""
        expected = max((s.wall for s in variant.runs), default=None)
        if expected is None:
            return True  # always try each variant once
        return time.monotonic() - began + expected * 1.2 <= args.budget

    # Round 1 of the fast variants, then the slow one(s), then the other rounds with
    # the order alternating. A variant that failed is not run again.
    skipped = {}
    for rep in range(max(args.reps, 1)):
        order = fast if rep % 2 == 0 else list(reversed(fast))
        for variant in order:
            if variant.errors:
                continue
            if not fits(variant, args.timeout):
                skipped[variant.key] = skipped.get(variant.key, 0) + 1
                continue
            one(variant, args.timeout)
        if rep == 0:
            for variant in slow:
                for slow_rep in range(args.reps_slow):
                    if variant.errors or not fits(variant, args.timeout_slow):
                        continue
                    one(variant, args.timeout_slow)
    total = time.monotonic() - began

    # Results
    header = ["variant", "runs", "first byte", "'Linux version'", "'Command line:'",
              "first KVM_RUN", "range of 'Linux version'"]
    rows = []
    banner_medians = {}
    first_medians = {}
    failed = False
    for v in variants:
        if not v.runs:
            failed = True
            rows.append([v.label, "0", "error", "", "", "", ""])
            continue
        if v.errors:
            failed = True
        first_medians[v.key] = median([s.first for s in v.runs])
        banner_medians[v.key] = median([s.banner for s in v.runs])
        prepares = [s.prepare for s in v.runs if s.prepare is not None]
        rows.append([v.label, str(len(v.runs)) + (f" ({len(v.errors)} failed)" if v.errors else ""),
                     fmt_time(first_medians[v.key]), fmt_time(banner_medians[v.key]),
                     fmt_time(median([s.cmdline for s in v.runs])),
                     fmt_time(median(prepares)) if prepares else "n/a",
                     f"{fmt_time(min(s.banner for s in v.runs))} .. {fmt_time(max(s.banner for s in v.runs))}"])

    ratio_header = ["ratio", "first byte", "'Linux version'"]
    ratio_rows = []

    def ratio(a, b, values):
        x, y = values.get(a), values.get(b)
        return x / y if x is not None and y and x == x and y == y else None

    if "qemu" in banner_medians:
        for v in variants:
            if v.kind == "swiftlet":
                ratio_rows.append([f"{v.label} / qemu microvm",
                                   fmt_ratio(ratio(v.key, "qemu", first_medians)),
                                   fmt_ratio(ratio(v.key, "qemu", banner_medians))])
    ratio_rows.append(["host decompression / guest decompressor (same bzImage)",
                       fmt_ratio(ratio("host-decomp", "guest-decomp", first_medians)),
                       fmt_ratio(ratio("host-decomp", "guest-decomp", banner_medians))])
    if "host-decomp" in banner_medians and "guest-decomp" in banner_medians:
        saved = banner_medians["guest-decomp"] - banner_medians["host-decomp"]
        notes.append(f"host decompression saves {fmt_time(saved)} to the banner on this host "
                     "(the guest's decompressor runs at CPL 0, emulated here)")
    for key, count in sorted(skipped.items()):
        notes.append(f"{key}: {count} repetition(s) left out to stay within --budget {args.budget:g} s")
    notes += [
        "times from the spawn of the VMM, medians; 'first byte' is the first byte on the VMM's stdout "
        "(the serial console), the other two the arrival of those strings; 'first KVM_RUN' (Swiftlet, "
        "from --trace-exits) is the host-side preparation: reading, decompressing, loading",
        f"fast variants {args.reps} runs each, interleaved, order alternating; guest decompressor "
        f"{args.reps_slow} run(s); whole benchmark {total:.0f} s",
    ]

    print("\nTime to the kernel's first serial output")
    print(table_text(header, rows))
    print("\nRatios (medians)")
    print(table_text(ratio_header, ratio_rows))
    for note in notes:
        print(f"  {note}")
    errors = [(v.label, e) for v in variants for e in v.errors]
    for label, error in errors:
        print(f"\n[{label}] {error}", file=sys.stderr)

    if args.markdown:
        lines = ["# Swiftlet Linux boot benchmark", ""] + [f"- {p}" for p in preamble] + [""]
        lines += ["## Time to the kernel's first serial output", "", table_markdown(header, rows), ""]
        lines += ["## Ratios", "", table_markdown(ratio_header, ratio_rows), ""]
        lines += [f"{n}  " for n in notes] + [""]
        with open(args.markdown, "w") as out:
            out.write("\n".join(lines) + "\n")
        print(f"\nwrote {args.markdown}")
    if failed:
        print("\nlinux-boot.py: some runs failed (see the messages above)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
