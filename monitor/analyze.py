"""qmon-analyze: a savevm/migration stream dissector for teaching.

It reads a stream (a file, stdin, or a snapshot tag) and explains it record by record: an
annotated listing (the default), a labelled hexdump (``--hexdump``), a JSON document (``--json``),
and ``--extract DIR`` writes each RAM block and each device's state as files.

There is one parser of the stream format (``machine/savevm/records.py``); the dissector drives it
and never re-reads the container on its own, so a stream it explains is exactly the stream the
loader reads. The parser cannot know how long a FULL section's payload is (the container has no
length fields), so the dissector answers its ``describe`` callback from the stream's own vmdesc
JSON, which QEMU appends after EOF for this purpose (analyze-migration.py reads it the same way),
and falls back to qmon's device definitions for a stream without one.

A broken stream is listed up to its first error, then one line ``error at offset 0xN: MESSAGE``
and exit status 1: never a traceback.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import re
import stat
import struct
import sys
from collections import Counter, defaultdict, deque
from dataclasses import dataclass, fields as dc_fields, is_dataclass

from pygments.token import Comment, Generic, Keyword, Name, Number, String, Text

from machine.savevm import format as F
from machine.savevm import records as R
from machine.savevm import xbzrle
from machine.units import format_size

PROG = "qmon-analyze"
PAGE = F.TARGET_PAGE_SIZE
CHUNK = 1 << 20  # bytes fed to the parser at a time: its buffer stays small for any stream
_ZERO_PAGE = F.ZERO_PAGE
_BE32 = struct.Struct(">I")


MAX_EXTRACT_BLOCK = 64 << 30  # what --extract agrees to write for one RAM block


class DissectError(Exception):
    """A stream the dissector cannot explain further (besides the parser's StreamError)."""

    def __init__(self, message: str, offset: int):
        from machine.savevm.records import printable

        message = printable(message)
        super().__init__(message)
        self.message = message
        self.offset = offset


# ---------------------------------------------------------------------------------------------
# Input


def open_stream(path: str):
    """(data, closer): the whole stream as a bytes-like object. A regular file is mapped, not
    read, so a 1 GiB stream costs no second copy in RAM; stdin and pipes are read."""
    if path == "-":
        return sys.stdin.buffer.read(), (lambda: None)
    f = open(path, "rb")
    try:
        st = os.fstat(f.fileno())
        if stat.S_ISREG(st.st_mode) and st.st_size > 0:
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            f.close()
            return mm, mm.close
        data = f.read()
    finally:
        if not f.closed:
            f.close()
    return data, (lambda: None)


def find_vmdesc(data):
    """The vmdesc trailer (QEMU_VM_VMDESCRIPTION, be32 len, JSON) at the very end of the data,
    found by looking backwards: (parsed JSON or None, offset of the 0x06 byte or None, note)."""
    n = len(data)
    start = max(0, n - R.MAX_VMDESC - 5)
    i = data.rfind(b'{"page_size"', start)
    while i >= 5:
        if data[i - 5] == F.QEMU_VM_VMDESCRIPTION and _BE32.unpack_from(data, i - 4)[0] == n - i:
            try:
                desc = json.loads(bytes(data[i:n]))
            except ValueError as e:
                return None, i - 5, f"the vmdesc is not valid JSON ({e})"
            if not isinstance(desc, dict) or not isinstance(desc.get("devices"), list):
                return None, i - 5, "the vmdesc has no device list"
            return desc, i - 5, None
        i = data.rfind(b'{"page_size"', start, i)
    return None, None, None


# ---------------------------------------------------------------------------------------------
# Device layouts: the vmdesc first, qmon's own devices when the stream has no vmdesc.


def _qmon_vmsd(idstr: str, version_id: int):
    from machine.devices.cpu import cpu_vmsd
    from machine.devices.globalstate import GlobalState
    from machine.devices.serial import Serial
    from machine.devices.timer import Timer

    if idstr == "cpu":
        if 1 <= version_id <= 2:
            return cpu_vmsd(version_id)
        return None
    vmsd = {"timer": Timer.vmsd, "globalstate": GlobalState.vmsd, "serial": Serial.vmsd}.get(idstr)
    if vmsd is None or not vmsd.minimum_version_id <= version_id <= vmsd.version_id:
        return None
    return vmsd


def qmon_desc(idstr: str, instance_id: int, version_id: int):
    """qmon's definition of a device section, in the vmdesc's shape, or None."""
    if instance_id != 0:
        return None
    vmsd = _qmon_vmsd(idstr, version_id)
    if vmsd is None:
        return None
    return vmsd.vmdesc(idstr, instance_id, version_id)


def desc_size(desc: dict) -> int:
    """Bytes of a payload described by a vmdesc entry: each field's size times its array
    length (QEMU records the bytes it wrote, per element), plus each subsection's header
    (0x05, u8 name length, name, be32 version_id) and contents."""
    n = 0
    for f in desc.get("fields", ()):
        n += int(f["size"]) * int(f.get("array_len", 1))
    for s in desc.get("subsections", ()):
        n += 1 + 1 + len(str(s["vmsd_name"]).encode()) + 4 + desc_size(s)
    return n


class Layouts:
    """Who knows each FULL section's layout. vmdesc entries are taken in stream order per
    (idstr, instance_id), as QEMU writes one entry per FULL section it writes."""

    def __init__(self, vmdesc):
        self.queue = defaultdict(deque)
        if vmdesc is not None:
            for dev in vmdesc.get("devices", ()):
                try:
                    self.queue[(str(dev["name"]), int(dev["instance_id"]))].append(dev)
                except (KeyError, TypeError, ValueError):
                    continue

    def lookup(self, idstr, instance_id, version_id):
        """(desc, source, note) or (None, None, None)."""
        q = self.queue.get((idstr, instance_id))
        if q:
            dev = q.popleft()
            try:
                desc_size(dev)
            except (KeyError, TypeError, ValueError):
                dev = None
            if dev is not None:
                if dev.get("version") == version_id:
                    return dev, "vmdesc", None
                mine = qmon_desc(idstr, instance_id, version_id)
                if mine is not None:
                    return mine, "qmon", f"the vmdesc describes version {dev.get('version')}"
                return dev, "vmdesc", f"the vmdesc describes version {dev.get('version')}"
        mine = qmon_desc(idstr, instance_id, version_id)
        if mine is not None:
            return mine, "qmon", None
        return None, None, None


# ---------------------------------------------------------------------------------------------
# Field values, decoded from the bytes by the vmdesc types


# type -> (size, signed). QEMU's check types ("int32 equal", "int32 le", "uint8 equal") carry
# the same integer; "timer" is the be64 expiry time (-1 when not pending).
_INTS = {"int8": (1, True), "uint8": (1, False), "int16": (2, True), "uint16": (2, False),
         "int32": (4, True), "uint32": (4, False), "int64": (8, True), "uint64": (8, False),
         "bool": (1, False), "timer": (8, True)}


def _int_kind(type_name: str, size: int):
    base = type_name.split(" ", 1)[0]
    k = _INTS.get(base)
    if k is not None and k[0] == size:
        return base, k[1]
    return None


@dataclass
class FieldValue:
    name: str
    type: str
    offset: int  # stream offset
    size: int
    value: object = None  # int, bool or bytes for a leaf
    elements: list | None = None  # an array: one FieldValue per element
    children: list | None = None  # a struct, tmp or subsection: its members
    vmsd_name: str | None = None
    version: int | None = None  # a subsection's version_id
    header: list | None = None  # a subsection's header spans (offset, size, label, value)
    note: str | None = None


def _leaf(name, type_name, data, pos, size, base):
    raw = bytes(data[pos:pos + size])
    kind = _int_kind(type_name, size)
    if kind is not None:
        v = int.from_bytes(raw, "big", signed=kind[1])
        if kind[0] == "bool":
            v = bool(v) if v in (0, 1) else v
        return FieldValue(name, type_name, base + pos, size, v)
    return FieldValue(name, type_name, base + pos, size, raw)


def decode_desc(desc, data, pos, end, base):
    """Members of a described payload in data[pos:end] (stream offset = base + index):
    (list of FieldValue, position after them). Never raises on odd input: a field that does not
    fit is marked with a note and decoding stops there."""
    out = []
    for f in desc.get("fields", ()):
        name = str(f.get("name", "?"))
        if "index" in f:
            name = f"{name}[{f['index']}]"
        type_name = str(f.get("type", "?"))
        size = int(f.get("size", 0))
        count = int(f.get("array_len", 1))
        nested = f.get("struct") if isinstance(f.get("struct"), dict) else (
            f if "fields" in f else None)  # VMSTATE_WITH_TMP describes its fields inline
        total = size * count
        if pos + total > end:
            out.append(FieldValue(name, type_name, base + pos, total,
                                  note=f"does not fit: {total} bytes described, "
                                       f"{max(0, end - pos)} left"))
            return out, end
        if "array_len" in f:
            fv = FieldValue(name, type_name, base + pos, total, elements=[],
                            vmsd_name=nested.get("vmsd_name") if nested else None)
            for i in range(count):
                fv.elements.append(_one(f"{name}[{i}]", type_name, nested, size, data, pos,
                                        base))
                pos += size
            out.append(fv)
        else:
            out.append(_one(name, type_name, nested, size, data, pos, base))
            pos += size
    for s in desc.get("subsections", ()):
        sname = str(s.get("vmsd_name", "?"))
        enc = sname.encode()
        hdr = 1 + 1 + len(enc) + 4
        if pos + hdr > end:
            out.append(FieldValue(sname, "subsection", base + pos, max(0, end - pos),
                                  note="subsection header does not fit"))
            return out, end
        marker, n = data[pos], data[pos + 1]
        got = bytes(data[pos + 2:pos + 2 + n])
        (ver,) = _BE32.unpack_from(data, pos + 2 + n) if pos + 6 + n <= end else (None,)
        note = None
        if marker != F.QEMU_VM_SUBSECTION or got != enc:
            note = f"expected subsection {sname!r}, found marker 0x{marker:02x} name {got!r}"
        header = [(base + pos, 1, "subsection", f"0x{marker:02x}"),
                  (base + pos + 1, 1, "subsection name len", str(n)),
                  (base + pos + 2, n, "subsection name", _quote(got)),
                  (base + pos + 2 + n, 4, "subsection version_id", str(ver))]
        start = pos
        pos += 2 + n + 4
        children, pos = decode_desc(s, data, pos, end, base)
        out.append(FieldValue(sname, "subsection", base + start, pos - start, children=children,
                              vmsd_name=sname, version=ver, header=header, note=note))
    return out, pos


def _one(name, type_name, nested, size, data, pos, base):
    if nested is None:
        return _leaf(name, type_name, data, pos, size, base)
    children, used = decode_desc(nested, data, pos, pos + size, base)
    fv = FieldValue(name, type_name, base + pos, size, children=children,
                    vmsd_name=nested.get("vmsd_name"))
    if used != pos + size:
        fv.note = f"members take {used - pos} of its {size} bytes"
    return fv


def _printable(b: bytes) -> bool:
    return all(32 <= c < 127 or c in (9, 10, 13) for c in b)


def _quote(b: bytes) -> str:
    return json.dumps(b.decode("latin-1"))


def format_value(fv: FieldValue, limit: int = 16) -> str:
    v = fv.value
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        if fv.type.startswith("bool"):
            return f"{v} (not a bool)"
        return str(v) if -10 < v < 10 else f"{v} (0x{v & ((1 << (8 * fv.size)) - 1):x})"
    if isinstance(v, bytes):
        n = len(v)
        if fv.type == "unused_buffer":
            return f"({n} unused bytes{'' if not any(v) else ', not zero'})"
        if not any(v):
            return f"zeros ({n} bytes)"
        text = v.split(b"\0", 1)[0]
        if text and _printable(text):
            rest = v[len(text):]
            tail = ""
            if rest and any(rest[1:]):
                tail = f" (+ {len(rest)} bytes after the string, not all zero)"
            return _quote(text) + tail
        shown = v[:limit].hex(" ")
        return f"{shown}{' ...' if n > limit else ''} ({n} bytes)"
    return "?"


def field_json(fv: FieldValue) -> dict:
    d = {"name": fv.name, "type": fv.type, "offset": fv.offset, "size": fv.size}
    if fv.vmsd_name and fv.type != "subsection":
        d["vmsd_name"] = fv.vmsd_name
    if fv.type == "subsection":
        d["version"] = fv.version
    if fv.elements is not None:
        if all(e.children is None for e in fv.elements):
            d["value"] = [_json_value(e) for e in fv.elements]
        else:
            d["elements"] = [field_json(e) for e in fv.elements]
    elif fv.children is not None:
        d["fields"] = [field_json(c) for c in fv.children]
    elif fv.note is None or fv.value is not None:
        d["value"] = _json_value(fv)
        if isinstance(fv.value, bytes):
            text = fv.value.split(b"\0", 1)[0]
            if text and _printable(text):
                d["text"] = text.decode("latin-1")
    if fv.note:
        d["note"] = fv.note
    return d


def _json_value(fv: FieldValue):
    return fv.value.hex() if isinstance(fv.value, bytes) else fv.value


# ---------------------------------------------------------------------------------------------
# The dissector: drives the parser and hands each record, with its context, to the views.


@dataclass
class Context:
    section: object = None  # SectionHeader (or a v2 record) the record belongs to
    fields: list | None = None  # DeviceState: decoded members
    source: str | None = None  # DeviceState: "vmdesc" or "qmon"
    note: str | None = None
    size: int = 0  # the record's size in bytes, where the dissector knows it


_RAM_PAGE_TYPES = (R.RamZero, R.RamPage, R.RamXbzrle)


def ram_record_size(rec) -> int:
    n = 8 + ((1 + len(rec.block.encode("latin-1"))) if rec.named else 0)
    if type(rec) is R.RamZero:
        return n + 1
    if type(rec) is R.RamPage:
        return n + len(rec.data)
    return n + 3 + len(rec.data)


class Dissector:
    def __init__(self, data, views, parser_factory=None):
        self.parser_factory = parser_factory or R.Parser
        self.data = data
        self.views = views
        vmdesc, self.vmdesc_offset, self.vmdesc_note = find_vmdesc(data)
        self.vmdesc = vmdesc
        self.layouts = Layouts(vmdesc)
        self.parser: R.Parser | None = None
        self.pending = None  # (desc, source, note) from the last describe() call
        self.section = None
        self.blocks: dict[str, int] = {}
        self.sections = Counter()
        self.pages = Counter()
        self.devices = 0
        self.end = None
        self.error = None  # (offset, message)
        self._scratch = bytearray(PAGE)

    # The parser's callback ------------------------------------------------------------------
    def describe(self, idstr, instance_id, version_id):
        off = self.parser.offset  # the section header's first byte
        self.pending = None
        if idstr == F.RAM_SECTION_IDSTR:
            return "ram", None
        if idstr == "block":  # the disk's live section (migrate -b)
            return "block", None
        desc, source, note = self.layouts.lookup(idstr, instance_id, version_id)
        if desc is None:
            why = "the stream has no vmdesc" if self.vmdesc is None else "not in the vmdesc"
            raise R.StreamError(f"cannot size section '{idstr}' instance {instance_id} version "
                                f"{version_id}: {why} and qmon has no such device", off)
        self.pending = (desc, source, note)
        return "device", desc_size(desc)

    # Driving --------------------------------------------------------------------------------
    def run(self) -> bool:
        """True when the stream was read to its end without an error."""
        data = self.data
        self.parser = p = self.parser_factory(self.describe)
        try:
            # Pages of a mapped file already parsed leave this process's resident set (they
            # stay in the page cache, and come back if a view reads them again).
            dontneed = getattr(mmap, "MADV_DONTNEED", None) if isinstance(data, mmap.mmap) \
                else None
            with memoryview(data) as mv:
                for start in range(0, len(data), CHUNK):
                    p.feed(mv[start:start + CHUNK])
                    if self._drain():
                        break
                    if dontneed is not None and start >= CHUNK:
                        data.madvise(dontneed, start - CHUNK, CHUNK)
                else:
                    p.feed_eof()
                    self._drain()
        except (R.StreamError, DissectError) as e:
            off = e.offset if e.offset is not None else p.offset
            self.error = (off, e.message)
        except OSError:
            raise  # writing the output or extracted files failed: not the stream's fault
        except Exception as e:  # anything else is a dissector bug: still no traceback
            self.error = (p.offset, f"{type(e).__name__}: {e}")
        if self.error is None and self.end is None:
            self.error = (p.offset, "the stream ends before its EOF section")
        if self.error is not None:
            for v in self.views:
                v.error(*self.error)
            return False
        summary = self.summary()
        for v in self.views:
            v.finish(summary)
        return True

    def _drain(self) -> bool:
        p = self.parser
        while True:
            rec = p.next()
            if rec is None:
                return False
            self._record(rec)
            if type(rec) is R.End:
                return True

    def _record(self, rec):
        t = type(rec)
        ctx = Context(self.section)
        if t in _RAM_PAGE_TYPES:
            self._check_page(rec)
            ctx.size = ram_record_size(rec)
        elif t is R.SectionHeader:
            self.section = rec
            ctx.section = rec
            self.sections[rec.type_name] += 1
            if rec.kind == "ram" and rec.version_id != F.RAM_SECTION_VERSION:
                ctx.note = f"QEMU's loader wants ram version {F.RAM_SECTION_VERSION}"
            if rec.section_type in (F.QEMU_VM_SECTION_START, F.QEMU_VM_SECTION_FULL) and \
                    rec.kind == "device" and self.pending:
                ctx.source = self.pending[1]
                ctx.note = self.pending[2]
        elif t is R.DeviceState:
            self._device(rec, ctx)
        elif t is R.RamMemSize:
            for name, length in rec.blocks:
                self.blocks[name] = length
        elif t is R.Footer:
            self.section = None
        elif t is R.End:
            self.end = rec
            self.section = None
        elif t is R.V2Record:
            self.section = rec
            ctx.section = rec
            self.sections["v2 record"] += 1
        for v in self.views:
            v.record(rec, ctx)

    def _check_page(self, rec):
        t = type(rec)
        length = self.blocks.get(rec.block)
        if length is None:
            raise DissectError(f"Can't find block {rec.block} (MEM_SIZE did not list it)",
                               rec.offset)
        if rec.addr + PAGE > length:
            raise DissectError(f"Illegal RAM offset {rec.addr:x} (block {rec.block} is "
                               f"0x{length:x} bytes)", rec.offset)
        if t is R.RamZero:
            self.pages["zero"] += 1
        elif t is R.RamPage:
            self.pages["page"] += 1
        else:
            # Whether a delta decodes does not depend on the page it applies to.
            try:
                xbzrle.decode(rec.data, self._scratch)
            except xbzrle.XbzrleError as e:
                raise DissectError(f"Failed to load XBZRLE page - decode error! ({e})",
                                   rec.offset) from None
            self.pages["xbzrle"] += 1

    def _device(self, rec, ctx):
        sec = self.section
        instance_id = getattr(sec, "instance_id", 0)
        pending, self.pending = self.pending, None
        if pending is None:  # a record the parser sized by itself (a v2 record)
            pending = self.layouts.lookup(rec.idstr, instance_id, rec.version_id)
        desc, source, note = pending
        self.devices += 1
        ctx.source, ctx.note = source, note
        if desc is None:
            ctx.note = "no description of this device: raw bytes"
            return
        if desc_size(desc) != len(rec.data):
            ctx.note = (f"{len(rec.data)} bytes, but the {source} describes {desc_size(desc)}: "
                        "raw bytes")
            return
        ctx.fields, _ = decode_desc(desc, rec.data, 0, len(rec.data), rec.offset)

    def summary(self) -> dict:
        end = self.end
        devs = [str(d.get("name")) for d in self.vmdesc.get("devices", ())] if self.vmdesc else []
        return {"bytes": len(self.data),
                "sections": sum(self.sections.values()),
                "section_types": dict(self.sections),
                "devices": self.devices,
                "pages": {"zero": self.pages["zero"], "page": self.pages["page"],
                          "xbzrle": self.pages["xbzrle"]},
                "ram_blocks": [{"name": n, "length": ln} for n, ln in self.blocks.items()],
                "vmdesc_devices": devs,
                "warning": end.warning if end else None,
                "trailing_bytes": len(self.data) - end.offset if end else 0}


# ---------------------------------------------------------------------------------------------
# Runs of ram page records


@dataclass
class Run:
    kind: str  # "zero", "page", "xbzrle"
    block: str
    addr: int  # first page
    last: int  # last page's address
    count: int
    offset: int  # stream offset of the first record
    end: int  # stream offset after the last record
    named: bool  # the first record names its block
    fill: int = 0
    nbytes: int = 0  # xbzrle: encoded bytes


_KIND = {R.RamZero: "zero", R.RamPage: "page", R.RamXbzrle: "xbzrle"}


class RunCollapser:
    """Consecutive page records of one kind at consecutive addresses of one block become one
    Run; ``add`` returns the run it closed, if any."""

    def __init__(self):
        self.run: Run | None = None

    def add(self, rec, size):
        t = type(rec)
        kind = _KIND[t]
        fill = rec.fill if t is R.RamZero else 0
        r = self.run
        if r is not None and r.kind == kind and r.block == rec.block and \
                rec.addr == r.last + PAGE and r.fill == fill:
            r.last = rec.addr
            r.count += 1
            r.end = rec.offset + size
            if t is R.RamXbzrle:
                r.nbytes += len(rec.data)
            return None
        self.run = Run(kind, rec.block, rec.addr, rec.addr, 1, rec.offset, rec.offset + size,
                       rec.named, fill, len(rec.data) if t is R.RamXbzrle else 0)
        return r

    def flush(self):
        r, self.run = self.run, None
        return r


# ---------------------------------------------------------------------------------------------
# The listing (default view)


def _sec_name(section_type) -> str:
    return F.SECTION_TYPE_NAMES.get(section_type, str(section_type))


def _record_fields(rec) -> dict:
    """A record's dataclass fields, for records this module has no special view of."""
    if is_dataclass(rec):
        return {f.name: getattr(rec, f.name) for f in dc_fields(rec)}
    return dict(vars(rec))


def _plain(v):
    if isinstance(v, (bytes, bytearray, memoryview)):
        b = bytes(v)
        return b.hex() if len(b) <= 64 else f"{b[:32].hex()}... ({len(b)} bytes)"
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return v


class Listing:
    def __init__(self, out, name):
        self.out = out
        self.runs = RunCollapser()
        self.w = 8
        self.write(f"{PROG}: {name}")

    def write(self, s):
        self.out.write(s + "\n")

    def line(self, offset, depth, kind, text=""):
        off = f"{offset:0{self.w}x}" if offset is not None else " " * self.w
        self.write(f"{off}  {'  ' * depth}{kind:<{16 - 2 * depth}} {text}".rstrip())

    def _flush_run(self):
        r = self.runs.flush()
        if r is not None:
            self._run(r)

    def _run(self, r: Run):
        what = r.kind if r.kind != "zero" or r.fill == 0 else f"zero (fill 0x{r.fill:02x})"
        pages = f"{r.count} page{'s' if r.count != 1 else ''}"
        rng = f"0x{r.addr:x}-0x{r.last + PAGE - 1:x}"
        extra = f", {r.nbytes} bytes encoded" if r.kind == "xbzrle" else ""
        named = "" if not r.named else " (names its block)"
        self.line(r.offset, 1, what, f"{r.block} {rng}: {pages}{extra}{named}")

    def record(self, rec, ctx):
        t = type(rec)
        if t in _RAM_PAGE_TYPES:
            closed = self.runs.add(rec, ctx.size)
            if closed is not None:
                self._run(closed)
            return
        self._flush_run()
        if t is R.Header:
            extra = {k: v for k, v in _record_fields(rec).items() if k not in ("offset", "version")}
            more = "".join(f", {k} {_plain(v)}" for k, v in extra.items())
            self.line(rec.offset, 0, "header", f"magic QEVM, version {rec.version}{more}")
        elif t is R.Configuration:
            self.line(rec.offset, 0, "configuration",
                      f"machine type {_quote(rec.name.encode('latin-1'))}")
        elif t is R.SectionHeader:
            text = f"section_id {rec.section_id}  {rec.idstr}"
            if rec.section_type in (F.QEMU_VM_SECTION_START, F.QEMU_VM_SECTION_FULL):
                text += f"  instance {rec.instance_id}  version {rec.version_id}"
            if ctx.note and rec.kind == "ram":
                text += f"  ({ctx.note})"
            self.line(rec.offset, 0, rec.type_name, text)
        elif t is R.RamMemSize:
            self.line(rec.offset, 1, "MEM_SIZE",
                      f"total 0x{rec.total:x} ({format_size(rec.total)}), "
                      f"{len(rec.blocks)} block{'s' if len(rec.blocks) != 1 else ''}")
            off = rec.offset + 8
            for name, length in rec.blocks:
                self.line(off, 2, "block", f"{_quote(name.encode('latin-1'))} length 0x{length:x}"
                          f" ({format_size(length)})")
                off += 1 + len(name.encode("latin-1")) + 8
        elif t is R.RamEOS:
            self.line(rec.offset, 1, "EOS", "end of this section's ram records")
        elif t is R.DeviceState:
            self._device(rec, ctx)
        elif t is R.Footer:
            sec = ctx.section
            who = f" ({sec.idstr})" if sec is not None else ""
            self.line(rec.offset, 1, "footer", f"section_id {rec.section_id}{who} ok")
        elif t is R.EOF:
            self.line(rec.offset, 0, "EOF")
        elif t is R.VMDesc:
            self._vmdesc(rec)
        elif t is R.End:
            if rec.warning:
                self.line(rec.offset, 0, "end", f"warning: {rec.warning}")
            else:
                self.line(rec.offset, 0, "end")
        elif t is R.V2Record:
            self.line(rec.offset, 0, "v2 record",
                      f"{rec.idstr}  instance {rec.instance_id}  version {rec.version_id}  "
                      f"length {rec.length}  ({rec.kind})")
        elif t is R.BlockChunk:
            addr = rec.sector << 9
            what = "zero chunk" if rec.data is None else "1 MiB of data"
            self.line(rec.offset, 1, "disk chunk",
                      f"{rec.device} sector {rec.sector} (0x{addr:x}): {what}")
        elif t is R.BlockProgress:
            self.line(rec.offset, 1, "progress", f"{rec.percent}%")
        elif t is R.BlockEOS:
            self.line(rec.offset, 1, "EOS", "end of this section's block records")
        else:
            f = _record_fields(rec)
            off = f.pop("offset", None)
            self.line(off, 1 if ctx.section is not None else 0, t.__name__,
                      "  ".join(f"{k} {_plain(v)}" for k, v in f.items()))

    def _device(self, rec, ctx):
        src = {"vmdesc": "fields from the vmdesc", "qmon": "fields from qmon's device definition",
               None: "no field layout"}[ctx.source]
        note = f"; {ctx.note}" if ctx.note else ""
        self.line(rec.offset, 1, "state", f"{len(rec.data)} bytes, {src}{note}")
        if ctx.fields is None:
            if rec.data:
                more = " ..." if len(rec.data) > 32 else ""
                self.line(None, 2, "raw", f"{rec.data[:32].hex(' ')}{more}")
            return
        for fv in ctx.fields:
            self._field(fv, 2)

    def _field(self, fv: FieldValue, depth):
        note = f"  [{fv.note}]" if fv.note else ""
        if fv.type == "subsection":
            self.line(fv.offset, depth, "subsection", f"{_quote(fv.name.encode())} version "
                      f"{fv.version}{note}")
            for c in fv.children or ():
                self._field(c, depth + 1)
            return
        if fv.elements is not None:
            n = len(fv.elements)
            if all(e.children is None for e in fv.elements):
                shown = ", ".join(format_value(e, 8) for e in fv.elements[:8])
                more = f", ... ({n} elements)" if n > 8 else ""
                self.line(fv.offset, depth, "field",
                          f"{fv.name} {fv.type}[{n}] = [{shown}{more}]{note}")
                return
            self.line(fv.offset, depth, "field", f"{fv.name} {fv.type}[{n}]"
                      f"{' ' + fv.vmsd_name if fv.vmsd_name else ''}{note}")
            for e in fv.elements:
                self._field(e, depth + 1)
            return
        if fv.children is not None:
            self.line(fv.offset, depth, "field", f"{fv.name} {fv.type}"
                      f"{' ' + fv.vmsd_name if fv.vmsd_name else ''}{note}")
            for c in fv.children:
                self._field(c, depth + 1)
            return
        if fv.value is None:
            self.line(fv.offset, depth, "field", f"{fv.name} {fv.type}{note}")
            return
        size = f" ({fv.size} bytes)" if isinstance(fv.value, bytes) and fv.type != "unused_buffer" \
            else ""
        self.line(fv.offset, depth, "field",
                  f"{fv.name} {fv.type}{size} = {format_value(fv)}{note}")

    def _vmdesc(self, rec):
        try:
            d = json.loads(rec.json)
            devs = [str(x.get("name")) + (f"[{x['instance_id']}]" if x.get("instance_id") else "")
                    for x in d.get("devices", ())]
            text = (f"{len(rec.json)} bytes of JSON, page_size {d.get('page_size')}, "
                    f"{len(devs)} device{'s' if len(devs) != 1 else ''}: {', '.join(devs)}")
        except (ValueError, AttributeError, TypeError) as e:
            text = f"{len(rec.json)} bytes, not valid vmdesc JSON ({e}); QEMU ignores it"
        self.line(rec.offset, 0, "vmdesc", text)

    def error(self, offset, message):
        self._flush_run()
        self.write(f"error at offset 0x{offset:x}: {message}")

    def finish(self, s):
        self._flush_run()
        if s["trailing_bytes"]:
            self.write(f"note: {s['trailing_bytes']} bytes after the vmdesc (a loader never "
                       "reads them)")
        types = ", ".join(f"{n} {t}" for t, n in s["section_types"].items())
        p = s["pages"]
        self.write(f"summary: {s['bytes']} bytes, {s['sections']} sections ({types}), "
                   f"{s['devices']} device states, pages: {p['zero']} zero, {p['page']} page, "
                   f"{p['xbzrle']} xbzrle")


# ---------------------------------------------------------------------------------------------
# JSON


class JsonView:
    def __init__(self, out, name):
        self.out = out
        self.doc = {"stream": name, "records": [], "summary": None, "error": None}
        self.runs = RunCollapser()

    def _add(self, d):
        self.doc["records"].append(d)

    def _flush_run(self):
        r = self.runs.flush()
        if r is not None:
            d = {"offset": r.offset, "type": r.kind, "block": r.block, "addr": r.addr,
                 "addr_end": r.last + PAGE, "count": r.count, "bytes": r.end - r.offset,
                 "named": r.named}
            if r.kind == "zero":
                d["fill"] = r.fill
            if r.kind == "xbzrle":
                d["encoded_bytes"] = r.nbytes
            self._add(d)

    def record(self, rec, ctx):
        t = type(rec)
        if t in _RAM_PAGE_TYPES:
            closed = self.runs.add(rec, ctx.size)
            if closed is not None:
                self.runs.run, keep = closed, self.runs.run
                self._flush_run()
                self.runs.run = keep
            return
        self._flush_run()
        if t is R.Header:
            d = {"offset": rec.offset, "type": "header", "magic": "QEVM"}
            d.update({k: _plain(v) for k, v in _record_fields(rec).items() if k != "offset"})
        elif t is R.Configuration:
            d = {"offset": rec.offset, "type": "configuration", "name": rec.name}
        elif t is R.SectionHeader:
            d = {"offset": rec.offset, "type": "section", "section_type": rec.type_name,
                 "section_id": rec.section_id, "idstr": rec.idstr,
                 "instance_id": rec.instance_id, "version_id": rec.version_id, "kind": rec.kind}
            if rec.section_type in (F.QEMU_VM_SECTION_PART, F.QEMU_VM_SECTION_END):
                d["header_bytes"] = 5
        elif t is R.RamMemSize:
            d = {"offset": rec.offset, "type": "mem_size", "total": rec.total,
                 "blocks": [{"name": n, "length": ln} for n, ln in rec.blocks]}
        elif t is R.RamEOS:
            d = {"offset": rec.offset, "type": "eos"}
        elif t is R.DeviceState:
            sec = ctx.section
            d = {"offset": rec.offset, "type": "device_state", "idstr": rec.idstr,
                 "instance_id": getattr(sec, "instance_id", None), "version_id": rec.version_id,
                 "size": len(rec.data), "source": ctx.source}
            if ctx.note:
                d["note"] = ctx.note
            if ctx.fields is not None:
                d["fields"] = [field_json(f) for f in ctx.fields]
            else:
                d["data"] = rec.data.hex()
        elif t is R.Footer:
            d = {"offset": rec.offset, "type": "footer", "section_id": rec.section_id, "ok": True}
        elif t is R.EOF:
            d = {"offset": rec.offset, "type": "eof"}
        elif t is R.VMDesc:
            d = {"offset": rec.offset, "type": "vmdesc", "length": len(rec.json)}
            try:
                j = json.loads(rec.json)
                d["page_size"] = j.get("page_size")
                d["devices"] = [x.get("name") for x in j.get("devices", ())]
            except (ValueError, AttributeError, TypeError) as e:
                d["note"] = f"not valid vmdesc JSON: {e}"
        elif t is R.End:
            d = {"offset": rec.offset, "type": "end", "warning": rec.warning}
        else:
            d = {k: _plain(v) for k, v in _record_fields(rec).items()}
            d["type"] = "v2_record" if t is R.V2Record else t.__name__
            d.setdefault("offset", None)
        self._add(d)

    def error(self, offset, message):
        self._flush_run()
        self.doc["error"] = {"offset": offset, "message": message}
        self.dump()

    def finish(self, s):
        self._flush_run()
        self.doc["summary"] = s
        self.dump()

    def dump(self):
        self.out.write(json.dumps(self.doc, indent=1) + "\n")


# ---------------------------------------------------------------------------------------------
# The labelled hexdump


_HEX_BYTES = 16
_RAM_FLAG_NAMES = [(F.RAM_SAVE_FLAG_FULL, "FULL"), (F.RAM_SAVE_FLAG_ZERO, "ZERO"),
                   (F.RAM_SAVE_FLAG_MEM_SIZE, "MEM_SIZE"), (F.RAM_SAVE_FLAG_PAGE, "PAGE"),
                   (F.RAM_SAVE_FLAG_XBZRLE, "XBZRLE"), (F.RAM_SAVE_FLAG_EOS, "EOS"),
                   (F.RAM_SAVE_FLAG_CONTINUE, "CONTINUE")]


def _flag_names(word: int) -> str:
    flags = word & ~F.TARGET_PAGE_MASK
    names = [n for bit, n in _RAM_FLAG_NAMES if flags & bit]
    return "|".join(names) or f"0x{flags:x}"


def _ram_spans(rec):
    """(offset, size, label, value) for each field of a ram page record."""
    t = type(rec)
    flags = {R.RamZero: F.RAM_SAVE_FLAG_ZERO, R.RamPage: F.RAM_SAVE_FLAG_PAGE,
             R.RamXbzrle: F.RAM_SAVE_FLAG_XBZRLE}[t]
    if not rec.named:
        flags |= F.RAM_SAVE_FLAG_CONTINUE
    o = rec.offset
    out = [(o, 8, "flags|addr", f"{_flag_names(flags)} addr 0x{rec.addr:x}")]
    o += 8
    if rec.named:
        b = rec.block.encode("latin-1")
        out.append((o, 1, "block idstr len", str(len(b))))
        out.append((o + 1, len(b), "block idstr", _quote(b)))
        o += 1 + len(b)
    if t is R.RamZero:
        out.append((o, 1, "fill byte", f"0x{rec.fill:02x}"))
    elif t is R.RamPage:
        out.append((o, len(rec.data), f"page data ({len(rec.data)} bytes)", ""))
    else:
        out.append((o, 1, "encoding", "XBZRLE"))
        out.append((o + 1, 2, "encoded len", str(len(rec.data))))
        out.extend(_xbzrle_spans(rec.data, o + 3))
    return out


def _uleb_at(src, i):
    if i < len(src) and not src[i] & 0x80:
        return src[i], 1
    if i + 1 < len(src) and not src[i + 1] & 0x80:
        return (src[i] & 0x7F) | (src[i + 1] << 7), 2
    return None


def _xbzrle_spans(src, base):
    """The delta's (zero run, nonzero run, new bytes) pieces, for the hexdump only (the
    record was already checked by decoding it); one span if it does not split cleanly."""
    out, i = [], 0
    while i < len(src):
        z = _uleb_at(src, i)
        nz = z and _uleb_at(src, i + z[1])
        if not nz or i + z[1] + nz[1] + nz[0] > len(src):
            return [(base, len(src), f"xbzrle delta ({len(src)} bytes)", "")]
        out.append((base + i, z[1], "zero run", f"{z[0]} unchanged bytes"))
        i += z[1]
        out.append((base + i, nz[1], "nonzero run", f"{nz[0]} new bytes"))
        i += nz[1]
        out.append((base + i, nz[0], f"new bytes ({nz[0]})", ""))
        i += nz[0]
    return out


class Hexdump:
    """Every field of the stream on a line: offset, bytes (at most 16, then "..."), label.
    Runs of similar ram records show their first two records, then one line for the rest."""

    SHOW_IN_RUN = 2

    def __init__(self, out, name, data, color: bool, collapse: bool = True):
        self.out = out
        self.data = data
        self.collapse = collapse
        self.last_end = 0
        self.pending = None  # (rec, ctx) waiting for the next record's offset
        self.runs = RunCollapser()
        self.hidden = None  # [count, first offset, end offset, first addr, last addr]
        self.run_shown = 0
        self.color = color
        if color:
            from pygments.formatters import Terminal256Formatter

            self.formatter = Terminal256Formatter(style="monokai")
        self.tokens = []
        self.text(f"{PROG}: {name} (hexdump)", "title")

    # Output -----------------------------------------------------------------------------
    def text(self, s, kind="note"):
        tok = {"title": Generic.Heading, "error": Generic.Error}.get(kind, Comment)
        self.tokens.append((tok, s))
        self.tokens.append((Text, "\n"))
        self._maybe_flush()

    def span(self, offset, size, label, value=""):
        raw = bytes(self.data[offset:offset + min(size, _HEX_BYTES)])
        hx = raw.hex(" ")
        if size > _HEX_BYTES:
            hx += " ..."
        toks = self.tokens
        toks.append((Name.Label, f"{offset:08x}"))
        toks.append((Text, "  "))
        toks.append((Number.Hex, f"{hx:<52}"))
        toks.append((Text, " "))
        toks.append((Name.Attribute, label))
        if value:
            toks.append((Text, " "))
            if value.startswith(('"', '= "', "{")):
                tok = String
            elif re.match(r"^(= )?-?(0x)?[0-9a-f]+", value):
                tok = Number
            else:
                tok = Keyword
            toks.append((tok, value))
        toks.append((Text, "\n"))
        self.last_end = max(self.last_end, offset + size)
        self._maybe_flush()

    def _maybe_flush(self, force=False):
        if len(self.tokens) < 4096 and not force:
            return
        if self.color:
            from pygments import format as pformat

            self.out.write(pformat(self.tokens, self.formatter))
        else:
            self.out.write("".join(v for _, v in self.tokens))
        self.tokens = []

    # Records ----------------------------------------------------------------------------
    def record(self, rec, ctx):
        if self.pending is not None:
            self._emit(*self.pending, rec.offset)
        self.pending = (rec, ctx)

    def _emit(self, rec, ctx, next_offset):
        t = type(rec)
        if t in _RAM_PAGE_TYPES and self.collapse:
            closed = self.runs.add(rec, ctx.size)
            if closed is not None:
                self._end_hidden()
                self.run_shown = 0
            if self.run_shown >= self.SHOW_IN_RUN:
                h = self.hidden
                if h is None:
                    self.hidden = [1, rec.offset, rec.offset + ctx.size, rec.addr, rec.addr,
                                   _flag_names(_record_flags(rec)), (rec, ctx)]
                else:
                    h[0] += 1
                    h[2] = rec.offset + ctx.size
                    h[4] = rec.addr
                self.last_end = rec.offset + ctx.size
                return
            self.run_shown += 1
        else:
            self._end_hidden()
            self.runs.flush()
            self.run_shown = 0
        for s in self._spans(rec, ctx):
            self.span(*s)
        if next_offset is not None and next_offset > self.last_end:
            self._unlabelled(self.last_end, next_offset)

    def _end_hidden(self):
        h, self.hidden = self.hidden, None
        if h is not None:
            count, start, end, a0, a1, flags, first = h
            if count == 1:  # a line saying "1 more" would be longer than the record
                for s in self._spans(*first):
                    self.span(*s)
                return
            self.text(f"{start:08x}  ... {count} more {flags} record{'s' if count != 1 else ''} "
                      f"like these ({end - start} bytes), addr 0x{a0:x}-0x{a1 + PAGE - 1:x}")

    def _unlabelled(self, start, end):
        n = end - start
        self.span(start, n, f"unlabelled bytes ({n})")

    def _spans(self, rec, ctx):
        t = type(rec)
        o = rec.offset
        if t in _RAM_PAGE_TYPES:
            return _ram_spans(rec)
        if t is R.Header:
            out = [(o, 4, "magic", '"QEVM"'), (o + 4, 4, "version", str(rec.version))]
            if rec.version == F.QEMU_VM_FILE_VERSION_COMPAT and len(self.data) >= o + 16:
                total = int.from_bytes(self.data[o + 8:o + 16], "big")
                out.append((o + 8, 8, "total_len (v2)", str(total)))
            return out
        if t is R.Configuration:
            b = rec.name.encode("latin-1")
            return [(o, 1, "section_type", "CONFIGURATION"), (o + 1, 4, "name len", str(len(b))),
                    (o + 5, len(b), "name", _quote(b))]
        if t is R.SectionHeader:
            out = [(o, 1, "section_type", rec.type_name),
                   (o + 1, 4, "section_id", str(rec.section_id))]
            if rec.section_type in (F.QEMU_VM_SECTION_START, F.QEMU_VM_SECTION_FULL):
                b = rec.idstr.encode("latin-1")
                out += [(o + 5, 1, "idstr len", str(len(b))),
                        (o + 6, len(b), "idstr", _quote(b)),
                        (o + 6 + len(b), 4, "instance_id", str(rec.instance_id)),
                        (o + 10 + len(b), 4, "version_id", str(rec.version_id))]
            else:
                out[-1] = (o + 1, 4, "section_id", f"{rec.section_id} ({rec.idstr})")
            return out
        if t is R.RamMemSize:
            out = [(o, 8, "flags|addr", f"MEM_SIZE total 0x{rec.total:x}")]
            q = o + 8
            for name, length in rec.blocks:
                b = name.encode("latin-1")
                out += [(q, 1, "block idstr len", str(len(b))),
                        (q + 1, len(b), "block idstr", _quote(b)),
                        (q + 1 + len(b), 8, "block length", f"0x{length:x}")]
                q += 1 + len(b) + 8
            return out
        if t is R.RamEOS:
            return [(o, 8, "flags|addr", "EOS")]
        if t is R.DeviceState:
            if ctx.fields is None:
                return [(o, len(rec.data), f"{rec.idstr} state ({len(rec.data)} bytes)", "")]
            return list(_iter_fields(ctx.fields, rec.idstr))
        if t is R.Footer:
            return [(o, 1, "footer", "0x7e"), (o + 1, 4, "section_id", f"{rec.section_id} ok")]
        if t is R.EOF:
            return [(o, 1, "section_type", "EOF")]
        if t is R.VMDesc:
            preview = rec.json[:48].decode("latin-1")
            preview += "..." if len(rec.json) > 48 else ""
            return [(o, 1, "section_type", "VMDESCRIPTION"),
                    (o + 1, 4, "json len", str(len(rec.json))),
                    (o + 5, len(rec.json), f"vmdesc json ({len(rec.json)} bytes)", preview)]
        if t is R.End:
            return []
        if t is R.V2Record:
            b = rec.idstr.encode("latin-1")
            return [(o, 1, "idstr len", str(len(b))), (o + 1, len(b), "idstr", _quote(b)),
                    (o + 1 + len(b), 4, "instance_id", str(rec.instance_id)),
                    (o + 5 + len(b), 4, "version_id", str(rec.version_id)),
                    (o + 9 + len(b), 4, "record len", str(rec.length))]
        f = _record_fields(rec)
        f.pop("offset", None)
        self.text(f"{o:08x}  {t.__name__} " + "  ".join(f"{k} {_plain(v)}" for k, v in f.items()))
        return []

    def error(self, offset, message):
        if self.pending is not None:
            self._emit(*self.pending, None)
            self.pending = None
        self._end_hidden()
        start = min(self.last_end, offset)
        if offset > start:
            self._unlabelled(start, offset)
        tail = min(len(self.data) - offset, _HEX_BYTES)
        if tail > 0:
            self.span(offset, tail, "<- the error is here")
        self.text(f"error at offset 0x{offset:x}: {message}", "error")
        self._maybe_flush(True)

    def finish(self, s):
        if self.pending is not None:
            rec, ctx = self.pending
            self._emit(rec, ctx, rec.offset)
            self.pending = None
        self._end_hidden()
        if s["trailing_bytes"]:
            self._unlabelled(len(self.data) - s["trailing_bytes"], len(self.data))
        p = s["pages"]
        self.text(f"summary: {s['bytes']} bytes, {s['sections']} sections, "
                  f"{s['devices']} device states, pages: {p['zero']} zero, {p['page']} page, "
                  f"{p['xbzrle']} xbzrle")
        self._maybe_flush(True)


def _record_flags(rec) -> int:
    f = {R.RamZero: F.RAM_SAVE_FLAG_ZERO, R.RamPage: F.RAM_SAVE_FLAG_PAGE,
         R.RamXbzrle: F.RAM_SAVE_FLAG_XBZRLE}[type(rec)]
    return f if rec.named else f | F.RAM_SAVE_FLAG_CONTINUE


def _iter_fields(fields, prefix):
    for fv in fields:
        yield from _field_spans_named(fv, prefix)


def _field_spans_named(fv: FieldValue, prefix):
    """Spans of one decoded member; labels carry the full path (cpu.env.segs[0].base)."""
    path = f"{prefix}.{fv.name}" if prefix else fv.name
    if fv.type == "subsection":
        yield from fv.header
        for c in fv.children or ():
            yield from _field_spans_named(c, fv.name)
        return
    if fv.elements is not None:
        for e in fv.elements:
            yield from _field_spans_named(e, prefix)
        return
    if fv.children is not None:
        for c in fv.children:
            yield from _field_spans_named(c, path)
        return
    label = f"{path} {fv.type}"
    if fv.value is None:
        yield (fv.offset, fv.size, label, f"[{fv.note}]" if fv.note else "")
        return
    if isinstance(fv.value, bytes):
        label += f" ({fv.size} bytes)"
        if fv.type == "unused_buffer":
            yield (fv.offset, fv.size, label, "")
            return
    yield (fv.offset, fv.size, label, "= " + format_value(fv, 0))


# ---------------------------------------------------------------------------------------------
# --extract


_SAFE = re.compile(r"[A-Za-z0-9_.-]")


def safe_name(name: str) -> str:
    """A file name for a block or device idstr ("/rom@etc/acpi/tables",
    "0000:00:01.3/piix4_pm"): bytes outside [A-Za-z0-9_.-] written as %XX, no leading dot."""
    out = []
    for i, b in enumerate(name.encode("utf-8", "surrogateescape")):
        c = chr(b)
        out.append(c if b < 128 and _SAFE.match(c) and not (i == 0 and c == ".") else f"%{b:02X}")
    return "".join(out) or "%"


class Extractor:
    """Writes DIR/ram-<block>.bin (the whole block: zero pages as zeros, PAGE data, XBZRLE
    applied to what the block holds so far) and DIR/<idstr>-<instance>.bin/.json.

    RAM goes out with pwrite into a sparse file, not through a mapping, so extracting a large
    stream keeps no second copy of its RAM in this process."""

    def __init__(self, directory, out, quiet=False):
        self.dir = directory
        self.out = out
        self.quiet = quiet
        os.makedirs(directory, exist_ok=True)
        self.blocks = {}  # name -> [fd, path, length, set of pages written non-zero]
        self.written = []
        self.closed = False
        self._page = bytearray(PAGE)

    def _block(self, name, length):
        path = os.path.join(self.dir, f"ram-{safe_name(name)}.bin")
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        os.ftruncate(fd, length)  # sparse: pages the stream never sends read as zeros
        # A set, not a bitmap: memory follows the pages the stream really sends, not the
        # size it claims.
        self.blocks[name] = [fd, path, length, set()]
        self.written.append((path, length))

    def record(self, rec, ctx):
        t = type(rec)
        if t is R.RamPage:
            b = self.blocks[rec.block]
            os.pwrite(b[0], rec.data, rec.addr)
            b[3].add(rec.addr // PAGE)
        elif t is R.RamZero:
            b = self.blocks[rec.block]
            page = rec.addr // PAGE
            if rec.fill or page in b[3]:
                os.pwrite(b[0], bytes([rec.fill]) * PAGE, rec.addr)
                if rec.fill:
                    b[3].add(page)
                else:
                    b[3].discard(page)
        elif t is R.RamXbzrle:
            b = self.blocks[rec.block]
            buf = self._page
            buf[:] = os.pread(b[0], PAGE, rec.addr).ljust(PAGE, b"\0")
            xbzrle.decode(rec.data, buf)
            os.pwrite(b[0], buf, rec.addr)
            b[3].add(rec.addr // PAGE)
        elif t is R.RamMemSize:
            for name, length in rec.blocks:
                if length > MAX_EXTRACT_BLOCK:
                    raise DissectError(f'RAM block "{name}" claims {length} bytes: --extract '
                                       f"writes at most {format_size(MAX_EXTRACT_BLOCK)} a "
                                       "block", rec.offset)
                if name in self.blocks:
                    if self.blocks[name][2] == length:
                        continue
                    self._close_block(name)
                self._block(name, length)
        elif t is R.DeviceState:
            inst = getattr(ctx.section, "instance_id", 0)
            stem = os.path.join(self.dir, f"{safe_name(rec.idstr)}-{inst}")
            with open(stem + ".bin", "wb") as f:
                f.write(rec.data)
            doc = {"idstr": rec.idstr, "instance_id": inst, "version_id": rec.version_id,
                   "section_id": getattr(ctx.section, "section_id", None),
                   "offset": rec.offset, "size": len(rec.data), "source": ctx.source}
            if ctx.note:
                doc["note"] = ctx.note
            if ctx.fields is not None:
                doc["values"] = {fv.name: _flat_value(fv) for fv in ctx.fields
                                 if fv.type not in ("subsection", "unused_buffer")}
                doc["fields"] = [field_json(fv) for fv in ctx.fields]
            with open(stem + ".json", "w") as f:
                json.dump(doc, f, indent=1)
                f.write("\n")
            self.written.append((stem + ".bin", len(rec.data)))
            self.written.append((stem + ".json", None))

    def _close_block(self, name):
        os.close(self.blocks.pop(name)[0])

    def close(self):
        if self.closed:
            return
        self.closed = True
        for name in list(self.blocks):
            self._close_block(name)
        if not self.quiet:
            for path, size in self.written:
                extra = f" ({size} bytes)" if size is not None else ""
                self.out.write(f"extracted {path}{extra}\n")

    # The list of files goes before the view's last lines (the error or the summary).
    def error(self, offset, message):
        self.close()

    def finish(self, s):
        self.close()


def _flat_value(fv: FieldValue):
    if fv.elements is not None:
        return [_flat_value(e) for e in fv.elements]
    if fv.children is not None:
        return {c.name: _flat_value(c) for c in fv.children}
    return _json_value(fv)


# ---------------------------------------------------------------------------------------------
# Command line


def _args(argv):
    ap = argparse.ArgumentParser(
        prog=PROG, description="Dissect a QEMU savevm/migration stream (version 3, QEMU 7.2) "
                               "and explain every record.")
    ap.add_argument("stream", nargs="?", help="a stream file, or - for stdin")
    ap.add_argument("--tag", help="the snapshot with this tag in the snapshot directory")
    ap.add_argument("--snapshot-dir", help="snapshot directory for --tag "
                                           "(default: qmon's, $QMON_SNAPSHOT_DIR)")
    view = ap.add_mutually_exclusive_group()
    view.add_argument("--hexdump", action="store_true",
                      help="every field's bytes, labelled")
    view.add_argument("--json", action="store_true", help="a machine-readable JSON document")
    ap.add_argument("--extract", metavar="DIR",
                    help="write each RAM block as DIR/ram-<block>.bin and each device's state "
                         "as DIR/<idstr>-<instance>.bin and .json")
    ap.add_argument("--all", action="store_true",
                    help="with --hexdump: show every ram record (no collapsing of runs)")
    ap.add_argument("--color", choices=("auto", "always", "never"), default="auto",
                    help="colour the hexdump (default: when the output is a terminal)")
    args = ap.parse_args(argv)
    if (args.stream is None) == (args.tag is None):
        ap.error("give a stream file (or -), or --tag TAG")
    if args.snapshot_dir and args.tag is None:
        ap.error("--snapshot-dir goes with --tag")
    return args


def _resolve_tag(tag, directory):
    from machine.snapshots import SnapshotStore

    if directory is None:
        from monitor.cli import default_snapshot_dir

        directory = default_snapshot_dir()
    if not os.path.isdir(directory):
        raise _UsageError(f"no snapshot directory '{directory}'")
    store = SnapshotStore(directory)
    info = store.find(tag)
    if info is None:
        raise _UsageError(f"Snapshot '{tag}' does not exist in '{store.dir}'")
    return store.stream_path(info), f"snapshot '{tag}' ({store.stream_path(info)})"


class _UsageError(Exception):
    pass


def main(argv=None) -> int:
    try:
        args = _args(argv)
    except SystemExit as e:  # argparse: usage or --help, already printed
        return e.code if isinstance(e.code, int) else 2
    out = sys.stdout
    closer = None
    try:
        if args.tag is not None:
            path, name = _resolve_tag(args.tag, args.snapshot_dir)
        else:
            path = args.stream
            name = "stdin" if path == "-" else path
        data, closer = open_stream(path)
        views = []
        if args.json:
            views.append(JsonView(out, name))
        elif args.hexdump:
            color = args.color == "always" or (args.color == "auto" and out.isatty())
            views.append(Hexdump(out, name, data, color, collapse=not args.all))
        else:
            views.append(Listing(out, name))
        extractor = None
        if args.extract:
            extractor = Extractor(args.extract, out, quiet=args.json)
            views.insert(0, extractor)
        try:
            ok = Dissector(data, views).run()
        finally:
            if extractor is not None:
                extractor.close()
        out.flush()
        return 0 if ok else 1
    except BrokenPipeError:
        # The reader went away (| head): stop quietly.
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        except OSError:
            pass
        return 1
    except KeyboardInterrupt:
        return 130
    except _UsageError as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        where = f" '{e.filename}'" if e.filename else ""
        print(f"{PROG}: {e.strerror or e}{where}", file=sys.stderr)
        return 1
    except Exception as e:  # never a traceback
        print(f"{PROG}: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    finally:
        if closer is not None:
            try:
                closer()
            except (BufferError, OSError):
                pass


if __name__ == "__main__":
    sys.exit(main())
