"""Every command during an active migration and during an incoming load gets QEMU's answer or
a clear error, with no deadlock (each command has a timeout) and no corrupted state; and the
boundaries: where listeners bind, one connection per -incoming, quitting mid-operation."""

import os
import socket
import time

from conftest import QmonProc, free_port


def status_of(lines):
    for line in lines:
        if line.startswith("Migration status: "):
            return line[len("Migration status: "):].split(" (")[0]
    return None


def _random_ram(path, size):
    # the first MiB stays zero: the counter workload runs there
    path.write_bytes(bytes(1 << 20) + os.urandom(size - (1 << 20)))


def test_commands_during_an_active_migration(tmp_path):
    snaps = str(tmp_path / "s")
    port = free_port()
    dst = QmonProc(["-m", "16M", "-S", "-incoming", f"tcp:127.0.0.1:{port}", "-mem-path",
                    str(tmp_path / "d.ram"), "-workload", "counter,size=1M,speed=5000",
                    "-snapshot-dir", snaps])
    dst.cmd("info status")
    _random_ram(tmp_path / "s.ram", 16 << 20)
    src = QmonProc(["-m", "16M", "-mem-path", str(tmp_path / "s.ram"), "-workload",
                    "counter,size=1M,speed=5000", "-snapshot-dir", snaps])
    try:
        src.cmd("savevm before")
        src.cmd("migrate_set_parameter max-bandwidth 4M")
        src.cmd(f"migrate -d tcp:127.0.0.1:{port}")
        src.wait_for("info migrate", lambda o: status_of(o) == "active")
        answers = {c: src.cmd(c, timeout=10) for c in (
            "stop", "info status", "cont", "info status", "savevm during", "loadvm before",
            "delvm before", f"migrate tcp:127.0.0.1:{port}", "system_reset", "info status")}
        assert answers["stop"] == [] and answers["cont"] == []
        assert answers["savevm during"] == ["Error: There's a migration process in progress"]
        assert answers["loadvm before"] == ["Error: There's a migration process in progress"]
        assert answers["delvm before"] == []
        assert answers[f"migrate tcp:127.0.0.1:{port}"] == [
            "Error: There's a migration process in progress"]
        assert answers["system_reset"] == []
        assert status_of(src.cmd("info migrate")) == "active"
        # incoming side, while it loads
        dst_answers = {c: dst.cmd(c, timeout=10) for c in (
            "info status", "savevm x", "loadvm x", "delvm x", "migrate tcp:127.0.0.1:1",
            "migrate_cancel", "system_reset", "stop", "cont")}
        assert dst_answers["info status"] == ["VM status: paused (inmigrate)"]
        assert dst_answers["savevm x"] == ["Error: Guest is waiting for an incoming migration"]
        assert dst_answers["loadvm x"] == ["Error: Guest is waiting for an incoming migration"]
        assert dst_answers["migrate tcp:127.0.0.1:1"] == [
            "Error: Guest is waiting for an incoming migration"]
        assert dst_answers["delvm x"] == dst_answers["migrate_cancel"] == []
        src.cmd("migrate_set_parameter max-bandwidth 1G")
        src.wait_for("info migrate", lambda o: status_of(o) == "completed", timeout=60)
        # cont on the destination while it waited: it runs once loaded
        dst.wait_for("info status", lambda o: o == ["VM status: running"], timeout=30)
        assert dst.cmd("info workload")[-1] == "invariant: ok"
    finally:
        src.close()
        dst.close()


def test_quit_while_migrating_and_while_loading_ends_cleanly(tmp_path):
    snaps = str(tmp_path / "s")
    port = free_port()
    dst = QmonProc(["-m", "16M", "-incoming", f"tcp:127.0.0.1:{port}", "-snapshot-dir", snaps])
    dst.cmd("info status")
    _random_ram(tmp_path / "s.ram", 16 << 20)
    src = QmonProc(["-m", "16M", "-mem-path", str(tmp_path / "s.ram"), "-snapshot-dir", snaps])
    src.cmd("migrate_set_parameter max-bandwidth 2M")
    src.cmd(f"migrate -d tcp:127.0.0.1:{port}")
    src.wait_for("info migrate", lambda o: status_of(o) == "active")
    src.proc.stdin.write("quit\n")
    src.proc.stdin.flush()
    assert src.proc.wait(10) == 0
    assert dst.proc.wait(20) == 1  # it lost its source: a failed load, with the reason
    assert any("load of migration failed" in l for l in dst.stderr_lines)
    # and a destination quit while loading
    port = free_port()
    dst = QmonProc(["-m", "16M", "-incoming", f"tcp:127.0.0.1:{port}", "-snapshot-dir", snaps])
    dst.cmd("info status")
    src = QmonProc(["-m", "16M", "-mem-path", str(tmp_path / "s.ram"), "-snapshot-dir", snaps])
    src.cmd("migrate_set_parameter max-bandwidth 2M")
    src.cmd(f"migrate -d tcp:127.0.0.1:{port}")
    src.wait_for("info migrate", lambda o: status_of(o) == "active")
    dst.proc.stdin.write("quit\n")
    dst.proc.stdin.flush()
    assert dst.proc.wait(10) == 0
    src.wait_for("info migrate", lambda o: status_of(o) == "failed", timeout=60)
    assert src.cmd("info status") == ["VM status: running"]
    src.close()


def test_quit_while_saving(tmp_path):
    snaps = tmp_path / "s"
    _random_ram(tmp_path / "r.ram", 256 << 20)
    src = QmonProc(["-m", "256M", "-mem-path", str(tmp_path / "r.ram"), "-snapshot-dir",
                    str(snaps)])
    src.proc.stdin.write("savevm big\nquit\n")
    src.proc.stdin.flush()
    assert src.proc.wait(60) == 0
    after = QmonProc(["-m", "256M", "-snapshot-dir", str(snaps)])
    rows = after.cmd("info snapshots")
    assert rows == ["There is no snapshot available."] or rows[2].split()[1] == "big"
    assert not [n for n in os.listdir(snaps) if n.startswith(".tmp-")]
    after.close()


def test_listeners_bind_loopback_and_take_one_connection(tmp_path):
    port = free_port()
    dst = QmonProc(["-m", "1M", "-M", "none", "-incoming", f"tcp::{port}", "-snapshot-dir",
                    str(tmp_path / "s")])
    info = dst.cmd("info migrate")
    assert f"\ttcp:127.0.0.1:{port}" in info  # no host named: loopback only
    with open("/proc/net/tcp") as f:
        listening = [l.split()[1] for l in f.readlines()[1:] if l.split()[3] == "0A"]
    assert f"0100007F:{port:04X}" in listening
    assert f"00000000:{port:04X}" not in listening
    first = socket.create_connection(("127.0.0.1", port))
    time.sleep(0.5)
    try:
        second = socket.create_connection(("127.0.0.1", port), timeout=2)
        second.close()
        assert False, "a second connection was accepted"
    except OSError:
        pass  # the listener took one connection and closed
    first.close()
    assert dst.proc.wait(10) == 1  # that connection brought no stream
    qmp = QmonProc(["-m", "1M", "-M", "none", "-qmp", f"tcp::{free_port()},server=on,wait=off",
                    "-snapshot-dir", str(tmp_path / "s")])
    qmp.cmd("info status")
    qmp.close()
