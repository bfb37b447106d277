from __future__ import annotations

from ..runstate import RunState
from ..vmstate import Field, VMStateDescription
from . import Device, LoadError

_BUF = 100


class GlobalState(Device):
    """QEMU's "globalstate": the runstate the source was in, so the destination can follow it."""

    idstr = "globalstate"
    vmsd = VMStateDescription("globalstate", 1, 1, (
        Field("size", "uint32"),
        Field("runstate", "buffer", _BUF),
    ))

    def __init__(self, machine):
        super().__init__(machine)
        self.stored: str | None = None  # the runstate captured when a save began
        self.received: RunState | None = None

    def store(self, state: RunState):
        self.stored = state.value

    def pre_save(self):
        name = (self.stored or self.machine.runstate.value).encode()
        return {"size": len(name) + 1, "runstate": name.ljust(_BUF, b"\0")}

    def check(self, values):
        size = values["size"]
        if size == 0 or size > _BUF:
            raise LoadError(f"globalstate: invalid runstate size {size}")
        raw = values["runstate"][:size].split(b"\0", 1)[0]
        try:
            RunState(raw.decode("ascii"))
        except (UnicodeDecodeError, ValueError):
            raise LoadError(f"globalstate: invalid runstate '{raw.decode('latin-1')}'") from None

    def post_load(self, values):
        raw = values["runstate"][: values["size"]].split(b"\0", 1)[0]
        self.received = RunState(raw.decode("ascii"))
