#!/usr/bin/env python3
"""API benchmark: what the Firecracker-compatible API (SwiftNIO's HTTP/1.1 on a Unix
socket) costs in memory and start-up, against `swiftlet run` without it, in one run.

With guests/counter.bin (counts at CPL 3) and 16 MiB of guest RAM:

  (a) Time to first answer: from spawning `swiftlet run --api-sock S` to the first
      `GET /` answered with 200.
  (b) Boot through the API: from spawning to the counter's first line, with
      PUT /machine-config, PUT /boot-source and PUT /actions InstanceStart sent as soon as
      the socket answers; against (c) `swiftlet run --flat counter.bin` spawned to its
      first line.
  (d) Resident memory (VmRSS, and VmHWM) of the process once the counter has printed 20
      lines: through the API, and plain `swiftlet run`; with --baseline BINARY (a build
      without NIO, e.g. main before the API), that binary's plain run too.

Each figure is the median of --reps runs (default 5); ratios are taken in the same run.

Usage:
  bench/api.py [SWIFTLET] [--baseline OTHER_SWIFTLET] [--reps N] [--markdown FILE]

Exit status 0 when every measurement ran, 1 when one failed, 2 for usage errors.
Python 3.8+, standard library only.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COUNTER = os.path.join(ROOT, "guests", "build", "counter.bin")


def http(path_to_socket: str, method: str, path: str, body: dict | None = None, timeout: float = 10.0) -> int:
    """Sends one request over the Unix socket; returns the status (or -1 if it cannot connect)."""
    data = json.dumps(body).encode() if body is not None else b""
    request = f"{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n"
    request += f"Content-Length: {len(data)}\r\n\r\n" if body is not None else "\r\n"
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(path_to_socket)
            s.sendall(request.encode() + data)
            answer = b""
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                answer += chunk
    except OSError:
        return -1
    try:
        return int(answer.split(b" ", 2)[1])
    except (IndexError, ValueError):
        return -1


def wait_until(predicate, timeout: float = 60.0, step: float = 0.0005) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if predicate():
            return time.monotonic() - started
        time.sleep(step)
    raise RuntimeError("timed out")


def count_lines(console: str) -> int:
    try:
        with open(console, "rb") as f:
            return f.read().count(b"\ncount ") + (1 if open(console, "rb").read(6) == b"count " else 0)
    except OSError:
        return 0


def memory(pid: int) -> tuple[int, int]:
    rss = hwm = 0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1])
            elif line.startswith("VmHWM:"):
                hwm = int(line.split()[1])
    return rss, hwm


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def run_api(binary: str, scratch: str) -> tuple[float, float, tuple[int, int]]:
    sock = os.path.join(scratch, "api.sock")
    console = os.path.join(scratch, "console-api")
    for path in (sock, console):
        if os.path.exists(path):
            os.unlink(path)
    started = time.monotonic()
    process = subprocess.Popen([binary, "run", "--api-sock", sock, "--serial", f"file:{console}"],
                               stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_until(lambda: http(sock, "GET", "/") == 200)
        first_answer = time.monotonic() - started
        for method, path, body in [("PUT", "/machine-config", {"vcpu_count": 1, "mem_size_mib": 16}),
                                   ("PUT", "/boot-source", {"kernel_image_path": COUNTER}),
                                   ("PUT", "/actions", {"action_type": "InstanceStart"})]:
            status = http(sock, method, path, body)
            if status != 204:
                raise RuntimeError(f"{method} {path}: {status}")
        wait_until(lambda: count_lines(console) >= 1)
        first_line = time.monotonic() - started
        wait_until(lambda: count_lines(console) >= 20, step=0.01)
        return first_answer, first_line, memory(process.pid)
    finally:
        stop(process)


def run_plain(binary: str, scratch: str) -> tuple[float, tuple[int, int]]:
    console = os.path.join(scratch, "console-plain")
    if os.path.exists(console):
        os.unlink(console)
    started = time.monotonic()
    process = subprocess.Popen([binary, "run", "--flat", COUNTER, "--memory", "16M", "--serial", f"file:{console}"],
                               stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_until(lambda: count_lines(console) >= 1)
        first_line = time.monotonic() - started
        wait_until(lambda: count_lines(console) >= 20, step=0.01)
        return first_line, memory(process.pid)
    finally:
        stop(process)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("swiftlet", nargs="?", default=os.path.join(ROOT, ".build", "release", "swiftlet"))
    parser.add_argument("--baseline", help="a swiftlet binary without the API (no NIO linked)")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--markdown", help="also write the table to this file")
    args = parser.parse_args()
    for path in [args.swiftlet, COUNTER] + ([args.baseline] if args.baseline else []):
        if not os.path.exists(path):
            print(f"api.py: {path} not found (make release guests)", file=sys.stderr)
            return 2

    scratch = tempfile.mkdtemp(prefix="swiftlet-api-bench-")
    try:
        answers, api_lines, api_rss, api_hwm = [], [], [], []
        plain_lines, plain_rss, plain_hwm = [], [], []
        base_lines, base_rss, base_hwm = [], [], []
        for _ in range(args.reps):
            a, b, (rss, hwm) = run_api(args.swiftlet, scratch)
            answers.append(a); api_lines.append(b); api_rss.append(rss); api_hwm.append(hwm)
            c, (rss, hwm) = run_plain(args.swiftlet, scratch)
            plain_lines.append(c); plain_rss.append(rss); plain_hwm.append(hwm)
            if args.baseline:
                c, (rss, hwm) = run_plain(args.baseline, scratch)
                base_lines.append(c); base_rss.append(rss); base_hwm.append(hwm)
    except RuntimeError as error:
        print(f"api.py: {error}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    med = statistics.median
    rows = [
        ("time to first answer on the socket (`GET /`)", f"{med(answers) * 1000:.1f} ms", ""),
        ("spawn to first guest line, through the API", f"{med(api_lines) * 1000:.1f} ms",
         f"{med(api_lines) / med(plain_lines):.2f}x plain"),
        ("spawn to first guest line, plain `swiftlet run --flat`", f"{med(plain_lines) * 1000:.1f} ms", "1.00x"),
        ("VmRSS running, through the API", f"{med(api_rss) / 1024:.1f} MiB",
         f"+{(med(api_rss) - med(plain_rss)) / 1024:.1f} MiB"),
        ("VmRSS running, plain `swiftlet run`", f"{med(plain_rss) / 1024:.1f} MiB", ""),
        ("VmHWM (peak), through the API / plain", f"{med(api_hwm) / 1024:.1f} / {med(plain_hwm) / 1024:.1f} MiB", ""),
    ]
    if args.baseline:
        rows += [
            ("baseline binary (no NIO): spawn to first guest line", f"{med(base_lines) * 1000:.1f} ms",
             f"plain is {med(plain_lines) / med(base_lines):.2f}x"),
            ("baseline binary (no NIO): VmRSS running", f"{med(base_rss) / 1024:.1f} MiB",
             f"plain is +{(med(plain_rss) - med(base_rss)) / 1024:.1f} MiB"),
        ]
    sizes = f"binary size {os.path.getsize(args.swiftlet) / 1e6:.1f} MB"
    if args.baseline:
        sizes += f", baseline {os.path.getsize(args.baseline) / 1e6:.1f} MB"
    table = [f"API cost, median of {args.reps} runs, 16 MiB counter guest; {sizes}", "",
             "| measurement | value | against |", "| --- | --- | --- |"]
    table += [f"| {name} | {value} | {against} |" for name, value, against in rows]
    text = "\n".join(table)
    print(text)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
