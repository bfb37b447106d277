"""The interactive console: a prompt_toolkit PromptSession speaking QEMU's monitor dialect."""

from __future__ import annotations

import os
import sys

from prompt_toolkit import PromptSession
from prompt_toolkit.completion import Completer, Completion, PathCompleter
from prompt_toolkit.document import Document
from prompt_toolkit.history import FileHistory
from prompt_toolkit.key_binding import KeyBindings
from prompt_toolkit.lexers import PygmentsLexer
from prompt_toolkit.patch_stdout import patch_stdout
from prompt_toolkit.styles import Style

from . import render
from .commands import INFO, TOP, find, sorted_table
from .lexer import MonitorLexer
from .session import QuitRequest

STYLE = Style.from_dict({
    "bottom-toolbar": "noreverse bg:#303030 #d0d0d0",
    "pygments.keyword": "#5fafff bold",
    "pygments.name.function": "#87d787",
    "pygments.number": "#d7af5f",
    "pygments.string": "#d787af",
    "pygments.name.variable": "#afafff",
    "pygments.name.attribute": "#5fd7d7",
})


class MonitorCompleter(Completer):
    """Command names (with their help as meta), info subcommands, snapshot tags after
    savevm/loadvm/delvm, and file paths where a command takes a file."""

    def __init__(self, session):
        self.session = session
        self.paths = PathCompleter(expanduser=True)

    def get_completions(self, document, complete_event):
        text = document.text_before_cursor
        words = text.split()
        if text and not text[-1].isspace():
            current = words.pop() if words else ""
        else:
            current = ""
        if not words:
            yield from self._names(TOP, current)
            return
        cmd = find(TOP, words[0])
        if cmd is None:
            return
        if cmd.name == "info" or (cmd.name == "help|?" and len(words) == 2 and words[1] == "info"):
            if len(words) == (1 if cmd.name == "info" else 2):
                yield from self._names(INFO, current)
            return
        if cmd.name == "help|?" and len(words) == 1:
            yield from self._names(TOP, current)
            return
        if cmd.completion == "tag" and len(words) == 1:
            try:
                tags = [i.tag for i in self.session.store.list()]
            except Exception:
                tags = []
            typed = current[1:] if current.startswith('"') else current
            for tag in tags:
                if tag.startswith(typed):
                    yield Completion(quote_arg(tag), start_position=-len(current),
                                     display=tag)
        elif cmd.completion == "file" and len(words) == len(cmd.specs):
            yield from self._paths(current, complete_event)

    def _paths(self, current, complete_event):
        """File names; quoted where QEMU's parser needs it (an absolute path unquoted would be
        read as a division in the size expression before it)."""
        typed = current[1:] if current.startswith('"') else current
        sub = Document(typed, len(typed))
        for c in self.paths.get_completions(sub, complete_event):
            full = typed[: len(typed) + c.start_position] + c.text
            needs_quotes = current.startswith('"') or full.startswith(("/", "~")) or any(
                ch.isspace() or ch in '"\\' for ch in full)
            text = quote_arg(full, force=needs_quotes, close=not full.endswith("/"))
            yield Completion(text, start_position=-len(current), display=c.display)

    @staticmethod
    def _names(table, prefix):
        for cmd in sorted_table(table):
            for name in cmd.names:
                if name.startswith(prefix):
                    yield Completion(name, start_position=-len(prefix), display_meta=cmd.help)


def quote_arg(text: str, force: bool = False, close: bool = True) -> str:
    """An argument as QEMU's get_str() reads it back: bare when it can be, else quoted."""
    if not force and text and not any(ch.isspace() or ch in '"\\' for ch in text):
        return text
    body = text.replace("\\", "\\\\").replace('"', '\\"')
    return '"' + body + ('"' if close else "")


def history_path() -> str:
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local",
                                                             "state")
    return os.path.join(base, "qmon", "history")


def _key_bindings() -> KeyBindings:
    kb = KeyBindings()

    @kb.add("c-c")
    def _(event):
        # Clear the line inside the running prompt rather than leaving it: between two prompts
        # the terminal is in cooked mode and would echo whatever is typed next.
        event.app.current_buffer.reset()

    return kb


def run_console(session, banner: str) -> int:
    machine = session.machine
    path = history_path()
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        history = FileHistory(path)
    except OSError:
        from prompt_toolkit.history import InMemoryHistory
        history = InMemoryHistory()
    ps = PromptSession(
        "(qemu) ",
        history=history,
        completer=MonitorCompleter(session),
        complete_while_typing=False,
        lexer=PygmentsLexer(MonitorLexer),
        bottom_toolbar=lambda: render.toolbar(machine),
        style=STYLE,
        key_bindings=_key_bindings(),
    )
    # The machine thread only asks for a redraw; the toolbar reads a fresh snapshot itself.
    machine.add_listener(lambda: ps.app.invalidate())
    fatal_exit = []

    def leave():
        # Leave the prompt properly (the terminal back in cooked mode), as Ctrl-D does.
        app = ps.app
        if app.is_running and app.loop is not None:
            app.loop.call_soon_threadsafe(lambda: app.exit(exception=EOFError()))

    def fatal(message):
        fatal_exit.append(message)  # then exit 1
        leave()

    machine.on_fatal = fatal
    machine.on_quit = leave
    print(banner)
    with patch_stdout(raw=True):
        while True:
            try:
                line = ps.prompt()
            except KeyboardInterrupt:
                continue
            except EOFError:
                break
            if fatal_exit:
                break
            try:
                session.execute(line)
            except QuitRequest:
                break
            except KeyboardInterrupt:
                # Ctrl-C while a command runs: stop waiting for it (the machine thread
                # finishes what it started, as QEMU does) and come back to the prompt.
                print("^C")
    if fatal_exit:
        print(f"qmon: {fatal_exit[0]}", file=sys.stderr)
        return 1
    return 0
