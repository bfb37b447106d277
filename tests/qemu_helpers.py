"""Driving real QEMU from tests: a process with a QMP socket, HMP commands through
human-monitor-command (their text comes back exactly as the monitor prints it, with no
readline echo to strip)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time

QEMU = shutil.which("qemu-system-x86_64")
QEMU_IMG = shutil.which("qemu-img")


def memory_backend(path: str, size_mb: int):
    """QEMU options that put guest RAM in FILE (block name "ram", like qmon's -M none)."""
    return ["-object", f"memory-backend-file,id=ram,size={size_mb}M,mem-path={path},share=on",
            "-machine", "memory-backend=ram"]


class Qemu:
    def __init__(self, workdir, *args, size_mb=16, machine="none"):
        self.qmp_path = os.path.join(str(workdir), f"qmp-{time.monotonic_ns()}.sock")
        self.proc = subprocess.Popen(
            [QEMU, "-M", machine, "-m", f"{size_mb}M", "-nodefaults", "-display", "none",
             "-qmp", f"unix:{self.qmp_path},server=on,wait=off", *args],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.sock = None
        end = time.monotonic() + 20
        while self.sock is None:
            try:
                s = socket.socket(socket.AF_UNIX)
                s.connect(self.qmp_path)
                self.sock = s
            except OSError:
                s.close()
                if self.proc.poll() is not None or time.monotonic() > end:
                    raise RuntimeError(f"QEMU did not start: {self.proc.stderr.read()}")
                time.sleep(0.05)
        self.f = self.sock.makefile("rwb")
        self._read()  # greeting
        self.qmp("qmp_capabilities")

    def _read(self):
        while True:
            line = self.f.readline()
            if not line:
                raise RuntimeError("QEMU closed its QMP socket")
            msg = json.loads(line)
            if "event" not in msg:
                return msg

    def qmp(self, command, **arguments):
        msg = {"execute": command}
        if arguments:
            msg["arguments"] = arguments
        self.f.write(json.dumps(msg).encode() + b"\n")
        self.f.flush()
        return self._read()

    def hmp(self, line) -> list[str]:
        reply = self.qmp("human-monitor-command", **{"command-line": line})
        text = reply["return"]
        return text.replace("\r\n", "\n").split("\n")[:-1] if text else []

    def wait_for(self, line, predicate, timeout=60):
        end = time.monotonic() + timeout
        while True:
            out = self.hmp(line)
            if predicate(out):
                return out
            if time.monotonic() > end:
                raise AssertionError(f"QEMU: {line!r} never satisfied the condition: {out}")
            time.sleep(0.05)

    def close(self):
        if self.proc.poll() is None:
            try:
                self.qmp("quit")
            except (OSError, RuntimeError, ValueError):
                pass
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.sock is not None:
            self.sock.close()
        return self.proc.returncode

    def stderr(self) -> str:
        self.close()
        return self.proc.stderr.read()
