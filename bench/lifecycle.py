#!/usr/bin/env python3
"""Lifecycle benchmark: restore from a snapshot against a full boot, in the same run.

For each RAM size (256 MiB and 1 GiB by default), with guests/counter.bin (counts and
prints at CPL 3):

  (a) Full boot: wall time from spawning `swiftlet run --flat counter.bin --memory SIZE`
      to the guest's first "count" line on the console.
  (b) Snapshot: the counter runs with --monitor; after a few lines it is paused
      (`swiftlet monitor SOCK stop`) and snapshotted (`snapshot DIR`): the wall time of
      that command, and the memory file's size on disk (zero pages are holes).
  (c) Restore: wall time from spawning `swiftlet run --restore DIR` to the first "count"
      line the restored guest prints. RAM is mapped from the memory file (MAP_PRIVATE),
      so this should not grow with the size of RAM.
  (d) For scale: the time to read the whole memory file (what a restore that loads RAM
      first would at least pay), measured right after (b).

Each timing is the median of --reps runs (default 5). The figures that mean something on a
noisy host are the ratios taken in the same run: restore / full boot, and restore at 1 GiB
/ restore at 256 MiB.

Usage:
  bench/lifecycle.py [SWIFTLET] [--reps N] [--sizes 256,1024] [--guests DIR] [--markdown FILE]

SWIFTLET defaults to .build/release/swiftlet. Exit status 0 when every measurement ran, 1
when one failed, 2 for usage errors. Python 3.8+, standard library only.
"""

from __future__ import annotations

import argparse
import os
import select
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def first_count_line(command: list[str], timeout: float = 60.0) -> float:
    """Spawns `command` and returns the seconds until a line starting with 'count '
    appears on its stdout; then kills it."""
    started = time.monotonic()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    buffer = b""
    try:
        while True:
            remaining = timeout - (time.monotonic() - started)
            if remaining <= 0:
                raise RuntimeError(f"no 'count' line within {timeout} s: {' '.join(command)}")
            ready, _, _ = select.select([process.stdout], [], [], remaining)
            if not ready:
                continue
            chunk = os.read(process.stdout.fileno(), 65536)
            if not chunk:
                raise RuntimeError(f"{' '.join(command)} ended first: {process.stderr.read().decode(errors='replace')}")
            buffer += chunk
            if b"count " in buffer:
                return time.monotonic() - started
    finally:
        process.kill()
        process.wait()


def monitor(swiftlet: str, socket: str, *command: str) -> str:
    result = subprocess.run([swiftlet, "monitor", socket, *command], capture_output=True, text=True, timeout=300)
    if result.returncode != 0:
        raise RuntimeError(f"monitor {' '.join(command)}: {result.stderr.strip() or result.stdout.strip()}")
    return result.stdout.strip()


def take_snapshot(swiftlet: str, guest: str, mib: int, directory: str, scratch: str) -> tuple[float, int]:
    """Runs the counter with a monitor, pauses and snapshots it; returns the snapshot
    command's seconds and the memory file's bytes on disk."""
    socket = os.path.join(scratch, f"monitor-{mib}.sock")
    process = subprocess.Popen([swiftlet, "run", "--flat", guest, "--memory", f"{mib}M", "--monitor", socket],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        seen = b""
        while seen.count(b"count ") < 3:
            if time.monotonic() > deadline:
                raise RuntimeError("the counter did not print")
            ready, _, _ = select.select([process.stdout], [], [], 1)
            if ready:
                chunk = os.read(process.stdout.fileno(), 65536)
                if not chunk:
                    raise RuntimeError(f"the counter ended: {process.stderr.read().decode(errors='replace')}")
                seen += chunk
        monitor(swiftlet, socket, "stop")
        started = time.monotonic()
        monitor(swiftlet, socket, "snapshot", directory)
        elapsed = time.monotonic() - started
        try:
            monitor(swiftlet, socket, "quit")
        except RuntimeError:
            pass
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    blocks = os.stat(os.path.join(directory, "memory")).st_blocks * 512
    return elapsed, blocks


def read_file_seconds(path: str) -> float:
    started = time.monotonic()
    with open(path, "rb", buffering=0) as handle:
        while handle.read(1 << 20):
            pass
    return time.monotonic() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("swiftlet", nargs="?", default=os.path.join(ROOT, ".build/release/swiftlet"))
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--sizes", default="256,1024", help="RAM sizes in MiB, comma-separated")
    parser.add_argument("--guests", default=os.path.join(ROOT, "guests/build"))
    parser.add_argument("--markdown", help="also write the table to this file")
    arguments = parser.parse_args()
    if arguments.reps < 1:
        print("lifecycle.py: --reps must be at least 1", file=sys.stderr)
        return 2
    try:
        sizes = [int(size) for size in arguments.sizes.split(",")]
    except ValueError:
        print(f"lifecycle.py: --sizes '{arguments.sizes}' is not a list of MiB", file=sys.stderr)
        return 2
    guest = os.path.join(arguments.guests, "counter.bin")
    for path in (arguments.swiftlet, guest):
        if not os.path.exists(path):
            print(f"lifecycle.py: {path} is missing (make release guests)", file=sys.stderr)
            return 2

    rows = []
    scratch = tempfile.mkdtemp(prefix="swiftlet-lifecycle-")
    try:
        for mib in sizes:
            boot = statistics.median(
                first_count_line([arguments.swiftlet, "run", "--flat", guest, "--memory", f"{mib}M"]) for _ in range(arguments.reps))
            directory = os.path.join(scratch, f"snapshot-{mib}")
            snapshot_seconds, on_disk = take_snapshot(arguments.swiftlet, guest, mib, directory, scratch)
            restore = statistics.median(
                first_count_line([arguments.swiftlet, "run", "--restore", directory]) for _ in range(arguments.reps))
            read_all = read_file_seconds(os.path.join(directory, "memory"))
            rows.append((mib, boot, snapshot_seconds, on_disk, restore, read_all))
            print(f"{mib} MiB: boot {boot * 1000:.1f} ms, snapshot {snapshot_seconds * 1000:.1f} ms "
                  f"({on_disk / 1024:.0f} KiB on disk), restore {restore * 1000:.1f} ms "
                  f"(restore/boot {restore / boot:.2f}), reading the memory file {read_all * 1000:.1f} ms", flush=True)
    except (RuntimeError, subprocess.TimeoutExpired, OSError) as error:
        print(f"lifecycle.py: {error}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    lines = ["| RAM | full boot to first line | snapshot (paused) | memory file on disk | restore to first line | restore / boot | reading the memory file |",
             "|-----|------|------|------|------|------|------|"]
    for mib, boot, snap, disk, restore, read_all in rows:
        lines.append(f"| {mib} MiB | {boot * 1000:.1f} ms | {snap * 1000:.1f} ms | {disk / 1024:.0f} KiB | "
                     f"{restore * 1000:.1f} ms | {restore / boot:.2f} | {read_all * 1000:.1f} ms |")
    if len(rows) >= 2:
        lines.append("")
        lines.append(f"restore at {rows[-1][0]} MiB / restore at {rows[0][0]} MiB: {rows[-1][4] / rows[0][4]:.2f}")
    table = "\n".join(lines)
    print(table)
    if arguments.markdown:
        with open(arguments.markdown, "w") as handle:
            handle.write(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
