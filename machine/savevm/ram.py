"""The "ram" live section (QEMU's migration/ram.c): START sends the block list, PART rounds send
dirty pages, END sends what is left. Zero pages go as ZERO records, others as PAGE records."""

from __future__ import annotations

import mmap
import struct
import time

from . import format as F
from . import xbzrle
from .records import StreamError

PAGE = F.TARGET_PAGE_SIZE
_ZERO = F.ZERO_PAGE
_FLAG_ZERO_CONT = F.RAM_SAVE_FLAG_ZERO | F.RAM_SAVE_FLAG_CONTINUE
_FLAG_PAGE_CONT = F.RAM_SAVE_FLAG_PAGE | F.RAM_SAVE_FLAG_CONTINUE
# QEMU checks the clock every 64 pages inside an iterate round.
_TIME_CHECK_PAGES = 64
_WORDS = PAGE // 8
MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22)  # Linux 5.14
MADV_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23)
_READ_REGION_SHIFT = 20
_can_populate = True  # False once the kernel has said it cannot (before 5.14)


def _populate(mem, advice: int, addr: int, length: int):
    """Map a run of pages with one system call instead of a page fault each (about 5 us here,
    1.4 s a GiB of fresh memory written page by page). Only a hint: without kernel support
    the pages fault in as they are touched."""
    global _can_populate
    if _can_populate:
        try:
            mem.madvise(advice, addr, length)
        except (OSError, ValueError):
            _can_populate = False


_BATCH = 256  # pages whose records are built at once


def _batch_pages(max_bytes, sent) -> int:
    """How many pages the next batch may hold: a byte budget is kept to within 64 pages."""
    if max_bytes is None:
        return _BATCH
    return max(_TIME_CHECK_PAGES, min(_BATCH, (max_bytes - sent) // PAGE))


_HEADERS: dict = {}


def _headers(k: int) -> struct.Struct:
    st = _HEADERS[k] = struct.Struct(f">{k}Q")
    return st


def _send_batch(w, mem, mv, words, p: int, e: int):
    """Queue the records of pages [p, e) of a block already named (CONTINUE): ZERO for a zero
    page, PAGE with a view of RAM for the others. Returns (zero pages, normal pages).

    A page whose first word is not zero cannot be a zero page, so random RAM needs no compare
    at all; its headers are packed in one call."""
    off0, offe = p * PAGE, e * PAGE
    # Reading a -mem-path file's pages one by one cost a page fault each.
    _populate(mem, MADV_POPULATE_READ, off0, offe - off0)
    firsts = words[p * _WORDS:e * _WORDS:_WORDS].tolist()
    k = e - p
    if 0 not in firsts:
        hv = memoryview((_HEADERS.get(k) or _headers(k)).pack(
            *range(off0 | _FLAG_PAGE_CONT, offe, PAGE)))
        iov = [None] * (2 * k)
        iov[0::2] = [hv[i:i + 8] for i in range(0, 8 * k, 8)]
        iov[1::2] = [mv[o:o + PAGE] for o in range(off0, offe, PAGE)]
        w.put_iov(iov, k * (PAGE + 8))
        return 0, k
    iov = []
    small = bytearray()
    zero_n = 0
    off = off0
    for f in firsts:
        if not f and mem[off:off + PAGE] == _ZERO:
            small += (off | _FLAG_ZERO_CONT).to_bytes(8, "big")
            small.append(0)
            zero_n += 1
        else:
            small += (off | _FLAG_PAGE_CONT).to_bytes(8, "big")
            iov.append(bytes(small))
            small.clear()
            iov.append(mv[off:off + PAGE])
        off += PAGE
    if small:
        iov.append(bytes(small))
    w.put_iov(iov, zero_n * 9 + (k - zero_n) * (PAGE + 8))
    return zero_n, k - zero_n


class RamStats:
    def __init__(self):
        self.zero_pages = 0  # QEMU's "duplicate"
        self.normal_pages = 0
        self.bytes = 0  # bytes of ram records written
        self.dirty_sync_count = 0
        self.dirtied_last_sync = 0  # pages newly dirtied since the sync before
        self.xbzrle_pages = 0
        self.xbzrle_bytes = 0
        self.xbzrle_cache_miss = 0
        self.xbzrle_overflow = 0
        self.xbzrle_encoded_input = 0  # page bytes that went through the encoder


class XbzrleCache:
    """QEMU's page cache for XBZRLE: direct-mapped, a power-of-two number of pages."""

    def __init__(self, size: int):
        n = max(1, size // PAGE)
        self.slots = 1 << (n.bit_length() - 1)
        self.size = self.slots * PAGE
        self.data = bytearray(self.size)
        self.addr = [-1] * self.slots

    def lookup(self, page: int):
        slot = page & (self.slots - 1)
        if self.addr[slot] != page:
            return None
        return slot

    def insert(self, page: int, content) -> int:
        slot = page & (self.slots - 1)
        self.addr[slot] = page
        self.data[slot * PAGE:(slot + 1) * PAGE] = content
        return slot


class RamSaveState:
    """Outgoing state of the ram section over one stream."""

    def __init__(self, block):
        self.block = block
        self.bitmap = bytearray()
        self.dirty_pages = 0  # pages set in the bitmap: counting them each step cost O(RAM) a step
        self.cursor = 0
        self.last_sent_block = None
        self.stats = RamStats()
        self.xbzrle: XbzrleCache | None = None
        # QEMU turns XBZRLE on once the first round over RAM is complete.
        self.xbzrle_enabled = False
        self.last_stage = False

    def enable_xbzrle(self, cache_size: int):
        self.xbzrle = XbzrleCache(cache_size)

    # QEMU's migration_bitmap_sync: fold the guest's dirty log into the migration bitmap.
    def sync(self):
        log = self.block.dirty
        newly = 0
        if log.find(1) >= 0:
            bm = self.bitmap
            n = len(bm)
            log_int = int.from_bytes(log, "little")
            bm_int = int.from_bytes(bm, "little")
            newly = (log_int & ~bm_int).bit_count()
            bm[:] = (bm_int | log_int).to_bytes(n, "little")
            self.dirty_pages += newly
            log[:] = bytes(n)
        self.stats.dirty_sync_count += 1
        self.stats.dirtied_last_sync = newly

    def pending_pages(self) -> int:
        return self.dirty_pages

    def setup(self, w):
        blk = self.block
        # Every page starts dirty, and the guest's own log restarts from here.
        self.bitmap = bytearray(b"\x01") * blk.npages
        self.dirty_pages = blk.npages
        blk.dirty[:] = bytes(blk.npages)
        self.stats.dirty_sync_count = 1
        # QEMU counts page records and each iterate round's EOS as transferred ram, not the
        # block list here nor the EOS that ends the END section.
        w.put_be64(blk.size | F.RAM_SAVE_FLAG_MEM_SIZE)
        w.put_counted(blk.idstr.encode())
        w.put_be64(blk.size)
        w.put_be64(F.RAM_SAVE_FLAG_EOS)

    def save_all(self, w):
        """The whole of RAM as one payload (the version 2 container's ram record): the block
        list, every page, EOS."""
        blk = self.block
        self.bitmap = bytearray(b"\x01") * blk.npages
        self.dirty_pages = blk.npages
        w.put_be64(blk.size | F.RAM_SAVE_FLAG_MEM_SIZE)
        w.put_counted(blk.idstr.encode())
        w.put_be64(blk.size)
        self._send(w, None, None)
        w.put_be64(F.RAM_SAVE_FLAG_EOS)

    def iterate(self, w, deadline: float | None = None, max_bytes: int | None = None) -> bool:
        """Send dirty pages until none is left (True), or the deadline or byte budget is hit."""
        done = self._send(w, deadline, max_bytes)
        w.put_be64(F.RAM_SAVE_FLAG_EOS)
        self.stats.bytes += 8
        return done

    def complete(self, w):
        for _ in self.complete_steps(w):
            pass

    def complete_steps(self, w, step_s=None, step_bytes=None):
        """The END section's pages, yielding between shares (see OutgoingStream)."""
        self.last_stage = True
        self.sync()
        while not self._send(w, None if step_s is None else time.monotonic() + step_s,
                             step_bytes):
            yield
        w.put_be64(F.RAM_SAVE_FLAG_EOS)

    def _header(self, w, off, flag):
        """A record header, naming the block only when it changed (QEMU's CONTINUE rule)."""
        blk = self.block
        if self.last_sent_block is blk:
            w.put_be64(off | flag | F.RAM_SAVE_FLAG_CONTINUE)
        else:
            w.put_be64(off | flag)
            w.put_counted(blk.idstr.encode())
            self.last_sent_block = blk

    def _xbzrle_page(self, w, page, off):
        """QEMU's save_xbzrle_page(): True when the page is dealt with (sent encoded, or
        unchanged and skipped); otherwise the bytes to send as a normal page. Those are the
        copy now in the cache, as in QEMU: the guest may change RAM before the page goes out,
        and the next delta must apply to exactly what the destination received."""
        cache, st = self.xbzrle, self.stats
        mem = self.block.mem
        current = mem[off:off + PAGE]
        slot = cache.lookup(page)
        if slot is None:
            st.xbzrle_cache_miss += 1
            if not self.last_stage:
                cache.insert(page, current)
            return current
        old = cache.data[slot * PAGE:(slot + 1) * PAGE]
        enc = xbzrle.encode(old, current)
        st.xbzrle_encoded_input += PAGE
        if not self.last_stage and enc != b"":
            cache.data[slot * PAGE:(slot + 1) * PAGE] = current
        if enc == b"":
            return True  # unchanged since it was last sent: nothing to send
        if enc is None:
            st.xbzrle_overflow += 1
            st.xbzrle_bytes += PAGE
            return current
        before = w.bytes_written
        self._header(w, off, F.RAM_SAVE_FLAG_XBZRLE)
        w.put_u8(F.ENCODING_FLAG_XBZRLE)
        w.put_be16(len(enc))
        w.put_bytes(enc)
        st.xbzrle_pages += 1
        st.xbzrle_bytes += w.bytes_written - before
        return True

    def _send(self, w, deadline, max_bytes) -> bool:
        blk = self.block
        mem = blk.mem
        mv = memoryview(mem)
        words = mv.cast("Q")  # a page's first 8 bytes are words[page * 512]
        bm = self.bitmap
        find = bm.find
        npages = blk.npages
        stats = self.stats
        start_bytes = w.bytes_written
        zero_n = normal_n = 0
        xb = self.xbzrle is not None and self.xbzrle_enabled
        pos = self.cursor
        checked = 0
        since_yield = 0
        try:
            while True:
                p = find(1, pos)
                if p < 0:
                    self._round_complete()
                    xb = self.xbzrle is not None and self.xbzrle_enabled
                    if pos == 0:
                        self.cursor = 0
                        return True
                    pos = 0  # wrap round to the pages before the cursor
                    continue
                q = find(0, p)
                if q < 0:
                    q = npages
                while p < q:
                    if self.last_sent_block is blk and not xb:
                        # The hot path: a batch of pages, their records built at once.
                        e = min(q, p + _batch_pages(max_bytes, w.bytes_written - start_bytes))
                        z, n = _send_batch(w, mem, mv, words, p, e)
                        # Once a MiB of pages is queued, hand the GIL over: the writer thread
                        # is back from its last sendmsg and would otherwise wait out the
                        # switch interval while the wire idles (1 GiB of random pages to a
                        # plain receiver: 0.68 s -> 0.61 s; zero pages have nothing to wait for).
                        since_yield += n
                        if since_yield >= _BATCH:
                            since_yield = 0
                            time.sleep(0)
                        zero_n += z
                        normal_n += n
                        bm[p:e] = bytes(e - p)
                        self.dirty_pages -= e - p
                        checked += e - p
                        p = e
                    else:
                        self._send_page(w, mv, p, xb)
                        bm[p] = 0
                        self.dirty_pages -= 1
                        checked += 1
                        p += 1
                        if checked % _TIME_CHECK_PAGES:
                            continue
                    if ((deadline is not None and time.monotonic() >= deadline) or
                            (max_bytes is not None
                             and w.bytes_written - start_bytes >= max_bytes)):
                        self.cursor = p
                        return False
                pos = q
        finally:
            stats.zero_pages += zero_n
            stats.normal_pages += normal_n
            stats.bytes += w.bytes_written - start_bytes
            words.release()
            mv.release()

    def _send_page(self, w, mv, page, xb):
        """One page the slow way: the block named, or XBZRLE in play."""
        blk, stats = self.block, self.stats
        off = page * PAGE
        if blk.is_zero_page(off):
            self._header(w, off, F.RAM_SAVE_FLAG_ZERO)
            w.put_u8(0)
            stats.zero_pages += 1
            if xb and not self.last_stage:
                # QEMU's xbzrle_cache_zero_page(): the cache must know it is zero
                slot = self.xbzrle.lookup(page)
                if slot is not None:
                    self.xbzrle.data[slot * PAGE:(slot + 1) * PAGE] = _ZERO
            return
        done = self._xbzrle_page(w, page, off) if xb else None
        if done is not True:
            self._header(w, off, F.RAM_SAVE_FLAG_PAGE)
            w.put_buffer_ref(mv[off:off + PAGE] if done is None else done)
            stats.normal_pages += 1

    def _round_complete(self):
        if self.xbzrle is not None:
            self.xbzrle_enabled = True


class RamLoadState:
    """Checks ram records against the local block and, when applying, writes them to RAM."""

    def __init__(self, block):
        self.block = block
        self._scratch = bytearray(PAGE)
        self._read_mapped = bytearray((block.size >> _READ_REGION_SHIFT) + 1)

    def run(self, parser, apply: bool) -> int:
        """Let the parser copy a run of plain records straight into RAM (the hot path)."""
        blk = self.block
        if apply:
            return parser.ram_run(blk.idstr, blk.size, blk.mem, self._map_for_writing,
                                  self._clear)
        return parser.ram_run(blk.idstr, blk.size)

    def _map_for_writing(self, addr: int, length: int):
        _populate(self.block.mem, MADV_POPULATE_WRITE, addr, length)

    def _clear(self, addr: int, fill: int = 0):
        """A ZERO record. Like QEMU, leave an already-zero page untouched, so that it stays
        unallocated. Reading it to see maps its 1 MiB region for reading first, in one call:
        for untouched memory that maps the shared zero page and allocates nothing."""
        blk = self.block
        if not fill:
            region = addr >> _READ_REGION_SHIFT
            if not self._read_mapped[region]:
                self._read_mapped[region] = 1
                start = region << _READ_REGION_SHIFT
                _populate(blk.mem, MADV_POPULATE_READ, start,
                          min(1 << _READ_REGION_SHIFT, blk.size - start))
            if blk.is_zero_page(addr):
                return
        blk.mem[addr:addr + PAGE] = bytes([fill]) * PAGE

    def _check_block(self, rec):
        blk = self.block
        if rec.block != blk.idstr:
            raise StreamError(f"Can't find block {rec.block}", rec.offset)
        if rec.addr + PAGE > blk.size:
            raise StreamError(f"Illegal RAM offset {rec.addr:x}", rec.offset)

    def mem_size(self, rec):
        for name, length in rec.blocks:
            if name != self.block.idstr:
                raise StreamError(f'Unknown ramblock "{name}", cannot accept migration',
                                  rec.offset)
            if length != self.block.size:
                raise StreamError(f"Size mismatch: {name}: 0x{length:x} != 0x{self.block.size:x}"
                                  ": Invalid argument", rec.offset)

    def page(self, rec, apply: bool):
        self._check_block(rec)
        if apply:
            self.block.mem[rec.addr:rec.addr + PAGE] = rec.data

    def zero(self, rec, apply: bool):
        self._check_block(rec)
        if apply:
            self._clear(rec.addr, rec.fill)

    def xbzrle(self, rec, apply: bool):
        self._check_block(rec)
        a = rec.addr
        target = self._scratch
        if apply:
            target[:] = self.block.mem[a:a + PAGE]
        try:
            xbzrle.decode(rec.data, target)
        except xbzrle.XbzrleError:
            raise StreamError("Failed to load XBZRLE page - decode error!", rec.offset) from None
        if apply:
            self.block.mem[a:a + PAGE] = target
