"""Sizes as QEMU spells them: ``128M``, ``1G``, ``4096``, ``2k``."""

from __future__ import annotations

import re

_SUFFIX = {"b": 0, "k": 10, "m": 20, "g": 30, "t": 40, "p": 50, "e": 60}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([bkmgtpeBKMGTPE])?\s*$")


def parse_size(text: str, default_suffix: str = "b") -> int:
    """Parse ``text`` like qemu_strtosz(); a bare number takes ``default_suffix``."""
    m = _SIZE_RE.match(text)
    if not m:
        raise ValueError(f"Invalid size {text}")
    number, suffix = m.groups()
    shift = _SUFFIX[(suffix or default_suffix).lower()]
    if "." in number:
        if suffix is None and default_suffix == "b":
            raise ValueError(f"Invalid size {text}")
        value = int(float(number) * (1 << shift))
    else:
        value = int(number) << shift
    if value >= 1 << 64:
        raise ValueError(f"Invalid size {text}")
    return value


def format_size(n: float) -> str:
    """QEMU's size_to_str(): %0.3g in B/KiB/MiB/GiB/..., moving up a unit at 1000."""
    units = ("B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB")
    i = 0
    while n >= 1000 and i < len(units) - 1:
        n /= 1024
        i += 1
    return f"{n:0.3g} {units[i]}"
