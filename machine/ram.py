"""Guest RAM: one block backed by an mmap, with a dirty log of one byte per page.

Anonymous mappings are zero-filled on first touch, so RAM the guest never writes costs no host
memory, and several GiB are fine. With ``-mem-path`` the block is a shared mapping of a file,
so RAM can be filled from outside and compared with ``cmp`` afterwards.
"""

from __future__ import annotations

import mmap
import os

from .savevm.format import TARGET_PAGE_SIZE, ZERO_PAGE

PAGE = TARGET_PAGE_SIZE
_Z8 = bytes(8)


class RAMBlock:
    def __init__(self, idstr: str, size: int, mem_path: str | None = None):
        if size <= 0 or size % PAGE:
            raise ValueError(f"RAM size must be a positive multiple of {PAGE} bytes")
        self.idstr = idstr
        self.size = size
        self.npages = size // PAGE
        self.mem_path = mem_path
        if mem_path:
            fd = os.open(mem_path, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                if os.fstat(fd).st_size < size:
                    os.ftruncate(fd, size)
                self.mem = mmap.mmap(fd, size, mmap.MAP_SHARED)
            finally:
                os.close(fd)
        else:
            self.mem = mmap.mmap(-1, size, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        # One byte per page, set by guest writes and cleared by a migration's dirty sync.
        self.dirty = bytearray(self.npages)

    def is_zero_page(self, offset: int) -> bool:
        mem = self.mem
        # Most non-zero pages differ in their first 8 bytes, which saves a 4 KiB compare.
        return mem[offset:offset + 8] == _Z8 and mem[offset:offset + PAGE] == ZERO_PAGE

    def read(self, addr: int, size: int) -> bytes:
        return self.mem[addr:addr + size]

    def write(self, addr: int, data) -> None:
        self.mem[addr:addr + len(data)] = data
        first, last = addr // PAGE, (addr + len(data) - 1) // PAGE
        self.dirty[first:last + 1] = b"\x01" * (last - first + 1)

    def close(self):
        try:
            self.mem.close()
        except BufferError:
            pass  # a stream still holds a view; the mapping goes with the process
