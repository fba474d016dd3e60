#!/usr/bin/env python3
"""What the sandbox costs: the same runs with `--seccomp on` (the default) and `--seccomp off`,
interleaved, in one run of this script (only ratios taken side by side mean much here).

  (a) PIO exit round trip: guests/build/pio-loop-{1k,101k}.bin; per exit =
      (median(101k) - median(1k)) / 100 000, wall and child CPU time. Every exit is a
      KVM_RUN ioctl, which the vCPU filter checks argument by argument.
  (b) virtio-blk: guests/build/virtio-blk.elf reading (crc) and writing (write 7) a raw
      image of --disk-mib MiB; wall and child CPU time of the whole run.

Usage: bench/seccomp.py [SWIFTLET] [--reps N] [--disk-mib N] [--markdown FILE]
SWIFTLET defaults to .build/release/swiftlet. Guests come from guests/build (make guests).
"""

import argparse
import os
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GUESTS = os.path.join(ROOT, "guests", "build")


def run_cpu(command):
    start = time.monotonic()
    pid = os.fork()
    if pid == 0:
        devnull = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(devnull, fd)
        os.execv(command[0], command)
    _, status, usage = os.wait4(pid, 0)
    wall = time.monotonic() - start
    return wall, usage.ru_utime + usage.ru_stime, os.waitstatus_to_exitcode(status)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("swiftlet", nargs="?", default=os.path.join(ROOT, ".build", "release", "swiftlet"))
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--disk-mib", type=int, default=64)
    parser.add_argument("--markdown")
    args = parser.parse_args()

    modes = ["on", "off"]
    samples = {}

    def record(key, mode, wall, cpu):
        samples.setdefault((key, mode), []).append((wall, cpu))

    pio = {n: os.path.join(GUESTS, f"pio-loop-{n}.bin") for n in ("1k", "101k")}
    scratch = tempfile.mkdtemp()
    disk = os.path.join(scratch, "disk.raw")
    with open(disk, "wb") as f:
        f.truncate(args.disk_mib << 20)
    blk = os.path.join(GUESTS, "virtio-blk.elf")
    try:
        for rep in range(args.reps):
            for mode in (modes if rep % 2 == 0 else modes[::-1]):
                for n, path in pio.items():
                    wall, cpu, status = run_cpu([args.swiftlet, "run", "--seccomp", mode, "--flat", path])
                    if status != 1:
                        sys.exit(f"pio-loop-{n} with --seccomp {mode}: status {status}")
                    record(f"pio-{n}", mode, wall, cpu)
                for job in ("crc", "write 7"):
                    wall, cpu, status = run_cpu([args.swiftlet, "run", "--seccomp", mode, "--kernel", blk,
                                                 "--disk", disk, "--cmdline", job])
                    if status != 1:
                        sys.exit(f"virtio-blk {job} with --seccomp {mode}: status {status}")
                    record(f"blk-{job}", mode, wall, cpu)
    finally:
        os.unlink(disk)
        os.rmdir(scratch)

    def median(key, mode, index):
        return statistics.median(s[index] for s in samples[(key, mode)])

    lines = ["| measurement | seccomp on | seccomp off | ratio on/off |", "| --- | --- | --- | --- |"]
    for index, what in ((0, "wall"), (1, "CPU")):
        per_exit = {m: (median("pio-101k", m, index) - median("pio-1k", m, index)) / 100_000 * 1e6 for m in modes}
        lines.append(f"| PIO exit round trip ({what}, medians) | {per_exit['on']:.2f} µs | {per_exit['off']:.2f} µs "
                     f"| **{per_exit['on'] / per_exit['off']:.3f}** |")
    for job in ("crc", "write 7"):
        for index, what in ((0, "wall"), (1, "CPU")):
            on, off = median(f"blk-{job}", "on", index), median(f"blk-{job}", "off", index)
            lines.append(f"| virtio-blk `{job}` of {args.disk_mib} MiB ({what}) | {on * 1000:.0f} ms | {off * 1000:.0f} ms "
                         f"| **{on / off:.3f}** |")
    table = "\n".join(lines)
    print(table)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(table + "\n")


if __name__ == "__main__":
    main()
