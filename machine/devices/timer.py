from __future__ import annotations

from ..vmstate import Field, VMStateDescription
from . import Device


class Timer(Device):
    """QEMU's "timer" section (softmmu/cpu-timers.c): the virtual clock's offsets.

    With the guest stopped QEMU's cpu_clock_offset holds the frozen virtual clock in ns, which is
    what this section carries and how the virtual clock comes back on load. qmon counts its ticks
    at 1 GHz, so cpu_ticks_offset equals the clock too.
    """

    idstr = "timer"
    vmsd = VMStateDescription("timer", 2, 1, (
        Field("cpu_ticks_offset", "int64"),
        Field("unused", "unused_buffer", 8),
        Field("cpu_clock_offset", "int64", version_id=2),
    ))

    def pre_save(self):
        ns = self.machine.clock.now_ns()
        return {"cpu_ticks_offset": ns, "cpu_clock_offset": ns}

    def check(self, values):
        pass

    def post_load(self, values):
        # A version-1 stream has no clock offset; its tick count is the best estimate.
        ns = values["cpu_clock_offset"] if values["cpu_clock_offset"] else values["cpu_ticks_offset"]
        self.machine.clock.set_ns(max(0, ns))
