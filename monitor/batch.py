"""Scripted sessions: commands from a file or a pipe, echoed as a transcript.

Each command is printed as ``(qemu) COMMAND`` before its output, so the output reads as a
session transcript. The run ends at end of input or ``quit``; the exit status is 1 if any
command failed, else 0.
"""

from __future__ import annotations

from .session import QuitRequest


def run_batch(session, lines, out) -> int:
    status = 0
    for raw in lines:
        line = raw.rstrip("\r\n")
        out(f"(qemu) {line}")
        try:
            if not session.execute(line):
                status = 1
        except QuitRequest:
            break
    return status
