"""Run control: stop, cont, system_reset, quit."""

from __future__ import annotations

from . import command


@command("stop|s", help="pause the guest (the virtual clock stops with it)")
def stop(session):
    m = session.machine
    m.run(m.stop)


@command("cont|c", help="resume the guest")
def cont(session):
    m = session.machine
    m.run(m.cont)


@command("system_reset", help="reset the devices; a paused guest goes back to prelaunch")
def system_reset(session):
    m = session.machine
    m.run(m.system_reset)


@command("quit|q", help="leave qmon (the machine goes with it)")
def quit_(session):
    from ..session import QuitRequest

    raise QuitRequest()
