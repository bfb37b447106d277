"""migrate, migrate_cancel, migrate_incoming, migrate_continue, the parameters and capabilities,
and info migrate / migrate_parameters / migrate_capabilities."""

from __future__ import annotations

import sys
import time

from machine.migration import state as S
from machine.units import parse_size

from .. import render
from . import INFO, CommandError, command


@command("migrate", "detach:-d,blk:-b,inc:-i,resume:-r,uri:s", "[-d] [-b] [-i] [-r] uri",
         "migrate to URI (tcp:HOST:PORT, unix:PATH, exec:CMD, file:PATH); -d returns at "
         "once, -b sends the disk too")
def migrate(session, uri, detach=False, blk=False, inc=False, resume=False):
    if inc:
        raise CommandError("qmon has no incremental block migration (-i): use -b")
    if resume:
        raise CommandError("qmon has no postcopy: there is no paused migration to resume")
    m = session.machine
    m.run(m.migrate, uri, blk)
    if detach:
        return
    progress = _Progress()
    try:
        while m.migration.status not in S.FINISHED:
            progress.show(m.migration)
            time.sleep(0.05)
    except KeyboardInterrupt:
        m.run(m.migrate_cancel)
        while m.migration.status not in S.FINISHED:
            time.sleep(0.01)
    finally:
        progress.clear()
    st = m.migration
    if st.status == S.FAILED:
        # QEMU reports this on stderr, not on the monitor; the command still failed.
        print(f"qmon: migration failed: {st.error}", file=sys.stderr, flush=True)
        raise _Failed()
    if st.status == S.CANCELLED:
        raise _Failed()


class _Failed(CommandError):
    """A failure already reported elsewhere: the monitor prints nothing more."""


class _Progress:
    """One line on the terminal, rewritten in place, while a migrate waits."""

    def __init__(self):
        self.tty = sys.__stderr__ is not None and sys.__stderr__.isatty()
        self.shown = False

    def show(self, st):
        if not self.tty or st.status != S.ACTIVE:
            return
        done = st.total - st.remaining if st.dirty_sync_count <= 1 else st.transferred
        sys.__stderr__.write(f"\rmigrate: {st.status}, pass {st.dirty_sync_count}, "
                             f"{done >> 20} MiB sent, {st.remaining >> 20} MiB remaining, "
                             f"{st.mbps:.0f} mbps (Ctrl-C cancels)\x1b[K")
        sys.__stderr__.flush()
        self.shown = True

    def clear(self):
        if self.shown:
            sys.__stderr__.write("\r\x1b[K")
            sys.__stderr__.flush()


@command("migrate_cancel", help="cancel the current migration")
def migrate_cancel(session):
    m = session.machine
    m.run(m.migrate_cancel)


@command("migrate_incoming", "uri:s", "uri",
         "start listening for an incoming migration (after -incoming defer)")
def migrate_incoming(session, uri):
    m = session.machine
    m.run(m.migrate_incoming, uri)


@command("migrate_continue", "state:s", "state",
         "continue a migration paused in STATE (pre-switchover)")
def migrate_continue(session, state):
    m = session.machine
    m.run(m.migrate_continue, state)


_RANGES = {  # QEMU's migrate_params_check(), with its underscore names and words
    "throttle-trigger-threshold": (1, 100, "1 to 100"),
    "cpu-throttle-initial": (1, 99, "1 to 99"),
    "cpu-throttle-increment": (1, 99, "1 to 99"),
}


def check_parameter(name: str, n: int, params: dict) -> int:
    """QEMU's checks of one migration parameter value (shared by HMP and QMP)."""
    under = name.replace("-", "_")
    if name == "downtime-limit" and n > 2000 * 1000:
        raise CommandError(f"Parameter '{under}' expects an integer in the range of 0 to "
                           "(2000 * 1000) ms")
    if name == "xbzrle-cache-size" and (n < 4096 or n & (n - 1)):
        raise CommandError(f"Parameter '{under}' expects a power of two no less than the "
                           "target page size")
    if name in _RANGES:
        lo, hi, words = _RANGES[name]
        if not lo <= n <= hi:
            raise CommandError(f"Parameter '{under}' expects an integer in the range of {words}")
    if name == "max-cpu-throttle" and not params["cpu-throttle-initial"] <= n <= 99:
        raise CommandError(f"Parameter '{under}' expects an integer in the range of "
                           "cpu_throttle_initial to 99")
    if name == "x-stream-version" and n not in (2, 3):
        raise CommandError("Parameter 'x-stream-version' expects 2 or 3")
    return n


def _hmp_value(name: str, value: str) -> int:
    """A value as HMP reads it: sizes for the byte-valued ones (max-bandwidth defaults to
    MiB, the others to bytes), small integers for the percentages."""
    if name == "max-bandwidth":
        try:
            n = parse_size(value, default_suffix="M")
        except ValueError:
            raise CommandError(f"Invalid size {value}") from None
        if n >= 1 << 63:
            raise CommandError(f"Invalid size {value}")
        return n
    if name in ("downtime-limit", "xbzrle-cache-size"):
        try:
            return parse_size(value)
        except ValueError:
            raise CommandError(f"Parameter '{name}' expects a non-negative number below "
                               "2^64") from None
    try:
        n = int(value, 0)
    except ValueError:
        raise CommandError(f"Parameter '{name}' expects uint64") from None
    if name in S.PERCENT_PARAMETERS and not 0 <= n <= 255:
        raise CommandError(f"Parameter '{name}' expects uint8_t")
    return n


@command("migrate_set_parameter", "parameter:s,value:s", "parameter value",
         "set a migration parameter (max-bandwidth: a bare number is MiB/s)")
def migrate_set_parameter(session, parameter, value):
    if parameter not in S.PARAMETER_DEFAULTS:
        if parameter in S.ALL_PARAMETERS:
            raise CommandError(f"qmon does not implement the migration parameter '{parameter}'")
        raise CommandError(f"invalid parameter value: {parameter}")
    m = session.machine
    n = check_parameter(parameter, _hmp_value(parameter, value), m.params)
    m.run(m.params.__setitem__, parameter, n)


@command("migrate_set_capability", "capability:s,state:b", "capability state",
         "turn a migration capability on or off")
def migrate_set_capability(session, capability, state):
    m = session.machine
    if capability not in S.CAPABILITIES:
        raise CommandError(f"invalid parameter value: {capability}")
    if m.migration_active():
        raise CommandError("There's a migration process in progress")
    if state and capability not in S.IMPLEMENTED_CAPABILITIES:
        raise CommandError(f"qmon does not implement the migration capability '{capability}' "
                           f"(it implements {', '.join(sorted(S.IMPLEMENTED_CAPABILITIES))})")
    m.run(m.caps.__setitem__, capability, state)


@command("migrate", help="show the migration status and its counters", table=INFO)
def info_migrate(session):
    m = session.machine
    for line in m.run(render.migrate_info, m):
        session.out(line)


@command("migrate_parameters", help="show the migration parameters", table=INFO)
def info_migrate_parameters(session):
    for line in render.migrate_parameters(session.machine.params):
        session.out(line)


@command("migrate_capabilities", help="show the migration capabilities", table=INFO)
def info_migrate_capabilities(session):
    for name in S.CAPABILITIES:
        session.out(f"{name}: {'on' if session.machine.caps[name] else 'off'}")


@command("migrate_passes", help="show the passes of the current or last migration (qmon)",
         table=INFO)
def info_migrate_passes(session):
    m = session.machine
    for line in m.run(render.migrate_passes, m.migration):
        session.out(line)
