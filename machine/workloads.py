"""Guest programs. A workload writes guest RAM during guest ticks and marks pages dirty.

Specs (``-workload``):

- ``idle``: writes nothing.
- ``counter[,start=ADDR][,size=SIZE][,speed=PAGES]``: QEMU's migration-test guest. It adds one
  to the first byte of every 4 KiB page in [start, start+size), in order, forever, ``speed``
  pages per second of virtual time (default 10000). Its whole state is in RAM, so it resumes
  correctly after loadvm, reset or migration. Invariant: every first byte equals the first
  page's, except that from one page on they may be exactly one lower (mod 256).
- ``dirty,rate=BYTES,wss=SIZE[,start=ADDR][,seed=N]``: random page writes (8 bytes into a page
  chosen uniformly from the working set), ``rate`` bytes of pages per second.

Sizes take K/M/G suffixes (binary).
"""

from __future__ import annotations

import random

from .ram import PAGE, RAMBlock
from .units import parse_size

_INC = bytes((i + 1) & 0xFF for i in range(256))
# At most this much virtual time is worked off in one tick, so a stalled machine thread does
# not come back with a burst of writes.
_MAX_TICK_S = 0.1


class WorkloadError(ValueError):
    pass


def _parse_opts(spec: str):
    name, _, rest = spec.partition(",")
    opts = {}
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if not eq:
            raise WorkloadError(f"workload option '{item}' needs a value (key=value)")
        opts[key.strip()] = value.strip()
    return name.strip(), opts


def _size_opt(opts, key, default):
    if key not in opts:
        return default
    try:
        return parse_size(opts.pop(key))
    except ValueError:
        raise WorkloadError(f"workload option {key}: invalid size") from None


def _int_opt(opts, key, default):
    if key not in opts:
        return default
    try:
        return int(parse_size(opts.pop(key)))
    except ValueError:
        raise WorkloadError(f"workload option {key}: expected a number") from None


class Workload:
    name = "idle"

    def __init__(self, ram: RAMBlock):
        self.ram = ram
        self.machine = None
        self.throttle = 0  # percent of guest time taken away (auto-converge)

    def attach(self, machine):
        self.machine = machine

    def tick(self, dt: float) -> None:
        pass

    def resync(self) -> None:
        """Pick up where RAM says the program is (after loadvm, reset, incoming migration)."""

    def describe(self) -> list[str]:
        return [f"workload: {self.name}"]

    def spec(self) -> str:
        return self.name


class Counter(Workload):
    name = "counter"

    def __init__(self, ram, start=0, size=None, speed=10000):
        super().__init__(ram)
        size = ram.size - start if size is None else size
        if start % PAGE or size % PAGE or size <= 0 or start + size > ram.size:
            raise WorkloadError("counter: start and size must be page aligned and inside RAM")
        if speed < 0:
            raise WorkloadError("counter: speed must not be negative")
        self.start, self.size, self.speed = start, size, speed
        self.npages = size // PAGE
        self.first_page = start // PAGE
        self.pos = 0
        self.laps = 0
        self.written = 0
        self._carry = 0.0

    def spec(self):
        return f"counter,start=0x{self.start:x},size=0x{self.size:x},speed={self.speed}"

    def _first_bytes(self) -> bytes:
        return self.ram.mem[self.start:self.start + self.size:PAGE]

    def tick(self, dt):
        self._carry += self.speed * min(dt, _MAX_TICK_S) * (100 - self.throttle) / 100
        n = int(self._carry)
        if not n:
            return
        self._carry -= n
        # However fast it is asked to go, a tick does at most two laps: the machine thread
        # must come back to the monitor.
        if n > 2 * self.npages:
            n = 2 * self.npages
            self._carry = 0.0
        mem, dirty = self.ram.mem, self.ram.dirty
        while n:
            k = min(n, self.npages - self.pos)
            a = self.start + self.pos * PAGE
            b = a + k * PAGE
            mem[a:b:PAGE] = mem[a:b:PAGE].translate(_INC)
            p = self.first_page + self.pos
            dirty[p:p + k] = b"\x01" * k
            self.pos += k
            self.written += k
            n -= k
            if self.pos == self.npages:
                self.pos = 0
                self.laps += 1
                if self.machine is not None:
                    self.machine.guest_print(f"counter: lap {self.laps} done")
                    self.machine.guest_disk_log(self.laps, f"counter: lap {self.laps} done")
        if self.machine is not None:
            last = self.start + ((self.pos - 1) % self.npages) * PAGE
            self.machine.guest_registers(rax=mem[last], rbx=self.start + self.pos * PAGE,
                                         rcx=self.laps, rip=0x1000 + (self.written & 0xF) * 4)

    def resync(self):
        fb = self._first_bytes()
        top = fb[0]
        self.pos = (len(fb) - len(fb.lstrip(bytes([top])))) % self.npages
        self._carry = 0.0
        # The lap count lives in RCX on a machine with a cpu (and comes back with it);
        # without one, RAM tells it modulo 256.
        cpu = self.machine.cpu if self.machine is not None else None
        if cpu is not None:
            self.laps = cpu.state["regs"][2]
        else:
            self.laps = (top - 1 if self.pos else top) & 0xFF
        self.written = self.laps * self.npages + self.pos

    def check(self) -> str | None:
        """None when the invariant holds, else where it breaks."""
        fb = self._first_bytes()
        top = fb[0]
        step = len(fb) - len(fb.lstrip(bytes([top])))
        if step == len(fb):
            return None
        low = fb[step]
        if low != (top - 1) & 0xFF:
            return self._broken(step, low, top)
        rest = fb[step:]
        bad = len(rest) - len(rest.lstrip(bytes([low])))
        if bad == len(rest):
            return None
        page = step + bad
        return self._broken(page, fb[page], low)

    def _broken(self, page, found, expected):
        addr = self.start + page * PAGE
        return (f"broken at page {page} (0x{addr:x}): first byte 0x{found:02x}, "
                f"expected 0x{expected:02x}")

    def describe(self):
        problem = self.check()
        fb = self._first_bytes()
        return [
            f"workload: {self.name}",
            f"range: 0x{self.start:x}-0x{self.start + self.size:x} ({self.npages} pages)",
            f"speed: {self.speed} pages/s",
            f"progress: lap {self.laps}, page {self.pos}, {self.written} page writes",
            f"value: 0x{fb[0]:02x} before page {self.pos}" if self.pos else
            f"value: 0x{fb[0]:02x} on every page",
            "invariant: ok" if problem is None else f"invariant: {problem}",
        ]


class Dirty(Workload):
    name = "dirty"

    def __init__(self, ram, rate, wss, start=0, seed=1):
        super().__init__(ram)
        if wss <= 0 or start % PAGE or start + wss > ram.size:
            raise WorkloadError("dirty: the working set (start, wss) must lie inside RAM")
        self.rate, self.wss, self.start = rate, wss, start
        self.first_page = start // PAGE
        self.wss_pages = max(1, wss // PAGE)
        self.rng = random.Random(seed)
        self.seed = seed
        self.written = 0
        self._carry = 0.0

    def spec(self):
        return f"dirty,rate={self.rate},wss={self.wss},start=0x{self.start:x}"

    def tick(self, dt):
        self._carry += self.rate / PAGE * min(dt, _MAX_TICK_S) * (100 - self.throttle) / 100
        n = int(self._carry)
        if not n:
            return
        self._carry -= n
        if n > 4 * self.wss_pages:
            n = 4 * self.wss_pages  # a bounded tick, whatever the rate
            self._carry = 0.0
        mem, dirty, rng = self.ram.mem, self.ram.dirty, self.rng
        first, span = self.first_page, self.wss_pages
        value = self.written
        for _ in range(n):
            page = first + rng.randrange(span)
            off = page * PAGE + (rng.randrange(PAGE // 8) << 3)
            value += 1
            mem[off:off + 8] = value.to_bytes(8, "little")
            dirty[page] = 1
        self.written = value

    def describe(self):
        return [
            f"workload: {self.name}",
            f"working set: 0x{self.start:x}-0x{self.start + self.wss:x} ({self.wss_pages} pages)",
            f"rate: {self.rate} bytes/s ({self.rate // PAGE} pages/s)",
            f"progress: {self.written} page writes",
        ]


def make_workload(spec: str, ram: RAMBlock) -> Workload:
    name, opts = _parse_opts(spec)
    if name == "idle":
        w = Workload(ram)
    elif name == "counter":
        w = Counter(ram, start=_size_opt(opts, "start", 0), size=_size_opt(opts, "size", None),
                    speed=_int_opt(opts, "speed", 10000))
    elif name == "dirty":
        if "rate" not in opts or "wss" not in opts:
            raise WorkloadError("dirty: needs rate=BYTES and wss=SIZE")
        w = Dirty(ram, rate=_size_opt(opts, "rate", 0), wss=_size_opt(opts, "wss", 0),
                  start=_size_opt(opts, "start", 0), seed=_int_opt(opts, "seed", 1))
    else:
        raise WorkloadError(f"unknown workload '{name}' (idle, counter, dirty)")
    if opts:
        raise WorkloadError(f"{name}: unknown option '{next(iter(opts))}'")
    return w
