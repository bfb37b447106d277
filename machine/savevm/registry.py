"""SaveStateEntry: what QEMU's register_savevm_live()/vmstate_register() record per handler."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class SaveStateEntry:
    idstr: str
    instance_id: int
    version_id: int
    section_id: int  # registration order, as QEMU numbers them
    live: object = None  # a live section (ram): setup/iterate/complete, or None
    device: object = None  # a Device with a FULL section, or None
    # Handlers QEMU registers that write nothing in a plain savevm (block, dirty-bitmap); they
    # still take a section_id, which keeps ram at id 2 as in QEMU.
    active: bool = True
    # A live section sent only when a migration asks for it (block, with migrate -b).
    opt_in: bool = False
    kind: str = "ram"  # what the parser reads in a live section's payload

    @property
    def minimum_version_id(self) -> int:
        if self.device is not None:
            return self.device.vmsd.minimum_version_id
        return self.version_id


def register(entries: list, idstr: str, version_id: int, *, live=None, device=None,
             active=True, instance_id: int = 0, opt_in=False, kind="ram") -> SaveStateEntry:
    se = SaveStateEntry(idstr, instance_id, version_id, len(entries), live, device, active,
                        opt_in, kind)
    entries.append(se)
    return se
