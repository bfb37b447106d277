"""The stream dissector (scripts/analyze.py, qmon-analyze) on every kind of stream: real QEMU 7.2
captures, qmon's own (lab and none, from a real qmon process and in-process), XBZRLE, stdin,
snapshot tags, version 2, and a corpus of broken streams.

Expected offsets and values come from the stream layout (reference §1-3) and from the data put
into the machines, never from the dissector itself."""

import hashlib
import importlib.util
import io
import json
import os
import random
import re
import struct
import subprocess
import sys

import pytest

from conftest import ROOT, run_qmon

SCRIPT = os.path.join(ROOT, "scripts", "analyze.py")
DATA = os.path.join(ROOT, "tests", "data", "streams")
BROKEN = os.path.join(DATA, "broken")
PAGE = 4096

_spec = importlib.util.spec_from_file_location("stream_corpus", os.path.join(DATA, "corpus.py"))
corpus = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(corpus)


def analyze(*args, stdin=None, env=None):
    e = dict(os.environ)
    if env:
        e.update(env)
    p = subprocess.run([sys.executable, SCRIPT, *map(str, args)], input=stdin,
                       capture_output=True, timeout=120, env=e)
    return p.returncode, p.stdout.decode("utf-8", "replace"), p.stderr.decode("utf-8", "replace")


def ok(*args, **kw):
    status, out, err = analyze(*args, **kw)
    assert status == 0, out + err
    assert err == ""
    return out


def stream(name):
    return os.path.join(DATA, name)


def read(name):
    with open(stream(name), "rb") as f:
        return f.read()


_LINE = re.compile(r"^([0-9a-f]{8})  ( *)(\S+)(?: +(.*))?$")


def entries(out):
    """(offset, depth, kind, text) of each listing line that starts with an offset."""
    res = []
    for line in out.splitlines():
        m = _LINE.match(line)
        if m:
            res.append((int(m.group(1), 16), len(m.group(2)) // 2, m.group(3),
                        m.group(4) or ""))
    return res


def runs(out):
    """[(kind, block, first, last_inclusive, count)] from the listing's run lines."""
    res = []
    for off, depth, kind, text in entries(out):
        m = re.match(r"(\S+) 0x([0-9a-f]+)-0x([0-9a-f]+): (\d+) pages?", text)
        if kind in ("zero", "page", "xbzrle") and m:
            res.append((kind, m.group(1), int(m.group(2), 16), int(m.group(3), 16),
                        int(m.group(4))))
    return res


def expected_runs(mem, block, kinds=None):
    """Runs of zero/non-zero pages of a RAM image, as a one-pass save sends them."""
    res = []
    for p in range(len(mem) // PAGE):
        kind = (kinds or {}).get(p) or ("zero" if not any(mem[p * PAGE:(p + 1) * PAGE])
                                        else "page")
        if res and res[-1][0] == kind and res[-1][3] == p * PAGE - 1:
            k, b, first, _, n = res[-1]
            res[-1] = (k, b, first, (p + 1) * PAGE - 1, n + 1)
        else:
            res.append((kind, block, p * PAGE, (p + 1) * PAGE - 1, 1))
    return res


def assert_no_traceback(out, err):
    assert "Traceback" not in out + err


# ---------------------------------------------------------------------------------------------
# Real QEMU 7.2 streams


QEMU_NONE_LISTING = """\
00000000  header           magic QEVM, version 3
00000008  configuration    machine type "none"
00000011  START            section_id 2  ram  instance 0  version 4
00000022    MEM_SIZE       total 0x200000 (2 MiB), 1 block
0000002a      block        "ram" length 0x200000 (2 MiB)
00000036    EOS            end of this section's ram records
0000003e    footer         section_id 2 (ram) ok
00000043  PART             section_id 2  ram
00000048    zero           ram 0x0-0x1fffff: 512 pages (names its block)
0000124c    EOS            end of this section's ram records
00001254    footer         section_id 2 (ram) ok
00001259  END              section_id 2  ram
0000125e    EOS            end of this section's ram records
00001266    footer         section_id 2 (ram) ok
0000126b  FULL             section_id 0  timer  instance 0  version 2
0000127e    state          24 bytes, fields from the vmdesc
0000127e      field        cpu_ticks_offset int64 = 0
00001286      field        unused unused_buffer = (8 unused bytes)
0000128e      field        cpu_clock_offset int64 = 0
00001296    footer         section_id 0 (timer) ok
0000129b  FULL             section_id 4  globalstate  instance 0  version 1
000012b4    state          104 bytes, fields from the vmdesc
000012b4      field        size uint32 = 10 (0xa)
000012b8      field        runstate buffer (100 bytes) = "prelaunch"
0000131c    footer         section_id 4 (globalstate) ok
00001321  EOF
00001322  vmdesc           486 bytes of JSON, page_size 4096, 2 devices: timer, globalstate
0000150d  end
summary: 5389 bytes, 5 sections (1 START, 1 PART, 1 END, 2 FULL), 2 device states, pages: \
512 zero, 0 page, 0 xbzrle
"""


def test_qemu_none_stream_listing():
    out = ok(stream("qemu-none-2m.stream"))
    lines = out.splitlines(keepends=True)
    assert lines[0] == f"qmon-analyze: {stream('qemu-none-2m.stream')}\n"
    assert "".join(lines[1:]) == QEMU_NONE_LISTING


def test_qemu_random_ram_runs_and_extract(tmp_path):
    ram = corpus.random_ram()
    out = ok(stream("qemu-none-2m-random.stream"), "--extract", tmp_path / "x")
    assert runs(out) == expected_runs(ram, "ram")
    assert "pages: 504 zero, 8 page, 0 xbzrle" in out
    assert (tmp_path / "x" / "ram-ram.bin").read_bytes() == ram
    assert (tmp_path / "x" / "globalstate-0.bin").read_bytes() == \
        read("qemu-none-2m-random.stream")[-(486 + 5 + 1 + 5 + 104):-(486 + 5 + 1 + 5)]
    gs = json.loads((tmp_path / "x" / "globalstate-0.json").read_text())
    assert gs["values"]["size"] == 10
    assert [f["text"] for f in gs["fields"] if f["name"] == "runstate"] == ["prelaunch"]
    assert f"extracted {tmp_path / 'x' / 'ram-ram.bin'} (2097152 bytes)" in out
    # In the JSON, runs and records tile the stream: each starts where the one before ended.
    recs = json.loads(ok(stream("qemu-none-2m-random.stream"), "--json"))["records"]
    spans = [(r["offset"], r["bytes"]) for r in recs if "bytes" in r]
    assert [b for _, b in spans[:3]] == [13, 3 * 4104, 96 * 9]
    for r, nxt in zip(recs, recs[1:]):
        if "bytes" in r:
            assert r["offset"] + r["bytes"] == nxt["offset"], r


def test_qemu_running_stream_decodes_the_clock():
    data = read("qemu-none-1m-running.stream")
    out = ok(stream("qemu-none-1m-running.stream"))
    # Locate the timer payload from the bytes: FULL, section_id 0, "timer", instance 0, v2.
    hdr = b"\x04\0\0\0\0\x05timer\0\0\0\0\0\0\0\x02"
    at = data.index(hdr) + len(hdr)
    ticks, unused, clock = struct.unpack_from(">q8sq", data, at)
    assert ticks and clock and unused == bytes(8)
    e = {text.split(" ")[0]: (off, text) for off, _, kind, text in entries(out) if kind == "field"}
    assert e["cpu_ticks_offset"] == (at, f"cpu_ticks_offset int64 = {ticks} (0x{ticks:x})")
    assert e["cpu_clock_offset"] == (at + 16, f"cpu_clock_offset int64 = {clock} (0x{clock:x})")
    assert 'runstate buffer (100 bytes) = "running"' in e["runstate"][1]
    assert "pages: 256 zero, 0 page, 0 xbzrle" in out


def test_qemu_pc_stream_every_device_decoded_through_the_vmdesc(tmp_path):
    data = read("qemu-pc-2m.stream")
    vmdesc = json.loads(data[data.rindex(b'{"page_size"'):])
    status, out, err = analyze(stream("qemu-pc-2m.stream"), "--json")
    assert status == 0, err
    doc = json.loads(out)
    assert doc["error"] is None
    recs = doc["records"]
    states = [r for r in recs if r["type"] == "device_state"]
    assert [(s["idstr"], s["instance_id"]) for s in states] == \
        [(d["name"], d["instance_id"]) for d in vmdesc["devices"]]
    assert all(s["source"] == "vmdesc" and "note" not in s for s in states)

    def walk(fields):
        for f in fields:
            yield f
            yield from walk(f.get("fields", ()))
            for e in f.get("elements", ()):
                yield e
                yield from walk(e.get("fields", ()))

    for s in states:
        # The decoded members tile the payload exactly.
        top = s["fields"]
        assert top[0]["offset"] == s["offset"]
        assert sum(f["size"] for f in top) == s["size"]
        for a, b in zip(top, top[1:]):
            assert a["offset"] + a["size"] == b["offset"]
        assert all("note" not in f for f in walk(top))
    cpu = next(s for s in states if s["idstr"] == "cpu")
    f = {x["name"]: x for x in cpu["fields"]}
    assert f["env.eip"]["value"] == 0xFFF0  # the reset vector
    # The raw bytes agree with the decoded values.
    regs = f["env.regs"]
    assert regs["value"] == list(struct.unpack_from(">16Q", data, regs["offset"]))
    sub = [x for x in cpu["fields"] if x["type"] == "subsection"]
    assert [x["name"] for x in sub] == [s["vmsd_name"] for s in
                                       next(d for d in vmdesc["devices"]
                                            if d["name"] == "cpu")["subsections"]]
    assert data[sub[0]["offset"]] == 0x05
    gs = next(s for s in states if s["idstr"] == "globalstate")
    assert gs["fields"][1]["text"] == "prelaunch"
    mem = next(r for r in recs if r["type"] == "mem_size")
    assert [b["name"] for b in mem["blocks"]] == [
        "pc.ram", "/rom@etc/acpi/tables", "pc.bios", "pc.rom", "/rom@etc/table-loader",
        "/rom@etc/acpi/rsdp"]
    assert doc["summary"]["pages"] == {"zero": 593, "page": 49, "xbzrle": 0}

    out = ok(stream("qemu-pc-2m.stream"), "--extract", tmp_path / "x")
    assert re.search(r'subsection +"cpu/poll_control_msr" version 1', out)
    x = tmp_path / "x"
    bios = (x / "ram-pc.bios.bin").read_bytes()
    # The pc.bios block is SeaBIOS's bios-256k.bin (Debian's seabios 1.16.2-1) as QEMU loaded it.
    assert hashlib.sha256(bios).hexdigest() == BIOS_SHA256
    assert (x / "ram-%2From%40etc%2Facpi%2Ftables.bin").stat().st_size == 0x20000
    assert (x / "ram-pc.ram.bin").read_bytes() == bytes(2 << 20)
    assert (x / "0000%3A00%3A01.3%2Fpiix4_pm-0.bin").exists()
    assert (x / "dma-1.json").exists() and (x / "i8259-1.bin").exists()
    cpu_json = json.loads((x / "cpu-0.json").read_text())
    assert cpu_json["values"]["env.eip"] == 0xFFF0
    assert (x / "cpu-0.bin").read_bytes() == data[cpu["offset"]:cpu["offset"] + cpu["size"]]


BIOS_SHA256 = "2da2018c7555e50b660a84a273a14a79cb87b9070fe6a90e9f151a53e357f7e6"


# ---------------------------------------------------------------------------------------------
# qmon's own streams


def _random_file(path, size, seed):
    r = random.Random(seed)
    data = bytearray(size)
    for p in range(0, size // PAGE, 3):  # every third page random, the rest zero
        data[p * PAGE:(p + 1) * PAGE] = r.randbytes(PAGE)
    path.write_bytes(data)
    return bytes(data)


def test_qmon_lab_snapshot_by_tag(tmp_path, snapdir):
    ram = _random_file(tmp_path / "ram.bin", 1 << 20, 1)
    status, out, err = run_qmon(["-M", "lab", "-m", "1M", "-S", "-mem-path",
                                 str(tmp_path / "ram.bin"), "-snapshot-dir", snapdir],
                                "savevm lesson\n")
    assert status == 0, out + err
    out = ok("--tag", "lesson", "--snapshot-dir", snapdir, "--extract", tmp_path / "x")
    assert out.splitlines()[0].startswith("qmon-analyze: snapshot 'lesson' (")
    assert 'machine type "lab"' in out
    assert runs(out) == expected_runs(ram, "lab.ram")
    heads = [(kind, text) for _, d, kind, text in entries(out) if kind == "FULL"]
    assert [t.split()[2] for _, t in heads] == ["timer", "globalstate", "cpu", "serial"]
    fields = {t.split(" ")[0]: t for _, _, k, t in entries(out) if k == "field"}
    assert fields["rip"] == "rip uint64 = 65520 (0xfff0)"
    assert fields["halted"] == "halted bool = false"
    assert fields["xcr0"] == "xcr0 uint64 = 1"
    assert fields["lsr"] == "lsr uint8 = 96 (0x60)"
    assert fields["regs"].startswith("regs uint64[16] = [")
    assert (tmp_path / "x" / "ram-lab.ram.bin").read_bytes() == ram
    cpu = json.loads((tmp_path / "x" / "cpu-0.json").read_text())
    from machine.devices.cpu import cpu_vmsd

    raw = (tmp_path / "x" / "cpu-0.bin").read_bytes()
    want = cpu_vmsd(2).decode(raw, 2)
    assert cpu["values"] == {k: v for k, v in want.items()}
    assert cpu["version_id"] == 2 and cpu["source"] == "vmdesc"

    # The default snapshot directory comes from qmon's own setting.
    out2 = ok("--tag", "lesson", env={"QMON_SNAPSHOT_DIR": snapdir})
    assert out2.splitlines()[1:] == ok("--tag", "lesson", "--snapshot-dir",
                                       snapdir).splitlines()[1:]
    status, out, err = analyze("--tag", "nosuch", "--snapshot-dir", snapdir)
    assert status == 1 and out == "" and "Snapshot 'nosuch' does not exist" in err
    assert len(err.splitlines()) == 1
    assert_no_traceback(out, err)


def _machine_stream(type_name, ram_size, fill=None, regs=None):
    from machine.machine import Machine
    from machine.savevm.savevm import save_stream
    from machine.savevm.stream import BytesSink, StreamWriter

    m = Machine(type_name, ram_size)
    try:
        if fill:
            fill(m)
        if regs is not None:
            m.cpu.state["regs"] = list(regs)
        w = StreamWriter(BytesSink())
        save_stream(m, w)
        return bytes(w.sink.data), bytes(m.ram.mem[:])
    finally:
        m.ram.close()


def test_qmon_none_stream_from_stdin_reads_like_qemus(tmp_path):
    data, _ = _machine_stream("none", 2 << 20)
    out = ok("-", stdin=data)
    assert out.splitlines()[0] == "qmon-analyze: stdin"
    assert out.splitlines()[1:] == QEMU_NONE_LISTING.splitlines()
    # The same bytes from a file give the same listing.
    (tmp_path / "s").write_bytes(data)
    assert ok(tmp_path / "s").splitlines()[1:] == out.splitlines()[1:]


def test_qmon_lab_without_vmdesc_falls_back_to_qmon_devices(tmp_path):
    regs = [i * 0x1111 for i in range(16)]
    data, _ = _machine_stream("lab", 1 << 20, regs=regs)
    eof = data.rindex(b"\x00\x06" + len(data[data.rindex(b'{"page_size"'):]).to_bytes(4, "big"))
    cut = data[:eof + 1]  # ends with EOF: QEMU only warns about the missing vmdesc
    (tmp_path / "s").write_bytes(cut)
    out = ok(tmp_path / "s")
    assert "fields from qmon's device definition" in out
    assert "fields from the vmdesc" not in out
    assert re.search(r"end +warning: Expected vmdescription section, but got 0", out)
    shown = ", ".join(str(r) if r < 10 else f"{r} (0x{r:x})" for r in regs[:8])
    assert f"regs uint64[16] = [{shown}, ... (16 elements)]" in out

    # A version-1 cpu section (no xcr0) decodes with the version-1 layout.
    hdr = b"\x04\0\0\0\x05\x03cpu\0\0\0\0\0\0\0\x02"
    at = cut.index(hdr)
    payload = at + len(hdr)
    v1 = (cut[:at] + hdr[:-1] + b"\x01" + cut[payload:payload + 153] + cut[payload + 161:])
    (tmp_path / "v1").write_bytes(v1)
    out = ok(tmp_path / "v1")
    assert re.search(r"FULL +section_id 5  cpu  instance 0  version 1", out)
    assert "153 bytes, fields from qmon's device definition" in out
    assert "xcr0" not in out and "halted bool = false" in out
    assert "summary:" in out

    # The same with the vmdesc kept: it describes cpu version 2, the section is version 1, so
    # qmon's version-1 layout sizes it, and the listing says why.
    vmdesc = data[eof + 1:]
    (tmp_path / "v1d").write_bytes(v1 + vmdesc)
    out = ok(tmp_path / "v1d")
    assert "153 bytes, fields from qmon's device definition; the vmdesc describes version 2" \
        in out
    assert "fields from the vmdesc" in out  # the other devices
    assert "summary:" in out and "xcr0" not in out


def xbzrle_stream():
    """A -M none stream over three passes with XBZRLE on: pass 1 sends every page, pass 2
    sends the dirtied pages whole (they enter the cache), pass 3 sends them as XBZRLE deltas.
    Returns (stream, final RAM)."""
    from machine.machine import Machine
    from machine.savevm.savevm import OutgoingStream
    from machine.savevm.stream import BytesSink, StreamWriter

    r = random.Random(5)
    m = Machine("none", 1 << 20)
    try:
        for p in (1, 2, 3, 10, 20):
            m.ram.write(p * PAGE, r.randbytes(PAGE))
        w = StreamWriter(BytesSink())
        out = OutgoingStream(m, w)
        (_, ram), = out.live
        ram.enable_xbzrle(1 << 20)
        out.header()
        out.setup()
        while not out.iterate():
            pass
        # Pages go to the sink by reference: flush before the guest writes them again.
        w.flush()
        m.ram.write(20 * PAGE, bytes(PAGE))  # sent whole in pass 1, a ZERO record in pass 2
        for rnd in range(2):
            for p in (1, 2, 10):
                m.ram.write(p * PAGE + 100 * rnd + 7, r.randbytes(5 + rnd))
            ram.sync()
            while not out.iterate():
                pass
            w.flush()
        m.ram.write(3 * PAGE + 4000, b"tail")
        out.complete()
        out.cleanup()
        return bytes(w.sink.data), bytes(m.ram.mem[:])
    finally:
        m.ram.close()


def test_xbzrle_stream_runs_and_extract(tmp_path):
    data, mem = xbzrle_stream()
    (tmp_path / "s").write_bytes(data)
    out = ok(tmp_path / "s", "--extract", tmp_path / "x")
    assert [r for r in runs(out) if r[0] == "xbzrle"] == [
        ("xbzrle", "ram", 0x1000, 0x2FFF, 2), ("xbzrle", "ram", 0xA000, 0xAFFF, 1)]
    assert runs(out) == [
        # pass 1: everything
        ("zero", "ram", 0, 0xFFF, 1), ("page", "ram", 0x1000, 0x3FFF, 3),
        ("zero", "ram", 0x4000, 0x9FFF, 6), ("page", "ram", 0xA000, 0xAFFF, 1),
        ("zero", "ram", 0xB000, 0x13FFF, 9), ("page", "ram", 0x14000, 0x14FFF, 1),
        ("zero", "ram", 0x15000, 0xFFFFF, 235),
        # pass 2: the dirtied pages, whole; page 20 now zero
        ("page", "ram", 0x1000, 0x2FFF, 2), ("page", "ram", 0xA000, 0xAFFF, 1),
        ("zero", "ram", 0x14000, 0x14FFF, 1),
        # pass 3: deltas against the pages sent in pass 2; END: the last change
        ("xbzrle", "ram", 0x1000, 0x2FFF, 2), ("xbzrle", "ram", 0xA000, 0xAFFF, 1),
        ("page", "ram", 0x3000, 0x3FFF, 1)]
    assert "pages: 252 zero, 9 page, 3 xbzrle" in out
    assert mem[20 * PAGE:21 * PAGE] == bytes(PAGE)
    assert (tmp_path / "x" / "ram-ram.bin").read_bytes() == mem
    # Only the last pass's delta makes the page right: the pass before left it stale.
    assert data.count(mem[PAGE:2 * PAGE]) == 0 and data.count(mem[3 * PAGE:4 * PAGE]) == 1
    assert [r["type"] for r in json.loads(ok(tmp_path / "s", "--json"))["records"]
            if r["type"] in ("xbzrle",)] == ["xbzrle", "xbzrle"]
    # The hexdump splits a delta into its runs: 107 unchanged bytes, then 6 new ones.
    hx = ok(tmp_path / "s", "--hexdump")
    assert re.search(r"XBZRLE\|CONTINUE addr 0x1000\n.*encoding XBZRLE\n.*encoded len 8\n"
                     r".*zero run 107 unchanged bytes\n.*nonzero run 6 new bytes\n"
                     r".*new bytes \(6\)", hx)

    # Broken deltas: a wrong encoding byte, a length over a page, a delta that does not decode.
    first = data.index((0x1000 | 0x40 | 0x20).to_bytes(8, "big"))
    for pos, new, off, msg in [
        (first + 8, b"\x02", first + 8, "Failed to load XBZRLE page - wrong compression!"),
        (first + 9, b"\x10\x01", first + 9, "Failed to load XBZRLE page - len overflow!"),
        (first + 12, b"\x00", first, "Failed to load XBZRLE page - decode error!"),
    ]:
        bad = data[:pos] + new + data[pos + len(new):]
        (tmp_path / "bad").write_bytes(bad)
        status, out, err = analyze(tmp_path / "bad")
        assert status == 1 and err == ""
        assert out.splitlines()[-1].startswith(f"error at offset 0x{off:x}: {msg}")
        assert re.search(r"page +ram 0xa000-0xafff: 1 page", out)  # pass 2 is listed


def test_a_large_stream_is_not_held_in_memory_twice(tmp_path):
    """128 MiB of random RAM: the dissector's peak RSS stays far below the stream's size."""
    size = 128 << 20
    data, mem = _machine_stream("none", size, fill=lambda m: m.ram.write(0, os.urandom(size)))
    (tmp_path / "big").write_bytes(data)
    del data, mem
    peak = ("import resource, subprocess, sys\n"
            "p = subprocess.run(sys.argv[1:], capture_output=True)\n"
            "print(p.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n")
    for extra in ([], ["--hexdump"], ["--extract", str(tmp_path / "x")]):
        p = subprocess.run([sys.executable, "-c", peak, sys.executable, SCRIPT,
                            str(tmp_path / "big"), *extra], capture_output=True, text=True,
                           timeout=300)
        status, kib = map(int, p.stdout.split())
        assert status == 0
        assert kib < 100 * 1024, (extra, kib)
    assert (tmp_path / "x" / "ram-ram.bin").stat().st_size == size


# ---------------------------------------------------------------------------------------------
# --hexdump and --json


_HEX = re.compile(r"^([0-9a-f]{8})  ((?:[0-9a-f]{2} )*[0-9a-f]{2})( \.\.\.)? +(.*)$")


def hexdump_spans(out):
    res = []
    for line in out.splitlines():
        m = _HEX.match(line)
        if m:
            res.append((int(m.group(1), 16), bytes.fromhex(m.group(2)), bool(m.group(3)),
                        m.group(4)))
    return res


@pytest.mark.parametrize("name", ["qemu-none-2m-random.stream", "qemu-pc-2m.stream"])
def test_hexdump_labels_every_byte(name):
    data = read(name)
    out = ok(stream(name), "--hexdump", "--all")
    spans = hexdump_spans(out)
    # Each line shows the stream's own bytes at its offset (at most 16, then "...").
    for off, shown, more, label in spans:
        assert data[off:off + len(shown)] == shown, (hex(off), label)
        assert len(shown) == 16 if more else 1 <= len(shown) <= 16
    # With --all the labelled fields tile the whole stream: no gap, no overlap.
    sizes = []
    for (off, shown, more, label), nxt in zip(spans, spans[1:] + [(len(data),)]):
        assert off < nxt[0], label
        if not more:
            assert off + len(shown) == nxt[0], (hex(off), label)
        sizes.append(nxt[0] - off)
    assert spans[0][0] == 0 and sum(sizes) == len(data)
    assert "unlabelled" not in out


def test_hexdump_field_labels_and_collapsed_runs():
    data = read("qemu-none-2m-random.stream")
    out = ok(stream("qemu-none-2m-random.stream"), "--hexdump")
    labels = {(off, label) for off, _, _, label in hexdump_spans(out)}
    for want in [(0, 'magic "QEVM"'), (4, "version 3"), (8, "section_type CONFIGURATION"),
                 (0xD, 'name "none"'), (0x11, "section_type START"), (0x12, "section_id 2"),
                 (0x16, "idstr len 3"), (0x17, 'idstr "ram"'), (0x1A, "instance_id 0"),
                 (0x1E, "version_id 4"), (0x22, "flags|addr MEM_SIZE total 0x200000"),
                 (0x2E, "block length 0x200000"), (0x36, "flags|addr EOS"),
                 (0x3E, "footer 0x7e"), (0x3F, "section_id 2 ok"),
                 (0x48, "flags|addr ZERO addr 0x0"), (0x51, 'block idstr "ram"'),
                 (0x54, "fill byte 0x00"), (0x55, "flags|addr PAGE|CONTINUE addr 0x1000"),
                 (0x5D, "page data (4096 bytes)")]:
        assert want in labels, want
    page1 = corpus.random_ram()[PAGE:PAGE + 16].hex(" ")
    assert data[0x5D:0x5D + 16].hex(" ") == page1
    assert f"0000005d  {page1} ...  page data (4096 bytes)" in out
    # Runs show two records, then one line for the rest of the run.
    assert "0000307f  ... 94 more ZERO|CONTINUE records like these (846 bytes), " \
           "addr 0x6000-0x63fff" in out
    assert re.search(r"globalstate\.runstate buffer \(100 bytes\) = \"prelaunch\"", out)
    assert re.search(r"timer\.cpu_ticks_offset int64 = 0", out)
    assert "\x1b[" not in out  # not a terminal: plain text


def test_hexdump_colour():
    plain = ok(stream("qemu-none-2m.stream"), "--hexdump")
    colour = ok(stream("qemu-none-2m.stream"), "--hexdump", "--color=always")
    assert "\x1b[38;5;" in colour
    assert re.sub(r"\x1b\[[0-9;]*m", "", colour) == plain


def test_hexdump_colour_on_a_terminal():
    import pty

    master, slave = pty.openpty()
    try:
        p = subprocess.Popen([sys.executable, SCRIPT, stream("qemu-none-2m.stream"),
                              "--hexdump"], stdout=slave, stderr=slave)
        os.close(slave)
        buf = b""
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:
                break
            if not chunk:
                break
            buf += chunk
        assert p.wait(60) == 0
    finally:
        os.close(master)
    assert b"\x1b[38;5;" in buf and b"magic" in buf


def test_json_records():
    doc = json.loads(ok(stream("qemu-none-2m.stream"), "--json"))
    recs = doc["records"]
    assert [(r["offset"], r["type"]) for r in recs] == [
        (0, "header"), (8, "configuration"), (0x11, "section"), (0x22, "mem_size"),
        (0x36, "eos"), (0x3E, "footer"), (0x43, "section"), (0x48, "zero"), (0x124C, "eos"),
        (0x1254, "footer"), (0x1259, "section"), (0x125E, "eos"), (0x1266, "footer"),
        (0x126B, "section"), (0x127E, "device_state"), (0x1296, "footer"),
        (0x129B, "section"), (0x12B4, "device_state"), (0x131C, "footer"), (0x1321, "eof"),
        (0x1322, "vmdesc"), (0x150D, "end")]
    assert recs[0]["version"] == 3 and recs[1]["name"] == "none"
    assert [r["section_type"] for r in recs if r["type"] == "section"] == \
        ["START", "PART", "END", "FULL", "FULL"]
    assert recs[13]["idstr"] == "timer" and recs[13]["section_id"] == 0
    assert recs[3]["blocks"] == [{"name": "ram", "length": 0x200000}]
    assert recs[7] == {"offset": 0x48, "type": "zero", "block": "ram", "addr": 0,
                       "addr_end": 0x200000, "count": 512, "bytes": 13 + 511 * 9,
                       "named": True, "fill": 0}
    timer = recs[14]
    assert [(f["name"], f["type"], f["offset"], f["size"]) for f in timer["fields"]] == [
        ("cpu_ticks_offset", "int64", 0x127E, 8), ("unused", "unused_buffer", 0x1286, 8),
        ("cpu_clock_offset", "int64", 0x128E, 8)]
    gs = recs[17]["fields"]
    assert gs[0]["value"] == 10 and gs[1]["text"] == "prelaunch"
    assert bytes.fromhex(gs[1]["value"]).startswith(b"prelaunch\0")
    assert recs[20]["devices"] == ["timer", "globalstate"]
    assert doc["error"] is None
    assert doc["summary"]["bytes"] == 5389
    assert doc["summary"]["pages"] == {"zero": 512, "page": 0, "xbzrle": 0}


# ---------------------------------------------------------------------------------------------
# Broken streams


def _broken_cases():
    with open(os.path.join(BROKEN, "expected.json")) as f:
        return json.load(f)


def test_broken_corpus_is_what_the_generator_makes():
    made = {c["name"]: c for c in corpus.broken()}
    index = _broken_cases()
    assert [c["name"] for c in index] == list(made)
    for c in index:
        with open(os.path.join(BROKEN, c["name"] + ".stream"), "rb") as f:
            assert f.read() == made[c["name"]]["data"], c["name"]
        assert (c["offset"], c["message"], c["last"]) == \
            (made[c["name"]]["offset"], made[c["name"]]["message"], made[c["name"]]["last"])


@pytest.mark.parametrize("case", _broken_cases(), ids=lambda c: c["name"])
def test_broken_stream(case):
    path = os.path.join(BROKEN, case["name"] + ".stream")
    off, msg = case["offset"], case["message"]
    status, out, err = analyze(path)
    assert status == 1, out
    assert err == ""
    assert_no_traceback(out, err)
    lines = out.splitlines()
    assert lines[-1].startswith(f"error at offset 0x{off:x}: {msg}"), lines[-1]
    assert sum(line.startswith("error at") for line in lines) == 1
    assert not any(line.startswith("summary:") for line in lines)
    listed = entries(out)
    # Everything before the error is listed, in stream order, and nothing past it.
    assert all(a[0] <= b[0] for a, b in zip(listed, listed[1:]))
    assert all(e[0] < off for e in listed)
    if case["last"] is None:
        assert listed == []
    else:
        assert listed[-1][2] == case["last"], lines[-2]
        # The listing of the intact stream agrees on every record before the damage (a run
        # cut by the error is shorter). A wrong vmdesc changes the section it describes.
        base = read(corpus.BASE)
        data = open(path, "rb").read()
        first_diff = next((i for i, (a, b) in enumerate(zip(base, data)) if a != b),
                          min(len(base), len(data)))
        limit = min(first_diff, off)
        if case["name"] == "vmdesc-wrong-size":
            limit = corpus.TIMER_PAYLOAD
        # Without the vmdesc (cut off), qmon's definitions of timer and globalstate give the
        # same fields.
        def same(es):
            return [(o, d, k, re.sub(r"fields from (the vmdesc|qmon's device definition)",
                                     "fields", t)) for o, d, k, t in es]

        good = same(entries(ok(stream(corpus.BASE))))
        before = same([e for e in listed if e[0] < limit and e[2] not in ("zero", "page")])
        assert before and all(e in good for e in before), case["name"]
        if case["name"] in ("no-eof", "truncated-vmdesc"):
            assert "fields from qmon's device definition" in out

    status, out, err = analyze(path, "--json")
    assert status == 1 and err == ""
    doc = json.loads(out)
    assert doc["error"]["offset"] == off and doc["error"]["message"].startswith(msg)
    assert all(r["offset"] < off for r in doc["records"])

    status, out, err = analyze(path, "--hexdump")
    assert status == 1 and err == ""
    assert_no_traceback(out, err)
    assert out.splitlines()[-1].startswith(f"error at offset 0x{off:x}: {msg}")
    data = open(path, "rb").read()
    for o, shown, _, label in hexdump_spans(out):
        assert data[o:o + len(shown)] == shown
    if off < len(data):
        assert f"{off:08x}  {data[off:off + 16].hex(' ')}" in out


def test_broken_streams_from_stdin_and_extract(tmp_path):
    data = open(os.path.join(BROKEN, "missing-footer.stream"), "rb").read()
    status, out, err = analyze("-", stdin=data)
    assert status == 1 and err == ""
    assert out.splitlines()[-1] == "error at offset 0x1254: Missing section footer for ram"
    assert re.search(r"zero +ram 0x0-0x1fffff: 512 pages", out)
    # --extract writes what was read before the error, and the error stays the last line.
    status, out, err = analyze("-", "--extract", tmp_path / "x", stdin=data)
    assert status == 1 and err == ""
    assert out.splitlines()[-2:] == [
        f"extracted {tmp_path / 'x' / 'ram-ram.bin'} (2097152 bytes)",
        "error at offset 0x1254: Missing section footer for ram"]
    assert (tmp_path / "x" / "ram-ram.bin").read_bytes() == bytes(2 << 20)


def test_usage_errors_are_one_line():
    for args in ([os.path.join(DATA, "nosuch.stream")], [DATA]):
        status, out, err = analyze(*args)
        assert status == 1 and out == ""
        assert len(err.splitlines()) == 1 and err.startswith("qmon-analyze: ")
        assert_no_traceback(out, err)
    status, out, err = analyze()
    assert status == 2 and "usage:" in err
    assert_no_traceback(out, err)


# ---------------------------------------------------------------------------------------------
# Version 2


def v2_stream():
    """A version 2 stream (reference §6): magic, 2, be64 total_len, then records of
    u8 idlen, idstr, be32 instance_id, be32 version_id, be32 record_len, payload."""
    from machine.devices.globalstate import GlobalState
    from machine.devices.timer import Timer

    ram = ((0x100000 | 0x04).to_bytes(8, "big") + b"\x03ram" + (0x100000).to_bytes(8, "big")
           + (0x02).to_bytes(8, "big") + b"\x03ram\0"
           + b"".join((p * PAGE | 0x22).to_bytes(8, "big") + b"\0" for p in range(1, 256))
           + (0x10).to_bytes(8, "big"))
    timer = Timer.vmsd.encode({"cpu_ticks_offset": 5, "cpu_clock_offset": 7})
    gs = GlobalState.vmsd.encode({"size": 8, "runstate": b"running".ljust(100, b"\0")})
    body = b""
    for idstr, version, payload in (("ram", 4, ram), ("timer", 2, timer),
                                    ("globalstate", 1, gs)):
        body += bytes([len(idstr)]) + idstr.encode() + struct.pack(">III", 0, version,
                                                                   len(payload)) + payload
    return b"QEVM" + struct.pack(">IQ", 2, len(body)) + body


def test_version_2_stream(tmp_path):
    from machine.savevm import records

    (tmp_path / "v2").write_bytes(v2_stream())
    status, out, err = analyze(tmp_path / "v2")
    assert_no_traceback(out, err)
    if not hasattr(records, "V2Record"):
        # The parser does not read version 2 yet: QEMU 7.2's own refusal, at the version.
        assert status == 1 and err == ""
        assert out.splitlines()[-1] == \
            "error at offset 0x4: SaveVM v2 format is obsolete and don't work anymore"
        return
    assert status == 0, out + err
    v2 = [t for _, _, k, t in entries(out) if k == "v2"]
    assert [t.split()[1] for t in v2] == ["ram", "timer", "globalstate"]
    assert "cpu_clock_offset int64 = 7" in out
    assert '"running"' in out


def test_version_2_records_are_listed_when_the_parser_yields_them():
    """The dissector's side of version 2, driven by a stand-in parser that yields what the v2
    parser does: a V2Record before each record's payload records."""
    from machine.devices.timer import Timer
    from machine.savevm import records as R
    from monitor.analyze import Dissector, JsonView, Listing

    V2Record = R.V2Record
    timer = Timer.vmsd.encode({"cpu_ticks_offset": 5, "cpu_clock_offset": 7})
    recs = [R.Header(0, 2), V2Record(16, "ram", 0, 4, 100, "ram"),
            R.RamMemSize(32, 0x2000, [("ram", 0x2000)]),
            R.RamZero(52, "ram", 0, 0, True), R.RamZero(65, "ram", 0x1000, 0, False),
            R.RamEOS(74), V2Record(82, "timer", 0, 2, 24, "device"),
            R.DeviceState(100, "timer", 2, timer), R.End(124)]

    class StandIn:
        def __init__(self, describe):
            self.it = iter(recs)
            self.offset = 0

        def feed(self, data):
            pass

        def feed_eof(self):
            pass

        def next(self):
            return next(self.it, None)

    out = io.StringIO()
    js = io.StringIO()
    assert Dissector(b"\0" * 124, [Listing(out, "v2"), JsonView(js, "v2")], StandIn).run()
    text = out.getvalue()
    assert re.search(r"00000010  v2 record +ram  instance 0  version 4  length 100  \(ram\)",
                     text)
    assert re.search(r"zero +ram 0x0-0x1fff: 2 pages", text)
    assert re.search(r"00000052  v2 record +timer  instance 0  version 2  length 24", text)
    assert "24 bytes, fields from qmon's device definition" in text
    assert "cpu_ticks_offset int64 = 5" in text and "cpu_clock_offset int64 = 7" in text
    assert "1 v2 record" not in text and "2 v2 record" in text
    doc = json.loads(js.getvalue())
    assert [r["type"] for r in doc["records"]] == [
        "header", "v2_record", "mem_size", "zero", "eos", "v2_record", "device_state", "end"]
    assert doc["records"][1]["idstr"] == "ram"
