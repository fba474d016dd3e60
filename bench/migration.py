#!/usr/bin/env python3
"""Live migration benchmark: total time and downtime of `swiftlet` migrating a guest
that keeps writing memory, for 256 MiB and 1 GiB of guest RAM.

For each RAM size and working set, in one run:

  1. guests/dirtier.s is assembled with --defsym WORKSET=<bytes> (the RAM it rewrites
     every round, from 2 MiB up) into a temporary directory.
  2. A target waits (`swiftlet run --incoming unix:...`) and a source runs the dirtier
     with a monitor socket. The serial outputs go to files that a thread polls every
     millisecond, timestamping each complete "round R sum S" line.
  3. After a warm-up, the dirtying rate is measured from the guest's own output: rounds
     per second times WORKSET.
  4. `swiftlet monitor SOCK migrate unix:...` migrates it. Swiftlet's summary gives the
     pre-copy rounds, pages and bytes sent, the total time (connect to commit) and the
     downtime (pause to commit).
  5. The guest-visible pause: the time between the last round line completed on the
     source and the first one completed on the target, next to the normal interval
     between two round lines measured before migrating (the baseline of the same run).
  6. The baseline, in the same run: the same number of bytes pushed through a Unix
     socket pair between two threads of this script in 1 MiB pieces (the floor of any
     stream on this host at this moment: the machine is shared, so only this ratio means
     much).
  7. Every round line of source and target together must be the next round with the sum
     the memory must give; a wrong one fails the benchmark (status 1).

Usage:
  bench/migration.py [SWIFTLET] [--reps N] [--markdown FILE]

SWIFTLET defaults to .build/release/swiftlet. Python 3.8+, standard library only;
needs /dev/kvm, GNU as and ld. Exit status: 0 when every run migrated with the right
checksums, 1 otherwise, 2 for usage errors.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MIB = 1 << 20
# (guest RAM, working set): a light and a heavy writer for each size.
CASES = [(256 * MIB, 16 * MIB), (256 * MIB, 128 * MIB), (1024 * MIB, 16 * MIB), (1024 * MIB, 512 * MIB)]
SUMMARY_RE = re.compile(r"(\d+) rounds?, (\d+) pages \((.*?) sent\), (\d+) while paused; total ([\d.]+) ms, downtime ([\d.]+) ms")
WARMUP = 3.0


def build_dirtier(directory: str, workset: int) -> str:
    """guests/dirtier.s with this working set, as a flat binary in `directory`."""
    obj = os.path.join(directory, f"dirtier-{workset}.o")
    out = os.path.join(directory, f"dirtier-{workset}.bin")
    guests = os.path.join(ROOT, "guests")
    subprocess.run(["as", "--64", "-I", guests, "--defsym", f"WORKSET={workset}", "-o", obj,
                    os.path.join(guests, "dirtier.s")], check=True)
    subprocess.run(["ld", "-m", "elf_x86_64", "-T", os.path.join(guests, "flat.ld"), "-o", out, obj], check=True)
    return out


class RoundWatcher(threading.Thread):
    """Polls serial output files every millisecond; records (time, round, sum) for each
    complete round line, and which file it came from."""

    def __init__(self, paths):
        super().__init__(daemon=True)
        self.paths = paths
        self.lines = {p: [] for p in paths}
        self.text = {p: "" for p in paths}
        self.stopping = False

    def run(self):
        offsets = {p: 0 for p in self.paths}
        partial = {p: "" for p in self.paths}
        while not self.stopping:
            now = time.monotonic()
            for p in self.paths:
                try:
                    with open(p, "rb") as f:
                        f.seek(offsets[p])
                        data = f.read()
                except FileNotFoundError:
                    continue
                if not data:
                    continue
                offsets[p] += len(data)
                chunk = data.decode("utf-8", "replace")
                self.text[p] += chunk
                pieces = (partial[p] + chunk).split("\n")
                partial[p] = pieces.pop()
                for line in pieces:
                    words = line.split()
                    if len(words) == 4 and words[0] == "round":
                        self.lines[p].append((now, int(words[1]), int(words[3])))
            time.sleep(0.001)


def check_rounds(text: str, pages: int) -> tuple[bool, int]:
    """Every round once, in order, with the right sum. Returns (ok, last round)."""
    expected = 1
    for line in text.split("\n")[:-1]:
        if not line.startswith("round "):
            continue
        words = line.split()
        r, s = int(words[1]), int(words[3])
        if r != expected or s != r * pages * (pages - 1) // 2 + pages * r * (r + 1) // 2:
            print(f"  wrong line after round {expected - 1}: {line!r}", file=sys.stderr)
            return False, expected - 1
        expected += 1
    return True, expected - 1


def socket_floor(total: int) -> float:
    """Seconds to move `total` bytes through a Unix socket pair, 1 MiB at a time."""
    import socket
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    chunk = bytes(range(256)) * 4096
    received = [0]

    def reader():
        buffer = bytearray(1 << 20)
        view = memoryview(buffer)
        while received[0] < total:
            n = b.recv_into(view)
            if n == 0:
                break
            received[0] += n

    thread = threading.Thread(target=reader)
    start = time.monotonic()
    thread.start()
    sent = 0
    while sent < total:
        piece = chunk[: min(len(chunk), total - sent)]
        a.sendall(piece)
        sent += len(piece)
    thread.join()
    elapsed = time.monotonic() - start
    a.close()
    b.close()
    return elapsed


def wait_for(predicate, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return False


def migrate_once(swiftlet: str, guest: str, memory: int, workset: int, scratch: str) -> dict | None:
    for name in ("source.out", "target.out", "in.sock", "mon.sock"):
        try:
            os.unlink(os.path.join(scratch, name))
        except FileNotFoundError:
            pass
    source_out, target_out = os.path.join(scratch, "source.out"), os.path.join(scratch, "target.out")
    incoming, monitor = os.path.join(scratch, "in.sock"), os.path.join(scratch, "mon.sock")
    mem = f"{memory // MIB}M"
    target = subprocess.Popen([swiftlet, "run", "--incoming", f"unix:{incoming}", "--memory", mem,
                               "--serial", f"file:{target_out}", "--timeout", "300"],
                              stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    source = subprocess.Popen([swiftlet, "run", "--flat", guest, "--memory", mem, "--serial", f"file:{source_out}",
                               "--monitor", monitor, "--timeout", "300"],
                              stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    watcher = RoundWatcher([source_out, target_out])
    watcher.start()
    try:
        if not wait_for(lambda: os.path.exists(incoming) and os.path.exists(monitor), 30):
            print("  the source or target did not start", file=sys.stderr)
            return None
        if not wait_for(lambda: len(watcher.lines[source_out]) >= 3, 60):
            print("  the dirtier printed no rounds", file=sys.stderr)
            return None
        time.sleep(WARMUP)
        before = list(watcher.lines[source_out])
        intervals = [b[0] - a[0] for a, b in zip(before, before[1:])]
        seconds = before[-1][0] - before[0][0]
        rate = (len(before) - 1) * workset / seconds if seconds > 0 else 0.0
        answer = subprocess.run([swiftlet, "monitor", monitor, "migrate", f"unix:{incoming}"], capture_output=True, text=True)
        match = SUMMARY_RE.search(answer.stdout)
        if answer.returncode != 0 or not match:
            print(f"  migrate failed: {answer.stdout.strip()} {answer.stderr.strip()}", file=sys.stderr)
            return None
        source.wait(timeout=30)
        last_on_source = watcher.lines[source_out][-1] if watcher.lines[source_out] else None
        if not wait_for(lambda: len(watcher.lines[target_out]) >= 3, 60):
            print("  the target printed no rounds", file=sys.stderr)
            return None
        first_on_target = watcher.lines[target_out][0]
        time.sleep(0.2)
        watcher.stopping = True
        watcher.join()
        ok, _ = check_rounds(watcher.text[source_out] + watcher.text[target_out], workset // 4096)
        if not ok or last_on_source is None:
            return None
        return {
            "rounds": int(match.group(1)), "pages": int(match.group(2)), "sent": match.group(3),
            "final_pages": int(match.group(4)), "total_ms": float(match.group(5)), "downtime_ms": float(match.group(6)),
            "rate": rate, "interval_ms": statistics.median(intervals) * 1000 if intervals else 0.0,
            "gap_ms": (first_on_target[0] - last_on_source[0]) * 1000,
            "floor_ms": socket_floor(int(match.group(2)) * 4096) * 1000,
        }
    finally:
        watcher.stopping = True
        for process in (source, target):
            if process.poll() is None:
                process.kill()
                process.wait()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("swiftlet", nargs="?", default=os.path.join(ROOT, ".build/release/swiftlet"))
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--markdown", help="append the table to this file")
    arguments = parser.parse_args()
    if not os.access(arguments.swiftlet, os.X_OK):
        print(f"migration.py: no swiftlet at {arguments.swiftlet}", file=sys.stderr)
        return 2
    print(f"Live migration, {arguments.reps} runs per case (median), over a Unix socket on one host")
    header = ("| guest RAM | working set | dirtying rate | rounds | pages sent | paused pages | total | socket floor | total / floor "
              "| downtime | gap in the guest's output | normal round interval |")
    rows = [header, "|" + " --- |" * 12]
    failed = False
    with tempfile.TemporaryDirectory(prefix="swiftlet-migration-") as scratch:
        for memory, workset in CASES:
            guest = build_dirtier(scratch, workset)
            results = []
            for _ in range(arguments.reps):
                result = migrate_once(arguments.swiftlet, guest, memory, workset, scratch)
                if result is None:
                    failed = True
                    continue
                results.append(result)
            if not results:
                rows.append(f"| {memory // MIB} MiB | {workset // MIB} MiB | failed |" + " |" * 9)
                continue
            med = lambda key: statistics.median(r[key] for r in results)
            rows.append(f"| {memory // MIB} MiB | {workset // MIB} MiB | {med('rate') / MIB:.0f} MiB/s | {med('rounds'):.0f} "
                        f"| {med('pages'):.0f} | {med('final_pages'):.0f} | {med('total_ms'):.0f} ms | {med('floor_ms'):.0f} ms "
                        f"| {statistics.median(r['total_ms'] / max(r['floor_ms'], 0.001) for r in results):.1f} | {med('downtime_ms'):.1f} ms "
                        f"| {med('gap_ms'):.1f} ms | {med('interval_ms'):.1f} ms |")
            print(rows[-1], flush=True)
    print("\n".join(rows))
    if arguments.markdown:
        with open(arguments.markdown, "a") as f:
            f.write("\n".join(rows) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
