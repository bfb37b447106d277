"""info and its subcommands (info snapshots lives with the snapshot commands)."""

from __future__ import annotations

from machine import QEMU_VERSION, __version__
from machine.devices.cpu import REG_NAMES
from machine.runstate import status_text

from .. import render
from . import INFO, PlainError, command
from .help import help_lines


@command("info", "item:s?", "[subcommand]", "show facts about the machine (alone: list them)",
         sub_table=INFO)
def info(session):
    for line in help_lines(INFO, "info "):
        session.out(line)


@command("status", help="show the run state of the guest", table=INFO)
def info_status(session):
    m = session.machine
    session.out(f"VM status: {status_text(m.run(lambda: m.runstate))}")


@command("version", help="show the QEMU version qmon speaks, and qmon's own", table=INFO)
def info_version(session):
    session.out("{}.{}.{}".format(*QEMU_VERSION) + f" (qmon {__version__})")


@command("name", help="show the name given with -name", table=INFO)
def info_name(session):
    if session.machine.name is not None:
        session.out(session.machine.name)


@command("registers", help="show the cpu's registers", table=INFO)
def info_registers(session):
    m = session.machine
    if m.cpu is None:
        raise PlainError("No CPU available")
    state = m.run(lambda: dict(m.cpu.pre_save(), regs=list(m.cpu.state["regs"])))
    for line in render.registers(state, REG_NAMES):
        session.out(line)


@command("workload", help="show the guest workload, its progress and its invariant",
         table=INFO)
def info_workload(session):
    m = session.machine
    for line in m.run(m.workload.describe):
        session.out(line)
