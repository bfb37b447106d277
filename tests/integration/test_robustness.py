"""Odd input gets a clear answer and loses nothing (findings of a review, each reproduced)."""

import json
import os
import time

import pytest

from conftest import run_qmon, transcript_outputs
from machine.snapshots import SnapshotStore


def outputs(args, commands, snapdir):
    status, out, err = run_qmon(list(args) + ["-snapshot-dir", snapdir],
                                "\n".join(commands) + "\n")
    assert "Traceback" not in out + err
    got = [lines for _, lines in transcript_outputs(out)]
    assert len(got) == len(commands), out
    return status, got


def test_odd_monitor_input(tmp_path, snapdir):
    ram = tmp_path / "ram.bin"
    ram.write_bytes(bytes(range(256)) * 4096)
    status, got = outputs(
        ["-M", "none", "-m", "1M", "-S", "-mem-path", str(ram)],
        ["xp/2xb 0", "x/", "xp /\u00b2xb 0", "xp /4294967297xb 0", "xp /2147483648xb 0",
         'pmemsave 0 0xffffffff+2 "f"', "xp /8xb 0xffffc", "xp /99999999xb 0xffff8",
         "xp /1xb -1"], snapdir)
    assert got[0] == ["0000000000000000: 0x00 0x01"]
    assert got[1] == ["unexpected end of expression", 'Try "help x" for more information']
    assert got[2] == ["invalid char in format: '\u00b2'", 'Try "help xp" for more information']
    assert got[3] == ["0000000000000000: 0x00"]  # the count is a C int, as in QEMU
    assert got[4] == []
    assert got[5] == ["'pmemsave' has failed: integer is for 32-bit values",
                      'Try "help pmemsave" for more information']
    assert got[6] == ["00000000000ffffc: Cannot access memory"]
    assert got[7] == ["00000000000ffff8: 0xf8 0xf9 0xfa 0xfb 0xfc 0xfd 0xfe 0xff",
                      "0000000000100000: Cannot access memory"]
    assert got[8] == ["ffffffffffffffff: Cannot access memory"]
    assert not (tmp_path / "f").exists()


@pytest.mark.parametrize("args,message", [
    (["-m", "8E"], "cannot map guest RAM"),
    (["-mem-path", "/proc/version"], "cannot map guest RAM"),
    (["-mem-path", "/nonexistent/dir/ram"], "No such file or directory"),
])
def test_ram_that_cannot_be_mapped(args, message, snapdir):
    status, out, err = run_qmon(["-M", "none"] + args + ["-snapshot-dir", snapdir], "")
    assert status == 1 and message in err and "Traceback" not in err


def test_junk_in_the_snapshot_directory_is_ignored(snapdir):
    outputs(["-M", "none", "-m", "1M", "-S"], ["savevm good"], snapdir)
    d = snapdir
    with open(os.path.join(d, "inf.json"), "w") as f:
        f.write('{"tag": "inf", "id": Infinity, "date": 0, "vm_clock_ns": 0, '
                '"vm_state_size": 1, "stream": "x"}')
    with open(os.path.join(d, "deep.json"), "w") as f:
        f.write("[" * 100000)
    os.mkfifo(os.path.join(d, "fifo.json"))
    with open(os.path.join(d, "date.json"), "w") as f:
        json.dump({"tag": "date", "id": 9, "date": 1e20, "vm_clock_ns": 0,
                   "vm_state_size": 1, "stream": "good.vmstate"}, f)
    status, got = outputs(["-M", "none", "-m", "1M", "-S"], ["info snapshots", "loadvm good"],
                          snapdir)
    assert [r.split()[1] for r in got[0][2:]] == ["good"]
    assert got[1] == []


def test_unreadable_metadata_never_costs_the_stream(snapdir):
    outputs(["-M", "none", "-m", "1M", "-S"], ["savevm keep"], snapdir)
    store = SnapshotStore(snapdir)
    stream = store.find("keep").stream
    meta = os.path.join(snapdir, "keep.json")
    d = json.load(open(meta))
    d["vm_clock_ns"] = "later"
    json.dump(d, open(meta, "w"))
    outputs(["-M", "none", "-m", "1M", "-S"], ["info snapshots"], snapdir)
    assert os.path.exists(os.path.join(snapdir, stream))


def test_a_failure_after_the_commit_point_keeps_the_new_snapshot(make_machine, snapdir,
                                                                   monkeypatch):
    import machine.snapshots as snapshots

    store = SnapshotStore(snapdir)
    m = make_machine("none", 1 << 20, paused=True)
    m.run(m.save_snapshot, store, "a")
    calls = []
    real = snapshots._fsync_dir

    def flaky(path):
        calls.append(path)
        if len(calls) == 2:  # the fsync after the metadata rename
            raise OSError(5, "Input/output error")
        real(path)

    monkeypatch.setattr(snapshots, "_fsync_dir", flaky)
    with pytest.raises(Exception):
        m.run(m.save_snapshot, store, "a")
    monkeypatch.setattr(snapshots, "_fsync_dir", real)
    info = store.find("a")
    assert info is not None and os.path.exists(store.stream_path(info))
    m.run(m.load_snapshot, store, "a")


def test_a_device_missing_from_the_stream_gets_its_reset_state(make_machine, snapdir):
    from machine.savevm.records import Footer, SectionHeader, parse_bytes
    from machine.savevm.savevm import Loader

    store = SnapshotStore(snapdir)
    m = make_machine("lab", 1 << 20, paused=True, workload="idle")
    m.run(m.save_snapshot, store, "full")
    data = open(store.stream_path(store.find("full")), "rb").read()
    recs = parse_bytes(data, Loader(m, False).describe)
    start = next(r.offset for r in recs if isinstance(r, SectionHeader) and r.idstr == "serial")
    end = next(r.offset for r in recs if isinstance(r, Footer) and r.offset > start) + 5
    cut = data[:start] + data[end:]

    def write(fd):
        os.write(fd, cut)
        return len(cut)

    store.save("noserial", write, 0)
    m.run(lambda: m.serial.state.__setitem__("tx_bytes", 12345))
    m.run(m.load_snapshot, store, "noserial")
    assert m.serial.state == m.serial.vmsd.defaults()


def test_a_workload_asked_to_go_impossibly_fast_does_not_hang_the_machine(snapdir):
    start = time.monotonic()
    status, got = outputs(["-M", "none", "-m", "1M", "-workload", "counter,speed=1P"],
                          ["info status", "stop", "info workload"], snapdir)
    assert got[2][-1] == "invariant: ok"
    assert time.monotonic() - start < 30
