"""trace-event and info trace-events."""

from __future__ import annotations

from machine.trace import TraceError

from . import INFO, PlainError, command


@command("trace-event", "name:s,option:b", "name on|off",
         "turn trace events on or off (NAME may be a pattern such as savevm_*)")
def trace_event(session, name, option):
    m = session.machine
    try:
        m.run(m.trace.set_state, name, option)
    except TraceError as e:
        raise PlainError(str(e)) from None


@command("trace-events", "name:s?", "[name]", "show the trace events and their state",
         table=INFO)
def info_trace_events(session, name=None):
    for line in session.machine.trace.listing(name):
        session.out(line)
