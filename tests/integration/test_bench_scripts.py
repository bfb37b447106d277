"""The benchmark scripts still run, end to end, on small RAM: real qmon processes (and QEMU
when it is installed) over QMP, the destination's RAM checked byte for byte by the script.

No figure is asserted here: speed is for the scripts to print, not for tests to judge."""

import json
import os
import subprocess
import sys

import pytest

from qemu_helpers import QEMU, QEMU_IMG

def have_qemu():
    return QEMU is not None and QEMU_IMG is not None


ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def script(name, *args, timeout=300):
    return subprocess.run([sys.executable, os.path.join(ROOT, "scripts", name), *args],
                          capture_output=True, text=True, timeout=timeout)


def test_bench_all_runs_every_benchmark_and_prints_the_table():
    args = ["--size", "64M", "--scale-sizes", "16M,32M", "--wss", "8M", "--runs", "1",
            "--scale-runs", "1"]
    if not have_qemu():
        args.append("--no-qemu")
    r = script("bench_all.py", *args, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    table = r.stdout[r.stdout.index("| # |"):].splitlines()
    numbers = [row.split("|")[1].strip() for row in table[2:]]
    expected = {"1", "4", "5", "6", "7"} | ({"2", "3"} if have_qemu() else set())
    assert set(numbers) == expected, table
    assert "converged" in r.stdout and "1 of 1 runs" in r.stdout


def test_bench_migrate_checks_the_destination_and_reports_json(tmp_path):
    out = tmp_path / "m.json"
    r = script("bench_migrate.py", "--sizes", "32M", "--zero", "0.9", "--runs", "2",
               "--no-qemu", "--json", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    (row,) = json.loads(out.read_text())
    q = row["qmon"]
    assert row["size"] == 32 << 20 and len(q["times"]) == 2
    assert all(t > 0 for t in q["times"])
    assert q["lat_samples"] > 0 and q["lat_src_p99"] >= q["lat_src_median"] > 0
    # zero pages stay unallocated on the destination; the source maps its whole RAM file
    assert q["rss_dst"] < q["rss_src"]


@pytest.mark.skipif(not have_qemu(), reason="qemu-system-x86_64 and qemu-img not installed")
def test_bench_savevm_runs_beside_qemu(tmp_path):
    out = tmp_path / "s.json"
    r = script("bench_savevm.py", "--size", "32M", "--runs", "1", "--dir", str(tmp_path),
               "--json", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(out.read_text())
    assert all(res[k] > 0 for k in ("qmon_save", "qmon_load", "qemu_save", "qemu_load"))
