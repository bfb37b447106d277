"""The simulated computer: RAM, devices, a virtual clock, a runstate, and the savevm protocol."""

__version__ = "0.1.0"
# The QEMU release whose wire format and monitor text qmon reproduces.
QEMU_VERSION = (7, 2, 0)
