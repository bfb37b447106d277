#!/usr/bin/env python3
"""Every benchmark of the performance issue, with one command, and a table of the results.

Runs bench_migrate.py (benchmarks 1, 5 and 6; 2 with --zero 0.9; 7 with --sizes 256M,1G,4G),
bench_savevm.py (3) and bench_dirty.py (4), prints what each prints, then one Markdown table
with the goals beside the figures (the table in README's Performance section comes from here).

    python scripts/bench_all.py [--runs 5] [--scale-runs 5] [--no-qemu]
    (--size, --scale-sizes and --wss make a quick run on small RAM, as the tests do)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from machine.units import format_size, parse_size  # noqa: E402


def bench(script: str, out: str, *args) -> dict:
    # Let the disk write back what the last benchmark wrote before this one is timed.
    subprocess.run(["sync"], check=False)
    time.sleep(2)
    subprocess.run([sys.executable, os.path.join(HERE, script), "--json", out, *args],
                   check=True)
    with open(out) as f:
        return json.load(f)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def verdict(ok: bool) -> str:
    return "met" if ok else "**not met**"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--scale-runs", type=int, default=5)
    ap.add_argument("--size", default="1G", help="RAM of benchmarks 1 to 6")
    ap.add_argument("--scale-sizes", default="256M,1G,4G", help="RAM sizes of benchmark 7")
    ap.add_argument("--wss", default="64M", help="benchmark 4's working set")
    ap.add_argument("--no-qemu", action="store_true")
    args = ap.parse_args()
    q = ["--no-qemu"] if args.no_qemu else []
    runs = ["--runs", str(args.runs)]
    size = parse_size(args.size)
    ram = format_size(size)
    with tempfile.TemporaryDirectory(prefix="qmon-bench-all-") as d:
        j = lambda name: os.path.join(d, name + ".json")  # noqa: E731
        mig = bench("bench_migrate.py", j("mig"), "--sizes", args.size, *runs, *q)[0]
        zero = bench("bench_migrate.py", j("zero"), "--sizes", args.size, "--zero", "0.9",
                     *runs, *q)[0]
        save = bench("bench_savevm.py", j("save"), "--size", args.size, *runs, *q)
        dirty = bench("bench_dirty.py", j("dirty"), "--size", args.size, "--wss", args.wss,
                      *runs)
        scale = bench("bench_migrate.py", j("scale"), "--sizes", args.scale_sizes, "--runs",
                      str(args.scale_runs), "--no-qemu", "--no-probe")

    rows = []
    qm, qe, raw = mig["qmon"], mig["qemu"], mig["raw"]
    t = qm["time"]
    if qe:
        rows.append(("1", f"{ram} random RAM, qmon / QEMU", f"{t:.3f} s / {qe['time']:.3f} s = "
                     f"{t / qe['time']:.2f}x", "<= 0.7x", verdict(t <= 0.7 * qe["time"])))
    rows.append(("1", f"{ram} random RAM, qmon / raw socket", f"{t:.3f} s / {raw:.3f} s = "
                 f"{t / raw:.2f}x", "<= 1.5x", verdict(t <= 1.5 * raw)))
    zq, ze = zero["qmon"], zero["qemu"]
    if ze:
        rows.append(("2", f"{ram}, 90% zero pages, qmon / QEMU", f"{zq['time']:.3f} s / "
                     f"{ze['time']:.3f} s = {zq['time'] / ze['time']:.2f}x", "<= 0.7x",
                     verdict(zq["time"] <= 0.7 * ze["time"])))
    if save.get("qemu_save"):
        for op in ("save", "load"):
            a, b = save[f"qmon_{op}"], save[f"qemu_{op}"]
            rows.append(("3", f"{op}vm {ram}, qmon / QEMU qcow2",
                         f"{a:.3f} s / {b:.3f} s = {a / b:.2f}x", "<= 1x", verdict(a <= b)))
    m = dirty["median"]
    worst = max(r["downtime"] for r in dirty["runs"])
    most = max(r["bytes"] for r in dirty["runs"]) / dirty["size"]
    rows.append(("4", f"dirty {args.wss} @ 200 MiB/s: passes, downtime (max), bytes (max)",
                 f"{m['passes']:.0f} passes, {m['downtime'] * 1000:.0f} ms ({worst * 1000:.0f}),"
                 f" {m['bytes'] / dirty['size']:.2f}x RAM ({most:.2f}x)",
                 "converges, < 300 ms, < 1.5x", verdict(worst < 0.3 and most < 1.5)))
    p99 = max(qm["lat_src_p99"], qm["lat_dst_p99"])
    rows.append(("5", "`info migrate` during 1: median / p99 (source; destination)",
                 f"{qm['lat_src_median'] * 1000:.1f} / {qm['lat_src_p99'] * 1000:.1f} ms; "
                 f"{qm['lat_dst_median'] * 1000:.1f} / {qm['lat_dst_p99'] * 1000:.1f} ms",
                 "p99 < 50 ms", verdict(p99 < 0.05)))
    rss = max(qm["rss_src"], qm["rss_dst"])
    rows.append(("6", "peak RSS during 1: source / destination",
                 f"{qm['rss_src'] >> 20} / {qm['rss_dst'] >> 20} MiB",
                 f"< {size >> 20} + 100 MiB", verdict(rss < size + (100 << 20))))
    per = [r["qmon"]["time"] / (r["size"] / (1 << 30)) for r in scale]
    spread = max(per) / min(per) - 1
    rows.append(("7", "time per GiB at " + " / ".join(args.scale_sizes.split(",")),
                 " / ".join(f"{p:.3f}" for p in per) + f" s (spread {spread:.0%})",
                 "flat within 15%", verdict(spread <= 0.15)))

    print(f"\n## Results ({os.cpu_count()} CPUs, {cpu_model()}, Python "
          f"{platform.python_version()}, Linux {platform.release()})\n")
    print("| # | benchmark | measured (medians) | goal | |")
    print("|---|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(r) + " |")


if __name__ == "__main__":
    main()
