from __future__ import annotations

from ..vmstate import Field, VMStateDescription
from . import Device

REG_NAMES = ("RAX", "RBX", "RCX", "RDX", "RSI", "RDI", "RBP", "RSP",
             "R8", "R9", "R10", "R11", "R12", "R13", "R14", "R15")
RESET_RIP = 0xFFF0
RESET_RFLAGS = 0x2
XCR0_DEFAULT = 0x1  # x87 only, the architectural reset value


def cpu_vmsd(version_id: int) -> VMStateDescription:
    """The cpu's description at ``version_id``. Version 2 added xcr0; a version-1 stream
    leaves it at its default, the way QEMU's VMSTATE_*_V fields behave."""
    fields = (
        Field("regs", "uint64", array_len=16),
        Field("rip", "uint64", default=RESET_RIP),
        Field("rflags", "uint64", default=RESET_RFLAGS),
        Field("tsc", "uint64"),
        Field("halted", "bool"),
        Field("xcr0", "uint64", version_id=2, default=XCR0_DEFAULT),
    )
    return VMStateDescription("cpu", version_id, 1,
                              tuple(f for f in fields if f.version_id <= version_id))


class Cpu(Device):
    """The lab machine's one vCPU. The guest workload runs "on" it: its registers mirror what
    the workload is doing (RBX the page it writes, RAX the value, RCX the laps)."""

    idstr = "cpu"
    vmsd = cpu_vmsd(2)

    def __init__(self, machine, version_id: int = 2):
        self.vmsd = cpu_vmsd(version_id)  # the machine type picks the cpu's version
        super().__init__(machine)

    def pre_save(self):
        # The TSC counts with the virtual clock (1 GHz); the timer section restores the clock.
        return dict(self.state, tsc=self.machine.clock.now_ns())

    def post_load(self, values):
        self.state = dict(values, tsc=0)
