"""One parser for the savevm stream: bytes in, typed records out, no I/O.

Feed it bytes with ``feed()``, say ``feed_eof()`` when the source is exhausted, and pull
records with ``next()`` until it returns None (needs more bytes) or an ``End`` record. The
loader, incoming migration and the dissector all use this parser, so the stream the dissector
explains is exactly the stream the loader reads.

The container has no length fields: the size of a FULL section's payload is known only from the
device's field list. The parser therefore asks a ``describe(idstr, instance_id, version_id)``
callback what a section holds; it raises ``StreamError`` for a section it cannot accept
(unknown idstr, unsupported version), which is how QEMU's loader fails too.

Checks that concern the stream's structure live here with QEMU's messages (magic, version,
configuration, section types, footers, ram record flags). Checks against the local machine (machine
type, block sizes, page offsets) belong to the loader.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from . import format as F

_BE32 = struct.Struct(">I")
_BE64 = struct.Struct(">Q")

MAX_CONFIG_NAME = 256  # QEMU machine type names are short; bound what a stream may claim
MAX_RAM_BLOCKS = 256
MAX_VMDESC = 64 << 20


def printable(text: str) -> str:
    """Names read from a stream are untrusted bytes: show anything outside printable ASCII
    as \\xNN, so a message stays one readable line."""
    return "".join(c if " " <= c <= "~" else f"\\x{ord(c):02x}" for c in text)


class StreamError(Exception):
    """A stream that cannot be loaded. ``offset`` is where the offending field starts.
    The message may quote names from the stream; it is made printable here, once for all."""

    def __init__(self, message: str, offset: int | None = None):
        message = printable(message)
        super().__init__(message)
        self.message = message
        self.offset = offset


# ---------------------------------------------------------------------------------------------
# Records. ``offset`` is the stream offset of the record's first byte.


@dataclass(slots=True)
class Header:
    offset: int
    version: int


@dataclass(slots=True)
class Configuration:
    offset: int
    name: str


@dataclass(slots=True)
class SectionHeader:
    offset: int
    section_type: int  # F.QEMU_VM_SECTION_START/PART/END/FULL
    section_id: int
    idstr: str
    instance_id: int
    version_id: int
    kind: str  # "ram" or "device"

    @property
    def type_name(self) -> str:
        return F.SECTION_TYPE_NAMES[self.section_type]


@dataclass(slots=True)
class RamMemSize:
    offset: int
    total: int
    blocks: list  # [(idstr, length)]


@dataclass(slots=True)
class RamZero:
    offset: int
    block: str
    addr: int
    fill: int
    named: bool  # the record carried the block name (CONTINUE clear)


@dataclass(slots=True)
class RamPage:
    offset: int
    block: str
    addr: int
    data: bytes
    named: bool


@dataclass(slots=True)
class RamXbzrle:
    offset: int
    block: str
    addr: int
    data: bytes
    named: bool


@dataclass(slots=True)
class RamEOS:
    offset: int


@dataclass(slots=True)
class BlockChunk:
    """One 1 MiB chunk of a disk in the "block" section; ``data`` None for a zero chunk."""

    offset: int
    device: str
    sector: int
    data: bytes | None


@dataclass(slots=True)
class BlockProgress:
    offset: int
    percent: int


@dataclass(slots=True)
class BlockEOS:
    offset: int


@dataclass(slots=True)
class DeviceState:
    offset: int
    idstr: str
    version_id: int
    data: bytes


@dataclass(slots=True)
class V2Record:
    """A record of the version 2 container (reference section 6). ``kind`` is "ram",
    "device", or "skip" (the v2 loader's lax answer to a record it does not know); the
    payload's records follow it (for "skip" nothing does: its bytes are passed over)."""

    offset: int
    idstr: str
    instance_id: int
    version_id: int
    length: int
    kind: str
    note: str | None = None


@dataclass(slots=True)
class Command:
    """A QEMU_VM_COMMAND record: be16 command, be16 length, data (return path, ping)."""

    offset: int
    cmd: int
    data: bytes


@dataclass(slots=True)
class Footer:
    offset: int
    section_id: int


@dataclass(slots=True)
class EOF:
    offset: int


@dataclass(slots=True)
class VMDesc:
    offset: int
    json: bytes


@dataclass(slots=True)
class End:
    """No more records. ``warning`` carries QEMU's complaint about a missing vmdesc, if any."""

    offset: int
    warning: str | None = None


@dataclass(slots=True)
class _Section:
    idstr: str
    instance_id: int
    version_id: int
    kind: str
    size: int  # payload size for devices


# Parser states.
(_S_HEADER, _S_CONFIG, _S_TOP, _S_RAM, _S_DEVICE, _S_FOOTER, _S_AFTER_EOF, _S_END, _S_DONE,
 _S_V2_TOP, _S_V2_SKIP, _S_BLOCK, _S_VMDESC_SKIP) = range(13)

_BLOCK_CHUNK = 1 << 20

_PAGE = F.TARGET_PAGE_SIZE
_PAGE_CONT = F.RAM_SAVE_FLAG_PAGE | F.RAM_SAVE_FLAG_CONTINUE
_ZERO_CONT = F.RAM_SAVE_FLAG_ZERO | F.RAM_SAVE_FLAG_CONTINUE
_FLAGS = _PAGE - 1
# ram_run() checks up to _RUN PAGE records' headers with one unpack: a first pass over RAM
# sends them back to back, one page after another.
_REC = _PAGE + 8
_RUN = 256
_RUN_MIN = 16
_RUN_HEADERS: dict = {}


def _run_headers(k: int) -> struct.Struct:
    st = _RUN_HEADERS[k] = struct.Struct(">" + "Q4096x" * k)
    return st


class Parser:
    def __init__(self, describe, describe_v2=None, keep_vmdesc: bool = True):
        """``describe(idstr, instance_id, version_id)`` returns ``("ram", None)`` or
        ``("device", payload_size)``, or raises StreamError. For version 2 streams,
        ``describe_v2`` may answer more laxly: ``("skip", note)`` for a record to pass over,
        or ``("device", size, note, version)`` to load a record at another version than it
        claims."""
        self._describe = describe
        self._describe_v2 = describe_v2
        # A loader never uses the vmdesc: it passes over it without holding it in memory.
        self._keep_vmdesc = keep_vmdesc
        self._vmdesc_off = 0
        self.version = None
        self._v2_end = 0  # stream offset where the v2 records end
        self._skip_left = 0
        self._buf = bytearray()
        self._pos = 0
        self._end = 0
        self._base = 0  # stream offset of _buf[0]
        self._eof = False
        self._state = _S_HEADER
        self._sections: dict[int, _Section] = {}
        self._current: _Section | None = None
        self._current_id = 0
        self._last_block: str | None = None

    # Input -----------------------------------------------------------------------------------
    # The buffer is a bytearray of fixed capacity holding unread bytes in [_pos, _end). A
    # source may read straight into its free space (``fill``), so a migration's pages are
    # copied once from the kernel into the buffer and once from the buffer into guest RAM.
    def _reserve(self, n: int) -> None:
        """Make room for ``n`` more bytes after ``_end``, dropping what was consumed."""
        buf, pos, end = self._buf, self._pos, self._end
        if len(buf) - end >= n:
            return
        k = end - pos
        if pos and len(buf) - k >= n:
            buf[:k] = buf[pos:end]  # same length: never resizes, so views may exist
        else:
            # Double what is pending, so that a long record fed in pieces is copied a few
            # times, not once a piece; size nothing by the old capacity.
            new = bytearray(max(2 * k, k + n, 1 << 16))
            new[:k] = buf[pos:end]
            self._buf = new
        self._base += pos
        self._pos = 0
        self._end = k

    def feed(self, data) -> None:
        n = len(data)
        self._reserve(n)
        self._buf[self._end:self._end + n] = data
        self._end += n

    def fill(self, readinto, size: int = 4 << 20) -> int:
        """Read up to ``size`` bytes into the buffer with ``readinto(memoryview) -> count``
        (a socket's recv_into, a file's readinto); 0 means the source is exhausted."""
        self._reserve(size)
        with memoryview(self._buf) as mv:
            part = mv[self._end:self._end + size]
            try:
                n = readinto(part) or 0
            finally:
                part.release()
        self._end += n
        return n

    def feed_eof(self) -> None:
        self._eof = True

    @property
    def offset(self) -> int:
        """Stream offset of the next unread byte."""
        return self._base + self._pos

    def _have(self, n: int) -> bool:
        if self._end - self._pos >= n:
            return True
        if self._eof:
            where = f" in section '{self._current.idstr}'" if self._current else ""
            raise StreamError(f"truncated stream: unexpected end of data at offset {self.offset}{where}",
                              self.offset)
        return False

    # Output ----------------------------------------------------------------------------------
    def next(self):
        """The next record, or None when more bytes are needed."""
        state = self._state
        if state == _S_RAM:
            return self._ram_record()
        if state == _S_TOP:
            return self._top()
        if state == _S_FOOTER:
            return self._footer()
        if state == _S_DEVICE:
            return self._device()
        if state == _S_BLOCK:
            return self._block_record()
        if state == _S_V2_TOP:
            return self._v2_top()
        if state == _S_V2_SKIP:
            return self._v2_skip()
        if state == _S_VMDESC_SKIP:
            return self._vmdesc_skip()
        if state == _S_HEADER:
            return self._header()
        if state == _S_CONFIG:
            return self._config()
        if state == _S_AFTER_EOF:
            return self._after_eof()
        if state == _S_END:
            self._state = _S_DONE
            return End(self.offset)
        return None  # after End: nothing more, whatever is fed

    def ram_run(self, idstr: str, size: int, mem=None, populate=None, clear=None) -> int:
        """The hot path of a migration: consume the plain records that follow in block
        ``idstr`` (CONTINUE PAGE, and CONTINUE ZERO with a zero fill) whose pages lie inside
        ``size``. When ``mem`` is given, pages are copied into it, ``populate(addr, length)``
        is called before a run of consecutive pages is written, and ``clear(addr)`` applies a
        ZERO record.

        No record objects are made. Anything else (a named block, another flag, an offset out
        of range, a record not wholly buffered) stops the run and is left for ``next()``,
        which reports it as usual. Returns the number of records consumed."""
        if self._state != _S_RAM or self._last_block != idstr:
            return 0
        buf, p, end = self._buf, self._pos, self._end
        unpack = _BE64.unpack_from
        count = 0
        with memoryview(buf) as mv:
            while True:
                k = min(_RUN, (end - p) // _REC)
                if k >= _RUN_MIN:
                    st = _RUN_HEADERS.get(k) or _run_headers(k)
                    words = st.unpack_from(buf, p)
                    w0 = words[0]
                    a0 = w0 - _PAGE_CONT
                    span = k * _PAGE
                    if (w0 & _FLAGS == _PAGE_CONT and a0 + span <= size
                            and words == tuple(range(w0, w0 + span, _PAGE))):
                        if mem is not None:
                            if populate is not None:
                                populate(a0, span)
                            q = p + 8
                            for a in range(a0, a0 + span, _PAGE):
                                mem[a:a + _PAGE] = mv[q:q + _PAGE]
                                q += _REC
                        p += k * _REC
                        count += k
                        continue
                # One record at a time for a while (mixed zero and normal pages, say).
                stop = False
                for _ in range(_RUN):
                    left = end - p
                    if left < 8:
                        stop = True
                        break
                    (w,) = unpack(buf, p)
                    flags = w & _FLAGS
                    a = w - flags
                    if flags == _PAGE_CONT:
                        if left < _REC or a + _PAGE > size:
                            stop = True
                            break
                        if mem is not None:
                            mem[a:a + _PAGE] = mv[p + 8:p + 8 + _PAGE]
                        p += _REC
                    elif flags == _ZERO_CONT:
                        if left < 9 or a + _PAGE > size or buf[p + 8]:
                            stop = True
                            break
                        if mem is not None:
                            clear(a)
                        p += 9
                    else:
                        stop = True
                        break
                    count += 1
                if stop:
                    break
        self._pos = p
        return count

    @property
    def done(self) -> bool:
        return self._state == _S_DONE

    def records(self):
        """Iterate over the records available now (stops when more bytes are needed)."""
        while True:
            rec = self.next()
            if rec is None:
                return
            yield rec
            if isinstance(rec, End):
                return

    # States ----------------------------------------------------------------------------------
    def _header(self):
        off = self.offset
        if self._eof and self._end - self._pos < 8:
            # QEMU reads zeros past the end of a short file: the magic check fails first.
            head = bytes(self._buf[self._pos:self._end]).ljust(8, b"\0")
            if int.from_bytes(head[:4], "big") != F.QEMU_VM_FILE_MAGIC:
                raise StreamError("Not a migration stream", off)
            raise StreamError("Unsupported migration stream version", off + 4)
        if not self._have(8):
            return None
        magic, version = struct.unpack_from(">II", self._buf, self._pos)
        if magic != F.QEMU_VM_FILE_MAGIC:
            raise StreamError("Not a migration stream", off)
        if version == F.QEMU_VM_FILE_VERSION_COMPAT:
            if not self._have(16):
                return None
            (total,) = _BE64.unpack_from(self._buf, self._pos + 8)
            self._pos += 16
            self.version = 2
            self._v2_end = self.offset + total
            self._state = _S_V2_TOP
            return Header(off, version)
        if version != F.QEMU_VM_FILE_VERSION:
            raise StreamError("Unsupported migration stream version", off + 4)
        self._pos += 8
        self.version = 3
        self._state = _S_CONFIG
        return Header(off, version)

    # Version 2: records with lengths, no section types, no footers, no configuration.
    def _v2_top(self):
        off = self.offset
        if off >= self._v2_end:
            self._state = _S_DONE
            return End(off)
        if not self._have(1):
            return None
        buf, p = self._buf, self._pos
        n = buf[p]
        if not self._have(1 + n + 12):
            return None
        idstr = bytes(buf[p + 1: p + 1 + n]).decode("latin-1")
        instance_id, version_id, length = struct.unpack_from(">III", buf, p + 1 + n)
        self._pos = p + 1 + n + 12
        start = self.offset
        if start + length > self._v2_end:
            raise StreamError(f"v2 record '{idstr}' of {length} bytes runs past the stream's "
                              "total length", off)
        note = None
        if self._describe_v2 is not None:
            answer = self._describe_v2(idstr, instance_id, version_id)
        else:
            try:
                answer = self._describe(idstr, instance_id, version_id)
            except StreamError as e:
                answer = ("skip", e.message)
        kind = answer[0]
        if kind == "skip":
            note = answer[1]
            self._skip_left = length
            self._state = _S_V2_SKIP
            return V2Record(off, idstr, instance_id, version_id, length, "skip", note)
        sec = _Section(idstr, instance_id, version_id, kind, answer[1] or 0)
        if kind == "device":
            if len(answer) > 2:
                note = answer[2]
                sec.version_id = answer[3]
            # Lax as v2 was: a payload of another size is cut or padded to the layout used.
            sec.size = answer[1]
            self._v2_device_len = length
        self._current = sec
        self._v2_record_end = start + length
        self._state = _S_RAM if kind == "ram" else _S_DEVICE
        return V2Record(off, idstr, instance_id, version_id, length, kind, note)

    def _skipped(self, what: str) -> bool:
        """Pass over ``_skip_left`` bytes as they arrive, never holding them; True once all
        have gone."""
        n = min(self._skip_left, self._end - self._pos)
        self._pos += n
        self._skip_left -= n
        if self._skip_left and self._eof:
            raise StreamError(f"truncated stream: {what} ends early", self.offset)
        return not self._skip_left

    def _vmdesc_skip(self):
        if not self._skipped("the vmdesc"):
            return None
        self._state = _S_END
        return VMDesc(self._vmdesc_off, b"")

    def _v2_skip(self):
        if not self._skipped("a v2 record"):
            return None
        self._state = _S_V2_TOP
        return self.next()

    def _config(self):
        if not self._have(1):
            return None
        off = self.offset
        if self._buf[self._pos] != F.QEMU_VM_CONFIGURATION:
            raise StreamError("Configuration section missing", off)
        if not self._have(5):
            return None
        (n,) = _BE32.unpack_from(self._buf, self._pos + 1)
        if n > MAX_CONFIG_NAME:
            raise StreamError(f"Configuration section: machine type name of {n} bytes is too long",
                              off + 1)
        if not self._have(5 + n):
            return None
        name = bytes(self._buf[self._pos + 5: self._pos + 5 + n]).decode("latin-1")
        self._pos += 5 + n
        self._state = _S_TOP
        return Configuration(off, name)

    def _top(self):
        if not self._have(1):
            return None
        buf, p, off = self._buf, self._pos, self.offset
        t = buf[p]
        if t in (F.QEMU_VM_SECTION_START, F.QEMU_VM_SECTION_FULL):
            if not self._have(6):
                return None
            (sid,) = _BE32.unpack_from(buf, p + 1)
            n = buf[p + 5]
            if not self._have(6 + n + 8):
                return None
            idstr = bytes(buf[p + 6: p + 6 + n]).decode("latin-1")
            instance_id, version_id = struct.unpack_from(">II", buf, p + 6 + n)
            kind, size = self._describe(idstr, instance_id, version_id)
            sec = _Section(idstr, instance_id, version_id, kind, size or 0)
            self._sections[sid] = sec
            self._pos = p + 6 + n + 8
        elif t in (F.QEMU_VM_SECTION_PART, F.QEMU_VM_SECTION_END):
            if not self._have(5):
                return None
            (sid,) = _BE32.unpack_from(buf, p + 1)
            sec = self._sections.get(sid)
            if sec is None:
                raise StreamError(f"Unknown savevm section {sid}", off)
            self._pos = p + 5
        elif t == F.QEMU_VM_EOF:
            self._pos = p + 1
            self._state = _S_AFTER_EOF
            return EOF(off)
        elif t == F.QEMU_VM_COMMAND:
            if not self._have(5):
                return None
            cmd, n = struct.unpack_from(">HH", buf, p + 1)
            if cmd not in (F.MIG_CMD_OPEN_RETURN_PATH, F.MIG_CMD_PING):
                raise StreamError(f"VM_COMMAND 0x{cmd:x} unknown (len 0x{n:x})", off)
            if not self._have(5 + n):
                return None
            data = bytes(buf[p + 5: p + 5 + n])
            self._pos = p + 5 + n
            return Command(off, cmd, data)
        else:
            raise StreamError(f"Unknown savevm section type {t}", off)
        self._current = sec
        self._current_id = sid
        self._state = {"ram": _S_RAM, "block": _S_BLOCK}.get(sec.kind, _S_DEVICE)
        return SectionHeader(off, t, sid, sec.idstr, sec.instance_id, sec.version_id, sec.kind)

    def _block_record(self):
        """QEMU's block migration records: be64 (sector << 9 | flags), see savevm/block.py."""
        if not self._have(8):
            return None
        buf, p, off = self._buf, self._pos, self.offset
        (word,) = _BE64.unpack_from(buf, p)
        flags, sector = word & 0x1FF, word >> 9
        if flags == 0x02:  # EOS
            self._pos = p + 8
            self._state = _S_FOOTER
            return BlockEOS(off)
        if flags == 0x04:  # PROGRESS
            self._pos = p + 8
            return BlockProgress(off, sector)
        if flags & 0x01 and not flags & ~0x09:  # DEVICE_BLOCK, maybe ZERO_BLOCK
            if not self._have(9):
                return None
            n = buf[p + 8]
            zero = bool(flags & 0x08)
            end = p + 9 + n + (0 if zero else _BLOCK_CHUNK)
            if not self._have(end - p):
                return None
            name = bytes(buf[p + 9: p + 9 + n]).decode("latin-1")
            data = None if zero else bytes(buf[p + 9 + n: end])
            self._pos = end
            return BlockChunk(off, name, sector, data)
        raise StreamError(f"Unknown block migration flags: 0x{flags:x}", off)

    def _device(self):
        sec = self._current
        if self.version == 2:
            # Lax as v2 was: a payload of another size is cut or padded to the layout used;
            # what lies beyond the layout is passed over, never held in memory.
            length = self._v2_device_len
            take = min(length, sec.size)
            if not self._have(take):
                return None
            off = self.offset
            data = bytes(self._buf[self._pos: self._pos + take])
            self._pos += take
            if length > take:
                self._skip_left = length - take
                self._state = _S_V2_SKIP
            else:
                self._state = _S_V2_TOP
            return DeviceState(off, sec.idstr, sec.version_id, data.ljust(sec.size, b"\0"))
        if not self._have(sec.size):
            return None
        off = self.offset
        data = bytes(self._buf[self._pos: self._pos + sec.size])
        self._pos += sec.size
        self._state = _S_FOOTER
        return DeviceState(off, sec.idstr, sec.version_id, data)

    def _footer(self):
        if not self._have(1):
            return None
        off = self.offset
        sec = self._current
        if self._buf[self._pos] != F.QEMU_VM_SECTION_FOOTER:
            raise StreamError(f"Missing section footer for {sec.idstr}", off)
        if not self._have(5):
            return None
        (sid,) = _BE32.unpack_from(self._buf, self._pos + 1)
        if sid != self._current_id:
            raise StreamError(f"Mismatched section id in footer for {sec.idstr} - "
                              f"read 0x{sid:x} expected 0x{self._current_id:x}", off + 1)
        self._pos += 5
        self._current = None
        self._state = _S_TOP
        return Footer(off, sid)

    def _ram_record(self):
        if not self._have(8):
            return None
        buf, p, off = self._buf, self._pos, self.offset
        (word,) = _BE64.unpack_from(buf, p)
        flags = word & ~F.TARGET_PAGE_MASK
        addr = word & F.TARGET_PAGE_MASK
        if flags == F.RAM_SAVE_FLAG_EOS:
            self._pos = p + 8
            if self.version == 2:
                if self.offset != self._v2_record_end:
                    raise StreamError("v2 ram record: its length does not match its contents",
                                      off)
                self._state = _S_V2_TOP
            else:
                self._state = _S_FOOTER
            return RamEOS(off)
        if flags == F.RAM_SAVE_FLAG_MEM_SIZE:
            return self._mem_size(off, addr)
        kind = flags & ~F.RAM_SAVE_FLAG_CONTINUE
        if kind not in (F.RAM_SAVE_FLAG_ZERO, F.RAM_SAVE_FLAG_PAGE, F.RAM_SAVE_FLAG_XBZRLE):
            raise StreamError(f"Unknown combination of migration flags: 0x{flags:x}", off)
        q = p + 8
        if flags & F.RAM_SAVE_FLAG_CONTINUE:
            block = self._last_block
            if block is None:
                # QEMU's words for a CONTINUE record with no block named before it.
                raise StreamError("Ack, bad migration stream!", off)
            named = False
        else:
            if not self._have(9):
                return None
            n = buf[q]
            if not self._have(9 + n):
                return None
            block = bytes(buf[q + 1: q + 1 + n]).decode("latin-1")
            q += 1 + n
            named = True
        if kind == F.RAM_SAVE_FLAG_PAGE:
            end = q + F.TARGET_PAGE_SIZE
            if not self._have(end - p):
                return None
            rec = RamPage(off, block, addr, bytes(buf[q:end]), named)
        elif kind == F.RAM_SAVE_FLAG_ZERO:
            if not self._have(q + 1 - p):
                return None
            end = q + 1
            rec = RamZero(off, block, addr, buf[q], named)
        else:
            if not self._have(q + 3 - p):
                return None
            if buf[q] != F.ENCODING_FLAG_XBZRLE:
                raise StreamError("Failed to load XBZRLE page - wrong compression!", self._base + q)
            (n,) = struct.unpack_from(">H", buf, q + 1)
            if n > F.TARGET_PAGE_SIZE:
                raise StreamError("Failed to load XBZRLE page - len overflow!", self._base + q + 1)
            end = q + 3 + n
            if not self._have(end - p):
                return None
            rec = RamXbzrle(off, block, addr, bytes(buf[q + 3:end]), named)
        self._last_block = block
        self._pos = end
        return rec

    def _mem_size(self, off, total):
        # Parse the whole block list before consuming anything, so a partial list waits for
        # more bytes instead of leaving the parser half-way through a record.
        buf, q = self._buf, self._pos + 8
        blocks = []
        remaining = total
        while remaining > 0:
            if len(blocks) >= MAX_RAM_BLOCKS:
                raise StreamError(f"MEM_SIZE lists more than {MAX_RAM_BLOCKS} RAM blocks", off)
            if not self._have(q + 1 - self._pos):
                return None
            n = buf[q]
            if not self._have(q + 1 + n + 8 - self._pos):
                return None
            name = bytes(buf[q + 1: q + 1 + n]).decode("latin-1")
            (length,) = _BE64.unpack_from(buf, q + 1 + n)
            if length == 0 or length > remaining:
                raise StreamError(f"MEM_SIZE total 0x{total:x} does not match the RAM block "
                                  f"lengths (block \"{name}\" has 0x{length:x})", self._base + q)
            blocks.append((name, length))
            remaining -= length
            q += 1 + n + 8
        self._pos = q
        return RamMemSize(off, total, blocks)

    def _after_eof(self):
        off = self.offset
        if self._end - self._pos < 1:
            if not self._eof:
                return None
            self._state = _S_DONE
            # QEMU reads a 0 byte past the end of the file and reports that.
            return End(off, "Expected vmdescription section, but got 0")
        t = self._buf[self._pos]
        if t != F.QEMU_VM_VMDESCRIPTION:
            self._state = _S_DONE
            return End(off, f"Expected vmdescription section, but got {t}")
        if not self._have(5):
            return None
        (n,) = _BE32.unpack_from(self._buf, self._pos + 1)
        if n > MAX_VMDESC:
            raise StreamError(f"vmdesc of {n} bytes is larger than {MAX_VMDESC}", off + 1)
        if not self._keep_vmdesc:
            self._pos += 5
            self._skip_left = n
            self._vmdesc_off = off
            self._state = _S_VMDESC_SKIP
            return self._vmdesc_skip()
        if not self._have(5 + n):
            return None
        data = bytes(self._buf[self._pos + 5: self._pos + 5 + n])
        self._pos += 5 + n
        self._state = _S_END
        return VMDesc(off, data)


def parse_bytes(data: bytes, describe):
    """All records of a complete stream held in memory (tests, small streams)."""
    p = Parser(describe)
    p.feed(data)
    p.feed_eof()
    out = []
    while True:
        rec = p.next()
        out.append(rec)
        if isinstance(rec, End):
            return out
