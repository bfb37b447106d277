"""vmstate, xbzrle, sizes, rendering, run states."""

import pytest

from machine.devices.cpu import cpu_vmsd
from machine.runstate import RunState, RunStateError, check_transition, status_text
from machine.savevm import xbzrle
from machine.units import format_size, parse_size
from monitor import render
from monitor.args import DumpSpec


def test_cpu_v1_payload_loads_into_v2_with_default():
    v1, v2 = cpu_vmsd(1), cpu_vmsd(2)
    values = v1.defaults()
    values["regs"] = list(range(16))
    values["rip"] = 0x1234
    payload = v1.encode(values)
    assert len(payload) == v2.size(1) == v2.size(2) - 8
    got = v2.decode(payload, 1)
    assert got["regs"] == list(range(16)) and got["rip"] == 0x1234
    assert got["xcr0"] == 1  # the field version 2 added takes its default
    assert v2.decode(v2.encode(got), 2) == got


@pytest.mark.parametrize("n,text", [(37645, "36.8 KiB"), (1000, "0.977 KiB"), (16 << 20, "16 MiB"),
                                    (0, "0 B"), (999, "999 B"), (1 << 30, "1 GiB")])
def test_format_size(n, text):
    assert format_size(n) == text


def test_parse_size():
    assert parse_size("16M") == 16 << 20
    assert parse_size("128", default_suffix="M") == 128 << 20
    assert parse_size("2k") == 2048
    with pytest.raises(ValueError):
        parse_size("abc")


def test_xbzrle_round_trip_and_quirks():
    old = bytearray(4096)
    new = bytearray(old)
    new[10:20] = b"x" * 10
    new[4000] = 7
    enc = xbzrle.encode(old, new)
    page = bytearray(old)
    assert xbzrle.decode(enc, page) == 4001
    assert page == new
    assert xbzrle.encode(old, old) == b""
    for bad in (b"\x00", b"\x05\x00", b"\x00\x05ab", b"\x80\x80\x01", b"\xff\x7f\x01x"):
        with pytest.raises(xbzrle.XbzrleError):
            xbzrle.decode(bad, bytearray(4096))


def test_status_text_and_transitions():
    assert status_text(RunState.RUNNING) == "running"
    assert status_text(RunState.PAUSED) == "paused"
    assert status_text(RunState.RESTORE_VM) == "paused (restore-vm)"
    check_transition(RunState.PRELAUNCH, RunState.RUNNING)
    with pytest.raises(RunStateError):
        check_transition(RunState.RESTORE_VM, RunState.PAUSED)


def test_snapshot_rows():
    from machine.snapshots import SnapshotInfo
    import time

    t = time.mktime((2026, 11, 27, 17, 28, 28, 0, 0, -1))
    rows = render.snapshots([SnapshotInfo("s1", 1, t, 1_000_000, 37645, "x")])
    assert rows == [
        "List of snapshots present on all disks:",
        "ID        TAG               VM SIZE                DATE     VM CLOCK     ICOUNT",
        "--        s1               36.8 KiB 2026-11-27 17:28:28 00:00:00.001           ",
    ]
    assert render.snapshots([]) == ["There is no snapshot available."]
    assert render.vm_clock(3723_004_000_000) == "01:02:03.004"


def _dump(count, fmt, size, addr=0):
    mem = bytes(range(256)) * 4 + b"Hello, QEMU!\0\tTa"
    return render.memory_dump(lambda a, n: mem[a:a + n] if a + n <= len(mem) else None,
                              addr, DumpSpec(count, fmt, size))


def test_memory_dump_matches_qemu():
    # Outputs recorded from QEMU 7.2's xp on the same bytes.
    assert _dump(16, "x", 1) == ["0000000000000000: 0x00 0x01 0x02 0x03 0x04 0x05 0x06 0x07",
                                 "0000000000000008: 0x08 0x09 0x0a 0x0b 0x0c 0x0d 0x0e 0x0f"]
    assert _dump(8, "x", 2) == ["0000000000000000: 0x0100 0x0302 0x0504 0x0706 0x0908 0x0b0a "
                                "0x0d0c 0x0f0e"]
    assert _dump(3, "x", 8, 8) == ["0000000000000008: 0x0f0e0d0c0b0a0908 0x1716151413121110",
                                   "0000000000000018: 0x1f1e1d1c1b1a1918"]
    assert _dump(4, "d", 4) == ["0000000000000000:   50462976  117835012  185207048  252579084"]
    assert _dump(4, "o", 4) == ["0000000000000000:  0300400400  0701402404 01302404410 01703406414"]
    assert _dump(5, "d", 1, 0xFE) == ["00000000000000fe: 254 255   0   1   2"]
    assert _dump(16, "c", 1, 0x400) == [
        "0000000000000400: 'H' 'e' 'l' 'l' 'o' ',' ' ' 'Q'",
        "0000000000000408: 'E' 'M' 'U' '!' '\\x00' '\\x09' 'T' 'a'"]
    assert _dump(1, "d", 8, 0xF8) == ["00000000000000f8:     -283686952306184"]
    assert _dump(0, "x", 1) == []
    assert _dump(4, "x", 4, 0x40C) == ["000000000000040c: Cannot access memory"]
