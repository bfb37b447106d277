#!/usr/bin/env python3
"""savevm and loadvm of -m 1G random RAM, beside `cp` of a 1 GiB file, in the same run.

Prints the median of several runs of each, and qmon's ratios to the copy. The RAM is a
-mem-path file filled with random bytes, so every page is a PAGE record.

    python scripts/bench_savevm.py [--size 1G] [--runs 3] [--dir DIR]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from machine.machine import Machine  # noqa: E402
from machine.snapshots import SnapshotStore  # noqa: E402
from machine.units import format_size, parse_size  # noqa: E402


def fill_random(path: str, size: int):
    chunk = 64 << 20
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(chunk, left)
            f.write(os.urandom(n))
            left -= n


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="1G")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--dir", default=None, help="where to put RAM, snapshots and copies")
    args = ap.parse_args()
    size = parse_size(args.size)
    work = tempfile.mkdtemp(prefix="qmon-bench-", dir=args.dir)
    try:
        ram_file = os.path.join(work, "ram.bin")
        fill_random(ram_file, size)
        machine = Machine("none", size, mem_path=ram_file, workload="idle")
        machine.start(paused=True)
        store = SnapshotStore(os.path.join(work, "snapshots"))

        cp, cp_sync, save, load = [], [], [], []
        # One untimed round first: the random file's own write-back and the page cache would
        # otherwise land on whichever timing comes first.
        warm = os.path.join(work, "warm.bin")
        subprocess.run(["sh", "-c", f"cp '{ram_file}' '{warm}' && sync"], check=True)
        os.unlink(warm)
        machine.run(machine.save_snapshot, store, "bench")
        subprocess.run(["sync"], check=True)
        for i in range(args.runs):
            dst = os.path.join(work, "copy.bin")
            cp.append(timed(lambda: subprocess.run(["cp", ram_file, dst], check=True)))
            os.unlink(dst)
            cp_sync.append(timed(lambda: subprocess.run(
                ["sh", "-c", f"cp '{ram_file}' '{dst}' && sync '{dst}'"], check=True)))
            os.unlink(dst)
            save.append(timed(lambda: machine.run(machine.save_snapshot, store, "bench")))
            load.append(timed(lambda: machine.run(machine.load_snapshot, store, "bench")))
        size_on_disk = store.find("bench").vm_state_size
        machine.shutdown()

        med = statistics.median
        print(f"RAM {format_size(size)} of random bytes, stream {size_on_disk} bytes, "
              f"{args.runs} runs, medians, {os.cpu_count()} CPUs")
        print(f"{'cp of the RAM file':<28} {med(cp):7.3f} s")
        print(f"{'cp + sync (fsync)':<28} {med(cp_sync):7.3f} s")
        print(f"{'qmon savevm (with fsync)':<28} {med(save):7.3f} s   "
              f"{med(save) / med(cp):5.2f}x cp   {med(save) / med(cp_sync):5.2f}x cp+sync")
        print(f"{'qmon loadvm (check + apply)':<28} {med(load):7.3f} s   "
              f"{med(load) / med(cp):5.2f}x cp")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
