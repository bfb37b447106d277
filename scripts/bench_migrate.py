#!/usr/bin/env python3
"""Live migration of -m 1G random RAM over TCP loopback between two qmon processes.

In the same run, for reference: a raw Python socket transfer of the same bytes between two
processes (the ceiling), and QEMU 7.2 doing the same migration when qemu-system-x86_64 is
installed. Time is measured from the `migrate` command to the destination running. Prints the
median of several runs and the ratios.

    python scripts/bench_migrate.py [--size 1G] [--runs 3] [--no-qemu]
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from machine.units import format_size, parse_size  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fill_random(path: str, size: int):
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(64 << 20, left)
            f.write(os.urandom(n))
            left -= n


class Monitor:
    """A monitor on a process's stdin/stdout; watches the output for a line."""

    def __init__(self, args, env=None):
        self.proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, env=env, bufsize=0)
        self.buf = bytearray()
        self.lock = threading.Lock()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        while True:
            data = os.read(self.proc.stdout.fileno(), 65536)
            if not data:
                return
            with self.lock:
                self.buf += data

    def send(self, line: str):
        self.proc.stdin.write(line.encode() + b"\n")
        self.proc.stdin.flush()

    def seen(self, text: bytes) -> bool:
        with self.lock:
            return text in self.buf

    def wait_seen(self, text: bytes, poll: str | None = None, timeout=120.0, every=0.005):
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.seen(text):
                return time.perf_counter()
            if poll:
                self.send(poll)
            time.sleep(every)
        raise TimeoutError(f"never saw {text!r}")

    def clear(self):
        with self.lock:
            self.buf.clear()

    def close(self):
        try:
            self.send("quit")
        except (BrokenPipeError, OSError):
            pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def qmon(*args):
    env = dict(os.environ, PYTHONPATH=ROOT)
    return Monitor([sys.executable, "-m", "monitor.cli", *args], env)


def migrate_once(src_cmd, dst_cmd, port, ready_poll) -> float:
    dst = dst_cmd(port)
    src = src_cmd()
    try:
        time.sleep(0.5)
        src.send("migrate_set_parameter max-bandwidth 100G")
        ready_poll(src)
        dst.clear()
        t0 = time.perf_counter()
        src.send(f"migrate -d tcp:127.0.0.1:{port}")
        t1 = dst.wait_seen(b"VM status: running", poll="info status")
        return t1 - t0
    finally:
        src.close()
        dst.close()


def qmon_pair(ram_file, dst_file, size, work):
    snaps = os.path.join(work, "snaps")

    def src():
        return qmon("-M", "none", "-m", str(size) + "B", "-mem-path", ram_file, "-workload",
                    "idle", "-snapshot-dir", snaps)

    def dst(port):
        return qmon("-M", "none", "-m", str(size) + "B", "-mem-path", dst_file,
                    "-incoming", f"tcp:127.0.0.1:{port}", "-snapshot-dir", snaps)

    return src, dst


def qemu_pair(qemu, ram_file, dst_file, size):
    mb = size >> 20

    def args(path):
        return [qemu, "-M", "none", "-m", f"{mb}M", "-nodefaults", "-display", "none",
                "-monitor", "stdio", "-object",
                f"memory-backend-file,id=ram,size={mb}M,mem-path={path},share=on",
                "-machine", "memory-backend=ram"]

    def src():
        return Monitor(args(ram_file))

    def dst(port):
        return Monitor(args(dst_file) + ["-incoming", f"tcp:127.0.0.1:{port}"])

    return src, dst


def sync_monitor(m: Monitor):
    """Wait until the monitor has answered everything sent so far."""
    marker = f"m{time.monotonic_ns()}"
    m.send("info name")
    m.send(f"nosuch_{marker}")
    m.wait_seen(marker.encode())


RECEIVER = r"""
import mmap, os, socket, sys, time
path, size, port = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600); os.ftruncate(fd, size)
mem = mmap.mmap(fd, size); view = memoryview(mem)
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


def raw_socket_once(ram_file, dst_file, size) -> float:
    import mmap

    port = free_port()
    rx = subprocess.Popen([sys.executable, "-c", RECEIVER, dst_file, str(size), str(port)],
                          stdout=subprocess.PIPE, text=True)
    assert rx.stdout.readline().strip() == "ready"
    with open(ram_file, "rb") as f:
        mem = mmap.mmap(f.fileno(), size, prot=mmap.PROT_READ)
        view = memoryview(mem)
        t0 = time.perf_counter()
        with socket.create_connection(("127.0.0.1", port)) as s:
            for off in range(0, size, 1 << 20):
                s.sendall(view[off:off + (1 << 20)])
            s.shutdown(socket.SHUT_WR)
            got = int(rx.stdout.readline())
        t1 = time.perf_counter()
        view.release()
        mem.close()
    rx.wait()
    assert got == size
    return t1 - t0


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="1G")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--no-qemu", action="store_true")
    args = ap.parse_args()
    size = parse_size(args.size)
    qemu = None if args.no_qemu else shutil.which("qemu-system-x86_64")
    work = tempfile.mkdtemp(prefix="qmon-bench-mig-")
    try:
        ram_file = os.path.join(work, "src.ram")
        dst_file = os.path.join(work, "dst.ram")
        fill_random(ram_file, size)
        results = {"raw": [], "qmon": [], "qemu": []}
        for _ in range(args.runs):
            results["raw"].append(raw_socket_once(ram_file, dst_file, size))
            os.unlink(dst_file)
            src, dst = qmon_pair(ram_file, dst_file, size, work)
            results["qmon"].append(migrate_once(src, dst, free_port(), sync_monitor))
            with open(ram_file, "rb") as a, open(dst_file, "rb") as b:
                same = a.read() == b.read()
            if not same:
                raise SystemExit("qmon: destination RAM differs from the source")
            os.unlink(dst_file)
            if qemu:
                src, dst = qemu_pair(qemu, ram_file, dst_file, size)
                results["qemu"].append(migrate_once(src, dst, free_port(), sync_monitor))
                os.unlink(dst_file)
        med = {k: statistics.median(v) for k, v in results.items() if v}
        print(f"{format_size(size)} of random RAM over TCP loopback, migrate -> destination "
              f"running, median of {args.runs} runs, {os.cpu_count()} CPUs")
        print(f"{'raw Python socket (2 processes)':<34} {med['raw']:7.3f} s")
        print(f"{'qmon -> qmon':<34} {med['qmon']:7.3f} s   "
              f"{med['qmon'] / med['raw']:5.2f}x raw")
        if "qemu" in med:
            print(f"{'QEMU 7.2 -> QEMU 7.2':<34} {med['qemu']:7.3f} s   "
                  f"{med['qemu'] / med['raw']:5.2f}x raw")
            print(f"{'qmon / QEMU':<34} {med['qmon'] / med['qemu']:7.2f}x")
        else:
            print("QEMU 7.2: not installed (qemu-system-x86_64), not measured")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
