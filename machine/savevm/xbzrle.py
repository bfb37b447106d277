"""QEMU's XBZRLE page delta encoding (migration/xbzrle.c).

A page is encoded against the copy the receiver already holds as (zero-run, nonzero-run) pairs:
a zero run counts unchanged bytes, a nonzero run counts changed bytes and is followed by them.
Lengths are unsigned LEB128 of at most two bytes. The trailing zero run is omitted.
"""

from __future__ import annotations

import re


class XbzrleError(ValueError):
    pass


def _uleb_small(src, i):
    """(value, bytes used) of a LEB128 number of at most 14 bits, or None."""
    b = src[i]
    if not b & 0x80:
        return b, 1
    if i + 1 >= len(src) or src[i + 1] & 0x80:
        return None
    return (b & 0x7F) | (src[i + 1] << 7), 2


def decode(src, dst, dlen: int = 4096) -> int:
    """Apply encoded ``src`` onto ``dst`` (a writable buffer of ``dlen`` bytes) in place.

    The checks are QEMU's xbzrle_decode_buffer(), including its quirk of wanting two bytes
    left before reading each run length. Raises XbzrleError where QEMU returns -1.
    """
    i = d = 0
    slen = len(src)
    while i < slen:
        if slen - i < 2:
            raise XbzrleError("truncated zero run")
        r = _uleb_small(src, i)
        if r is None or (i and not r[0]):
            raise XbzrleError("bad zero run")
        i += r[1]
        d += r[0]
        if d > dlen:
            raise XbzrleError("zero run past the end of the page")
        if slen - i < 2:
            raise XbzrleError("truncated nonzero run")
        r = _uleb_small(src, i)
        if r is None or not r[0]:
            raise XbzrleError("bad nonzero run")
        i += r[1]
        count = r[0]
        if d + count > dlen or i + count > slen:
            raise XbzrleError("nonzero run past the end of the page")
        dst[d:d + count] = src[i:i + count]
        d += count
        i += count
    return d


def _uleb(n: int) -> bytes:
    return bytes([n]) if n < 0x80 else bytes([(n & 0x7F) | 0x80, n >> 7])


_CHANGED = re.compile(rb"[^\x00]+")


def encode(old, new, limit: int = 4096) -> bytes | None:
    """Encode ``new`` against ``old`` exactly as xbzrle_encode_buffer() does; None where QEMU
    returns -1 (the encoding would not fit in ``limit`` bytes, so the page goes whole). An
    unchanged page encodes to b"".

    The changed bytes are found in C: XOR the pages as integers and let a regular expression
    find the runs of non-zero bytes, which are exactly QEMU's nonzero runs.
    """
    n = len(new)
    diff = (int.from_bytes(old, "little") ^ int.from_bytes(new, "little")).to_bytes(n, "little")
    out = bytearray()
    prev = 0
    for m in _CHANGED.finditer(diff):
        start, end = m.span()
        # QEMU checks for room for two bytes before each run length.
        if len(out) + 2 > limit:
            return None
        out += _uleb(start - prev)
        if len(out) + 2 > limit:
            return None
        out += _uleb(end - start)
        if len(out) + (end - start) > limit:
            return None
        out += new[start:end]
        prev = end
    if prev < n and out and len(out) + 2 > limit:
        return None  # QEMU's check at the top of the loop, before it finds the tail unchanged
    return bytes(out)
