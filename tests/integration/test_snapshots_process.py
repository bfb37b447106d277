"""Snapshots across processes, tag handling, the store's atomicity, the counter invariant."""

import os

from conftest import run_qmon, transcript_outputs
from machine.snapshots import SnapshotStore


def run(args, commands, snapdir):
    status, out, err = run_qmon(list(args) + ["-snapshot-dir", snapdir],
                                "\n".join(commands) + "\n")
    assert "Traceback" not in out + err
    return status, [lines for _, lines in transcript_outputs(out)]


def test_snapshots_persist_across_processes(tmp_path, snapdir):
    ram1, ram2 = tmp_path / "a.bin", tmp_path / "b.bin"
    args = ["-m", "8M", "-workload", "counter,speed=20000"]
    status, got = run(args + ["-mem-path", str(ram1)],
                      ["stop", "savevm first", "cont", "stop", "savevm second", "info workload",
                       "info snapshots"], snapdir)
    assert status == 0
    assert got[5][-1] == "invariant: ok"
    rows = got[6][2:]
    assert [r.split()[1] for r in rows] == ["first", "second"]
    # a new process on the same directory lists and loads them
    status, got = run(args + ["-S", "-mem-path", str(ram2)],
                      ["info snapshots", "loadvm second", "info workload", "info status"],
                      snapdir)
    assert status == 0
    assert [r.split()[1] for r in got[0][2:]] == ["first", "second"]
    assert got[2][-1] == "invariant: ok"
    assert got[3] == ["VM status: paused (prelaunch)"]
    assert ram1.read_bytes() == ram2.read_bytes()  # RAM after loadvm equals RAM at savevm


def test_other_ram_size_or_machine_type_fail_with_qemus_message(snapdir):
    run(["-M", "none", "-m", "16M", "-S"], ["savevm s16"], snapdir)
    status, got = run(["-M", "none", "-m", "32M", "-S"], ["info snapshots", "loadvm s16"],
                      snapdir)
    assert status == 1
    assert got[0][2].split()[1] == "s16"
    assert got[1] == ["Error: Size mismatch: ram: 0x1000000 != 0x2000000: Invalid argument"]
    status, got = run(["-M", "lab", "-m", "16M", "-S"], ["loadvm s16"], snapdir)
    assert got[0] == ["Error: Machine type received is 'none' and local is 'lab'"]


def test_vm_size_is_the_stream_byte_count(snapdir):
    status, got = run(["-M", "none", "-m", "16M", "-S"], ["savevm s", "info snapshots"], snapdir)
    row = got[1][2]
    assert row.startswith("--        s                36.8 KiB ")
    assert row.endswith(" 00:00:00.000" + " " * 11)
    info = SnapshotStore(snapdir).find("s")
    assert info.vm_state_size == 37645
    assert os.path.getsize(os.path.join(snapdir, info.stream)) == 37645


def test_tags(tmp_path, snapdir):
    outside = tmp_path / "escaped"
    tags = ['"../escaped"', "x/y", '"a b"', '"q\\"t"', "'sq'", '""', "123", "../../../etc/passwd",
            '"' + "L" * 300 + '"']
    cmds = [f"savevm {t}" for t in tags] + ["info snapshots"]
    status, got = run(["-M", "none", "-m", "1M", "-S"], cmds, snapdir)
    assert status == 0
    expected = ["../escaped", "x/y", "a b", 'q"t', "'sq'", "", "123", "../../../etc/passwd"]
    for row, tag in zip(got[-1][2:], expected):
        assert row.startswith(f"--        {tag:<16} "), (row, tag)
    assert got[-1][-1][10:].startswith("L" * 255 + " ")  # cut to 255 bytes, as QEMU does
    assert not outside.exists()
    for name in os.listdir(snapdir):
        assert "/" not in name and name not in (".", "..")
    assert sorted(os.listdir(tmp_path)) == sorted(["snapshots"])
    # loadvm/delvm match tags only; the 300-character name no longer exists
    status, got = run(["-M", "none", "-m", "1M", "-S"],
                      ['loadvm "a b"', "loadvm 1", 'delvm ""', "loadvm " + "L" * 300,
                       "loadvm " + "L" * 255, "info snapshots"], snapdir)
    assert got[0] == [] and got[4] == []
    assert got[1] == ["Error: Snapshot '1' does not exist in one or more devices"]
    assert got[3] == ["Error: Snapshot '" + "L" * 300 + "' does not exist in one or more devices"]
    assert len(got[5]) == 2 + 8


def test_resaving_a_tag_replaces_it_and_moves_it_last(snapdir):
    status, got = run(["-M", "none", "-m", "1M", "-S"],
                      ["savevm a", "savevm b", "savevm a", "info snapshots", "delvm a",
                       "info snapshots", "delvm a"], snapdir)
    assert [r.split()[1] for r in got[3][2:]] == ["b", "a"]
    assert [r.split()[1] for r in got[5][2:]] == ["b"]
    assert got[6] == []
    assert len([n for n in os.listdir(snapdir) if n.endswith(".vmstate")]) == 1


def test_leftovers_of_a_dead_writer_are_ignored_then_removed(snapdir):
    run(["-M", "none", "-m", "1M", "-S"], ["savevm keep"], snapdir)
    # what a writer killed mid-save leaves: a temporary stream, an unreferenced final stream,
    # and a temporary metadata file (pid 999999 does not exist)
    for name in (".tmp-999999-000000aa.vmstate", "keep.999999-000000bb.vmstate",
                 ".tmp-999999-000000cc.json", "mine.vmstate"):
        with open(os.path.join(snapdir, name), "wb") as f:
            f.write(b"QEVM partial")
    status, got = run(["-M", "none", "-m", "1M", "-S"], ["info snapshots", "loadvm keep"],
                      snapdir)
    assert status == 0
    assert [r.split()[1] for r in got[0][2:]] == ["keep"]
    # qmon's own leftovers are gone; a file qmon did not write is never touched
    assert sorted(os.listdir(snapdir)) == sorted(
        ["keep.json", SnapshotStore(snapdir).find("keep").stream, "mine.vmstate"])


def test_a_damaged_stream_is_listed_and_loadvm_says_what_is_wrong(snapdir):
    run(["-M", "none", "-m", "1M", "-S"], ["savevm hurt"], snapdir)
    path = os.path.join(snapdir, SnapshotStore(snapdir).find("hurt").stream)
    with open(path, "r+b") as f:
        f.truncate(1000)
    status, got = run(["-M", "none", "-m", "1M", "-S"], ["info snapshots", "loadvm hurt"],
                      snapdir)
    assert got[0][2].split()[1] == "hurt"
    assert got[1] == ["Error: truncated stream: unexpected end of data at offset 994 in "
                      "section 'ram'"]
    assert os.path.exists(path)


def test_failed_save_keeps_the_older_snapshot(make_machine, snapdir):
    import pytest
    from machine.machine import MachineError

    store = SnapshotStore(snapdir)
    m = make_machine("none", 1 << 20, paused=True)
    m.run(m.save_snapshot, store, "a")
    old = store.find("a")

    def failing_write(fd):
        os.write(fd, b"QEVM")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        store.save("a", failing_write, 0)
    assert store.find("a") == old
    m.run(m.load_snapshot, store, "a")
    assert sorted(os.listdir(snapdir)) == sorted(["a.json", old.stream])


def test_counter_invariant_detects_a_stale_page(make_machine):
    m = make_machine("none", 1 << 20, workload="counter,speed=50000")
    import time
    time.sleep(0.2)
    m.run(m.vm_stop)
    assert m.run(m.workload.check) is None
    first = m.run(lambda: m.ram.read(0, 1)[0])
    m.run(lambda: m.ram.write(0x80000, bytes([(first + 100) & 0xFF])))
    problem = m.run(m.workload.check)
    assert problem is not None and "page 128" in problem
    assert "invariant: broken at page 128" in "\n".join(m.run(m.workload.describe))
