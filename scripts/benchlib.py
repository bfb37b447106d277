"""What the benchmark scripts share: starting qmon and QEMU with QMP, filling RAM files,
reading a process's peak memory, medians and percentiles.

Both programs are driven the same way, over QMP, so the same clock and the same events time
them: a `migrate` sent on the source's QMP, the RESUME event read on the destination's.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

PAGE = 4096
# RAM files live in memory (tmpfs) so that disk writeback does not time the run.
SHM = "/dev/shm" if os.path.isdir("/dev/shm") else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fill_file(path: str, size: int, zero_ratio: float = 0.0):
    """Random bytes; with ``zero_ratio`` 0.9, nine pages in ten are zero (one random page,
    then nine zero pages, all through the file)."""
    chunk = 64 << 20
    every = round(1 / (1 - zero_ratio)) if zero_ratio else 1
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(chunk, left)
            if every == 1:
                f.write(os.urandom(n))
            else:
                buf = bytearray(n)
                for off in range(0, n, every * PAGE):
                    buf[off:off + PAGE] = os.urandom(min(PAGE, n - off))
                f.write(buf)
            left -= n


def same_files(a: str, b: str) -> bool:
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            x, y = fa.read(64 << 20), fb.read(64 << 20)
            if x != y:
                return False
            if not x:
                return True


def median(xs):
    return statistics.median(xs) if xs else float("nan")


def percentile(xs, q: float):
    if not xs:
        return float("nan")
    s = sorted(xs)
    return s[min(len(s) - 1, int(round(q / 100 * (len(s) - 1))))]


def peak_rss(pid: int) -> int:
    """The process's peak resident set (VmHWM), in bytes."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def qemu_binary():
    return shutil.which("qemu-system-x86_64")


class QMP:
    """A QMP connection: commands with replies, and events timed as they arrive."""

    def __init__(self, port: int, timeout: float = 30.0):
        end = time.monotonic() + timeout
        while True:
            try:
                self.sock = socket.create_connection(("127.0.0.1", port))
                break
            except OSError:
                if time.monotonic() > end:
                    raise
                time.sleep(0.02)
        self.file = self.sock.makefile("rb")
        self.events: list = []  # (perf_counter at arrival, event dict)
        self._replies: list = []
        self._cv = threading.Condition()
        json.loads(self.file.readline())  # greeting
        threading.Thread(target=self._read, daemon=True).start()
        self.cmd("qmp_capabilities")

    def _read(self):
        try:
            for line in self.file:
                t = time.perf_counter()
                msg = json.loads(line)
                with self._cv:
                    if "event" in msg:
                        self.events.append((t, msg))
                    else:
                        self._replies.append(msg)
                    self._cv.notify_all()
        except OSError:
            pass  # the process quit
        with self._cv:
            self._replies.append({"error": {"desc": "connection closed"}})
            self._cv.notify_all()

    def cmd(self, name: str, timeout: float = 600.0, **args):
        msg = {"execute": name}
        if args:
            msg["arguments"] = args
        with self._cv:
            self._replies.clear()
        self.sock.sendall(json.dumps(msg).encode() + b"\n")
        with self._cv:
            if not self._cv.wait_for(lambda: self._replies, timeout):
                raise TimeoutError(f"no reply to {name}")
            reply = self._replies.pop(0)
        if "error" in reply:
            raise RuntimeError(f"{name}: {reply['error'].get('desc')}")
        return reply["return"]

    def hmp(self, line: str) -> str:
        return self.cmd("human-monitor-command", **{"command-line": line})

    def wait_event(self, name: str, timeout: float = 600.0, pred=None) -> float:
        """The arrival time of the first event ``name`` (that ``pred`` accepts)."""
        def find():
            for t, e in self.events:
                if e["event"] == name and (pred is None or pred(e)):
                    return t
            return None
        with self._cv:
            if not self._cv.wait_for(lambda: find() is not None, timeout):
                raise TimeoutError(f"no {name} event")
            return find()

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass


class VM:
    """One qmon or QEMU process with two QMP servers: one to drive it, one to probe it."""

    def __init__(self, args: list, env=None):
        self.ports = (free_port(), free_port())
        qmp = [a for p in self.ports
               for a in ("-qmp", f"tcp:127.0.0.1:{p},server=on,wait=off")]
        # stdin stays open: qmon reads a script from a pipe and would quit at its end.
        self.proc = subprocess.Popen(args + qmp, stdin=subprocess.PIPE,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     env=env)
        self.qmp = QMP(self.ports[0])
        self.probe = QMP(self.ports[1])

    @property
    def pid(self) -> int:
        return self.proc.pid

    def close(self):
        try:
            self.qmp.cmd("quit", timeout=10)
        except (OSError, RuntimeError, TimeoutError):
            pass
        self.qmp.close()
        self.probe.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def qmon(*args) -> VM:
    env = dict(os.environ, PYTHONPATH=ROOT)
    return VM([sys.executable, "-m", "monitor.cli", *args], env)


def qemu(*args) -> VM:
    return VM([qemu_binary(), "-nodefaults", "-display", "none", *args])


def qemu_ram_file_args(path: str, size: int) -> list:
    mb = size >> 20
    return ["-object", f"memory-backend-file,id=ram,size={mb}M,mem-path={path},share=on",
            "-machine", "memory-backend=ram"]


class Poller:
    """Sends `info migrate` on a probe connection back to back (with a short pause) and keeps
    each round trip: the monitor's latency while a migration runs."""

    def __init__(self, qmp: QMP, pause: float = 0.005):
        self.qmp, self.pause = qmp, pause
        self.samples: list = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.is_set():
            t = time.perf_counter()
            try:
                self.qmp.hmp("info migrate")
            except (OSError, RuntimeError, TimeoutError):
                return
            self.samples.append(time.perf_counter() - t)
            time.sleep(self.pause)

    def stop(self) -> list:
        self._stop.set()
        self._thread.join(10)
        return self.samples
