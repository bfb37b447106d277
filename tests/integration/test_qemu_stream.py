"""Against the real QEMU 7.2: its -M none stream and ours are the same bytes, and its loads."""

import os
import shutil
import subprocess

import pytest

from conftest import run_qmon, transcript_outputs
from machine.snapshots import SnapshotStore

QEMU = shutil.which("qemu-system-x86_64")
pytestmark = pytest.mark.skipif(QEMU is None, reason="qemu-system-x86_64 is not installed")


def qemu_stream(tmp_path, extra=(), ram_file=None):
    out = tmp_path / "qemu.stream"
    args = [QEMU, "-M", "none", "-m", "16M", "-nodefaults", "-display", "none", "-S",
            "-monitor", "stdio"]
    if ram_file:
        args += ["-object", f"memory-backend-file,id=ram,size=16M,mem-path={ram_file},share=on",
                 "-machine", "memory-backend=ram"]
    script = (f'migrate_set_parameter max-bandwidth 100G\nmigrate "exec:cat > {out}"\n'
              "info migrate\nquit\n")
    subprocess.run(args + list(extra), input=script, capture_output=True, text=True, timeout=60)
    return out.read_bytes()


def test_paused_none_stream_is_byte_identical_to_qemus(tmp_path, make_machine):
    from machine.savevm.savevm import save_stream
    from machine.savevm.stream import BytesSink, StreamWriter

    theirs = qemu_stream(tmp_path)
    m = make_machine("none", 16 << 20, paused=True)
    w = StreamWriter(BytesSink())
    m.run(save_stream, m, w)
    assert len(theirs) == 37645
    assert bytes(w.sink.data) == theirs


def test_qemu_stream_with_random_ram_loads_in_qmon(tmp_path, snapdir):
    ram = tmp_path / "ram.bin"
    data = bytearray(os.urandom(16 << 20))
    for page in range(0, 4096, 7):  # some zero pages among the random ones
        data[page * 4096:(page + 1) * 4096] = bytes(4096)
    ram.write_bytes(data)
    stream = qemu_stream(tmp_path, ram_file=str(ram))
    store = SnapshotStore(snapdir)

    def write(fd):
        os.write(fd, stream)
        return len(stream)

    store.save("from-qemu", write, 0)
    mine = tmp_path / "mine.bin"
    status, out, err = run_qmon(["-M", "none", "-m", "16M", "-S", "-mem-path", str(mine),
                                 "-snapshot-dir", snapdir], "loadvm from-qemu\ninfo status\n")
    assert status == 0, out + err
    assert transcript_outputs(out)[1][1] == ["VM status: paused (prelaunch)"]
    assert mine.read_bytes() == bytes(data)


def test_after_running_only_the_clock_values_differ(tmp_path, make_machine):
    """A machine that ran for a while, then paused: same length, same layout; the only bytes
    that differ are the timer section's two clock values (cpu_ticks_offset and
    cpu_clock_offset), which depend on how long each program ran."""
    import time

    from machine.savevm.records import DeviceState, parse_bytes
    from machine.savevm.savevm import Loader, save_stream
    from machine.savevm.stream import BytesSink, StreamWriter

    out = tmp_path / "qemu.stream"
    args = [QEMU, "-M", "none", "-m", "16M", "-nodefaults", "-display", "none",
            "-monitor", "stdio"]
    script = (f'stop\nmigrate_set_parameter max-bandwidth 100G\nmigrate "exec:cat > {out}"\n'
              "info migrate\nquit\n")
    p = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL, text=True)
    time.sleep(0.3)
    p.communicate(script, timeout=60)
    theirs = out.read_bytes()
    m = make_machine("none", 16 << 20)
    time.sleep(0.3)
    m.run(m.vm_stop)
    w = StreamWriter(BytesSink())
    m.run(save_stream, m, w)
    mine = bytes(w.sink.data)
    assert len(mine) == len(theirs)
    timer = next(r for r in parse_bytes(mine, Loader(m, False).describe)
                 if isinstance(r, DeviceState) and r.idstr == "timer")
    clock_bytes = set(range(timer.offset, timer.offset + 8)) | \
        set(range(timer.offset + 16, timer.offset + 24))
    differing = {i for i in range(len(mine)) if mine[i] != theirs[i]}
    assert differing and differing <= clock_bytes
