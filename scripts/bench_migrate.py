#!/usr/bin/env python3
"""Live migration of RAM over TCP loopback: qmon to qmon, beside a raw socket and QEMU 7.2.

Benchmarks 1, 2, 5, 6 and 7 of the performance issue. For each RAM size:
- raw: a Python process sends the RAM file's bytes with sendall() to another Python process,
  which receives them into fresh anonymous memory of the same size (the ceiling: the link and
  the page copies, nothing else);
- qmon: `migrate` between two qmon processes, timed from the command to the destination's
  RESUME event; the destination's RAM is then compared with the source's, byte for byte. In
  as many runs again, `info migrate` is sent on both sides every 5 ms and each round trip
  kept (these runs are timed apart: the probing costs CPU). Each side's peak resident memory
  is read after every run;
- QEMU 7.2 doing the same migration, when qemu-system-x86_64 is installed.
Both programs get the same setup: the source's RAM is a file in /dev/shm (share=on), the
destination's plain anonymous `-m` RAM, max-bandwidth lifted, the guest idle.

    python scripts/bench_migrate.py [--sizes 1G] [--zero 0.9] [--runs 5] [--no-qemu] [--json F]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import benchlib as B
from machine.units import format_size, parse_size

RECEIVER = r"""
import mmap, socket, sys
size, port = int(sys.argv[1]), int(sys.argv[2])
mem = mmap.mmap(-1, size, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS); view = memoryview(mem)
srv = socket.socket(); srv.bind(("127.0.0.1", port)); srv.listen(1)
print("ready", flush=True)
conn, _ = srv.accept()
got = 0
while got < size:
    n = conn.recv_into(view[got:], min(8 << 20, size - got))
    if not n: break
    got += n
print(got, flush=True)
"""

SENDER = r"""
import mmap, socket, sys
path, size, port = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
f = open(path, "rb"); view = memoryview(mmap.mmap(f.fileno(), size, prot=mmap.PROT_READ))
sys.stdin.readline()
with socket.create_connection(("127.0.0.1", port)) as s:
    for off in range(0, size, 1 << 20):
        s.sendall(view[off:off + (1 << 20)])
"""


def raw_once(src_file: str, size: int) -> float:
    port = B.free_port()
    rx = subprocess.Popen([sys.executable, "-c", RECEIVER, str(size), str(port)],
                          stdout=subprocess.PIPE, text=True)
    assert rx.stdout.readline().strip() == "ready"
    tx = subprocess.Popen([sys.executable, "-c", SENDER, src_file, str(size), str(port)],
                          stdin=subprocess.PIPE, text=True)
    time.sleep(0.3)  # the sender has mapped the file
    t0 = time.perf_counter()
    tx.stdin.write("go\n")
    tx.stdin.flush()
    got = int(rx.stdout.readline())
    t1 = time.perf_counter()
    tx.wait()
    rx.wait()
    if got != size:
        raise SystemExit(f"raw socket: received {got} of {size} bytes")
    return t1 - t0


def migrate_once(kind: str, src_file: str, size: int, work: str, probe: bool) -> dict:
    """One migration; returns its time and both peak RSS, and with ``probe`` the round trips
    of `info migrate` sent on both sides meanwhile (else the destination's RAM is checked)."""
    port = B.free_port()
    if kind == "qmon":
        common = ["-M", "none", "-m", f"{size}B", "-snapshot-dir", os.path.join(work, "snaps")]
        src = B.qmon(*common, "-mem-path", src_file, "-workload", "idle")
        dst = B.qmon(*common, "-incoming", f"tcp:127.0.0.1:{port}")
    else:
        common = ["-M", "none", "-m", f"{size >> 20}M"]
        src = B.qemu(*common, *B.qemu_ram_file_args(src_file, size))
        dst = B.qemu(*common, "-incoming", f"tcp:127.0.0.1:{port}")
    try:
        src.qmp.cmd("migrate-set-parameters", **{"max-bandwidth": 100 << 30})
        time.sleep(0.2)
        polls = [B.Poller(src.probe), B.Poller(dst.probe)] if probe else []
        t0 = time.perf_counter()
        src.qmp.cmd("migrate", uri=f"tcp:127.0.0.1:{port}")
        t1 = dst.qmp.wait_event("RESUME")
        lat_src, lat_dst = (p.stop() for p in polls) if probe else ([], [])
        info = src.qmp.cmd("query-migrate")
        if info.get("status") != "completed":
            time.sleep(0.5)
            info = src.qmp.cmd("query-migrate")
        result = {"time": t1 - t0, "lat_src": lat_src, "lat_dst": lat_dst,
                  "rss_src": B.peak_rss(src.pid), "rss_dst": B.peak_rss(dst.pid),
                  "status": info.get("status")}
        if kind == "qmon" and not probe:
            out = os.path.join(B.SHM or work, "qmon-bench-dst.ram")
            step = 1 << 30  # pmemsave's size is 32 bits wide, as in QEMU
            with open(src_file, "rb") as f:
                for addr in range(0, size, step):
                    n = min(step, size - addr)
                    # Quoted: unquoted, "SIZE /path" would read as a division.
                    said = dst.qmp.hmp(f'pmemsave {addr} {n} "{out}"').strip()
                    if said:
                        raise SystemExit(f"qmon: pmemsave: {said}")
                    with open(out, "rb") as g:
                        same = f.read(n) == g.read()
                    os.unlink(out)
                    if not same:
                        raise SystemExit("qmon: the destination's RAM differs from the "
                                         f"source's (in the GiB at {addr:#x})")
        return result
    finally:
        src.close()
        dst.close()


def run(sizes, zero: float, runs: int, use_qemu: bool, probe: bool = True) -> list:
    qemu = use_qemu and B.qemu_binary()
    work = tempfile.mkdtemp(prefix="qmon-bench-mig-")
    rows = []
    try:
        for size in sizes:
            src_file = os.path.join(B.SHM or work, f"qmon-bench-src-{os.getpid()}.ram")
            B.fill_file(src_file, size, zero)
            try:
                res = {"raw": [], "qmon": [], "qemu": [], "qmon_probed": [],
                       "qemu_probed": []}
                kinds = ["qmon"] + (["qemu"] if qemu else [])
                for _ in range(runs):
                    if not zero:
                        res["raw"].append(raw_once(src_file, size))
                    for kind in kinds:
                        res[kind].append(migrate_once(kind, src_file, size, work, False))
                    if probe:
                        for kind in kinds:
                            res[kind + "_probed"].append(
                                migrate_once(kind, src_file, size, work, True))
            finally:
                os.unlink(src_file)
            rows.append(summarize(size, zero, runs, res) | {"qemu_wanted": use_qemu})
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return rows


def summarize(size, zero, runs, res) -> dict:
    row = {"size": size, "zero": zero, "runs": runs,
           "raw": B.median(res["raw"]) if res["raw"] else None}
    for kind in ("qmon", "qemu"):
        rs = res[kind]
        if not rs:
            row[kind] = None
            continue
        probed = res[kind + "_probed"]
        lat_src = [x for r in probed for x in r["lat_src"]]
        lat_dst = [x for r in probed for x in r["lat_dst"]]
        rs = rs + probed  # peak memory over every run
        row[kind] = {
            "time": B.median([r["time"] for r in res[kind]]),
            "times": [r["time"] for r in res[kind]],
            "time_probed": B.median([r["time"] for r in probed]),
            "lat_src_median": B.median(lat_src), "lat_src_p99": B.percentile(lat_src, 99),
            "lat_dst_median": B.median(lat_dst), "lat_dst_p99": B.percentile(lat_dst, 99),
            "lat_samples": len(lat_src) + len(lat_dst),
            "rss_src": max(r["rss_src"] for r in rs), "rss_dst": max(r["rss_dst"] for r in rs),
        }
    return row


def report(rows):
    for row in rows:
        size, q, e = row["size"], row["qmon"], row["qemu"]
        what = "random RAM" if not row["zero"] else f"RAM {row['zero']:.0%} zero pages"
        print(f"\n{format_size(size)} of {what} over TCP loopback, `migrate` to the destination "
              f"running; median of {row['runs']} runs, {os.cpu_count()} CPUs")
        if row["raw"]:
            print(f"  {'raw Python socket (2 processes)':<32} {row['raw']:7.3f} s")
        line = f"  {'qmon -> qmon':<32} {q['time']:7.3f} s"
        if row["raw"]:
            line += f"   {q['time'] / row['raw']:5.2f}x raw"
        print(line + f"   ({format_size(int(size / q['time']))}/s)")
        if e:
            line = f"  {'QEMU 7.2 -> QEMU 7.2':<32} {e['time']:7.3f} s"
            if row["raw"]:
                line += f"   {e['time'] / row['raw']:5.2f}x raw"
            print(line)
            print(f"  {'qmon / QEMU':<32} {q['time'] / e['time']:7.2f}x")
        elif not row["qemu_wanted"]:
            print("  QEMU 7.2: not measured (--no-qemu)")
        else:
            print("  QEMU 7.2: not installed (qemu-system-x86_64), not measured")
        for name, r in (("qmon", q), ("QEMU", e)):
            if not r or not r["lat_samples"]:
                continue
            print(f"  {name}, in runs with `info migrate` sent every 5 ms on both sides: "
                  f"{r['time_probed']:.3f} s")
            print(f"  {name} `info migrate` round trip: source median "
                  f"{r['lat_src_median'] * 1000:.1f} ms, p99 {r['lat_src_p99'] * 1000:.1f} ms; "
                  f"destination median {r['lat_dst_median'] * 1000:.1f} ms, p99 "
                  f"{r['lat_dst_p99'] * 1000:.1f} ms ({r['lat_samples']} samples)")
            print(f"  {name} peak RSS: source {r['rss_src'] >> 20} MiB, destination "
                  f"{r['rss_dst'] >> 20} MiB (RAM {size >> 20} MiB)")
    if len(rows) > 1:
        print("\nScale (qmon time per GiB):")
        per = [r["qmon"]["time"] / (r["size"] / (1 << 30)) for r in rows]
        for r, p in zip(rows, per):
            print(f"  {format_size(r['size']):>6}  {p:6.3f} s/GiB")
        print(f"  spread: {max(per) / min(per) - 1:.1%} (max/min - 1)")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1G", help="comma-separated RAM sizes (256M,1G,4G)")
    ap.add_argument("--zero", type=float, default=0.0, help="share of zero pages (0.9)")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--no-qemu", action="store_true")
    ap.add_argument("--no-probe", action="store_true",
                    help="skip the runs that measure the monitor's latency")
    ap.add_argument("--json", help="also write the figures to this file")
    args = ap.parse_args()
    sizes = [parse_size(s) for s in args.sizes.split(",")]
    rows = run(sizes, args.zero, args.runs, not args.no_qemu, not args.no_probe)
    report(rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
