#!/usr/bin/env python3
"""Live migration while the guest keeps writing: does it converge, how long is the downtime?

Benchmark 4 of the performance issue. The source has -m 1G of random RAM and runs
`-workload dirty,rate=200M,wss=64M` (200 MB/s of page writes over a 64 MiB working set); the
downtime limit is left at its default (300 ms) and max-bandwidth is lifted. Downtime is measured
from outside, on this machine's clock: from the source's STOP event to the destination's RESUME
event, both read over QMP. Prints passes, downtime and bytes sent, medians of several runs.

    python scripts/bench_dirty.py [--size 1G] [--rate 200M] [--wss 64M] [--runs 5] [--json F]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time

import benchlib as B
from machine.units import format_size, parse_size


def once(src_file: str, size: int, rate: int, wss: int, work: str) -> dict:
    port = B.free_port()
    common = ["-M", "none", "-m", f"{size}B", "-snapshot-dir", os.path.join(work, "snaps")]
    src = B.qmon(*common, "-mem-path", src_file, "-workload", f"dirty,rate={rate},wss={wss}")
    dst = B.qmon(*common, "-incoming", f"tcp:127.0.0.1:{port}")
    try:
        src.qmp.cmd("migrate-set-parameters", **{"max-bandwidth": 100 << 30})
        time.sleep(0.5)  # the workload is writing
        t0 = time.perf_counter()
        src.qmp.cmd("migrate", uri=f"tcp:127.0.0.1:{port}")
        t_resume = dst.qmp.wait_event("RESUME")
        t_stop = src.qmp.wait_event("STOP")
        end = time.monotonic() + 10
        while True:
            info = src.qmp.cmd("query-migrate")
            if info.get("status") in ("completed", "failed") or time.monotonic() > end:
                break
            time.sleep(0.05)
        if info.get("status") != "completed":
            raise SystemExit(f"the migration did not complete: {info.get('status')}")
        ram = info["ram"]
        return {"total": t_resume - t0, "downtime": t_resume - t_stop,
                "reported_downtime": info.get("downtime", 0) / 1000,
                "passes": ram["dirty-sync-count"], "bytes": ram["transferred"]}
    finally:
        src.close()
        dst.close()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="1G")
    ap.add_argument("--rate", default="200M")
    ap.add_argument("--wss", default="64M")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--json", help="also write the figures to this file")
    args = ap.parse_args()
    size, rate, wss = parse_size(args.size), parse_size(args.rate), parse_size(args.wss)
    work = tempfile.mkdtemp(prefix="qmon-bench-dirty-")
    src_file = os.path.join(B.SHM or work, f"qmon-bench-dirty-{os.getpid()}.ram")
    try:
        B.fill_file(src_file, size)
        runs = [once(src_file, size, rate, wss, work) for _ in range(args.runs)]
    finally:
        os.unlink(src_file)
        shutil.rmtree(work, ignore_errors=True)
    med = {k: B.median([r[k] for r in runs]) for k in runs[0]}
    print(f"\nLive migration of {format_size(size)} of random RAM while the guest writes "
          f"{format_size(rate)}/s over a {format_size(wss)} working set; default downtime-limit "
          f"(300 ms), max-bandwidth lifted; median of {args.runs} runs, {os.cpu_count()} CPUs")
    print(f"  {'converged':<34} {len(runs)} of {len(runs)} runs")
    print(f"  {'passes (dirty syncs)':<34} {med['passes']:.0f}  (each run: "
          f"{', '.join(str(r['passes']) for r in runs)})")
    print(f"  {'downtime, STOP to RESUME':<34} {med['downtime'] * 1000:6.0f} ms  (max "
          f"{max(r['downtime'] for r in runs) * 1000:.0f} ms)")
    print(f"  {'downtime, as qmon reports it':<34} {med['reported_downtime'] * 1000:6.0f} ms")
    print(f"  {'bytes sent':<34} {med['bytes'] / size:6.2f}x RAM  ({format_size(int(med['bytes']))}"
          f"; max {max(r['bytes'] for r in runs) / size:.2f}x)")
    print(f"  {'migrate to destination running':<34} {med['total']:6.3f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"runs": runs, "median": med, "size": size}, f, indent=1)


if __name__ == "__main__":
    main()
