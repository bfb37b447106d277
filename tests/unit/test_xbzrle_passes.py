"""XBZRLE across many passes against a guest that rewrites, zeroes and restores pages: the
destination must end byte for byte equal to the source (the delta chain must never break)."""

import random

import pytest

from machine.machine import Machine
from machine.savevm.savevm import Loader, OutgoingStream
from machine.savevm.stream import StreamWriter


class LateSink:
    """Keeps the buffers it is given and reads them only at the end, as the migration's writer
    thread may: a view of guest RAM shows whatever the guest wrote meanwhile."""

    def __init__(self):
        self.parts = []

    def writev(self, buffers):
        self.parts.extend(buffers)

    @property
    def data(self):
        return b"".join(bytes(b) for b in self.parts)


@pytest.mark.parametrize("seed", range(6))
def test_many_passes_of_deltas_reconstruct_the_source(seed):
    rng = random.Random(seed)
    src = Machine("none", 256 << 10, workload="idle")
    dst = Machine("none", 256 << 10, workload="idle")
    npages = src.ram.npages
    originals = {}
    for p in range(npages):
        if rng.random() < 0.7:
            data = bytes(rng.randrange(256) for _ in range(64)) * 64
            src.ram.write(p * 4096, data)
            originals[p] = data
    w = StreamWriter(LateSink())
    out = OutgoingStream(src, w)
    ram = out.live[0][1]
    ram.enable_xbzrle(64 << 10)  # smaller than RAM: slots get evicted too
    out.header()
    out.setup()
    for _ in range(12):
        out.iterate()
        for _ in range(rng.randrange(5, 40)):
            p = rng.randrange(npages)
            roll = rng.random()
            if roll < 0.2:
                src.ram.write(p * 4096, bytes(4096))  # the page becomes zero
            elif roll < 0.4 and p in originals:
                src.ram.write(p * 4096, originals[p])  # and comes back
            else:
                off = p * 4096 + rng.randrange(4096 - 16)
                src.ram.write(off, bytes(rng.randrange(256) for _ in range(rng.randrange(1, 16))))
        ram.sync()
    out.complete()
    assert ram.stats.xbzrle_pages > 0
    loader = Loader(dst, True)
    loader.feed(bytes(w.sink.data))
    loader.feed_eof()
    assert dst.ram.mem[:] == src.ram.mem[:]


def test_a_page_that_turns_zero_and_comes_back():
    src = Machine("none", 64 << 10, workload="idle")
    dst = Machine("none", 64 << 10, workload="idle")
    w = StreamWriter(LateSink())
    out = OutgoingStream(src, w)
    ram = out.live[0][1]
    ram.enable_xbzrle(64 << 10)
    out.header()
    out.setup()
    page = 3 * 4096
    steps = [b"A" * 4096, b"A" * 2048 + b"B" * 2048, b"A" * 2048 + b"C" * 2048, bytes(4096),
             b"A" * 2048 + b"C" * 2048]
    for content in steps:
        src.ram.write(page, content)
        ram.sync()
        out.iterate()
    out.complete()
    loader = Loader(dst, True)
    loader.feed(w.sink.data)
    loader.feed_eof()
    assert dst.ram.read(page, 4096) == steps[-1]


@pytest.mark.parametrize("seed", range(4))
def test_the_dirty_page_count_follows_the_bitmap(seed):
    """pending_pages() is a running count (counting the bitmap each step cost O(RAM) a step):
    through syncs, budgeted rounds and the batch and one-page paths it must equal the bitmap."""
    from machine.ram import RAMBlock
    from machine.savevm.ram import RamSaveState
    from machine.savevm.stream import BytesSink

    rng = random.Random(seed)
    blk = RAMBlock("pc.ram", 2 << 20)
    for _ in range(100):
        page = rng.randrange(blk.npages)
        blk.write(page * 4096, bytes([rng.randrange(1, 256)]) * rng.choice((8, 4096)))
    st = RamSaveState(blk)
    w = StreamWriter(BytesSink())
    st.setup(w)
    for _ in range(30):
        assert st.pending_pages() == st.bitmap.count(1)
        st.iterate(w, max_bytes=rng.choice((4096, 64 << 10, 1 << 20)))
        assert st.pending_pages() == st.bitmap.count(1)
        for _ in range(rng.randrange(40)):
            blk.write(rng.randrange(blk.npages) * 4096, b"\x01" * 8)
        st.sync()
    st.complete(w)
    assert st.pending_pages() == st.bitmap.count(1) == 0
