"""QEMU's XBZRLE page delta encoding (migration/xbzrle.c).

A page is encoded against the copy the receiver already holds as (zero-run, nonzero-run) pairs:
a zero run counts unchanged bytes, a nonzero run counts changed bytes and is followed by them.
Lengths are unsigned LEB128 of at most two bytes. The trailing zero run is omitted.
"""

from __future__ import annotations


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


def encode(old, new, limit: int = 4096) -> bytes | None:
    """Encode ``new`` against ``old``; None when the encoding would exceed ``limit`` bytes
    (QEMU then sends the page whole). An unchanged page encodes to b""."""
    n = len(new)
    out = bytearray()
    i = 0
    while i < n:
        # zero run: bytes that did not change
        j = i
        while j < n and old[j] == new[j]:
            j += 1
        if j == n:
            break
        zrun = j - i
        k = j
        while k < n and old[k] != new[k]:
            k += 1
        out += _uleb(zrun)
        out += _uleb(k - j)
        out += new[j:k]
        if len(out) > limit:
            return None
        i = k
    return bytes(out)
