#!/usr/bin/env python3
"""The cost of one small durable append on this disk, two ways.

Writes 8,000 records of 256 bytes, each followed by fdatasync, into
  - a file that each write extends (how the hub's log segments grow today:
    every flush also commits the file's new size through the journal), and
  - a file filled with zeros beforehand (no size change, no journal commit),
and prints p50 / p99 / max in microseconds for each, twice, alternating.

Usage: scripts/flush-probe.py [DIR]   (default: target/, on the disk to measure)
"""
import os
import sys
import time


def run(directory, prezeroed, n=8000, size=256):
    path = os.path.join(directory, "flush-probe.dat")
    if os.path.exists(path):
        os.unlink(path)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        if prezeroed:
            os.pwrite(fd, b"\0" * (n * size + 4096), 0)
            os.fsync(fd)
        record = b"x" * size
        lat = []
        for i in range(n):
            t = time.perf_counter_ns()
            os.pwrite(fd, record, i * size)
            os.fdatasync(fd)
            lat.append((time.perf_counter_ns() - t) // 1000)
    finally:
        os.close(fd)
        os.unlink(path)
    lat.sort()
    return lat[len(lat) // 2], lat[len(lat) * 99 // 100], lat[-1]


def main():
    directory = sys.argv[1] if len(sys.argv) > 1 else "target"
    os.makedirs(directory, exist_ok=True)
    for _ in range(2):
        for name, prezeroed in (("extended", False), ("pre-zeroed", True)):
            p50, p99, worst = run(directory, prezeroed)
            print(f"{name:>10}: p50 {p50} us, p99 {p99} us, max {worst} us")


if __name__ == "__main__":
    main()
