"""The dispatcher shared by the console, scripts and (later) QMP's human-monitor-command.

``Session.execute(line)`` finds the command in the table (descending into ``info``), parses its
arguments with the one args_type parser, runs the handler and prints what QEMU would print. It
returns False when the command failed, which scripted runs turn into exit status 1.
"""

from __future__ import annotations

from machine.machine import MachineError

from .args import ArgError, MemFormat
from .commands import TOP, CommandError, PlainError, find


# QEMU's x86 monitor names ($eax ... read the whole register on a 64-bit target) beside the
# 64-bit names.
_REG_ALIASES = {"eax": "rax", "ebx": "rbx", "ecx": "rcx", "edx": "rdx", "esi": "rsi",
                "edi": "rdi", "ebp": "rbp", "fp": "rbp", "esp": "rsp", "sp": "rsp",
                "eip": "rip", "eflags": "rflags"}


class QuitRequest(Exception):
    """``quit``: the front end ends its loop as on end of input."""


class Session:
    def __init__(self, machine, store, out=print):
        self.machine = machine
        self.store = store
        self.out = out
        self.memfmt = MemFormat()  # x/xp's sticky format and size, per monitor as in QEMU

    def register_value(self, name: str):
        """$name in expressions: the cpu's registers; None (unknown register) without a cpu."""
        m = self.machine
        if m.cpu is None:
            return None
        return m.run(self._register, name)

    def _register(self, name: str):
        cpu = self.machine.cpu
        from machine.devices.cpu import REG_NAMES

        n = _REG_ALIASES.get(name.lower(), name.lower())
        if n in ("pc", "rip"):
            return cpu.state["rip"]
        if n == "rflags":
            return cpu.state["rflags"]
        regs = [r.lower().strip() for r in REG_NAMES]
        if n in regs:
            return cpu.state["regs"][regs.index(n)]
        return None

    def execute(self, line: str) -> bool:
        s = line
        i = 0
        while i < len(s) and s[i].isspace():
            i += 1
        if i == len(s):
            return True
        start = i
        table = TOP
        while True:
            j = i
            # QEMU's get_command_name() stops at '/', so "xp/2xb 0" works.
            while j < len(s) and s[j] != "/" and not s[j].isspace():
                j += 1
            cmd = find(table, s[i:j])
            if cmd is None:
                self.out(f"unknown command: '{s[start:j]}'")
                return False
            i = j
            if cmd.sub_table is None:
                break
            while i < len(s) and s[i].isspace():
                i += 1
            if i == len(s):
                break  # bare "info": its own handler lists the subcommands
            table = cmd.sub_table
        typed = s[start:j]
        try:
            args = ({} if cmd.sub_table is not None else
                    _parse(cmd, s[i:], self.memfmt, self.register_value))
        except ArgError as e:
            self.out(str(e))
            self.out(f'Try "help {typed}" for more information')
            return False
        try:
            cmd.handler(self, **args)
        except QuitRequest:
            raise
        except (CommandError, MachineError) as e:
            if str(e):
                self.out(f"Error: {e}")
            return False
        except PlainError as e:
            self.out(str(e))
            return False
        except Exception as e:  # a bug of ours: one line, never a traceback
            self.out(f"Error: internal error in '{typed}': {type(e).__name__}: {e}")
            return False
        return True


def _parse(cmd, text, memfmt, registers):
    from .args import parse_arguments

    return parse_arguments(cmd.name, cmd.specs, text, memfmt, registers)
