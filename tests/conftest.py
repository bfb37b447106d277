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
