"""Pure functions from machine facts to QEMU-format text."""

from __future__ import annotations

import time

from machine.units import format_size

_SNAP_HEADER = f"{'ID':<10}{'TAG':<17}{'VM SIZE':>8}{'DATE':>20}{'VM CLOCK':>13}{'ICOUNT':>11}"


def vm_clock(ns: int) -> str:
    """HH:MM:SS.mmm, hours not wrapped (QEMU's info snapshots)."""
    ms_total = ns // 1_000_000
    secs, ms = divmod(ms_total, 1000)
    mins, s = divmod(secs, 60)
    h, m = divmod(mins, 60)
    return f"{h:02d}:{m:02d}:{s:02d}.{ms:03d}"


def snapshots(infos) -> list[str]:
    if not infos:
        return ["There is no snapshot available."]
    lines = ["List of snapshots present on all disks:", _SNAP_HEADER]
    for info in infos:
        date = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info.date))
        # QEMU hides per-disk ids in this table and prints "--"; ICOUNT is empty for savevm.
        lines.append(f"{'--':<9} {info.tag:<16} {format_size(info.vm_state_size):>8}"
                     f"{date:>20}{vm_clock(info.vm_clock_ns):>13}{'':>11}")
    return lines


def _char(v: int) -> str:
    special = {0x27: "\\'", 0x5C: "\\\\", 0x0A: "\\n", 0x0D: "\\r"}
    if v in special:
        return f"'{special[v]}'"
    if 32 <= v <= 126:
        return f"'{chr(v)}'"
    return f"'\\x{v:02x}'"


def memory_dump(read, addr: int, spec) -> list[str]:
    """QEMU's memory_dump(): ``read(addr, n)`` returns bytes or None when inaccessible."""
    wsize = spec.size
    length = wsize * spec.count
    line_size = 8 if wsize == 1 else 16
    fmt = spec.format
    if fmt == "o":
        digits = -(-wsize * 8 // 3)
    elif fmt in ("u", "d"):
        digits = -(-wsize * 8 * 10 // 33)
    else:
        digits = wsize * 8 // 4
    if fmt == "c":
        wsize = 1
    lines = []
    while length > 0:
        n = min(length, line_size)
        head = f"{addr & 0xFFFFFFFFFFFFFFFF:016x}:"
        buf = read(addr, n)
        if buf is None:
            lines.append(head + " Cannot access memory")
            break
        items = []
        for i in range(0, n, wsize):
            v = int.from_bytes(buf[i:i + wsize], "little")
            if fmt == "o":
                items.append(f"{('0' + format(v, 'o')) if v else '0':>{digits}}")
            elif fmt == "x":
                items.append(f"0x{v:0{digits}x}")
            elif fmt == "u":
                items.append(f"{v:>{digits}}")
            elif fmt == "d":
                if wsize == 8 and v >= 1 << 63:
                    v -= 1 << 64  # QEMU prints only 8-byte values as signed
                items.append(f"{v:>{digits}}")
            else:
                items.append(_char(v))
        lines.append(head + "".join(" " + it for it in items))
        addr += n
        length -= n
    return lines


def registers(cpu_state: dict, reg_names) -> list[str]:
    regs = cpu_state["regs"]
    lines = []
    for row in range(0, 16, 4):
        lines.append(" ".join(f"{reg_names[i]:<3}={regs[i]:016x}" for i in range(row, row + 4)))
    lines.append(f"RIP={cpu_state['rip']:016x} RFL={cpu_state['rflags']:08x} "
                 f"HLT={int(bool(cpu_state['halted']))}")
    lines.append(f"TSC={cpu_state['tsc']:016x} XCR0={cpu_state.get('xcr0', 0):016x}")
    return lines


def toolbar(machine) -> str:
    from machine.runstate import status_text

    text = (f" {status_text(machine.runstate)} | clock {vm_clock(machine.clock.now_ns())} | "
            f"RAM {format_size(machine.ram.size)} | {machine.workload.name} | "
            f"{machine.type_name}")
    mig = machine.migration
    if mig.status not in ("none",):
        text += f" | migration {mig.status}"
        if mig.status == "active" and mig.total:
            done = 100 * (1 - mig.remaining / mig.total) if mig.dirty_sync_count <= 1 else None
            text += (f" {done:.0f}%" if done is not None else
                     f" pass {mig.dirty_sync_count}") + f" {mig.mbps:.0f} mbps"
    return text
