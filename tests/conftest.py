import os
import subprocess
import sys
import tempfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def qmon_cmd():
    return [sys.executable, "-m", "monitor.cli"]


def run_qmon(args, script="", timeout=60, env=None):
    """Run a real qmon process on a script fed through stdin; returns (status, stdout, stderr)."""
    e = dict(os.environ)
    e["PYTHONPATH"] = ROOT + os.pathsep + e.get("PYTHONPATH", "")
    if env:
        e.update(env)
    p = subprocess.run(qmon_cmd() + list(args), input=script, capture_output=True, text=True,
                       timeout=timeout, env=e, cwd=ROOT)
    return p.returncode, p.stdout, p.stderr


def transcript_outputs(stdout):
    """{command: [output lines]} in order, as a list of (command, lines)."""
    out = []
    for line in stdout.splitlines():
        if line.startswith("(qemu) "):
            out.append((line[7:], []))
        elif out:
            out[-1][1].append(line)
    return out


@pytest.fixture
def snapdir(tmp_path):
    d = tmp_path / "snapshots"
    d.mkdir()
    return str(d)


@pytest.fixture
def make_machine():
    from machine.machine import Machine

    made = []

    def make(type_name="lab", ram=16 << 20, paused=False, **kw):
        m = Machine(type_name, ram, **kw)
        m.start(paused=paused)
        made.append(m)
        return m

    yield make
    for m in made:
        m.shutdown()


class QmonProc:
    """A long-running qmon process driven line by line through a pipe.

    ``cmd(line)`` sends the command and an empty line after it; the echo of the empty line
    ("(qemu) ") marks the end of the command's output.
    """

    def __init__(self, args, env=None):
        import queue
        import threading

        e = dict(os.environ)
        e["PYTHONPATH"] = ROOT + os.pathsep + e.get("PYTHONPATH", "")
        if env:
            e.update(env)
        self.proc = subprocess.Popen(qmon_cmd() + list(args), stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     env=e, cwd=ROOT, bufsize=1)
        self.lines = queue.Queue()
        self.stderr_lines = []
        self.seen: list[str] = []  # every stdout line, async messages included
        threading.Thread(target=self._read, args=(self.proc.stdout, self.lines.put),
                         daemon=True).start()
        threading.Thread(target=self._read, args=(self.proc.stderr, self.stderr_lines.append),
                         daemon=True).start()

    @staticmethod
    def _read(f, put):
        for line in f:
            put(line.rstrip("\n"))
        put(None)

    def cmd(self, line, timeout=60):
        import queue

        self.proc.stdin.write(line + "\n\n")
        self.proc.stdin.flush()
        out = []
        seen_echo = False
        while True:
            try:
                got = self.lines.get(timeout=timeout)
            except queue.Empty:
                raise AssertionError(f"no answer to {line!r}; so far {out}") from None
            if got is None:
                raise AssertionError(f"qmon exited during {line!r}: {out} {self.stderr_lines}")
            self.seen.append(got)
            if not seen_echo:
                if got == f"(qemu) {line}":
                    seen_echo = True
                continue
            if got == "(qemu) ":
                return out
            out.append(got)

    def wait_for(self, line, predicate, timeout=60, interval=0.05):
        import time

        end = time.monotonic() + timeout
        while time.monotonic() < end:
            out = self.cmd(line)
            if predicate(out):
                return out
            time.sleep(interval)
        raise AssertionError(f"{line!r} never satisfied the condition; last: {out}")

    def close(self, timeout=10):
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write("quit\n")
                self.proc.stdin.flush()
            except (BrokenPipeError, ValueError):
                pass
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def qmon_proc():
    made = []

    def start(*args, **kw):
        p = QmonProc(args, **kw)
        made.append(p)
        return p

    yield start
    for p in made:
        if p.proc.poll() is None:
            p.proc.kill()
            p.proc.wait()
