"""savevm/loadvm round trips, and every loadvm error leaving the machine exactly as it was."""

import hashlib
import os
import struct

import pytest

from machine.machine import Machine, MachineError
from machine.runstate import RunState
from machine.savevm.records import (DeviceState, RamMemSize, RamPage, RamZero, SectionHeader,
                                    parse_bytes)
from machine.savevm.savevm import Loader
from machine.snapshots import SnapshotStore


def fingerprint(m):
    def snap():
        return (hashlib.sha256(m.ram.mem[:]).hexdigest(),
                # device state as held (the clock-derived fields are compared via the clock)
                {k: repr(d.state) for k, d in m.devices.items()},
                m.clock.now_ns(), m.runstate)
    return m.run(snap)


def put_stream(store, tag, data):
    def write(fd):
        os.write(fd, data)
        return len(data)
    store.save(tag, write, 0)


def stream_of(store, tag):
    with open(store.stream_path(store.find(tag)), "rb") as f:
        return f.read()


@pytest.fixture
def store(snapdir):
    return SnapshotStore(snapdir)


@pytest.mark.parametrize("mtype", ["lab", "none"])
def test_round_trip_restores_ram_and_devices_byte_for_byte(make_machine, store, mtype):
    m = make_machine(mtype, 8 << 20, workload="counter,size=1M,speed=200000")
    import time
    time.sleep(0.3)
    m.run(m.vm_stop)
    m.run(lambda: m.ram.write(0x20_0000 + 7, os.urandom(3 * 4096)))
    before = fingerprint(m)
    m.run(m.save_snapshot, store, "s")
    assert fingerprint(m) == before
    m.run(m.vm_start)
    time.sleep(0.3)  # the counter moves on
    m.run(m.vm_stop)
    assert fingerprint(m)[0] != before[0]
    m.run(m.load_snapshot, store, "s")
    assert fingerprint(m) == before
    assert m.run(m.workload.check) is None


def test_snapshot_of_a_running_guest_keeps_running_and_the_invariant(make_machine, store):
    m = make_machine("lab", 4 << 20, workload="counter,speed=50000")
    m.run(m.save_snapshot, store, "live")
    assert m.runstate == RunState.RUNNING
    m.run(m.load_snapshot, store, "live")
    assert m.runstate == RunState.RUNNING
    assert m.run(m.workload.check) is None


def _section(recs, idstr):
    return next(r for r in recs if isinstance(r, SectionHeader) and r.idstr == idstr)


def _mutations(m, data):
    """(name, broken stream, expected message) for every check the loader makes."""
    recs = parse_bytes(data, Loader(m, False).describe)
    timer = _section(recs, "timer")
    tver = timer.offset + 1 + 4 + 1 + len("timer") + 4
    ram = _section(recs, "ram")
    rver = ram.offset + 1 + 4 + 1 + 3 + 4
    gs = _section(recs, "globalstate")
    ms = next(r for r in recs if isinstance(r, RamMemSize))
    page = next(r for r in recs if isinstance(r, RamPage))
    named = next(r for r in recs if isinstance(r, (RamPage, RamZero)) and r.named)
    gs_payload = next(r for r in recs if isinstance(r, DeviceState) and r.idstr == "globalstate")
    foot = timer.offset + 1 + 4 + 1 + 5 + 8 + 24

    def at(off, b):
        return data[:off] + b + data[off + len(b):]

    size = m.ram.size
    return [
        ("magic", at(0, b"QEVN"), "Not a migration stream"),
        ("version", at(4, struct.pack(">I", 4)), "Unsupported migration stream version"),
        ("version 1", at(4, struct.pack(">I", 1)), "Unsupported migration stream version"),
        ("config missing", at(8, b"\x04"), "Configuration section missing"),
        ("machine type", at(13, b"p" + b"x" * (len(m.config_name) - 1)),
         f"Machine type received is 'p{'x' * (len(m.config_name) - 1)}' and local is "
         f"'{m.config_name}'"),
        ("unknown section", at(timer.offset + 6, b"tumer"),
         "Unknown savevm section or instance 'tumer' 0. Make sure that your current VM setup "
         "matches your saved VM setup, including any hotplugged devices"),
        ("unknown instance", at(timer.offset + 6 + 5, struct.pack(">I", 1)),
         "Unknown savevm section or instance 'timer' 1. Make sure that your current VM setup "
         "matches your saved VM setup, including any hotplugged devices"),
        ("newer version", at(tver, struct.pack(">I", 3)), "savevm: unsupported version 3 for "
         "'timer' v2"),
        ("older version", at(tver, struct.pack(">I", 0)),
         "timer: incoming version_id 0 is too old for local minimum version_id  1"),
        ("ram version", at(rver, struct.pack(">I", 5)), "savevm: unsupported version 5 for "
         "'ram' v4"),
        ("footer missing", at(foot, b"\x00"), "Missing section footer for timer"),
        ("footer id", at(foot + 1, struct.pack(">I", 5)),
         "Mismatched section id in footer for timer - read 0x5 expected 0x0"),
        ("ram size", at(ms.offset, struct.pack(">Q", (size // 2) | 4)) [:ms.offset + 8]
         + bytes([len(m.ram.idstr)]) + m.ram.idstr.encode() + struct.pack(">Q", size // 2)
         + data[ms.offset + 8 + 1 + len(m.ram.idstr) + 8:],
         f"Size mismatch: {m.ram.idstr}: 0x{size // 2:x} != 0x{size:x}: Invalid argument"),
        ("block name", at(named.offset + 9, b"Z"), f"Can't find block Z{m.ram.idstr[1:]}"),
        ("page offset", at(page.offset, struct.pack(">Q", size | 0x28)),
         f"Illegal RAM offset {size:x}"),
        ("globalstate", at(gs_payload.offset, struct.pack(">I", 200)),
         "globalstate: invalid runstate size 200"),
        ("runstate name", at(gs_payload.offset + 4, b"bogus\0"),
         "globalstate: invalid runstate 'bogus'"),
        ("truncated in ram", data[:page.offset + 100],
         f"truncated stream: unexpected end of data at offset {page.offset} in section 'ram'"),
        ("truncated before EOF", data[:gs.offset], "truncated stream: unexpected end of data at "
         f"offset {gs.offset}"),
        ("section type", at(gs.offset, b"\x09"), "Unknown savevm section type 9"),
    ]


@pytest.mark.parametrize("mtype", ["lab", "none"])
@pytest.mark.parametrize("was_running", [False, True])
def test_every_loadvm_error_leaves_the_machine_unchanged(make_machine, store, mtype, was_running):
    m = make_machine(mtype, 1 << 20, workload="idle")
    m.run(lambda: m.ram.write(0x4000, b"\x5a" * 4096))
    m.run(m.save_snapshot, store, "good")
    data = stream_of(store, "good")
    m.run(lambda: m.ram.write(0x8000, b"changed after the save"))
    if not was_running:
        m.run(m.vm_stop)
    for name, broken, message in _mutations(m, data):
        put_stream(store, name, broken)
        if was_running:
            m.run(m.vm_stop)  # freeze the clock for the comparison, then run again
            before = fingerprint(m)
            m.run(m.vm_start)
        else:
            before = fingerprint(m)
        with pytest.raises(MachineError) as e:
            m.run(m.load_snapshot, store, name)
        assert str(e.value) == message, name
        assert m.runstate == (RunState.RUNNING if was_running else RunState.PAUSED), name
        m.run(m.vm_stop)
        after = fingerprint(m)
        assert after[:2] == before[:2], name
        assert after[3] == before[3], name
        if not was_running:
            assert after[2] == before[2], name
        else:
            m.run(m.vm_start)
    # and the good one still loads
    m.run(m.load_snapshot, store, "good")
    assert m.run(lambda: m.ram.read(0x8000, 7)) == bytes(7)


def test_missing_snapshot_pauses_a_running_guest_like_qemu(make_machine, store):
    m = make_machine("none", 1 << 20)
    with pytest.raises(MachineError) as e:
        m.run(m.load_snapshot, store, "nosuch")
    assert str(e.value) == "Snapshot 'nosuch' does not exist in one or more devices"
    assert m.runstate == RunState.RESTORE_VM


def test_stream_of_another_ram_size_or_machine_type(make_machine, store):
    small = make_machine("none", 1 << 20)
    small.run(small.save_snapshot, store, "small")
    big = make_machine("none", 2 << 20)
    with pytest.raises(MachineError) as e:
        big.run(big.load_snapshot, store, "small")
    assert str(e.value) == "Size mismatch: ram: 0x100000 != 0x200000: Invalid argument"
    lab = make_machine("lab", 1 << 20)
    with pytest.raises(MachineError) as e:
        lab.run(lab.load_snapshot, store, "small")
    assert str(e.value) == "Machine type received is 'none' and local is 'lab'"
