"""The "ram" live section (QEMU's migration/ram.c): START sends the block list, PART rounds send
dirty pages, END sends what is left. Zero pages go as ZERO records, others as PAGE records."""

from __future__ import annotations

import time

from . import format as F
from .records import StreamError

PAGE = F.TARGET_PAGE_SIZE
_Z8 = bytes(8)
_ZERO = F.ZERO_PAGE
_FLAG_ZERO_CONT = F.RAM_SAVE_FLAG_ZERO | F.RAM_SAVE_FLAG_CONTINUE
_FLAG_PAGE_CONT = F.RAM_SAVE_FLAG_PAGE | F.RAM_SAVE_FLAG_CONTINUE
# QEMU checks the clock every 64 pages inside an iterate round.
_TIME_CHECK_PAGES = 64


class RamStats:
    def __init__(self):
        self.zero_pages = 0  # QEMU's "duplicate"
        self.normal_pages = 0
        self.bytes = 0  # bytes of ram records written
        self.dirty_sync_count = 0


class RamSaveState:
    """Outgoing state of the ram section over one stream."""

    def __init__(self, block):
        self.block = block
        self.bitmap = bytearray()
        self.cursor = 0
        self.last_sent_block = None
        self.stats = RamStats()

    # QEMU's migration_bitmap_sync: fold the guest's dirty log into the migration bitmap.
    def sync(self):
        log = self.block.dirty
        if log.find(1) >= 0:
            bm = self.bitmap
            bm_int = int.from_bytes(bm, "little") | int.from_bytes(log, "little")
            bm[:] = bm_int.to_bytes(len(bm), "little")
            log[:] = bytes(len(log))
        self.stats.dirty_sync_count += 1

    def pending_pages(self) -> int:
        return self.bitmap.count(1)

    def setup(self, w):
        blk = self.block
        # Every page starts dirty, and the guest's own log restarts from here.
        self.bitmap = bytearray(b"\x01") * blk.npages
        blk.dirty[:] = bytes(blk.npages)
        self.stats.dirty_sync_count = 1
        start = w.bytes_written
        w.put_be64(blk.size | F.RAM_SAVE_FLAG_MEM_SIZE)
        w.put_counted(blk.idstr.encode())
        w.put_be64(blk.size)
        w.put_be64(F.RAM_SAVE_FLAG_EOS)
        self.stats.bytes += w.bytes_written - start

    def iterate(self, w, deadline: float | None = None, max_bytes: int | None = None) -> bool:
        """Send dirty pages until none is left (True), or the deadline or byte budget is hit."""
        done = self._send(w, deadline, max_bytes)
        w.put_be64(F.RAM_SAVE_FLAG_EOS)
        self.stats.bytes += 8
        return done

    def complete(self, w):
        self.sync()
        self._send(w, None, None)
        w.put_be64(F.RAM_SAVE_FLAG_EOS)
        self.stats.bytes += 8

    def _send(self, w, deadline, max_bytes) -> bool:
        blk = self.block
        mem = blk.mem
        mv = memoryview(mem)
        bm = self.bitmap
        find = bm.find
        npages = blk.npages
        small = w._small
        put_ref = w.put_buffer_ref
        stats = self.stats
        start_bytes = w.bytes_written
        zero_n = normal_n = 0
        name = blk.idstr.encode()
        named_prefix = bytes([len(name)]) + name
        pos = self.cursor
        checked = 0
        try:
            while True:
                p = find(1, pos)
                if p < 0:
                    if pos == 0:
                        self.cursor = 0
                        return True
                    pos = 0  # wrap round to the pages before the cursor
                    continue
                q = find(0, p)
                if q < 0:
                    q = npages
                for page in range(p, q):
                    off = page * PAGE
                    if self.last_sent_block is blk:
                        if mem[off:off + 8] == _Z8 and mem[off:off + PAGE] == _ZERO:
                            small += (off | _FLAG_ZERO_CONT).to_bytes(8, "big")
                            small.append(0)
                            w.bytes_written += 9
                            zero_n += 1
                        else:
                            small += (off | _FLAG_PAGE_CONT).to_bytes(8, "big")
                            w.bytes_written += 8
                            put_ref(mv[off:off + PAGE])
                            normal_n += 1
                    else:
                        zero = blk.is_zero_page(off)
                        flag = F.RAM_SAVE_FLAG_ZERO if zero else F.RAM_SAVE_FLAG_PAGE
                        small += (off | flag).to_bytes(8, "big")
                        small += named_prefix
                        w.bytes_written += 8 + len(named_prefix)
                        if zero:
                            small.append(0)
                            w.bytes_written += 1
                            zero_n += 1
                        else:
                            put_ref(mv[off:off + PAGE])
                            normal_n += 1
                        self.last_sent_block = blk
                    bm[page] = 0
                    checked += 1
                    if checked % _TIME_CHECK_PAGES == 0:
                        if len(small) > (1 << 20):
                            w.flush()
                        if ((deadline is not None and time.monotonic() >= deadline) or
                                (max_bytes is not None
                                 and w.bytes_written - start_bytes >= max_bytes)):
                            self.cursor = page + 1
                            return False
                pos = q
        finally:
            stats.zero_pages += zero_n
            stats.normal_pages += normal_n
            stats.bytes += w.bytes_written - start_bytes
            mv.release()


class RamLoadState:
    """Checks ram records against the local block and, when applying, writes them to RAM."""

    def __init__(self, block):
        self.block = block
        self._scratch = bytearray(PAGE)

    def _check_block(self, rec):
        blk = self.block
        if rec.block != blk.idstr:
            raise StreamError(f'Unknown ramblock "{rec.block}", cannot accept migration',
                              rec.offset)
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
            mem, a = self.block.mem, rec.addr
            # Like QEMU, leave an already-zero page untouched so it stays unallocated.
            if rec.fill or mem[a:a + PAGE] != _ZERO:
                mem[a:a + PAGE] = bytes([rec.fill]) * PAGE

    def xbzrle(self, rec, apply: bool):
        from .xbzrle import XbzrleError, decode

        self._check_block(rec)
        a = rec.addr
        target = self._scratch
        if apply:
            target[:] = self.block.mem[a:a + PAGE]
        try:
            decode(rec.data, target)
        except XbzrleError:
            raise StreamError("Failed to load XBZRLE page - decode error!", rec.offset) from None
        if apply:
            self.block.mem[a:a + PAGE] = target
