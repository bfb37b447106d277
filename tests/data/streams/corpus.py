#!/usr/bin/env python3
"""The stream corpus for the dissector's tests: how each file here was made, and the broken
streams derived from a real QEMU 7.2 stream.

    python tests/data/streams/corpus.py capture   # re-capture the QEMU streams (needs QEMU 7.2)
    python tests/data/streams/corpus.py broken    # rewrite broken/*.stream and broken/expected.json

Captured with Debian's qemu-system-x86_64 7.2 (`migrate "exec:cat > FILE"`, nothing compressed):

- qemu-none-2m.stream: `-M none -m 2M -S` (paused in prelaunch): every page a ZERO record.
- qemu-none-2m-random.stream: the same machine with its RAM mapped on a file holding
  ``random_ram()`` (a few seeded random pages and a line of text, the rest zero), so the stream
  has PAGE records between runs of ZERO records.
- qemu-none-1m-running.stream: `-M none -m 1M`, running for a moment before the migration: the
  timer's clock values are not zero and globalstate says "running".
- qemu-pc-2m.stream: `-M pc -m 2M -vga none -S`: six RAM blocks (BIOS and option ROMs among
  them) and 30 devices with structs, arrays of structs, subsections and QEMU's other vmdesc
  types (timer, "int32 equal", "pci config", tmp ...). Its pc.bios block is SeaBIOS's
  bios-256k.bin as QEMU loaded it.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import tempfile

DIR = os.path.dirname(os.path.abspath(__file__))
BROKEN = os.path.join(DIR, "broken")
BASE = "qemu-none-2m.stream"

RANDOM_PAGES = (1, 2, 3, 100, 101, 300, 511)
TEXT_PAGE = 200
TEXT = b"Hello from the guest: qmon teaching stream\n"


def random_ram() -> bytes:
    """The 2 MiB RAM image behind qemu-none-2m-random.stream."""
    r = random.Random(7200)
    data = bytearray(2 << 20)
    for p in RANDOM_PAGES:
        data[p * 4096:(p + 1) * 4096] = r.randbytes(4096)
    data[TEXT_PAGE * 4096:TEXT_PAGE * 4096 + len(TEXT)] = TEXT
    return bytes(data)


# --------------------------------------------------------------------------------------------
# Capturing from QEMU


def _qemu(qemu, args, out, paused=True, wait=0.0):
    import time

    cmd = [qemu, "-nodefaults", "-display", "none", "-monitor", "stdio"] + args
    if paused:
        cmd.append("-S")
    p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL, text=True)
    p.stdin.write("migrate_set_parameter max-bandwidth 100G\n")
    p.stdin.flush()
    time.sleep(wait)
    p.stdin.write(f'migrate "exec:cat > {out}"\ninfo status\nquit\n')
    p.stdin.close()
    p.wait(60)


def capture(qemu: str = "qemu-system-x86_64"):
    with tempfile.TemporaryDirectory(prefix="an-capture-") as tmp:
        ram = os.path.join(tmp, "ram.bin")
        with open(ram, "wb") as f:
            f.write(random_ram())
        jobs = [
            ("qemu-none-2m.stream", ["-M", "none", "-m", "2M"], True, 0),
            ("qemu-none-2m-random.stream",
             ["-M", "none", "-m", "2M", "-object",
              f"memory-backend-file,id=ram,size=2M,mem-path={ram},share=on",
              "-machine", "memory-backend=ram"], True, 0),
            ("qemu-none-1m-running.stream", ["-M", "none", "-m", "1M"], False, 0.5),
            ("qemu-pc-2m.stream", ["-M", "pc", "-m", "2M", "-vga", "none"], True, 0),
        ]
        for name, args, paused, wait in jobs:
            out = os.path.join(tmp, name)
            _qemu(qemu, args, out, paused, wait)
            shutil.copy(out, os.path.join(DIR, name))
            print(f"{name}: {os.path.getsize(out)} bytes")


# --------------------------------------------------------------------------------------------
# Broken streams, each one change to qemu-none-2m.stream. Offsets come from that stream's
# layout (checked below), never from the dissector: header 0, configuration 0x08, START 0x11,
# MEM_SIZE 0x22 (its block entry at 0x2a), EOS 0x36, footer 0x3e, PART 0x43, 512 ZERO records
# from 0x48 (the first names the block: 13 bytes; then 9 bytes each), EOS 0x124c, footer 0x1254,
# END 0x1259, FULL timer 0x126b (payload 0x127e, footer 0x1296), FULL globalstate 0x129b,
# EOF 0x1321, vmdesc 0x1322.

PART, ZERO0, PART_FOOTER = 0x43, 0x48, 0x1254
TIMER, TIMER_PAYLOAD, TIMER_FOOTER = 0x126B, 0x127E, 0x1296
EOF_AT, VMDESC_AT = 0x1321, 0x1322


def zero_record(i: int) -> int:
    """Offset of the i-th ZERO record of the PART section."""
    return ZERO0 if i == 0 else ZERO0 + 13 + 9 * (i - 1)


def _check_base(d: bytes):
    assert d[:8] == b"QEVM\0\0\0\x03" and d[8:0x11] == b"\x07\0\0\0\x04none"
    assert d[PART:PART + 5] == b"\x02\0\0\0\x02"
    assert d[ZERO0:ZERO0 + 13] == bytes(7) + b"\x02\x03ram\0"
    assert d[zero_record(1):zero_record(1) + 9] == bytes(6) + b"\x10\x22\0"
    assert d[zero_record(511) + 9:zero_record(511) + 17] == bytes(7) + b"\x10"  # EOS
    assert d[PART_FOOTER:PART_FOOTER + 5] == b"\x7e\0\0\0\x02"
    assert d[TIMER:TIMER + 11] == b"\x04\0\0\0\0\x05timer"
    assert d[TIMER_FOOTER:TIMER_FOOTER + 5] == b"\x7e\0\0\0\0"
    assert d[EOF_AT:VMDESC_AT + 1] == b"\x00\x06"
    assert len(d) == VMDESC_AT + 5 + int.from_bytes(d[VMDESC_AT + 1:VMDESC_AT + 5], "big")


def _put(d: bytes, off: int, new: bytes) -> bytes:
    return d[:off] + new + d[off + len(new):]


def broken() -> list[dict]:
    """[{name, data, offset, message, last}]: ``message`` starts the error text; ``last`` is
    found in the listing's last line before the error."""
    with open(os.path.join(DIR, BASE), "rb") as f:
        d = f.read()
    _check_base(d)
    z100 = zero_record(100)
    z2, z5 = zero_record(2), zero_record(5)
    vm = d[VMDESC_AT + 5:]
    # The vmdesc says the timer's last field has 9 bytes (same JSON length): the vmdesc drives
    # how the parser sizes the section, so the footer is then looked for one byte too late.
    bad_vm = vm.replace(b'"cpu_clock_offset", "type": "int64", "size": 8',
                        b'"cpu_clock_offset", "type": "int64", "size": 9')
    assert len(bad_vm) == len(vm) and bad_vm != vm
    cases = [
        ("empty", b"", 0, "Not a migration stream", None),
        ("bad-magic", _put(d, 0, b"QEVN"), 0, "Not a migration stream", None),
        ("short-header", d[:6], 4, "Unsupported migration stream version", None),
        ("bad-version", _put(d, 4, b"\0\0\0\x04"), 4, "Unsupported migration stream version",
         None),
        ("no-configuration", d[:8] + d[0x11:], 8, "Configuration section missing", "header"),
        ("header-only", d[:8], 8, "truncated stream", "header"),
        ("mem-size-mismatch", _put(d, 0x22, (0x100000 | 0x04).to_bytes(8, "big")), 0x2a,
         "MEM_SIZE total 0x100000 does not match", "START"),
        ("unknown-section-type", _put(d, PART, b"\x09"), PART, "Unknown savevm section type 9",
         "footer"),
        ("unknown-section-id", _put(d, PART + 1, b"\0\0\0\x07"), PART,
         "Unknown savevm section 7", "footer"),
        ("continue-without-block", _put(d, ZERO0 + 7, b"\x22"), ZERO0,
         "Ack, bad migration stream!", "PART"),
        ("bad-ram-flags", _put(d, z5 + 7, b"\x21"), z5,
         "Unknown combination of migration flags: 0x21", "zero"),
        ("unknown-block", _put(d, ZERO0 + 9, b"rom"), ZERO0, "Can't find block rom", "PART"),
        ("page-outside-block", _put(d, z2, (0x200000 | 0x22).to_bytes(8, "big")), z2,
         "Illegal RAM offset 200000", "zero"),
        ("truncated-in-part", d[:z100 + 4], z100, "truncated stream", "zero"),
        ("missing-footer", _put(d, PART_FOOTER, b"\x7f"), PART_FOOTER,
         "Missing section footer for ram", "EOS"),
        ("mismatched-footer", _put(d, TIMER_FOOTER + 1, b"\0\0\0\x05"), TIMER_FOOTER + 1,
         "Mismatched section id in footer for timer - read 0x5 expected 0x0", "field"),
        ("unknown-device", _put(d, TIMER + 6, b"tymer"), TIMER,
         "cannot size section 'tymer' instance 0 version 2", "footer"),
        ("vmdesc-wrong-size", d[:VMDESC_AT + 5] + bad_vm, TIMER_FOOTER + 1,
         "Missing section footer for timer", "field"),
        ("no-eof", d[:EOF_AT], EOF_AT, "truncated stream", "footer"),
        ("truncated-vmdesc", d[:-10], VMDESC_AT, "truncated stream", "EOF"),
    ]
    return [{"name": n, "data": data, "offset": off, "message": msg, "last": last}
            for n, data, off, msg, last in cases]


def write_broken():
    os.makedirs(BROKEN, exist_ok=True)
    index = []
    for c in broken():
        with open(os.path.join(BROKEN, c["name"] + ".stream"), "wb") as f:
            f.write(c["data"])
        index.append({k: c[k] for k in ("name", "offset", "message", "last")})
    with open(os.path.join(BROKEN, "expected.json"), "w") as f:
        json.dump(index, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    what = sys.argv[1] if len(sys.argv) > 1 else ""
    if what == "capture":
        capture(*sys.argv[2:3])
    elif what == "broken":
        write_broken()
    else:
        print(__doc__)
        sys.exit(2)
