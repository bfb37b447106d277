"""The "block" live section (QEMU's migration/block.c, what `migrate -b` adds): the disk goes
in 1 MiB chunks as a second live section whose PART records interleave with ram's.

Records, each a be64 of (sector << 9 | flags): DEVICE_BLOCK (then u8 len, device name, and
1 MiB of data unless ZERO_BLOCK), PROGRESS (sector field = percent done), EOS.
"""

from __future__ import annotations

import time

from ..disk import CHUNK, SECTOR_BITS
from .records import StreamError

BLK_MIG_FLAG_DEVICE_BLOCK = 0x01
BLK_MIG_FLAG_EOS = 0x02
BLK_MIG_FLAG_PROGRESS = 0x04
BLK_MIG_FLAG_ZERO_BLOCK = 0x08
_ZERO_CHUNK = bytes(CHUNK)


class BlockStats:
    def __init__(self):
        self.bytes = 0
        self.chunks = 0


class BlockSaveState:
    def __init__(self, disk):
        self.disk = disk
        self.bitmap = bytearray()
        self.stats = BlockStats()
        self._progress = -1

    def sync(self):
        d = self.disk
        for i in range(d.nchunks):
            if d.dirty[i]:
                self.bitmap[i] = 1
        d.dirty[:] = bytes(d.nchunks)

    def pending_bytes(self) -> int:
        return self.bitmap.count(1) * CHUNK

    def setup(self, w):
        self.bitmap = bytearray(b"\x01") * self.disk.nchunks
        self.disk.dirty[:] = bytes(self.disk.nchunks)
        w.put_be64(BLK_MIG_FLAG_EOS)

    def _send_chunk(self, w, i):
        d = self.disk
        start = w.bytes_written
        data = d.mem[i * CHUNK:(i + 1) * CHUNK]
        flags = BLK_MIG_FLAG_DEVICE_BLOCK
        zero = data == _ZERO_CHUNK
        if zero:
            flags |= BLK_MIG_FLAG_ZERO_BLOCK
        w.put_be64(((i * CHUNK) >> SECTOR_BITS << SECTOR_BITS) | flags)
        w.put_counted(d.name.encode())
        if not zero:
            w.put_bytes(data)
        self.bitmap[i] = 0
        self.stats.chunks += 1
        self.stats.bytes += w.bytes_written - start

    def _send(self, w, deadline, max_bytes) -> bool:
        start = w.bytes_written
        while True:
            i = self.bitmap.find(1)
            if i < 0:
                return True
            self._send_chunk(w, i)
            total = self.disk.nchunks
            progress = (total - self.bitmap.count(1)) * 100 // total
            if progress != self._progress:
                self._progress = progress
                w.put_be64((progress << SECTOR_BITS) | BLK_MIG_FLAG_PROGRESS)
            w.flush()
            if deadline is not None and time.monotonic() >= deadline:
                return False
            if max_bytes is not None and w.bytes_written - start >= max_bytes:
                return False

    def iterate(self, w, deadline=None, max_bytes=None) -> bool:
        done = self._send(w, deadline, max_bytes)
        w.put_be64(BLK_MIG_FLAG_EOS)
        return done

    def complete(self, w):
        self.sync()
        self._send(w, None, None)
        w.put_be64((100 << SECTOR_BITS) | BLK_MIG_FLAG_PROGRESS)
        w.put_be64(BLK_MIG_FLAG_EOS)


class BlockLoadState:
    def __init__(self, disk):
        self.disk = disk

    def chunk(self, rec, apply: bool):
        d = self.disk
        if d is None or rec.device != d.name:
            raise StreamError(f"Error unknown block device {rec.device}", rec.offset)
        addr = rec.sector << SECTOR_BITS
        if addr % CHUNK or addr + CHUNK > d.size:
            raise StreamError(f"block: chunk at sector {rec.sector} is outside the disk",
                              rec.offset)
        if apply:
            d.mem[addr:addr + CHUNK] = rec.data if rec.data is not None else _ZERO_CHUNK
