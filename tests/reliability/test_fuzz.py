"""Fuzzing the loader (issue 7, first bullet): hostile savevm streams.

Valid streams of every machine type (none, lab-1.0, lab-2.0, lab with a disk and its "block"
section, a version 2 container, a stream with XBZRLE pages) are mutated: bit flips, byte
changes, truncation at every offset, length fields set to 0, 255, 2^32-1, 2^63, records and
sections reordered, duplicated and removed. Each mutated stream goes to

- loadvm in-process (``check_then_load`` on the machine thread, and ``Machine.load_snapshot``
  through a snapshot store for a sample): only StreamError / MachineError, a one-line message,
  and after a failure the machine's RAM, disk, devices, clock and runstate exactly as before;
  memory stays bounded whatever sizes the stream claims (tracemalloc);
- the dissector, in-process on every input (no internal error) and as a subprocess on a sample
  (no traceback, exit 1 with ``error at offset 0x..: ...``, no hang, bounded RSS);
- a real ``qmon -incoming exec:cat FILE`` on a sample: a broken stream ends it with status 1 and
  ``qmon: load of migration failed: <the loadvm message>``, a loadable one completes.

Hypothesis drives random mutation chains; ``tests/data/fuzz/`` holds a corpus of nasty streams
replayed every run. The exhaustive parts are ``@pytest.mark.slow``. Counts of inputs tried are
written to /tmp/qmon-fuzz-figures.json at the end of the module.

Problems of a mutation family are collected and reported together, grouped by kind with a few
examples each. While fixing one kind, ``QMON_FUZZ_HIDE="several lines"`` (a substring of the
category) hides it so the others show; never set it in CI.
"""

from __future__ import annotations

import builtins
import collections
import hashlib
import io
import json
import os
import random
import re
import struct
import subprocess
import sys
import tempfile
import time
import tracemalloc

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import ROOT, QmonProc
from machine.machine import Machine, MachineError
from machine.savevm import format as F
from machine.savevm.records import (EOF, BlockChunk, Configuration, End, Footer, Header,
                                    RamMemSize, RamPage, RamXbzrle, RamZero, SectionHeader,
                                    StreamError, V2Record, VMDesc, Parser)
from machine.savevm.savevm import Loader, OutgoingStream, check_then_load, save_stream_v2
from machine.savevm.stream import BytesSink, StreamWriter
from machine.snapshots import SnapshotStore

FUZZ_DIR = os.path.join(ROOT, "tests", "data", "fuzz")
ANALYZE = os.path.join(ROOT, "scripts", "analyze.py")
FIGURES = "/tmp/qmon-fuzz-figures.json"
PAGE = F.TARGET_PAGE_SIZE
MEMORY_BOUND = 64 << 20  # bytes a load may allocate, whatever the stream claims
RSS_BOUND_KB = 200 << 10  # a child process (python + qmon) stays well under this

COUNTS = collections.Counter()  # target -> inputs tried


@pytest.fixture(scope="module", autouse=True)
def _figures():
    start = time.monotonic()
    yield
    figures = {"inputs": dict(COUNTS), "total": sum(COUNTS.values()),
               "seconds": round(time.monotonic() - start, 1)}
    try:
        old = json.load(open(FIGURES))
    except (OSError, ValueError):
        old = {}
    old[os.environ.get("PYTEST_FUZZ_RUN", "last")] = figures
    with open(FIGURES, "w") as f:
        json.dump(old, f, indent=1)
    print(f"\nfuzz figures: {figures}")


@pytest.fixture(autouse=True)
def _slow_only_when_asked(request):
    """The exhaustive parts run with ``-m slow`` (or QMON_SLOW=1); a plain run is the quick
    subset."""
    if request.node.get_closest_marker("slow") is not None:
        if "slow" not in (request.config.getoption("markexpr") or "") and \
                os.environ.get("QMON_SLOW") != "1":
            pytest.skip("slow: run with -m slow")


# ---------------------------------------------------------------------------------------------
# Valid streams of every machine type


class Kind:
    """One kind of stream: how to make its machine, and the stream itself."""

    def __init__(self, name, mtype, ram, disk=False):
        self.name, self.mtype, self.ram, self.disk = name, mtype, ram, disk
        self.data = b""
        self.drive = None

    def machine(self, tmpdir):
        kw = {"workload": "idle"}
        if self.disk:
            path = os.path.join(tmpdir, f"{self.name}-{random.getrandbits(32):08x}.img")
            with open(path, "wb") as f:
                f.write(bytes(1 << 20))
            kw["drive"] = path
        m = Machine(self.mtype, self.ram, **kw)
        m.start(paused=True)
        return m

    def cli_args(self, tmpdir):
        # the machine type's default workload: a lab guest runs its counter after the load
        args = ["-M", self.mtype, "-m", f"{self.ram >> 10}K"]
        if self.disk:
            path = os.path.join(tmpdir, f"cli-{random.getrandbits(32):08x}.img")
            with open(path, "wb") as f:
                f.write(bytes(1 << 20))
            args += ["-drive", f"file={path}"]
        return args


def _dirty(m, rng):
    """Some non-zero pages (a few random, one repeated pattern, one page of 0x01 fill)."""
    def fill():
        n = m.ram.npages
        for p in rng.sample(range(n), 3):
            m.ram.write(p * PAGE + rng.randrange(64), rng.randbytes(rng.randrange(1, 200)))
        m.ram.write((n - 1) * PAGE, bytes(range(256)) * 16)
        if m.cpu is not None:
            m.guest_registers(rax=0x1234, rip=0xFFF0)
        if m.disk is not None:
            m.disk.write(0, b"disk says hi".ljust(4096, b"\xee"))
    m.run(fill)


def _save_v3(m, opt_in=()):
    def save():
        m.globalstate.store(m.runstate)
        try:
            w = StreamWriter(BytesSink())
            out = OutgoingStream(m, w, opt_in=opt_in)
            out.header()
            out.setup()
            while not out.iterate():
                pass
            out.complete()
            return bytes(w.sink.data)
        finally:
            m.globalstate.stored = None
    return m.run(save)


def _save_v2(m, tmpdir):
    def save():
        m.globalstate.store(m.runstate)
        try:
            with tempfile.TemporaryFile(dir=tmpdir) as f:
                save_stream_v2(m, f)
                f.seek(0)
                return f.read()
        finally:
            m.globalstate.stored = None
    return m.run(save)


def _save_xbzrle(m):
    """A stream with XBZRLE records: deltas of pages changed between passes."""
    rng = random.Random(7)

    def save():
        w = StreamWriter(BytesSink())
        out = OutgoingStream(m, w)
        ram = out.live[0][1]
        ram.enable_xbzrle(64 << 10)
        out.header()
        out.setup()
        for _ in range(4):
            out.iterate()
            for _ in range(6):
                p = rng.randrange(m.ram.npages)
                m.ram.write(p * PAGE + rng.randrange(PAGE - 16), rng.randbytes(8))
            ram.sync()
        m.globalstate.store(m.runstate)
        out.complete()
        m.globalstate.stored = None
        assert ram.stats.xbzrle_pages > 0
        return bytes(w.sink.data)
    return m.run(save)


KINDS = {
    "none": Kind("none", "none", 64 << 10),
    "lab-1.0": Kind("lab-1.0", "lab-1.0", 128 << 10),
    "lab-2.0": Kind("lab-2.0", "lab-2.0", 256 << 10),
    "lab-disk": Kind("lab-disk", "lab", 64 << 10, disk=True),
    "v2": Kind("v2", "lab-2.0", 64 << 10),
    "xbzrle": Kind("xbzrle", "none", 64 << 10),
}


@pytest.fixture(scope="module")
def workdir():
    with tempfile.TemporaryDirectory(prefix="fz-") as d:
        yield d


@pytest.fixture(scope="module")
def streams(workdir):
    """{kind name: Kind with .data}; every stream loads into a fresh machine of its kind."""
    rng = random.Random(1234)
    for kind in KINDS.values():
        m = kind.machine(workdir)
        try:
            _dirty(m, rng)
            if kind.name == "v2":
                kind.data = _save_v2(m, workdir)
            elif kind.name == "xbzrle":
                kind.data = _save_xbzrle(m)
            else:
                kind.data = _save_v3(m, opt_in=("block",) if kind.disk else ())
        finally:
            m.shutdown()
    return KINDS


class Targets:
    """One long-lived paused machine per kind that every mutated stream is loaded into."""

    def __init__(self, workdir):
        self.workdir = workdir
        self.machines = {}

    def get(self, kind):
        m = self.machines.get(kind.name)
        if m is None:
            m = self.machines[kind.name] = kind.machine(self.workdir)
        return m

    def close(self):
        for m in self.machines.values():
            m.shutdown()


@pytest.fixture(scope="module")
def targets(workdir, streams):
    t = Targets(workdir)
    yield t
    t.close()


# ---------------------------------------------------------------------------------------------
# Fingerprint and one load attempt (on the machine thread, so nothing moves in between)


def _fingerprint(m):
    devs = {}
    for k, d in m.devices.items():
        devs[k] = (repr(d.state), repr(getattr(d, "received", None)))
    disk = hashlib.sha256(m.disk.mem[:]).hexdigest() if m.disk is not None else None
    return (hashlib.sha256(m.ram.mem[:]).hexdigest(), disk, devs, m.clock.now_ns(),
            m.runstate, m.ram.dirty.count(1))


Outcome = collections.namedtuple("Outcome", "ok message offset unchanged detail")


def _attempt_on_thread(m, data, chunk):
    before = _fingerprint(m)
    try:
        check_then_load(m, io.BytesIO(data), chunk=chunk)
    except StreamError as e:
        after = _fingerprint(m)
        return Outcome(False, e.message, e.offset, before == after, (before, after))
    except BaseException as e:  # noqa: BLE001 - any other type is the bug we look for
        import traceback
        return Outcome(None, f"{type(e).__name__}: {e}", None, before == _fingerprint(m),
                       traceback.format_exc())
    m.workload.resync()
    return Outcome(True, None, None, None, None)


def attempt(m, data, chunk=1 << 20, what="loadvm"):
    COUNTS[what] += 1
    return m.run(_attempt_on_thread, m, data, chunk, timeout=60)


def _short(text, n=240):
    text = repr(text) if not isinstance(text, str) else text
    return text if len(text) <= n else text[:n] + f"... ({len(text)} chars)"


def outcome_problems(out: Outcome, label):
    """(category, description) of what is wrong with one load attempt; empty: nothing."""
    if out.ok is None:
        return [(f"loadvm raised {out.message.split(':', 1)[0]}",
                 f"{label}: {_short(out.message)}\n{out.detail}")]
    if out.ok:
        return []
    bad = []
    if not isinstance(out.message, str) or not out.message:
        bad.append(("empty message", label))
    elif "\n" in out.message or "\r" in out.message:
        bad.append(("loadvm message of several lines", f"{label}: {_short(repr(out.message))}"))
    elif _looks_internal(out.message):
        bad.append(("loadvm internal error", f"{label}: {_short(out.message)}"))
    if not out.unchanged:
        bad.append(("failed load changed the machine",
                    f"{label}: {_short(out.message)}: {_short(out.detail, 600)}"))
    return bad


_IGNORE = os.environ.get("QMON_FUZZ_HIDE")  # exploring only: hide one known problem category


def check_outcome(out: Outcome, label):
    bad = [b for b in outcome_problems(out, label) if not (_IGNORE and _IGNORE in b[0])]
    assert not bad, "\n".join(f"[{c}] {t}" for c, t in bad)


class Problems:
    """Problems of many inputs, grouped by kind, a few examples each, reported at once."""

    def __init__(self):
        self.groups = collections.defaultdict(list)
        self.count = collections.Counter()

    def add(self, category, text):
        if _IGNORE and _IGNORE in category:
            return
        self.count[category] += 1
        if len(self.groups[category]) < 3:
            self.groups[category].append(text)

    def check(self):
        assert not self.groups, "\n".join(
            f"[{c}] x{self.count[c]}:\n    " + "\n    ".join(v) for c, v in self.groups.items())


_EXC_NAMES = {n for n in dir(builtins) if isinstance(getattr(builtins, n), type)
              and issubclass(getattr(builtins, n), BaseException)}


def _looks_internal(msg):
    """Messages of the catch-all paths ('internal error: KeyError: ...', 'TypeError: ...')."""
    if msg.startswith("internal error"):
        return True
    head = msg.split(":", 1)[0]
    return head in _EXC_NAMES or head in ("XbzrleError", "VMStateError", "DiskError")


# In-process dissector: every input, all three views.

def dissect_problems(data, what="dissector-inproc"):
    """(category, text) of what is wrong with the dissector's answer on ``data`` (all views)."""
    from monitor import analyze as A
    COUNTS[what] += 1
    results = []
    bad = []
    for view, make in (("listing", lambda out: A.Listing(out, "fuzz")),
                       ("json", lambda out: A.JsonView(out, "fuzz")),
                       ("hexdump", lambda out: A.Hexdump(out, "fuzz", data, False))):
        out = io.StringIO()
        try:
            d = A.Dissector(data, [make(out)])
            ok = d.run()
        except Exception as e:  # noqa: BLE001
            bad.append((f"dissector {view} raised {type(e).__name__}", _short(str(e))))
            continue
        if not ok:
            off, msg = d.error
            if not (isinstance(off, int) and 0 <= off <= len(data)):
                bad.append(("dissector error offset outside the stream", f"{off} {_short(msg)}"))
            if "\n" in msg or "\r" in msg:
                bad.append(("dissector message of several lines", _short(repr(msg))))
            elif _looks_internal(msg):
                bad.append(("dissector internal error", _short(msg)))
        results.append(ok)
    if len(set(results)) > 1:
        bad.append(("dissector views disagree", repr(results)))
    dissect_problems.last_ok = all(results)
    return bad


def dissect(data, what="dissector-inproc"):
    """True when the stream dissects to its end; asserts no problem."""
    bad = [b for b in dissect_problems(data, what) if not (_IGNORE and _IGNORE in b[0])]
    assert not bad, "\n".join(f"[{c}] {t}" for c, t in bad)
    return dissect_problems.last_ok


# ---------------------------------------------------------------------------------------------
# Stream anatomy: records, sections, length fields


def records_of(kind, m):
    """All records of a valid stream, with the offset where each one ends."""
    p = Parser(Loader(m, False).describe, Loader(m, False).describe_v2)
    p.feed(kind.data)
    p.feed_eof()
    recs = []
    while True:
        r = p.next()
        recs.append(r)
        if isinstance(r, End):
            break
    return recs


def spans(kind, m):
    """(start, end) of every record, and of every section (header to footer)."""
    recs = records_of(kind, m)
    offs = [r.offset for r in recs]
    rec_spans = [(a, b) for a, b in zip(offs, offs[1:]) if b > a]
    sec_spans = []
    starts = [r.offset for r in recs if isinstance(r, (SectionHeader, V2Record, EOF))]
    starts.append(len(kind.data))
    sec_spans = [(a, b) for a, b in zip(starts, starts[1:]) if b > a]
    return rec_spans, sec_spans


def length_fields(kind, m):
    """(name, offset, width) of every length-like field, in the layout of reference §1-6."""
    data = kind.data
    out = []
    for r in records_of(kind, m):
        t = type(r)
        o = r.offset
        if t is Header and r.version == 2:
            out.append(("v2 total length", 8, 8))
        elif t is Configuration:
            out.append(("config name length", o + 1, 4))
        elif t is SectionHeader:
            out.append((f"section id {r.idstr}", o + 1, 4))
            if r.section_type in (F.QEMU_VM_SECTION_START, F.QEMU_VM_SECTION_FULL):
                n = len(r.idstr)
                out += [(f"idstr length {r.idstr}", o + 5, 1),
                        (f"instance id {r.idstr}", o + 6 + n, 4),
                        (f"version id {r.idstr}", o + 10 + n, 4)]
        elif t is Footer:
            out.append(("footer section id", o + 1, 4))
        elif t is VMDesc:
            out.append(("vmdesc length", o + 1, 4))
        elif t is RamMemSize:
            out.append(("MEM_SIZE total", o, 8))
            q = o + 8
            for name, _ in r.blocks:
                out += [(f"MEM_SIZE idstr length {name}", q, 1),
                        (f"MEM_SIZE block length {name}", q + 1 + len(name), 8)]
                q += 1 + len(name) + 8
        elif t in (RamPage, RamZero, RamXbzrle):
            q = o + 8
            if r.named:
                out.append((f"{t.__name__} block name length", q, 1))
                q += 1 + len(r.block)
            if t is RamXbzrle:
                out.append(("XBZRLE be16 length", q + 1, 2))
        elif t is V2Record:
            n = len(r.idstr)
            out += [(f"v2 idstr length {r.idstr}", o, 1),
                    (f"v2 record length {r.idstr}", o + 1 + n + 8, 4)]
        elif t is BlockChunk:
            out += [("block name length", o + 8, 1), ("block sector", o, 8)]
    assert all(off + w <= len(data) for _, off, w in out)
    return out


SPECIALS = {1: [0, 1, 0x7F, 0x80, 255],
            2: [0, 255, 0x1000, 0x1001, 0xFFFF],
            4: [0, 255, 0x7FFFFFFF, 2 ** 32 - 1],
            8: [0, 255, 2 ** 32 - 1, 2 ** 63, 2 ** 64 - 1]}


def set_field(data, off, width, value):
    """A be field set to ``value``; for MEM_SIZE/ram words the low flag bits are kept."""
    old = int.from_bytes(data[off:off + width], "big")
    if width == 8 and 0 < old & 0x1FF < 0x80 and value > 0xFFF:
        value = (value & ~0xFFF) | (old & 0xFFF)  # keep the record's flags
    return data[:off] + (value % (1 << (8 * width))).to_bytes(width, "big") + data[off + width:]


def field_mutations(kind, m):
    out = []
    for name, off, width in length_fields(kind, m):
        for v in SPECIALS[width]:
            out.append((f"{name}@{off:#x}={v:#x}", set_field(kind.data, off, width, v)))
    return out


def splice_mutations(kind, m, rng, limit):
    """Records and sections reordered, duplicated and removed, cut at the parser's offsets."""
    data = kind.data
    rec_spans, sec_spans = spans(kind, m)
    out = []
    for label, sp in (("section", sec_spans), ("record", rec_spans)):
        for i, (a, b) in enumerate(sp):
            out.append((f"remove {label} {i}", data[:a] + data[b:]))
            out.append((f"duplicate {label} {i}", data[:b] + data[a:b] + data[b:]))
        pairs = [(i, j) for i in range(len(sp)) for j in range(i + 1, len(sp))]
        rng.shuffle(pairs)
        for i, j in pairs[:limit]:
            (a, b), (c, d) = sp[i], sp[j]
            out.append((f"swap {label} {i},{j}",
                        data[:a] + data[c:d] + data[b:c] + data[a:b] + data[d:]))
        for _ in range(limit // 4):
            (a, b), (c, d) = rng.choice(sp), rng.choice(sp)
            out.append((f"copy {label} {a:#x} to {c:#x}", data[:c] + data[a:b] + data[c:]))
    return out


def payload_mutations(kind, m, stride=1):
    """Every byte of every device's state set to 0, 0xff and flipped; every digit of the vmdesc
    JSON (which the dissector sizes sections from) set to 0 and 9."""
    data = kind.data
    out = []
    for r in records_of(kind, m):
        if type(r).__name__ == "DeviceState":
            for i in range(r.offset, r.offset + len(r.data), stride):
                for v in (0, 0xFF, data[i] ^ 0x80):
                    out.append((f"{r.idstr} payload {i - r.offset}={v:#x}",
                                data[:i] + bytes([v]) + data[i + 1:]))
        elif isinstance(r, VMDesc):
            base = r.offset + 5
            for j, c in enumerate(r.json):
                if 0x30 <= c <= 0x39:
                    for v in b"09":
                        if v != c:
                            i = base + j
                            out.append((f"vmdesc digit {j}={chr(v)}",
                                        data[:i] + bytes([v]) + data[i + 1:]))
    return out


def byte_mutations(kind, rng, n):
    data = kind.data
    out = []
    for _ in range(n):
        i = rng.randrange(len(data))
        roll = rng.random()
        if roll < 0.4:
            bit = rng.randrange(8)
            out.append((f"flip {i:#x}.{bit}", data[:i] + bytes([data[i] ^ (1 << bit)]) +
                        data[i + 1:]))
        elif roll < 0.8:
            v = rng.choice([0, 1, 0x7E, 0x7F, 0x80, 0xFF, rng.randrange(256)])
            out.append((f"byte {i:#x}={v:#x}", data[:i] + bytes([v]) + data[i + 1:]))
        else:
            k = rng.randrange(1, 9)
            out.append((f"random {i:#x}+{k}", data[:i] + rng.randbytes(k) + data[i + k:]))
    return out


def truncations(kind, stride=1):
    data = kind.data
    return [(f"truncate {n}", data[:n]) for n in range(0, len(data), stride)]


# ---------------------------------------------------------------------------------------------
# Sanity: the valid streams load and dissect


def test_every_valid_stream_loads_and_dissects(streams, targets):
    for kind in streams.values():
        m = targets.get(kind)
        out = attempt(m, kind.data)
        assert out.ok, (kind.name, out)
        assert dissect(kind.data), kind.name
    kinds = {k: records_of(v, targets.get(v)) for k, v in streams.items()}
    assert any(isinstance(r, RamXbzrle) for r in kinds["xbzrle"])
    assert any(isinstance(r, BlockChunk) for r in kinds["lab-disk"])
    assert any(isinstance(r, V2Record) for r in kinds["v2"])
    for k, recs in kinds.items():
        assert any(isinstance(r, RamPage) for r in recs), k


# ---------------------------------------------------------------------------------------------
# In-process loadvm: deterministic mutation families


def _run_family(kind, m, mutations, dissector=True, chunks=(1 << 20,)):
    """Every mutation through loadvm (and the dissector); all problems are collected, then
    reported together, grouped by kind, a few examples each."""
    results = collections.Counter()
    problems = Problems()
    for label, data in mutations:
        full = f"{kind.name}: {label}"
        out = attempt(m, data)
        for cat, text in outcome_problems(out, full):
            problems.add(cat, text)
        results["ok" if out.ok else "error"] += 1
        for chunk in chunks[1:]:
            if kind.disk:
                chunk = max(chunk, 65537)  # the 1 MiB block chunk: not 13 bytes at a time
            other = attempt(m, data, chunk=chunk, what="loadvm-chunked")
            if (other.ok, other.message) != (out.ok, out.message):
                problems.add("fed in pieces, another outcome",
                             f"{full}: {chunk} bytes at a time: {_short(other.message)} != "
                             f"{_short(out.message)}")
        if dissector:
            for cat, text in dissect_problems(data):
                problems.add(cat, f"{full}: {text}")
    problems.check()
    return results


@pytest.mark.parametrize("name", list(KINDS))
def test_length_fields_set_to_extremes(streams, targets, name):
    kind = streams[name]
    m = targets.get(kind)
    res = _run_family(kind, m, field_mutations(kind, m), chunks=(1 << 20, 61))
    assert res["error"] > 0


@pytest.mark.parametrize("name", list(KINDS))
def test_records_and_sections_reordered_duplicated_removed(streams, targets, name):
    kind = streams[name]
    m = targets.get(kind)
    rng = random.Random(name)
    _run_family(kind, m, splice_mutations(kind, m, rng, limit=12))


@pytest.mark.parametrize("name", list(KINDS))
def test_byte_changes_quick(streams, targets, name):
    kind = streams[name]
    m = targets.get(kind)
    rng = random.Random("bytes" + name)
    _run_family(kind, m, byte_mutations(kind, rng, 60), chunks=(1 << 20, 4097))


@pytest.mark.parametrize("name", ["lab-2.0", "v2"])
def test_device_state_and_vmdesc_bytes(streams, targets, name):
    kind = streams[name]
    m = targets.get(kind)
    _run_family(kind, m, payload_mutations(kind, m, stride=3))


@pytest.mark.slow
@pytest.mark.parametrize("name", list(KINDS))
def test_device_state_and_vmdesc_bytes_every_byte(streams, targets, name):
    kind = streams[name]
    m = targets.get(kind)
    _run_family(kind, m, payload_mutations(kind, m), dissector=not kind.disk)


@pytest.mark.parametrize("name", ["none", "v2", "xbzrle"])
def test_truncation_sampled(streams, targets, name):
    """Every offset of the header and of the last 600 bytes, a stride through the rest."""
    kind = streams[name]
    m = targets.get(kind)
    n = len(kind.data)
    cuts = sorted(set(range(0, min(n, 200))) | set(range(max(0, n - 600), n)) |
                  set(range(0, n, 97)))
    res = _run_family(kind, m, [(f"truncate {c}", kind.data[:c]) for c in cuts],
                      dissector=False)
    assert res["ok"] <= 1  # at most the cut of the vmdesc-less end (QEMU only warns)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(KINDS))
def test_truncation_at_every_offset(streams, targets, name):
    """Every offset; in the two big streams, every offset of every record but the bodies of
    4 KiB pages and 1 MiB disk chunks (their first and last 16 bytes, and a stride)."""
    kind = streams[name]
    m = targets.get(kind)
    n = len(kind.data)
    if n <= 40000:
        cuts = range(n)
    else:
        cuts = set()
        recs = records_of(kind, m)
        for r, nxt in zip(recs, recs[1:]):
            a, b = r.offset, nxt.offset
            if isinstance(r, (RamPage, BlockChunk)) and b - a > 64:
                cuts |= set(range(a, a + 16)) | set(range(b - 16, b)) | set(range(a, b, 1021))
            else:
                cuts |= set(range(a, b))
        cuts = sorted(c for c in cuts if c < n)
    _run_family(kind, m, [(f"truncate {c}", kind.data[:c]) for c in cuts],
                dissector=name in ("none", "v2"))


@pytest.mark.slow
@pytest.mark.parametrize("name", list(KINDS))
def test_byte_changes_exhaustive(streams, targets, name):
    kind = streams[name]
    m = targets.get(kind)
    rng = random.Random("slow" + name)
    n = 200 if kind.disk else 1000
    _run_family(kind, m, byte_mutations(kind, rng, n), chunks=(1 << 20, 13),
                dissector=not kind.disk)
    _run_family(kind, m, splice_mutations(kind, m, rng, limit=100), dissector=False)


# ---------------------------------------------------------------------------------------------
# load_snapshot through a snapshot store: MachineError, runstate kept


def _put(store, tag, data):
    def write(fd):
        os.write(fd, data)
        return len(data)
    store.save(tag, write, 0)


def test_load_snapshot_raises_machine_error_and_keeps_everything(streams, workdir):
    store = SnapshotStore(os.path.join(workdir, "snaps"))
    rng = random.Random(99)
    problems = Problems()
    for kind in streams.values():
        m = kind.machine(workdir)
        try:
            muts = field_mutations(kind, m)
            muts = rng.sample(muts, min(len(muts), 12)) + byte_mutations(kind, rng, 8)
            for running in (False, True):
                m.run(m.vm_start)
                m.run(m.vm_stop)  # paused, not prelaunch
                for i, (label, data) in enumerate(muts):
                    tag = f"{kind.name}-{i}"
                    where = f"{kind.name}: {label} (running: {running})"
                    _put(store, tag, data)
                    COUNTS["load_snapshot"] += 1
                    if running:
                        m.run(m.vm_start)
                    m.run(m.vm_stop)
                    before = m.run(_fingerprint, m)
                    if running:
                        m.run(m.vm_start)
                    try:
                        m.run(m.load_snapshot, store, tag, timeout=60)
                    except MachineError as e:
                        msg = str(e)
                        state = m.runstate.value
                        m.run(m.vm_stop)
                        after = m.run(_fingerprint, m)
                        same = (after[:3] == before[:3] and after[4:] == before[4:]
                                and (running or after[3] == before[3]))
                        for cat, text in outcome_problems(
                                Outcome(False, msg, None, same, (before, after)), where):
                            problems.add(cat, text)
                        if msg.startswith("Error while loading VM state"):
                            problems.add("second pass failed", f"{where}: {msg}")
                        if state != ("running" if running else "paused"):
                            problems.add("runstate changed", f"{where}: {state}")
                    except Exception as e:  # noqa: BLE001
                        problems.add(f"load_snapshot raised {type(e).__name__}",
                                     f"{where}: {_short(str(e))}")
                    else:
                        if m.runstate.value != ("running" if running else "paused"):
                            problems.add("runstate after a good load",
                                         f"{where}: {m.runstate.value}")
                    m.run(m.vm_stop)
        finally:
            m.shutdown()
    problems.check()


# ---------------------------------------------------------------------------------------------
# Memory stays bounded whatever sizes the stream claims


def _huge_claims(kind, m):
    out = []
    for name, off, width in length_fields(kind, m):
        if width >= 4 or "length" in name:
            for v in ([255] if width == 1 else [2 ** 32 - 1, 2 ** 31, 2 ** 63, 2 ** 64 - 1]):
                if width == 2:
                    v = 0xFFFF
                out.append((f"{name}={v:#x}", set_field(kind.data, off, width, v)))
    # a stream that is all length: a v2 header claiming 2^63 bytes, then a record of 2^32-1
    v2 = struct.pack(">IIQ", F.QEMU_VM_FILE_MAGIC, 2, 2 ** 63 - 1)
    out.append(("v2 huge record", v2 + b"\x05timer" + struct.pack(">III", 0, 2, 2 ** 32 - 1)))
    out.append(("v2 huge skip", v2 + b"\x05nosuc" + struct.pack(">III", 0, 2, 2 ** 32 - 1)
                + bytes(1000)))
    return out


def _measure(m, data):
    def run():
        tracemalloc.start()
        try:
            tracemalloc.reset_peak()
            base = tracemalloc.get_traced_memory()[0]
            try:
                check_then_load(m, io.BytesIO(data))
            except StreamError:
                pass
            return tracemalloc.get_traced_memory()[1] - base
        finally:
            tracemalloc.stop()
    return m.run(run, timeout=120)


@pytest.mark.parametrize("name", ["lab-2.0", "v2", "xbzrle", "lab-disk"])
def test_memory_bounded_whatever_sizes_the_stream_claims(streams, targets, name):
    kind = streams[name]
    m = targets.get(kind)
    worst = (0, None)
    for label, data in _huge_claims(kind, m):
        COUNTS["memory"] += 1
        peak = _measure(m, data)
        worst = max(worst, (peak, label))
    # the stream itself is held once or twice (parser buffer, records); never RAM-sized claims
    bound = min(MEMORY_BOUND, 4 * len(kind.data) + max(kind.ram, 1 << 20) + (4 << 20))
    assert worst[0] < bound, f"{name}: {worst[1]} made a load allocate {worst[0]} bytes"


def _big_v2_device_record(kind, n):
    """A v2 stream: the timer's 16-byte state in a record that says (and has) ``n`` bytes."""
    body = b"\x05timer" + struct.pack(">III", 0, 2, n) + bytes(n)
    return struct.pack(">IIQ", F.QEMU_VM_FILE_MAGIC, 2, len(body)) + body


def _big_vmdesc(kind, n):
    """A valid v3 stream whose vmdesc says (and has) ``n`` bytes (under MAX_VMDESC)."""
    data = kind.data
    i = data.rindex(b"\x06" + struct.pack(">I", len(data) - data.rindex(b'{"page_size"')))
    return data[:i] + b"\x06" + struct.pack(">I", n) + b" " * n


@pytest.mark.parametrize("make", [_big_v2_device_record, _big_vmdesc],
                         ids=["v2 device record of 48 MiB", "vmdesc of 48 MiB"])
def test_memory_bounded_when_the_claimed_bytes_are_really_sent(streams, targets, workdir, make):
    """A length field backed by real bytes: a loader reading its file 1 MiB at a time must not
    hold the whole record (a 16-byte device state, or JSON it ignores) in memory: that is an
    allocation sized by the stream, beyond the machine's 64 KiB of RAM."""
    kind = streams["none"]
    m = targets.get(kind)
    data = make(kind, 48 << 20)
    COUNTS["memory"] += 1
    path = os.path.join(workdir, "big.stream")
    with open(path, "wb") as f:
        f.write(data)
    del data

    def run():
        tracemalloc.start()
        try:
            with open(path, "rb") as f:
                try:
                    check_then_load(m, f)
                    result = "ok"
                except StreamError as e:
                    result = e.message
            return result, tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    result, peak = m.run(run, timeout=120)
    os.unlink(path)
    assert peak < 16 << 20, f"load ({result}) peaked at {peak >> 20} MiB"


# ---------------------------------------------------------------------------------------------
# Hypothesis: random chains of mutations, and feeding in random chunk sizes


@st.composite
def mutated(draw, kinds):
    name = draw(st.sampled_from(sorted(kinds)))
    kind = kinds[name]
    data = bytearray(kind.data)
    steps = []
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "byte", "insert", "delete", "truncate", "field",
                                   "splice"]))
        n = len(data)
        if n == 0:
            break
        if op == "flip":
            i, b = draw(st.integers(0, n - 1)), draw(st.integers(0, 7))
            data[i] ^= 1 << b
        elif op == "byte":
            i = draw(st.integers(0, n - 1))
            data[i] = draw(st.sampled_from([0, 1, 0x7E, 0x7F, 0x80, 0xFF]) | st.integers(0, 255))
        elif op == "insert":
            i = draw(st.integers(0, n))
            data[i:i] = draw(st.binary(min_size=1, max_size=16))
        elif op == "delete":
            i = draw(st.integers(0, n - 1))
            del data[i:i + draw(st.integers(1, 64))]
        elif op == "truncate":
            del data[draw(st.integers(0, n - 1)):]
        elif op == "field":
            fields = FIELD_CACHE[name]
            fname, off, width = draw(st.sampled_from(fields))
            if off + width <= n:
                v = draw(st.sampled_from(SPECIALS[width]) | st.integers(0, 2 ** (8 * width) - 1))
                data[:] = set_field(bytes(data), off, width, v)
            op = f"field {fname}"
        else:
            sp = SPAN_CACHE[name]
            a, b = draw(st.sampled_from(sp))
            c = draw(st.sampled_from([s for s, _ in sp] + [len(kind.data)]))
            if b <= n and c <= n:
                piece = bytes(data[a:b])
                if draw(st.booleans()):
                    del data[a:b]
                    c = c - (b - a) if c >= b else min(c, a)
                data[c:c] = piece
        steps.append(op)
    return name, bytes(data), steps


FIELD_CACHE: dict = {}
SPAN_CACHE: dict = {}


@pytest.fixture(scope="module")
def caches(streams, targets):
    for name, kind in streams.items():
        m = targets.get(kind)
        FIELD_CACHE[name] = length_fields(kind, m)
        rec, sec = spans(kind, m)
        SPAN_CACHE[name] = rec + sec
    return streams


def _hypothesis_body(streams, targets, case, chunk):
    name, data, steps = case
    kind = streams[name]
    m = targets.get(kind)
    out = attempt(m, data, what="hypothesis")
    check_outcome(out, f"{name} {steps}")
    other = attempt(m, data, chunk=chunk, what="hypothesis-chunked")
    check_outcome(other, f"{name} {steps} chunk {chunk}")
    assert (other.ok, other.message) == (out.ok, out.message), (name, steps, chunk)
    dissect(data, what="hypothesis-dissector")


_SETTINGS = dict(deadline=None, derandomize=True, database=None,
                 suppress_health_check=[HealthCheck.function_scoped_fixture,
                                        HealthCheck.too_slow, HealthCheck.data_too_large])


@settings(max_examples=150, **_SETTINGS)
@given(case=st.data(), chunk=st.sampled_from([1, 7, 64, 4095, 4096, 4097, 65536]))
def test_hypothesis_random_mutations(caches, targets, case, chunk):
    _hypothesis_body(caches, targets, case.draw(mutated(caches)), chunk)


@pytest.mark.slow
@settings(max_examples=1500, **_SETTINGS)
@given(case=st.data(), chunk=st.sampled_from([1, 3, 64, 4095, 4097, 1 << 20]))
def test_hypothesis_random_mutations_long(caches, targets, case, chunk):
    _hypothesis_body(caches, targets, case.draw(mutated(caches)), chunk)


# ---------------------------------------------------------------------------------------------
# The corpus in tests/data/fuzz/: replayed every run


def _corpus():
    try:
        with open(os.path.join(FUZZ_DIR, "corpus.json")) as f:
            return json.load(f)
    except OSError:
        return []


@pytest.mark.parametrize("entry", _corpus(), ids=lambda e: e["file"])
def test_corpus_replay(entry, workdir, targets):
    with open(os.path.join(FUZZ_DIR, entry["file"]), "rb") as f:
        data = f.read()
    kind = KINDS[entry["kind"]]
    m = targets.get(kind)
    out = attempt(m, data, what="corpus")
    check_outcome(out, entry["file"])
    assert out.ok == (entry["expect"] == "ok"), (entry["file"], out.message)
    if "error" in entry:
        assert out.message == entry["error"], entry["file"]
    dissect(data, what="corpus-dissector")
    peak = _measure(m, data)
    assert peak < MEMORY_BOUND, (entry["file"], peak)


# ---------------------------------------------------------------------------------------------
# Real processes: the dissector and -incoming exec:cat


def _run_child(argv, timeout, cwd="/tmp", stdin=subprocess.DEVNULL):
    """(status, stdout, stderr, maxrss KiB); a hang is a failure."""
    env = dict(os.environ, PYTHONPATH=ROOT)
    p = subprocess.Popen(argv, stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         cwd=cwd, env=env)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        p.communicate()
        raise AssertionError(f"hang: {argv} did not finish in {timeout}s") from None
    return p.returncode, out.decode("utf-8", "replace"), err.decode("utf-8", "replace")


def _sample(streams, targets, n, seed):
    """n mutated streams spread over every kind and mutation family, with the in-process
    loadvm outcome of each (what -incoming must say too)."""
    rng = random.Random(seed)
    pool = []
    for kind in streams.values():
        m = targets.get(kind)
        fam = (field_mutations(kind, m) + splice_mutations(kind, m, rng, 6) +
               byte_mutations(kind, rng, 20) + truncations(kind, stride=max(1, len(kind.data) // 40)))
        pool.append((kind, fam))
    out = []
    for i in range(n):
        kind, fam = pool[i % len(pool)]
        label, data = rng.choice(fam)
        res = attempt(targets.get(kind), data, what="sample-inproc")
        out.append((kind, label, data, res))
    return out


def _dissector_case(workdir, kind, label, data, i, args=()):
    path = os.path.join(workdir, f"dis-{i}.stream")
    with open(path, "wb") as f:
        f.write(data)
    COUNTS["dissector-process"] += 1
    status, out, err, hwm_kb = run_dissector([path, *args])
    where = f"{kind.name}: {label} {args}"
    assert "Traceback" not in out + err, f"{where}:\n{err[-3000:]}"
    assert status in (0, 1), (where, status, err)
    if status == 1:
        text = out + err
        assert "error at offset 0x" in text or '"error": {' in text, (where, text[-2000:])
        for ln in err.splitlines():
            if ln.startswith("qmon-analyze:"):
                pytest.fail(f"{where}: dissector failed outside the stream check: {ln}")
        for ln in out.splitlines():
            if ln.startswith("error at offset"):
                assert not _looks_internal(ln.split(": ", 1)[1]), (where, ln)
    assert hwm_kb < RSS_BOUND_KB, (where, hwm_kb)
    return status


def _incoming_case(workdir, kind, label, data, i, res):
    path = os.path.join(workdir, f"inc-{i}.stream")
    with open(path, "wb") as f:
        f.write(data)
    snaps = os.path.join(workdir, "inc-snaps")
    argv = [sys.executable, "-m", "monitor.cli", *kind.cli_args(workdir), "-incoming",
            f"exec:cat {path}", "-snapshot-dir", snaps]
    COUNTS["incoming-process"] += 1
    where = f"{kind.name}: {label}"
    # stdin stays open: a failed load, not the end of the commands, is what ends the process
    q = QmonProc(argv[3:])
    try:
        if not res.ok:
            try:
                q.proc.wait(30)
            except subprocess.TimeoutExpired:
                raise AssertionError(f"{where}: hang, a stream loadvm rejects "
                                     f"({res.message}) left -incoming waiting") from None
            time.sleep(0.05)  # the reader threads drain the pipes
            err = "\n".join(x for x in q.stderr_lines if x is not None)
            assert "Traceback" not in err, f"{where}:\n{err}"
            assert q.proc.returncode == 1, (where, q.proc.returncode, err)
            want = f"qmon: load of migration failed: {res.message}"
            assert err.strip().endswith(want.strip()), (where, err, want)
            if not (_IGNORE and _IGNORE in "message of several lines"):
                assert err.strip() == want, f"{where}: not one line: {err!r}"
        else:
            # a loadable stream must be loaded, not left half-way
            q.wait_for("info status", lambda o: o and "inmigrate" not in o[0], timeout=30)
            info = q.cmd("info migrate")
            assert "Migration status: completed" in info, (where, info)
            err = "\n".join(x for x in q.stderr_lines if x is not None)
            assert "Traceback" not in err and "load of migration failed" not in err, (where, err)
    finally:
        if q.proc.poll() is None:
            q.proc.kill()
        q.proc.wait()


def _processes(streams, targets, workdir, n, seed):
    cases = _sample(streams, targets, n, seed)
    for i, (kind, label, data, res) in enumerate(cases):
        check_outcome(res, f"{kind.name}: {label}")
        _incoming_case(workdir, kind, label, data, i, res)
        _dissector_case(workdir, kind, label, data, i,
                        args=[(), ("--json",), ("--hexdump",)][i % 3])


def test_processes_quick_sample(streams, targets, workdir):
    _processes(streams, targets, workdir, 10, seed=5)


@pytest.mark.slow
def test_processes_sample_of_60(streams, targets, workdir):
    _processes(streams, targets, workdir, 60, seed=6)


# The dissector in a child that reports its own peak RSS (VmHWM: the wait4 figure of a child
# includes the parent's size at fork time).
_HWM_WRAPPER = """
import runpy, sys
sys.argv = sys.argv[1:]
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
finally:
    sys.stdout.flush()
    hwm = [ln for ln in open("/proc/self/status") if ln.startswith("VmHWM:")]
    sys.stderr.write("\\n@@hwm " + hwm[0].split()[1] + "\\n")
"""


def run_dissector(args, timeout=60):
    """(status, stdout, stderr, peak RSS in KiB) of scripts/analyze.py ARGS."""
    status, out, err = _run_child([sys.executable, "-c", _HWM_WRAPPER, ANALYZE, *args], timeout)
    m = re.search(r"\n@@hwm (\d+)\n", err)
    assert m, err[-2000:]
    err = err[:m.start()] + err[m.end():]
    return status, out, err, int(m.group(1))


def _claim_stream(claim):
    """A 67-byte stream whose MEM_SIZE record claims one RAM block of ``claim`` bytes."""
    name = b"ram"
    return (struct.pack(">II", F.QEMU_VM_FILE_MAGIC, 3) + b"\x07" + struct.pack(">I", 4)
            + b"none" + b"\x01" + struct.pack(">I", 2) + b"\x03ram" + struct.pack(">II", 0, 4)
            + struct.pack(">Q", claim | F.RAM_SAVE_FLAG_MEM_SIZE) + bytes([len(name)]) + name
            + struct.pack(">Q", claim) + struct.pack(">Q", F.RAM_SAVE_FLAG_EOS)
            + b"\x7e" + struct.pack(">I", 2))


@pytest.mark.parametrize("claim", [1 << 30, 1 << 40, 1 << 46, 1 << 62])
def test_dissector_extract_bounded_by_claimed_ram_size(workdir, claim):
    """--extract sizes its output by the MEM_SIZE record: a claim must not turn into an
    allocation (its page bitmap) before a single page arrived, and a claim the file system
    cannot hold is a stream error, not an I/O failure."""
    path = os.path.join(workdir, f"extract-{claim:x}.stream")
    with open(path, "wb") as f:
        f.write(_claim_stream(claim))
    outdir = os.path.join(workdir, f"extract-{claim:x}")
    COUNTS["dissector-process"] += 1
    status, out, err, hwm = run_dissector(["--extract", outdir, path])
    assert "Traceback" not in err and "MemoryError" not in out + err, (out, err)
    assert status == 1, (out, err)
    assert re.search(r"^error at offset 0x[0-9a-f]+: ", out, re.M), (out, err)
    assert not err.strip(), f"not a stream error: {err.strip()}"
    assert hwm < 120 << 10, f"dissector --extract peaked at {hwm} KiB for a claimed block " \
                            f"of {claim:#x} bytes"
