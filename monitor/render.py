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


_GLOBALS = [
    "globals:",
    "store-global-state: on",
    "only-migratable: off",
    "send-configuration: on",
    "send-section-footer: on",
    "decompress-error-check: on",
    "clear-bitmap-shift: 18",
]
# Statuses for which QEMU fills in times and ram counters (fill_source_migration_info).
_WITH_RAM = {"active", "cancelling", "pre-switchover", "device", "completed"}


def migrate_info(machine) -> list[str]:
    """QEMU 7.2's hmp_info_migrate() for this machine (runs on the machine thread)."""
    from machine.migration.state import now_ms

    lines = list(_GLOBALS)
    out, inc = machine.migration, machine.incoming_state
    st = out if out.status != "none" else inc
    outgoing = st is out
    if st.status != "none":
        head = f"Migration status: {st.status}"
        if st.status == "failed" and st.error:
            head += f" ({st.error})"
        lines.append(head)
        timed = outgoing and st.status in _WITH_RAM
        if not timed:
            total = 0
        elif st.status == "completed":
            total = st.total_ms
        else:
            total = now_ms() - st.start_ms
        lines.append(f"total time: {int(total)} ms")
        if timed and st.status != "completed":
            lines.append(f"expected downtime: {int(st.expected_downtime_ms)} ms")
        if timed and st.status == "completed":
            lines.append(f"downtime: {int(st.downtime_ms)} ms")
        if timed:
            lines.append(f"setup: {int(st.setup_ms)} ms")
    if outgoing and st.status in _WITH_RAM:
        remaining = 0 if st.status == "completed" else st.remaining
        lines += [
            f"transferred ram: {st.transferred >> 10} kbytes",
            f"throughput: {st.mbps:0.2f} mbps",
            f"remaining ram: {remaining >> 10} kbytes",
            f"total ram: {st.total >> 10} kbytes",
            f"duplicate: {st.duplicate} pages",
            "skipped: 0 pages",
            f"normal: {st.normal} pages",
            f"normal bytes: {(st.normal * 4096) >> 10} kbytes",
            f"dirty sync count: {st.dirty_sync_count}",
            "page size: 4 kbytes",
            "multifd bytes: 0 kbytes",
            f"pages-per-second: {int(st.pages_per_second)}",
        ]
        if st.dirty_pages_rate and st.status != "completed":
            lines.append(f"dirty pages rate: {st.dirty_pages_rate} pages")
        if st.precopy_bytes:
            lines.append(f"precopy ram: {st.precopy_bytes >> 10} kbytes")
        if st.downtime_bytes:
            lines.append(f"downtime ram: {st.downtime_bytes >> 10} kbytes")
        if st.disk is not None and st.status != "completed":
            lines += [f"transferred disk: {st.disk['transferred'] >> 10} kbytes",
                      f"remaining disk: {st.disk['remaining'] >> 10} kbytes",
                      f"total disk: {st.disk['total'] >> 10} kbytes"]
        if st.xbzrle is not None:
            x = st.xbzrle
            lines += [
                f"cache size: {x['cache-size']} bytes",
                f"xbzrle transferred: {x['bytes'] >> 10} kbytes",
                f"xbzrle pages: {x['pages']} pages",
                f"xbzrle cache miss: {x['cache-miss']} pages",
                f"xbzrle cache miss rate: {x['cache-miss-rate']:0.2f}",
                f"xbzrle encoding rate: {x['encoding-rate']:0.2f}",
                f"xbzrle overflow: {x['overflow']}",
            ]
        if machine.workload.throttle:
            lines.append(f"cpu throttle percentage: {machine.workload.throttle}")
    if inc.socket_addresses:
        lines.append("socket address: [")
        lines += [f"\t{a}" for a in inc.socket_addresses]
        lines.append("]")
    return lines


def migrate_parameters(params: dict) -> list[str]:
    lines = []
    for name, value in params.items():
        if name == "max-bandwidth":
            lines.append(f"{name}: {value} bytes/second")
        elif name == "downtime-limit":
            lines.append(f"{name}: {value} ms")
        elif name == "xbzrle-cache-size":
            lines.append(f"{name}: {value} bytes")
        else:
            lines.append(f"{name}: {value}")
    return lines


def migrate_passes(st, width: int = 40) -> list[str]:
    """qmon's 'info migrate_passes': one row per pass (dirty sync period) of the current or
    last migration, and a bar chart of the dirty memory left at the end of each, so that
    convergence, or the lack of it, shows at a glance."""
    from machine.migration.state import now_ms

    passes = list(st.passes)
    cur = st.current_pass
    if not passes and cur is None:
        return ["No migration has run yet."]
    lines = [f"{'pass':>4} {'duration':>10} {'pages':>8} {'zero':>8} {'dirtied':>8} "
             f"{'bandwidth':>12} {'exp.downtime':>12} {'pending':>10}"]

    def row(p, running=False):
        dur = (now_ms() - p.start_ms) if running else p.duration_ms
        bw = p.bandwidth * 1000  # bytes/ms -> bytes/s
        pending = "(running)" if running else format_size(p.pending_bytes)
        return (f"{p.number:>4} {dur:>7.0f} ms {p.pages:>8} {p.zero_pages:>8} {p.dirtied:>8} "
                f"{format_size(bw) + '/s':>12} {p.expected_downtime_ms:>9.0f} ms {pending:>10}")

    lines += [row(p) for p in passes]
    if cur is not None and st.status not in ("completed", "failed", "cancelled"):
        lines.append(row(cur, running=True))
    peak = max((p.pending_bytes for p in passes), default=0)
    if passes:
        lines.append("dirty memory left at the end of each pass:")
        for p in passes:
            n = round(width * p.pending_bytes / peak) if peak else 0
            lines.append(f"{p.number:>4} |{'#' * n} {format_size(p.pending_bytes)}")
    return lines
