"""qmon and real QEMU 7.2 migrate into each other, in both directions, and fail alike."""

import os

import pytest

from conftest import free_port
from qemu_helpers import QEMU, QEMU_IMG, Qemu, memory_backend

pytestmark = pytest.mark.skipif(QEMU is None, reason="qemu-system-x86_64 is not installed")

MiB = 1 << 20


def random_ram(path, size=16 * MiB, zero_every=7):
    data = bytearray(os.urandom(size))
    for page in range(0, size // 4096, zero_every):
        data[page * 4096:(page + 1) * 4096] = bytes(4096)
    path.write_bytes(data)
    return bytes(data)


def status_of(lines):
    for line in lines:
        if line.startswith("Migration status: "):
            return line[len("Migration status: "):].split(" (")[0]
    return None


def field(lines, name):
    for line in lines:
        if line.startswith(name + ": "):
            return line[len(name) + 2:]
    return None


@pytest.fixture
def qemus(tmp_path):
    made = []

    def start(*args, **kw):
        q = Qemu(tmp_path, *args, **kw)
        made.append(q)
        return q

    yield start
    for q in made:
        q.close()


def counter_invariant(data: bytes, start=0, size=None):
    fb = data[start:(start + size) if size else len(data):4096]
    top = fb[0]
    step = len(fb) - len(fb.lstrip(bytes([top])))
    rest = fb[step:]
    return not rest or (rest[0] == (top - 1) & 0xFF and rest.count(rest[0]) == len(rest))


# qmon -> QEMU ---------------------------------------------------------------------------------

def test_qmon_to_qemu_random_ram(qemus, qmon_proc, tmp_path):
    src_ram, dst_ram = tmp_path / "src.ram", tmp_path / "dst.ram"
    data = random_ram(src_ram)
    port = free_port()
    q = qemus(*memory_backend(str(dst_ram), 16), "-incoming", f"tcp:127.0.0.1:{port}")
    src = qmon_proc("-M", "none", "-m", "16M", "-mem-path", str(src_ram), "-snapshot-dir",
                    str(tmp_path / "s"))
    assert src.cmd(f"migrate tcp:127.0.0.1:{port}") == []
    assert status_of(src.cmd("info migrate")) == "completed"
    q.wait_for("info status", lambda o: o == ["VM status: running"])
    assert dst_ram.read_bytes() == data


def test_qmon_to_qemu_with_the_counter_running(qemus, qmon_proc, tmp_path):
    src_ram, dst_ram = tmp_path / "src.ram", tmp_path / "dst.ram"
    port = free_port()
    q = qemus(*memory_backend(str(dst_ram), 16), "-incoming", f"tcp:127.0.0.1:{port}")
    src = qmon_proc("-M", "none", "-m", "16M", "-mem-path", str(src_ram), "-workload",
                    "counter,speed=50000", "-snapshot-dir", str(tmp_path / "s"))
    src.wait_for("info workload", lambda o: "lap 1" in o[3] or "lap 2" in o[3])
    assert src.cmd(f"migrate tcp:127.0.0.1:{port}") == []
    q.wait_for("info status", lambda o: o == ["VM status: running"])
    got = dst_ram.read_bytes()
    assert got == src_ram.read_bytes()
    assert counter_invariant(got) and got[0] != 0


def test_qemu_decodes_our_xbzrle_records(qemus, qmon_proc, tmp_path):
    src_ram, dst_ram = tmp_path / "src.ram", tmp_path / "dst.ram"
    random_ram(src_ram, 8 * MiB)
    port = free_port()
    q = qemus(*memory_backend(str(dst_ram), 8), "-incoming", f"tcp:127.0.0.1:{port}",
              size_mb=8)
    src = qmon_proc("-M", "none", "-m", "8M", "-mem-path", str(src_ram), "-workload",
                    "dirty,rate=2M,wss=1M", "-snapshot-dir", str(tmp_path / "s"))
    src.cmd("migrate_set_capability xbzrle on")
    src.cmd("migrate_set_parameter max-bandwidth 4M")
    src.cmd("migrate_set_parameter downtime-limit 1")
    src.cmd(f"migrate -d tcp:127.0.0.1:{port}")
    src.wait_for("info migrate", lambda o: int((field(o, "xbzrle pages") or "0").split()[0]) > 50,
                 timeout=60)
    src.cmd("migrate_set_parameter max-bandwidth 1G")
    src.cmd("migrate_set_parameter downtime-limit 300")
    info = src.wait_for("info migrate", lambda o: status_of(o) == "completed", timeout=60)
    assert int(field(info, "dirty sync count")) >= 3
    q.wait_for("info status", lambda o: o == ["VM status: running"])
    assert dst_ram.read_bytes() == src_ram.read_bytes()


def test_a_qmon_snapshot_file_loads_in_qemu(qemus, qmon_proc, tmp_path):
    from machine.snapshots import SnapshotStore

    src_ram, dst_ram = tmp_path / "src.ram", tmp_path / "dst.ram"
    data = random_ram(src_ram)
    snaps = tmp_path / "snaps"
    src = qmon_proc("-M", "none", "-m", "16M", "-S", "-mem-path", str(src_ram),
                    "-snapshot-dir", str(snaps))
    assert src.cmd("savevm s1") == []
    stream = SnapshotStore(str(snaps)).stream_path(SnapshotStore(str(snaps)).find("s1"))
    q = qemus(*memory_backend(str(dst_ram), 16), "-incoming", f"exec:cat '{stream}'")
    # the snapshot was taken in prelaunch; QEMU takes the state the stream names
    q.wait_for("info status", lambda o: o == ["VM status: paused (prelaunch)"])
    assert dst_ram.read_bytes() == data


# QEMU -> qmon ---------------------------------------------------------------------------------

def test_qemu_to_qmon_tcp(qemus, qmon_proc, tmp_path):
    src_ram, dst_ram = tmp_path / "src.ram", tmp_path / "dst.ram"
    data = random_ram(src_ram)
    port = free_port()
    dst = qmon_proc("-M", "none", "-m", "16M", "-mem-path", str(dst_ram), "-incoming",
                    f"tcp:127.0.0.1:{port}", "-snapshot-dir", str(tmp_path / "s"))
    assert dst.cmd("info status") == ["VM status: paused (inmigrate)"]
    q = qemus(*memory_backend(str(src_ram), 16))
    q.hmp("migrate_set_parameter max-bandwidth 100G")
    q.hmp(f"migrate -d tcp:127.0.0.1:{port}")
    q.wait_for("info migrate", lambda o: status_of(o) == "completed")
    dst.wait_for("info status", lambda o: o == ["VM status: running"])
    assert dst_ram.read_bytes() == data


def test_qemu_stream_file_to_qmon(qemus, qmon_proc, tmp_path):
    src_ram, dst_ram = tmp_path / "src.ram", tmp_path / "dst.ram"
    data = random_ram(src_ram)
    stream = tmp_path / "qemu.stream"
    q = qemus(*memory_backend(str(src_ram), 16), "-S")
    q.hmp("migrate_set_parameter max-bandwidth 100G")
    q.hmp(f'migrate "exec:cat > {stream}"')
    q.wait_for("info migrate", lambda o: status_of(o) == "completed")
    q.close()
    dst = qmon_proc("-M", "none", "-m", "16M", "-mem-path", str(dst_ram), "-incoming",
                    f"exec:cat {stream}", "-snapshot-dir", str(tmp_path / "s"))
    dst.wait_for("info status", lambda o: o == ["VM status: paused (prelaunch)"])
    assert dst_ram.read_bytes() == data


# Mismatches fail alike ------------------------------------------------------------------------

def test_lab_stream_into_qemu_none_and_back(qemus, qmon_proc, tmp_path):
    port = free_port()
    q = qemus("-incoming", f"tcp:127.0.0.1:{port}")
    src = qmon_proc("-M", "lab", "-m", "16M", "-snapshot-dir", str(tmp_path / "s"))
    src.cmd(f"migrate tcp:127.0.0.1:{port}")
    assert q.proc.wait(20) == 1
    err = q.proc.stderr.read()
    assert "Machine type received is 'lab' and local is 'none'" in err
    assert "load of migration failed" in err
    # and the other way round: a QEMU -M none stream into a qmon lab machine
    port = free_port()
    dst = qmon_proc("-M", "lab", "-m", "16M", "-incoming", f"tcp:127.0.0.1:{port}",
                    "-snapshot-dir", str(tmp_path / "s"))
    dst.cmd("info status")
    q2 = qemus()
    q2.hmp(f"migrate -d tcp:127.0.0.1:{port}")
    assert dst.proc.wait(20) == 1
    assert ("qmon: load of migration failed: Machine type received is 'none' and local is "
            "'lab'") in dst.stderr_lines


def test_16m_into_32m_each_way(qemus, qmon_proc, tmp_path):
    port = free_port()
    q = qemus("-incoming", f"tcp:127.0.0.1:{port}", size_mb=32)
    src = qmon_proc("-M", "none", "-m", "16M", "-snapshot-dir", str(tmp_path / "s"))
    src.cmd(f"migrate tcp:127.0.0.1:{port}")
    assert q.proc.wait(20) == 1
    qemu_message = "Size mismatch: ram: 0x1000000 != 0x2000000: Invalid argument"
    assert qemu_message in q.proc.stderr.read()
    port = free_port()
    dst = qmon_proc("-M", "none", "-m", "32M", "-incoming", f"tcp:127.0.0.1:{port}",
                    "-snapshot-dir", str(tmp_path / "s"))
    dst.cmd("info status")
    q2 = qemus()
    q2.hmp(f"migrate -d tcp:127.0.0.1:{port}")
    assert dst.proc.wait(20) == 1
    assert f"qmon: load of migration failed: {qemu_message}" in dst.stderr_lines


# Snapshot sizes -------------------------------------------------------------------------------

@pytest.mark.skipif(QEMU_IMG is None, reason="qemu-img is not installed")
def test_info_snapshots_shows_the_same_vm_size(qemus, qmon_proc, tmp_path):
    import subprocess

    disk = tmp_path / "d.qcow2"
    subprocess.run([QEMU_IMG, "create", "-q", "-f", "qcow2", str(disk), "64M"], check=True)
    q = qemus("-S", "-drive", f"file={disk},if=none")
    assert q.hmp("savevm s1") == []
    qrow = q.hmp("info snapshots")[2]
    src = qmon_proc("-M", "none", "-m", "16M", "-S", "-snapshot-dir", str(tmp_path / "s"))
    src.cmd("savevm s1")
    mrow = src.cmd("info snapshots")[2]
    assert qrow[:35] == mrow[:35] == "--        s1               36.8 KiB"


def test_return_path_both_ways(qemus, qmon_proc, tmp_path):
    """QEMU's return-path capability: OPEN_RETURN_PATH and PING in the stream, PONG and
    SHUT back. A qmon source and a QEMU destination, then the other way round."""
    port = free_port()
    q = qemus("-incoming", f"tcp:127.0.0.1:{port}")
    src = qmon_proc("-M", "none", "-m", "16M", "-snapshot-dir", str(tmp_path / "s"))
    assert src.cmd("migrate_set_capability return-path on") == []
    assert src.cmd(f"migrate tcp:127.0.0.1:{port}") == []
    assert status_of(src.cmd("info migrate")) == "completed"
    q.wait_for("info status", lambda o: o == ["VM status: running"])
    port = free_port()
    dst = qmon_proc("-M", "none", "-m", "16M", "-incoming", f"tcp:127.0.0.1:{port}",
                    "-snapshot-dir", str(tmp_path / "s"))
    dst.cmd("info status")
    q2 = qemus()
    q2.hmp("migrate_set_capability return-path on")
    q2.hmp(f"migrate -d tcp:127.0.0.1:{port}")
    q2.wait_for("info migrate", lambda o: status_of(o) == "completed")
    dst.wait_for("info status", lambda o: o == ["VM status: running"])
