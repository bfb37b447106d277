#!/usr/bin/env python3
"""savevm and loadvm of -m 1G random RAM: qmon beside QEMU 7.2 saving into a qcow2 image.

Benchmark 3 of the performance issue. Both programs run as processes driven over QMP
(human-monitor-command `savevm bench`, `loadvm bench`), timed from the command to its reply.
Their RAM is the same file of random bytes in /dev/shm; qmon's snapshot store and QEMU's qcow2
image (`-drive file=x.qcow2,if=none`) sit side by side in one directory on disk. Both make the
snapshot durable before they answer (qmon fsyncs its stream file, QEMU flushes the image).
Beside them, `cp` of the RAM file into that directory with and without a sync.

    python scripts/bench_savevm.py [--size 1G] [--runs 5] [--dir DIR] [--no-qemu] [--json F]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import tempfile
import time

import benchlib as B
from machine.units import format_size, parse_size


def timed_hmp(vm, line: str) -> float:
    t = time.perf_counter()
    said = vm.qmp.hmp(line).strip()
    dt = time.perf_counter() - t
    if said:
        raise SystemExit(f"{line}: {said}")
    return dt


def timed_run(cmd: list) -> float:
    t = time.perf_counter()
    subprocess.run(cmd, check=True)
    return time.perf_counter() - t


def run(size: int, runs: int, work: str, use_qemu: bool) -> dict:
    ram = os.path.join(B.SHM or work, f"qmon-bench-save-{os.getpid()}.ram")
    B.fill_file(ram, size)
    res = {"cp": [], "cp_sync": [], "qmon_save": [], "qmon_load": [], "qemu_save": [],
           "qemu_load": []}
    vms = []
    try:
        vms.append(("qmon", B.qmon("-M", "none", "-m", f"{size}B", "-mem-path", ram,
                                   "-workload", "idle",
                                   "-snapshot-dir", os.path.join(work, "snapshots"))))
        if use_qemu and B.qemu_binary():
            image = os.path.join(work, "x.qcow2")
            subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", image,
                            str(2 * size)], check=True)
            vms.append(("qemu", B.qemu("-M", "none", "-m", f"{size >> 20}M",
                                       *B.qemu_ram_file_args(ram, size), "-drive",
                                       f"file={image},if=none,id=d0,format=qcow2")))
        # One untimed round each: the first write of a file pays for its blocks.
        for _, vm in vms:
            timed_hmp(vm, "savevm bench")
        copy = os.path.join(work, "copy.bin")
        subprocess.run(["cp", ram, copy], check=True)
        for _ in range(runs):
            os.unlink(copy)
            subprocess.run(["sync"], check=True)
            res["cp"].append(timed_run(["cp", ram, copy]))
            os.unlink(copy)
            subprocess.run(["sync"], check=True)
            res["cp_sync"].append(timed_run(["sh", "-c", f"cp '{ram}' '{copy}' && sync '{copy}'"]))
            for name, vm in vms:
                subprocess.run(["sync"], check=True)
                res[f"{name}_save"].append(timed_hmp(vm, "savevm bench"))
                res[f"{name}_load"].append(timed_hmp(vm, "loadvm bench"))
    finally:
        for _, vm in vms:
            vm.close()
        os.unlink(ram)
    return {k: B.median(v) if v else None for k, v in res.items()} | {"size": size,
                                                                       "runs": runs}


def report(r: dict):
    print(f"\nsavevm / loadvm of {format_size(r['size'])} of random RAM, median of {r['runs']} "
          f"runs, {os.cpu_count()} CPUs")
    print(f"  {'cp of the RAM file':<30} {r['cp']:7.3f} s")
    print(f"  {'cp + sync':<30} {r['cp_sync']:7.3f} s")
    for op in ("save", "load"):
        q, e = r[f"qmon_{op}"], r[f"qemu_{op}"]
        line = f"  {'qmon ' + op + 'vm':<30} {q:7.3f} s"
        if e:
            line += f"   QEMU 7.2 (qcow2) {e:7.3f} s   qmon/QEMU {q / e:5.2f}x"
        print(line)
    if not r["qemu_save"]:
        print("  QEMU 7.2: not installed (qemu-system-x86_64), not measured")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="1G")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--dir", default=None, help="where the snapshots go (a disk, not tmpfs)")
    ap.add_argument("--no-qemu", action="store_true")
    ap.add_argument("--json", help="also write the figures to this file")
    args = ap.parse_args()
    work = tempfile.mkdtemp(prefix="qmon-bench-save-", dir=args.dir)
    try:
        r = run(parse_size(args.size), args.runs, work, not args.no_qemu)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report(r)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(r, f, indent=1)


if __name__ == "__main__":
    main()
