"""x, xp, pmemsave: guest memory, read on the machine thread."""

from __future__ import annotations

from .. import render
from . import CommandError, PlainError, command

_CHUNK = 1 << 20


def _dump(session, fmt, addr, virtual: bool):
    m = session.machine
    if fmt.format == "i" or (virtual and m.cpu is None):
        if m.cpu is None:
            raise PlainError("Can not dump without CPU")
        raise CommandError("qmon has no disassembler: format 'i' is not supported")
    size = m.ram.size

    def read_chunk(a, n):
        # The lab cpu runs with paging off, so virtual and physical addresses coincide.
        a &= (1 << 64) - 1
        return m.ram.read(a, min(n, size - a)) if a < size else b""

    # Render a window at a time: a huge count streams out without holding the machine thread
    # (or memory) for the whole dump.
    wsize = fmt.size if fmt.size > 0 else 1
    total = max(0, fmt.count) * wsize
    line_bytes = 8 if wsize == 1 else 16
    window = 4096 * line_bytes
    done = 0
    while done < total:
        n = min(window, total - done)
        base = addr + done
        data = m.run(read_chunk, base, n)

        def read(a, k, base=base, data=data):
            off = a - base
            return data[off:off + k] if off + k <= len(data) else None

        spec = type(fmt)(n // wsize, fmt.format, fmt.size)
        lines = render.memory_dump(read, base, spec)
        for line in lines:
            session.out(line)
        if lines and lines[-1].endswith("Cannot access memory"):
            break
        done += n


@command("x", "fmt:/,addr:l", "/fmt addr", "dump guest memory at a virtual address")
def x(session, fmt, addr):
    _dump(session, fmt, addr, virtual=True)


@command("xp", "fmt:/,addr:l", "/fmt addr", "dump guest memory at a physical address")
def xp(session, fmt, addr):
    _dump(session, fmt, addr, virtual=False)


@command("pmemsave", "val:l,size:i,filename:s", "addr size file",
         "save 'size' bytes of physical memory from 'addr' to a file", completion="file")
def pmemsave(session, val, size, filename):
    m = session.machine
    try:
        f = open(filename, "wb")
    except OSError as e:
        raise CommandError(f"Could not open '{filename}': {e.strerror}") from None
    ram_size = m.ram.size

    def chunk(a, n):
        # Outside RAM reads as zeros, as QEMU's cpu_physical_memory_read does.
        data = m.ram.read(a, max(0, min(n, ram_size - a))) if a < ram_size else b""
        return data + bytes(n - len(data))

    with f:
        done = 0
        while done < size:
            n = min(_CHUNK, size - done)
            try:
                f.write(m.run(chunk, val + done, n))
            except OSError:
                raise CommandError("An IO error has occurred") from None
            done += n
