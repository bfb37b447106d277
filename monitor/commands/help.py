"""help|? [cmd]."""

from __future__ import annotations

from . import TOP, command, find, sorted_table


def help_lines(table, prefix="") -> list[str]:
    return [c.help_line(prefix) for c in sorted_table(table)]


@command("help|?", "name:S?", "[cmd]", "show the help, or the help of one command")
def help_(session, name=None):
    if name is None:
        for line in help_lines(TOP):
            session.out(line)
        return
    words = name.split()
    table, prefix = TOP, ""
    for k, word in enumerate(words):
        cmd = find(table, word)
        if cmd is None:
            session.out(f"unknown command: '{prefix}{word}'")
            return
        if cmd.sub_table is not None and k + 1 < len(words):
            table, prefix = cmd.sub_table, prefix + word + " "
            continue
        if cmd.sub_table is not None:
            for line in help_lines(cmd.sub_table, prefix + word + " "):
                session.out(line)
        else:
            session.out(cmd.help_line(prefix))
        return
