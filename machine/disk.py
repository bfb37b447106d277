"""A disk for the lab machine (``-drive file=PATH``): a file mapped into memory, with a dirty
log of one byte per 1 MiB chunk, the unit QEMU's block migration sends."""

from __future__ import annotations

import mmap
import os

CHUNK = 1 << 20  # QEMU's BLK_MIG_BLOCK_SIZE
SECTOR_BITS = 9


class DiskError(ValueError):
    pass


class Disk:
    def __init__(self, path: str, name: str = "disk0"):
        self.path = path
        self.name = name
        try:
            fd = os.open(path, os.O_RDWR)
        except OSError as e:
            raise DiskError(f"Could not open '{path}': {e.strerror}") from None
        try:
            size = os.fstat(fd).st_size
            if size == 0 or size % CHUNK:
                raise DiskError(f"'{path}': qmon disks are a whole number of MiB "
                                f"(this one is {size} bytes)")
            self.mem = mmap.mmap(fd, size, mmap.MAP_SHARED)
        finally:
            os.close(fd)
        self.size = size
        self.nchunks = size // CHUNK
        self.dirty = bytearray(self.nchunks)

    def write(self, offset: int, data: bytes):
        self.mem[offset:offset + len(data)] = data
        first, last = offset // CHUNK, (offset + len(data) - 1) // CHUNK
        self.dirty[first:last + 1] = b"\x01" * (last - first + 1)
