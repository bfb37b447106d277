"""The console in a real terminal (tmux): prompt, completion, toolbar, history, async output."""

import os
import shlex
import shutil
import subprocess
import sys
import time
import uuid

import pytest

from conftest import ROOT

TMUX = shutil.which("tmux")
pytestmark = pytest.mark.skipif(TMUX is None, reason="tmux is not installed")


class Term:
    def __init__(self, args, env):
        self.name = "qmon-" + uuid.uuid4().hex[:8]
        envs = " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items())
        cmd = (f"cd {shlex.quote(ROOT)} && env PYTHONPATH={shlex.quote(ROOT)} {envs} "
               f"{shlex.quote(sys.executable)} -m monitor.cli {' '.join(map(shlex.quote, args))}"
               "; echo QMON-EXITED $?; sleep 30")
        subprocess.run([TMUX, "new-session", "-d", "-s", self.name, "-x", "120", "-y", "30", cmd],
                       check=True)

    def screen(self) -> str:
        return subprocess.run([TMUX, "capture-pane", "-p", "-t", self.name], capture_output=True,
                              text=True).stdout

    def keys(self, *keys):
        subprocess.run([TMUX, "send-keys", "-t", self.name] + list(keys), check=True)

    def type(self, text):
        subprocess.run([TMUX, "send-keys", "-t", self.name, "-l", text], check=True)

    def wait_for(self, predicate, timeout=10.0):
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            s = self.screen()
            if predicate(s):
                return s
            time.sleep(0.1)
        raise AssertionError("screen never matched:\n" + self.screen())

    def wait_text(self, text, timeout=10.0):
        return self.wait_for(lambda s: text in s, timeout)

    def prompts(self) -> int:
        return sum(1 for l in self.screen().splitlines() if l.startswith("(qemu)"))

    def command(self, text):
        """Type a command and wait until its output is done and a fresh prompt is ready."""
        n = self.prompts()
        self.type(text)
        self.keys("Enter")
        self.wait_for(lambda s: self.prompts() > n and self.prompt_line().rstrip() == "(qemu)")
        time.sleep(0.2)  # the prompt is drawn; give the key reader a moment to take input

    def prompt_line(self, screen=None) -> str:
        screen = self.screen() if screen is None else screen
        lines = [l for l in screen.splitlines() if l.startswith("(qemu)")]
        return lines[-1] if lines else ""

    def close(self):
        subprocess.run([TMUX, "kill-session", "-t", self.name], capture_output=True)


@pytest.fixture
def term(tmp_path):
    made = []
    env = {"XDG_STATE_HOME": str(tmp_path / "state"), "TERM": "xterm-256color"}

    def start(*args):
        t = Term(list(args) + ["-snapshot-dir", str(tmp_path / "snaps")], env)
        made.append(t)
        t.wait_text("(qemu)")
        time.sleep(0.5)  # let prompt_toolkit finish its start-up (terminal queries) first
        return t

    yield start
    for t in made:
        t.close()


def test_banner_prompt_and_toolbar(term):
    t = term("-m", "16M", "-S")
    s = t.wait_text("paused (prelaunch)")
    assert "QEMU 7.2.0 monitor" in s and "type 'help' for more information" in s
    assert "RAM 16 MiB | counter | lab" in s and "clock 00:00:00.000" in s
    t.command("cont")
    s = t.wait_for(lambda s: " running |" in s)
    clock1 = s.split("clock ")[1][:12]
    s = t.wait_for(lambda s: " running |" in s and s.split("clock ")[1][:12] != clock1)
    t.command("info status")
    t.wait_text("VM status: running")


def test_completion(term):
    t = term("-m", "4M", "-S")
    t.type("inf")
    t.keys("Tab")
    t.wait_for(lambda s: t.prompt_line().startswith("(qemu) info"))
    t.type(" sta")
    t.keys("Tab")
    t.wait_for(lambda s: t.prompt_line().startswith("(qemu) info status"))
    t.keys("Enter")
    t.wait_text("VM status: paused (prelaunch)")
    t.wait_for(lambda s: t.prompt_line().rstrip() == "(qemu)")
    time.sleep(0.2)
    t.command('savevm "with space"')
    t.type("delvm wi")
    t.keys("Tab")  # a tag QEMU's parser would split is completed quoted
    t.wait_for(lambda s: t.prompt_line().rstrip() == '(qemu) delvm "with space"')
    t.keys("C-c")
    t.wait_for(lambda s: t.prompt_line().rstrip() == "(qemu)")
    t.command("savevm snapone")
    t.type("loadvm sn")
    t.keys("Tab")
    t.wait_for(lambda s: t.prompt_line().rstrip() == "(qemu) loadvm snapone")
    t.keys("C-c")  # Ctrl-C clears the line
    t.wait_for(lambda s: t.prompt_line().rstrip() == "(qemu)")
    # command names come with their help as meta in the menu
    t.type("sa")
    t.keys("Tab")
    t.wait_for(lambda s: t.prompt_line().startswith("(qemu) savevm"))
    t.keys("C-c")
    t.wait_for(lambda s: t.prompt_line().rstrip() == "(qemu)")
    t.type("s")
    t.keys("Tab")
    t.wait_text("pause the guest")  # the menu shows each command's help beside its name
    t.keys("C-c")
    t.wait_for(lambda s: t.prompt_line().rstrip() == "(qemu)")
    t.type("help sys")
    t.keys("Tab")
    t.wait_for(lambda s: t.prompt_line().rstrip() == "(qemu) help system_reset")
    t.keys("C-c")
    # pmemsave's third argument is a file (qmon runs in the repository here)
    t.type("pmemsave 0 16 READ")
    t.keys("Tab")
    t.wait_for(lambda s: t.prompt_line().rstrip() == "(qemu) pmemsave 0 16 README.md")


def test_history_persists_across_sessions(term):
    t = term("-m", "4M", "-S")
    t.command("info name")
    t.command("info version")
    t.wait_text("qmon 0.1.0)")
    t.keys("C-d")
    t.wait_text("QMON-EXITED 0")
    t2 = term("-m", "4M", "-S")
    t2.keys("Up")
    t2.wait_for(lambda s: t2.prompt_line().rstrip() == "(qemu) info version")
    t2.keys("Up")
    t2.wait_for(lambda s: t2.prompt_line().rstrip() == "(qemu) info name")


def test_async_output_appears_above_the_prompt(term):
    # 256 pages at 1000 pages/s: a lap every 0.26 s
    t = term("-m", "1M", "-S", "-serial", "stdio", "-workload", "counter,speed=1000")
    t.command("cont")
    t.type("info wor")  # a half-typed line must survive the output printed above it
    s = t.wait_for(lambda s: s.count("counter: lap") >= 3
                   and t.prompt_line(s).rstrip() == "(qemu) info wor")
    lines = [l for l in s.splitlines() if l.strip()]
    prompt_at = max(i for i, l in enumerate(lines) if l.startswith("(qemu)"))
    assert lines[prompt_at].rstrip() == "(qemu) info wor"
    assert all(not l.startswith("counter: lap") for l in lines[prompt_at + 1:])
    assert all("(qemu)" not in l for l in lines if l.startswith("counter"))
    t.type("kload")
    t.keys("Enter")
    t.wait_text("invariant: ok")
    t.type("quit")
    t.keys("Enter")
    t.wait_text("QMON-EXITED 0")


def test_migrate_shows_progress_and_ctrl_c_cancels(term, qmon_proc, tmp_path):
    from conftest import free_port

    port = free_port()
    dst = qmon_proc("-m", "16M", "-incoming", f"tcp:127.0.0.1:{port}",
                    "-snapshot-dir", str(tmp_path / "d"))
    assert dst.cmd("info status") == ["VM status: paused (inmigrate)"]
    ram = tmp_path / "src.ram"
    ram.write_bytes(os.urandom(16 << 20))
    t = term("-m", "16M", "-mem-path", str(ram))
    t.command("migrate_set_parameter max-bandwidth 1M")
    t.type(f"migrate tcp:127.0.0.1:{port}")
    t.keys("Enter")
    t.wait_text("migrate: active, pass 1")
    t.keys("C-c")
    t.wait_for(lambda s: t.prompt_line(s).rstrip() == "(qemu)")
    time.sleep(0.2)
    t.command("info migrate")
    s = t.wait_text("Migration status: cancelled")
    assert "running |" in s  # the toolbar: the source runs on
    assert dst.proc.wait(10) == 1  # the destination lost its stream


def test_toolbar_follows_a_detached_migration(term, qmon_proc, tmp_path):
    from conftest import free_port

    port = free_port()
    dst = qmon_proc("-m", "16M", "-incoming", f"tcp:127.0.0.1:{port}",
                    "-snapshot-dir", str(tmp_path / "d"))
    dst.cmd("info status")
    ram = tmp_path / "src.ram"
    ram.write_bytes(os.urandom(16 << 20))
    t = term("-m", "16M", "-mem-path", str(ram))
    t.command("migrate_set_parameter max-bandwidth 4M")
    t.command(f"migrate -d tcp:127.0.0.1:{port}")
    t.wait_text("| migration active")
    t.command("migrate_set_parameter max-bandwidth 1G")
    t.wait_text("| migration completed")
    t.wait_text("paused (postmigrate)")
