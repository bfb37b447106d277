"""One script of monitor commands against qmon and real QEMU 7.2: the same text once times,
dates, sizes and version strings are masked. On a difference the test shows the diff.

Masked on purpose, and why:
- numbers in info migrate / info snapshots rows (times, counters, dates, clocks);
- help: the text after " -- " (qmon's help texts are its own; names and params must match),
  and QEMU's continuation lines ("\\t\\t\\t -b ...");
- info migrate_parameters: QEMU prints more parameters; only the ones qmon has are compared.
"""

import difflib
import re
import subprocess

import pytest

from conftest import free_port
from qemu_helpers import QEMU, QEMU_IMG, Qemu

pytestmark = pytest.mark.skipif(QEMU is None or QEMU_IMG is None,
                                reason="qemu-system-x86_64 and qemu-img are needed")

SCRIPT = [
    "info status", "stop", "info status", "cont", "info status",
    "savevm s1", "info snapshots", "savevm s2", "delvm s1", "info snapshots",
    "loadvm nosuch", "delvm nosuch", "info status", "cont",
    "nosuch", "info nosuch", "loadvm", "stop extra", "x /zz 0", "xp /2xb (1",
    "help stop", "help cont", "help savevm", "help loadvm", "help delvm", "help x", "help xp",
    "help pmemsave", "help quit", "help system_reset", "help migrate", "help migrate_cancel",
    "help migrate_set_parameter", "help migrate_set_capability", "help info", "help help",
    "help info status", "help info snapshots", "help info migrate", "help nosuch",
    "migrate_set_parameter max-bandwidth 2k", "migrate_set_parameter downtime-limit 500",
    "migrate_set_parameter xbzrle-cache-size 2M", "migrate_set_parameter bogus 1",
    "migrate_set_parameter max-bandwidth abc", "info migrate_parameters",
    "migrate_set_parameter max-bandwidth 100G",
    "info migrate_capabilities", "migrate_set_capability bogus on",
    "migrate foo", "migrate tcp:127.0.0.1",
    "xp /16xb 0", "xp /4xw 0", "xp /2xg 8", "xp /5db 0xfe", "xp /3cb 0",
    "x /4xb 0", "xp /1xw 0xfffffe", "xp /0xb 0",
    "system_reset", "info status",
]
# -d: through QMP's human-monitor-command QEMU cannot wait ("terminal does not allow
# synchronous migration"); both sides then wait until it completed before 'info migrate'.
MIGRATE = ['migrate -d "exec:cat > /dev/null"', "info migrate", "info status",
           "migrate tcp:1:1"]

_QMON_PARAMS = ("throttle-trigger-threshold", "cpu-throttle-initial", "cpu-throttle-increment",
                "max-cpu-throttle", "max-bandwidth", "downtime-limit", "xbzrle-cache-size")


def mask(cmd: str, lines: list[str]) -> list[str]:
    if cmd.startswith("help"):
        lines = [l.split(" -- ")[0] for l in lines if not l.startswith("\t")]
        if cmd == "help info":  # QEMU has many more info subcommands; compare the shared ones
            shared = ("info status ", "info snapshots ", "info migrate ", "info name ",
                      "info version ", "info migrate_parameters ", "info migrate_capabilities ")
            lines = [l for l in lines if l.startswith(shared)]
        return lines
    if cmd == "info migrate_parameters":
        return [l for l in lines if l.split(":")[0] in _QMON_PARAMS]
    out = []
    for l in lines:
        l = re.sub(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", "DATE", l)
        l = re.sub(r"\d\d:\d\d:\d\d\.\d{3}", "CLOCK", l)
        l = re.sub(r"\d+(\.\d+)? (KiB|MiB|B)\b", "SIZE", l)
        if cmd == "info migrate":
            l = re.sub(r"\d+(\.\d+)?", "N", l)
        out.append(l)
    return out


def run_qmon_script(tmp_path):
    from conftest import QmonProc

    q = QmonProc(["-M", "none", "-m", "16M", "-snapshot-dir", str(tmp_path / "snaps")])
    try:
        got = []
        for cmd in SCRIPT + MIGRATE:
            got.append(q.cmd(cmd))
            if cmd.startswith("migrate -d"):
                q.wait_for("info migrate", lambda o: any("completed" in l for l in o))
        return got
    finally:
        q.close()


def run_qemu_script(tmp_path):
    disk = tmp_path / "d.qcow2"
    subprocess.run([QEMU_IMG, "create", "-q", "-f", "qcow2", str(disk), "64M"], check=True)
    q = Qemu(tmp_path, "-drive", f"file={disk},if=none")
    try:
        got = []
        for cmd in SCRIPT + MIGRATE:
            got.append(q.hmp(cmd))
            if cmd.startswith("migrate -d"):
                q.wait_for("info migrate", lambda o: any("completed" in l for l in o))
        return got
    finally:
        q.close()


def test_same_script_same_text(tmp_path):
    mine = run_qmon_script(tmp_path / "qmon")
    theirs = run_qemu_script(tmp_path)
    assert len(mine) == len(theirs) == len(SCRIPT + MIGRATE)
    a, b = [], []
    for cmd, m, t in zip(SCRIPT + MIGRATE, mine, theirs):
        a += [f"(qemu) {cmd}"] + mask(cmd, m)
        b += [f"(qemu) {cmd}"] + mask(cmd, t)
    diff = list(difflib.unified_diff(b, a, "QEMU 7.2", "qmon", lineterm="", n=2))
    assert not diff, "\n" + "\n".join(diff)
