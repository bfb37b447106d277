"""One parser for QEMU's ``args_type`` notation (monitor/hmp.c: monitor_parse_arguments).

An args_type string lists ``name:type`` items separated by commas: ``"name:s?"`` (an optional
string), ``"detach:-d,uri:s"`` (a flag, then a string), ``"fmt:/,addr:l"`` (a /fmt spec, then an
expression). Types:

- ``s`` string (one word, or double-quoted with \\n \\r \\\\ \\' \\" escapes); ``F`` a file name;
  ``S`` the rest of the line; ``b`` on|off
- ``i`` ``l`` an expression as QEMU's monitor reads it (+ - * / % & | ^ ~ ( ), C numbers,
  'c' character constants, $register); ``M`` the same in MiB
- ``/`` a /COUNT FORMAT SIZE spec for x/xp, sticky between commands
- ``-X`` a flag option ``-X``

A trailing ``?`` makes an argument optional. Errors carry QEMU's messages.
"""

from __future__ import annotations

from dataclasses import dataclass


class ArgError(Exception):
    """Bad arguments: the monitor prints the message, then the 'Try "help ..."' line."""


@dataclass
class ArgSpec:
    name: str
    type: str  # one of s S F b i l M / -
    optional: bool
    flag: str = ""  # for type "-": the option letter


def parse_args_type(args_type: str) -> list[ArgSpec]:
    specs = []
    for item in filter(None, args_type.split(",")):
        name, _, t = item.partition(":")
        optional = t.endswith("?")
        t = t.rstrip("?")
        if t.startswith("-"):
            specs.append(ArgSpec(name, "-", True, t[1:]))
        else:
            specs.append(ArgSpec(name, t, optional))
    return specs


@dataclass
class MemFormat:
    """The sticky part of x/xp's /fmt: QEMU keeps format and size between commands."""

    format: str = "x"
    size: int = 4


@dataclass
class DumpSpec:
    count: int
    format: str
    size: int


_SPACE = " \t\n\r\v\f"  # C's isspace(): ASCII only
_DIGITS = "0123456789"


class _Text:
    def __init__(self, s: str, pos: int = 0):
        self.s = s
        self.pos = pos

    def peek(self) -> str:
        return self.s[self.pos] if self.pos < len(self.s) else ""

    def skip_spaces(self):
        while self.pos < len(self.s) and self.s[self.pos] in _SPACE:
            self.pos += 1

    def at_end(self) -> bool:
        return self.pos >= len(self.s)


# --- strings -------------------------------------------------------------------------------------

_ESCAPES = {"n": "\n", "r": "\r", "\\": "\\", "'": "'", '"': '"'}


def _get_str(t: _Text) -> str | None:
    """QEMU's get_str(): a word or a double-quoted string; None (after printing nothing) if
    there is none. Quoting errors raise ArgError with QEMU's first line."""
    t.skip_spaces()
    if t.at_end():
        return None
    s = t.s
    if s[t.pos] == '"':
        t.pos += 1
        out = []
        while t.pos < len(s) and s[t.pos] != '"':
            c = s[t.pos]
            if c == "\\":
                t.pos += 1
                esc = s[t.pos] if t.pos < len(s) else ""
                if esc not in _ESCAPES:
                    raise _Quoting(f"unsupported escape code: '\\{esc}'")
                out.append(_ESCAPES[esc])
            else:
                out.append(c)
            t.pos += 1
        if t.pos >= len(s):
            raise _Quoting("unterminated string")
        t.pos += 1
        return "".join(out)
    start = t.pos
    while t.pos < len(s) and s[t.pos] not in _SPACE:
        t.pos += 1
    return s[start:t.pos]


class _Quoting(Exception):
    pass


# --- expressions ---------------------------------------------------------------------------------

_MASK = (1 << 64) - 1


class _Expr:
    """QEMU's monitor expression evaluator (expr_sum/expr_logic/expr_prod/expr_unary)."""

    def __init__(self, t: _Text, registers):
        self.t = t
        self.registers = registers

    def _next(self):
        self.t.pos += 1
        self.t.skip_spaces()

    def sum(self) -> int:
        val = self.logic()
        while self.t.peek() in ("+", "-") and self.t.peek():
            op = self.t.peek()
            self._next()
            val2 = self.logic()
            val = (val + val2) if op == "+" else (val - val2)
        return val & _MASK

    def logic(self) -> int:
        val = self.prod()
        while self.t.peek() in ("&", "|", "^") and self.t.peek():
            op = self.t.peek()
            self._next()
            val2 = self.prod()
            val = {"&": val & val2, "|": val | val2, "^": val ^ val2}[op]
        return val & _MASK

    def prod(self) -> int:
        val = self.unary()
        while self.t.peek() in ("*", "/", "%") and self.t.peek():
            op = self.t.peek()
            self._next()
            val2 = self.unary()
            if op == "*":
                val = val * val2
            else:
                if val2 == 0:
                    raise ArgError("division by zero")
                # C's signed 64-bit division and remainder, truncating toward zero.
                a, b = _signed(val), _signed(val2)
                q = abs(a) // abs(b) * (1 if (a < 0) == (b < 0) else -1)
                val = q if op == "/" else a - q * b
            val &= _MASK
        return val

    def unary(self) -> int:
        t = self.t
        c = t.peek()
        if c == "+":
            self._next()
            return self.unary()
        if c == "-":
            self._next()
            return -self.unary() & _MASK
        if c == "~":
            self._next()
            return ~self.unary() & _MASK
        if c == "(":
            self._next()
            val = self.sum()
            if t.peek() != ")":
                raise ArgError("')' expected")
            self._next()
            return val
        if c == "'":
            t.pos += 1
            if t.at_end():
                raise ArgError("character constant expected")
            val = ord(t.s[t.pos])
            t.pos += 1
            if t.peek() != "'":
                raise ArgError("missing terminating ' character")
            self._next()
            return val
        if c == "$":
            t.pos += 1
            start = t.pos
            while t.pos < len(t.s) and (t.s[t.pos].isascii() and t.s[t.pos].isalnum()
                                        or t.s[t.pos] in "_."):
                t.pos += 1
            name = t.s[start:t.pos]
            t.skip_spaces()
            value = self.registers(name) if self.registers else None
            if value is None:
                raise ArgError("unknown register")
            return value & _MASK
        if c == "":
            raise ArgError("unexpected end of expression")
        val, end = _strtoull(t.s, t.pos)
        if end == t.pos:
            raise ArgError(f"invalid char '{c}' in expression")
        t.pos = end
        t.skip_spaces()
        return val


def _signed(v: int) -> int:
    return v - (1 << 64) if v & (1 << 63) else v


def _strtoull(s: str, pos: int):
    """C strtoull(s, &end, 0) for the digits at ``pos``: (value, end)."""
    i = pos
    base = 10
    if s.startswith(("0x", "0X"), i) and i + 2 < len(s) and s[i + 2] in "0123456789abcdefABCDEF":
        base, i = 16, i + 2
    elif s.startswith("0", i):
        base = 8
    digits = "0123456789abcdef"[:base]
    start = i
    while i < len(s) and s[i] in digits + digits.upper()[10:]:
        i += 1
    if i == start:
        return 0, pos
    val = int(s[start:i], base)
    if val > _MASK:
        raise ArgError("number too large")
    return val, i


def eval_expr(text: str, registers=None) -> int:
    """Evaluate a whole expression (tests, and callers outside an args_type)."""
    t = _Text(text)
    t.skip_spaces()
    val = _Expr(t, registers).sum()
    if not t.at_end():
        raise ArgError(f"invalid char '{t.peek()}' in expression")
    return val


# --- the argument parser -------------------------------------------------------------------------


def parse_arguments(cmd_name: str, specs: list[ArgSpec], text: str, memfmt: MemFormat | None = None,
                    registers=None) -> dict:
    """Parse ``text`` (what follows the command name) against ``specs``.

    ``cmd_name`` is the command's name field as QEMU prints it in messages (``stop|s``).
    """
    t = _Text(text)
    args: dict = {}
    for spec in specs:
        kind = spec.type
        if kind in ("s", "F"):
            try:
                value = _get_str(t)
            except _Quoting as e:
                what = "filename" if kind == "F" else "string"
                raise ArgError(f"{e}\n{cmd_name}: {what} expected") from None
            if value is None:
                if spec.optional:
                    args[spec.name] = None
                    continue
                what = "filename" if kind == "F" else "string"
                raise ArgError(f"{cmd_name}: {what} expected")
            args[spec.name] = value
        elif kind == "S":
            t.skip_spaces()
            rest = t.s[t.pos:]
            if not rest:
                if spec.optional:
                    args[spec.name] = None
                    continue
                raise ArgError(f"{cmd_name}: string expected")
            args[spec.name] = rest
            t.pos = len(t.s)
        elif kind == "b":
            t.skip_spaces()
            start = t.pos
            while t.pos < len(t.s) and t.s[t.pos] not in _SPACE:
                t.pos += 1
            value = t.s[start:t.pos] or None
            if value is None and spec.optional:
                args[spec.name] = None
                continue
            if value not in ("on", "off"):
                raise ArgError("Expected 'on' or 'off'")
            args[spec.name] = value == "on"
        elif kind in ("i", "l", "M"):
            t.skip_spaces()
            if t.at_end() and spec.optional:
                args[spec.name] = None
                continue
            val = _Expr(t, registers).sum()
            if kind == "i" and (val >> 32) & 0xFFFFFFFF:
                raise ArgError(f"'{cmd_name}' has failed: integer is for 32-bit values")
            if kind == "M":
                val = (val << 20) & _MASK
            args[spec.name] = val
        elif kind == "/":
            args[spec.name] = _parse_format(t, memfmt or MemFormat())
        elif kind == "-":
            # QEMU's rule: flags must come in the order args_type lists them; a flag that
            # belongs to a later option is left for it, any other is an error.
            t.skip_spaces()
            present = False
            if t.peek() == "-":
                letter = t.s[t.pos + 1: t.pos + 2]
                later = [s.flag for s in specs[specs.index(spec) + 1:] if s.type == "-"]
                if letter == spec.flag:
                    present = True
                    t.pos += 2
                elif letter not in later or not letter:
                    raise ArgError(f"{cmd_name}: unsupported option -{letter}")
            args[spec.name] = present
        else:
            raise ValueError(f"unknown args_type {kind}")
    t.skip_spaces()
    if not t.at_end():
        raise ArgError(f"{cmd_name}: extraneous characters at the end of line")
    return args


def _parse_format(t: _Text, memfmt: MemFormat) -> DumpSpec:
    t.skip_spaces()
    if t.peek() != "/":
        fmt = memfmt.format
        return DumpSpec(1, fmt, -1 if fmt == "i" else memfmt.size)
    t.pos += 1
    count = 1
    if t.peek() and t.peek() in _DIGITS:
        start = t.pos
        while t.peek() and t.peek() in _DIGITS:
            t.pos += 1
        # QEMU reads it with strtol() into a C int: saturate at LONG_MAX, keep 32 bits.
        count = min(int(t.s[start:t.pos]), (1 << 63) - 1) & 0xFFFFFFFF
        if count >= 1 << 31:
            count -= 1 << 32
    fmt, size = None, None
    while True:
        c = t.peek()
        if c in ("o", "d", "u", "x", "i", "c"):
            fmt = c
        elif c == "b":
            size = 1
        elif c == "h":
            size = 2
        elif c == "w":
            size = 4
        elif c in ("g", "L"):
            size = 8
        else:
            break
        t.pos += 1
    if not t.at_end() and t.peek() not in _SPACE:
        raise ArgError(f"invalid char in format: '{t.peek()}'")
    if fmt is None:
        fmt = memfmt.format
    if fmt != "i":
        if size is None:
            size = memfmt.size
        memfmt.size = size
    elif size is None:
        size = -1
    memfmt.format = fmt
    return DumpSpec(count, fmt, size)
