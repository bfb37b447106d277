"""Devices: each declares its state as vmstate fields and says how to capture and restore it."""

from __future__ import annotations

from ..vmstate import VMStateDescription


class LoadError(Exception):
    """Device state that decodes but makes no sense (QEMU's post_load failures)."""


class Device:
    """A device with a FULL section. Subclasses set ``idstr`` and ``vmsd``."""

    idstr: str = ""
    instance_id: int = 0
    vmsd: VMStateDescription

    def __init__(self, machine):
        self.machine = machine
        self.state = self.vmsd.defaults()

    def reset(self) -> None:
        self.state = self.vmsd.defaults()

    def pre_save(self) -> dict:
        """Field values to write; called on the machine thread with the guest stopped."""
        return self.state

    def check(self, values: dict) -> None:
        """Raise LoadError for decoded values the device cannot take (nothing applied yet)."""

    def post_load(self, values: dict) -> None:
        """Apply checked values."""
        self.state = values

    def save(self) -> bytes:
        return self.vmsd.encode(self.pre_save())
