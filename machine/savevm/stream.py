"""Writing the stream: big-endian integers and counted strings over any byte sink.

A sink is anything with ``writev(buffers)`` that writes every buffer in order (a file, a socket,
a pipe, a bytearray). The writer never seeks, so the same bytes can go to a file or a socket.

Small fields accumulate in a bytearray; page-sized buffers are queued by reference (memoryviews
of guest RAM) and handed to the sink in batches, so a page costs one list append, not a copy.
"""

from __future__ import annotations

import os
import struct

_BE16 = struct.Struct(">H")
_BE32 = struct.Struct(">I")
_BE64 = struct.Struct(">Q")

# Flush once this many buffers or bytes are queued: large enough that a system call moves
# megabytes, small enough to stay under IOV_MAX and keep memory flat.
_FLUSH_BUFFERS = 1000
_FLUSH_BYTES = 4 << 20


class BytesSink:
    """Collects the stream in memory (tests, the dissector, small streams)."""

    def __init__(self):
        self.data = bytearray()

    def writev(self, buffers):
        for b in buffers:
            self.data += b


class FdSink:
    """Writes to a file descriptor with writev(2), retrying short writes."""

    IOV_MAX = 1024

    def __init__(self, fd: int):
        self.fd = fd

    def writev(self, buffers):
        write_vectored(lambda chunk: os.writev(self.fd, chunk), buffers, self.IOV_MAX)


def write_vectored(send, buffers, iov_max: int = 1024):
    """Write every buffer in order with a scatter-gather call (``send(list) -> bytes
    written``: os.writev, socket.sendmsg), resuming after short writes. Buffers are bytes-like
    objects of single bytes (bytes, bytearray, memoryviews of format 'B')."""
    i, end = 0, len(buffers)
    while i < end:
        chunk = buffers[i:i + iov_max]
        n = send(chunk)
        if n == sum(map(len, chunk)):
            i += len(chunk)
            continue
        # A short write: skip the buffers it took and go on with the rest of the one it cut.
        for b in chunk:
            if n < len(b):
                break
            n -= len(b)
            i += 1
        if n:
            buffers = [memoryview(buffers[i])[n:]] + list(buffers[i + 1:end])
            i, end = 0, len(buffers)


class StreamWriter:
    def __init__(self, sink):
        self.sink = sink
        self._small = bytearray()
        self._queue: list = []
        self._queued = 0
        self.bytes_written = 0  # every byte accepted so far, flushed or not

    # Small fields -------------------------------------------------------
    def put_u8(self, v: int):
        self._small.append(v)
        self.bytes_written += 1

    def put_be16(self, v: int):
        self._small += _BE16.pack(v)
        self.bytes_written += 2

    def put_be32(self, v: int):
        self._small += _BE32.pack(v)
        self.bytes_written += 4

    def put_be64(self, v: int):
        self._small += _BE64.pack(v)
        self.bytes_written += 8

    def put_bytes(self, b):
        self._small += b
        self.bytes_written += len(b)

    def put_counted(self, s: bytes):
        """u8 length then the bytes, QEMU's idstr encoding (no NUL)."""
        if len(s) > 255:
            raise ValueError("name longer than 255 bytes")
        self._small.append(len(s))
        self._small += s
        self.bytes_written += 1 + len(s)

    # Large buffers ------------------------------------------------------
    def put_buffer_ref(self, buf):
        """Queue a large buffer (a page of RAM) without copying it.

        The buffer must not change until the next flush; callers send RAM that either is
        stopped or whose later changes are caught by the dirty log and resent.
        """
        self.put_iov([buf], len(buf))

    def put_iov(self, buffers: list, n: int):
        """Queue ready-made buffers (``n`` bytes in all) by reference, in order: a batch of
        records built at once. The same rule as put_buffer_ref holds for what they view."""
        if self._small:
            self._queue.append(bytes(self._small))
            self._queued += len(self._small)
            self._small.clear()
        self._queue += buffers
        self._queued += n
        self.bytes_written += n
        if len(self._queue) >= _FLUSH_BUFFERS or self._queued >= _FLUSH_BYTES:
            self.flush()

    def flush(self):
        if self._small:
            self._queue.append(bytes(self._small))
            self._small.clear()
        if self._queue:
            self.sink.writev(self._queue)
            self._queue = []
            self._queued = 0


be16 = _BE16
be32 = _BE32
be64 = _BE64
