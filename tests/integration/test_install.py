"""What installing qmon provides: the lexer plugin; and big RAM costing no host memory."""

import resource
import subprocess
import sys

from conftest import run_qmon, transcript_outputs


def test_pygments_finds_the_lexer_by_name():
    from pygments.lexers import get_lexer_by_name
    from pygments.token import Generic, Keyword, Name, Number

    lexer = get_lexer_by_name("qemu-monitor")
    tokens = [(t, v) for t, v in lexer.get_tokens("(qemu) info status\nxp /4xb 0x10\n")
              if v.strip()]
    assert tokens[0] == (Generic.Prompt, "(qemu) ")
    assert (Keyword, "info") in tokens and (Name.Function, "status") in tokens
    assert (Number, "0x10") in tokens


def test_pygmentize_command_line():
    p = subprocess.run([sys.executable, "-m", "pygments", "-l", "qemu-monitor", "-f", "raw"],
                       input="savevm s1\n", capture_output=True, text=True)
    assert p.returncode == 0 and "Token.Keyword" in p.stdout


# Runs qmon as the only child of a fresh interpreter, so the peak RSS it reports is qmon's own.
_PEAK = """
import resource, subprocess, sys
p = subprocess.run(sys.argv[1:], input=sys.stdin.read(), capture_output=True, text=True)
sys.stdout.write(p.stdout)
sys.stderr.write(p.stderr)
print("PEAK_KIB", resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr)
sys.exit(p.returncode)
"""


def test_4g_of_ram_costs_no_host_memory_until_touched(snapdir):
    import os

    from conftest import ROOT, qmon_cmd

    env = dict(os.environ, PYTHONPATH=ROOT)
    p = subprocess.run([sys.executable, "-c", _PEAK] + qmon_cmd() +
                       ["-M", "none", "-m", "4G", "-S", "-snapshot-dir", snapdir],
                       input="xp /2xg 0xfffffff0\nsavevm big\nloadvm big\ninfo status\n",
                       capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    status, out, err = p.returncode, p.stdout, p.stderr
    peak_kib = int(err.split("PEAK_KIB")[1])
    assert status == 0, err
    assert transcript_outputs(out)[0][1] == [
        "00000000fffffff0: 0x0000000000000000 0x0000000000000000"]
    assert [lines for _, lines in transcript_outputs(out)][1:] == [
        [], [], ["VM status: paused (prelaunch)"]]
    assert peak_kib < 200 * 1024, f"peak RSS {peak_kib} KiB"
