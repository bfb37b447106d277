"""The command table, in the spirit of QEMU's hmp-commands.hx: one declarative entry a command.

Each theme module registers its commands with ``@command``; importing this package loads them
all. ``TOP`` holds the top-level commands, ``INFO`` the ``info`` subcommands.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..args import ArgSpec, parse_args_type


class CommandError(Exception):
    """A command that failed: printed as ``Error: <message>``."""


class PlainError(Exception):
    """A failure QEMU reports as bare text, without ``Error: `` (e.g. 'No CPU available')."""


@dataclass
class Command:
    name: str  # "stop|s": the name and its aliases, as QEMU prints it
    args_type: str
    params: str
    help: str
    handler: object
    sub_table: list | None = None
    completion: str | None = None  # what the console completes for the argument: tag, file
    specs: list[ArgSpec] = field(default_factory=list)

    def __post_init__(self):
        self.specs = parse_args_type(self.args_type)

    @property
    def names(self) -> list[str]:
        return self.name.split("|")

    def help_line(self, prefix: str = "") -> str:
        return f"{prefix}{self.name} {self.params} -- {self.help}"


TOP: list[Command] = []
INFO: list[Command] = []


def command(name: str, args_type: str = "", params: str = "", help: str = "", table=None,
            completion: str | None = None, sub_table=None):
    def register(fn):
        (TOP if table is None else table).append(
            Command(name, args_type, params, help, fn, sub_table, completion))
        return fn
    return register


def find(table: list[Command], word: str) -> Command | None:
    for cmd in table:
        if word in cmd.names:
            return cmd
    return None


def sorted_table(table: list[Command]) -> list[Command]:
    return sorted(table, key=lambda c: c.name)


# Load every theme module so their commands register.
from . import help, info, memory, migration, snapshots, trace, vm  # noqa: E402,F401
