from __future__ import annotations

from ..vmstate import Field, VMStateDescription
from . import Device


class Serial(Device):
    """A 16550-style UART. The guest writes lines to it; they reach the monitor's output when
    the machine was started with ``-serial stdio``."""

    idstr = "serial"
    vmsd = VMStateDescription("serial", 1, 1, (
        Field("divider", "uint16", default=12),
        Field("ier", "uint8"),
        Field("iir", "uint8", default=1),
        Field("lcr", "uint8", default=3),
        Field("mcr", "uint8"),
        Field("lsr", "uint8", default=0x60),
        Field("msr", "uint8", default=0xB0),
        Field("scr", "uint8"),
        Field("tx_bytes", "uint64"),
    ))

    def write_line(self, text: str):
        self.state["tx_bytes"] += len(text) + 1
        self.machine.emit_serial(text)
