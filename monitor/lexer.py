"""A pygments lexer for monitor lines and transcripts (``pygmentize -l qemu-monitor``)."""

from __future__ import annotations

import re

from pygments.lexer import RegexLexer, bygroups, words
from pygments.token import (Comment, Generic, Keyword, Name, Number, Operator, String, Text,
                            Whitespace)


def _command_names():
    from .commands import INFO, TOP

    top = [n for c in TOP for n in c.names if n != "info"]
    info = [n for c in INFO for n in c.names]
    return top, info


_TOP, _INFO = _command_names()


class MonitorLexer(RegexLexer):
    name = "QEMU monitor"
    aliases = ["qemu-monitor", "hmp"]
    filenames = ["*.hmp"]
    flags = re.MULTILINE

    tokens = {
        "root": [
            (r"\(qemu\) ", Generic.Prompt),
            (r"#.*?$", Comment.Single),
            (r"Error: .*?$", Generic.Error),
            (r"(info)(\s+)(" + "|".join(re.escape(n) for n in _INFO) + r")(?=\s|$)",
             bygroups(Keyword, Whitespace, Name.Function), "args"),
            (r"info(?=\s|$)", Keyword, "args"),
            (words(sorted(_TOP, key=len, reverse=True), suffix=r"(?=\s|$)"), Keyword, "args"),
            (r"\n", Whitespace),
            (r".+?$", Generic.Output),
        ],
        "args": [
            (r"\n", Whitespace, "#pop"),
            (r"[ \t]+", Whitespace),
            (r"/\d*[oduxicbhwgL]*", String.Other),
            (r'"(\\.|[^"\\\n])*"?', String.Double),
            (r"\$\w+", Name.Variable),
            (r"0[xX][0-9a-fA-F]+|\d+", Number),
            (r"-[a-zA-Z](?=\s|$)", Name.Attribute),
            (r"(on|off)(?=\s|$)", Keyword.Constant),
            (r"[+\-*/%&|^~()]", Operator),
            (r"[^\s+\-*/%&|^~()]+", Text),
        ],
    }
