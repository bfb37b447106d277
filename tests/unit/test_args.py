"""The args_type parser against QEMU 7.2's messages and semantics."""

import pytest

from monitor.args import (ArgError, MemFormat, eval_expr, parse_args_type, parse_arguments)


def parse(args_type, text, name="cmd", memfmt=None, registers=None):
    return parse_arguments(name, parse_args_type(args_type), text, memfmt, registers)


@pytest.mark.parametrize("expr,value", [
    ("0x10", 0x10), ("010", 8), ("10", 10), ("0X10", 16), ("0x10*2", 0x20), ("0x10-1", 0xF),
    ("0x10|1", 0x11), ("0x10 ^ 1", 0x11), ("7%4", 3), ("(2+3)*4", 20), ("0x10&0x3f", 0x10),
    ("-0x10+0x20", 0x10), ("+4", 4), ("--4", 4), ("'a'", 0x61), ("0x100 / 0x10", 0x10),
    ("~0", (1 << 64) - 1), ("2*-1", (1 << 64) - 2), ("1+2*3", 7),
])
def test_expressions(expr, value):
    assert eval_expr(expr) == value


@pytest.mark.parametrize("expr,message", [
    ("", "unexpected end of expression"), ("1+", "unexpected end of expression"),
    ("(1", "')' expected"), ("foo", "invalid char 'f' in expression"),
    ("1/0", "division by zero"), ("1%0", "division by zero"),
    ("''", "missing terminating ' character"), ("'ab'", "missing terminating ' character"),
    ("0x10000000000000000", "number too large"), ("$pc", "unknown register"),
])
def test_expression_errors(expr, message):
    with pytest.raises(ArgError) as e:
        eval_expr(expr)
    assert str(e.value) == message


def test_strings_and_quoting():
    assert parse("name:s", ' "a b"') == {"name": "a b"}
    assert parse("name:s", r' "q\"t"') == {"name": 'q"t'}
    assert parse("name:s", " 'sq'") == {"name": "'sq'"}  # single quotes are not quotes
    assert parse("name:s?", "   ") == {"name": None}
    with pytest.raises(ArgError) as e:
        parse("name:s", "", name="loadvm")
    assert str(e.value) == "loadvm: string expected"
    with pytest.raises(ArgError) as e:
        parse("name:s?", ' "abc', name="savevm")
    assert str(e.value) == "unterminated string\nsavevm: string expected"
    with pytest.raises(ArgError) as e:
        parse("name:s?", r' "bad\q"', name="savevm")
    assert str(e.value) == "unsupported escape code: '\\q'\nsavevm: string expected"


def test_extraneous_uses_the_full_name():
    with pytest.raises(ArgError) as e:
        parse("", " extra", name="stop|s")
    assert str(e.value) == "stop|s: extraneous characters at the end of line"
    with pytest.raises(ArgError) as e:
        parse("name:s?", " a b", name="savevm")
    assert str(e.value) == "savevm: extraneous characters at the end of line"


def test_pmemsave_reads_a_slash_as_division():
    # QEMU reads "4096 /tmp/x" as 4096 divided by tmp: an absolute path must be quoted.
    spec = "val:l,size:i,filename:s"
    with pytest.raises(ArgError) as e:
        parse(spec, " 0 4096 /tmp/pm.bin")
    assert str(e.value) == "invalid char 't' in expression"
    assert parse(spec, ' 0 4096 "/tmp/pm.bin"') == {"val": 0, "size": 4096,
                                                   "filename": "/tmp/pm.bin"}
    assert parse(spec, " 0 16 /2 pm6.bin") == {"val": 0, "size": 8, "filename": "pm6.bin"}


def test_format_is_sticky_per_kind():
    fmt = MemFormat()
    spec = "fmt:/,addr:l"
    r = parse(spec, " 0", memfmt=fmt)["fmt"]
    assert (r.count, r.format, r.size) == (1, "x", 4)
    r = parse(spec, " /2xb 0", memfmt=fmt)["fmt"]
    assert (r.count, r.format, r.size) == (2, "x", 1)
    r = parse(spec, " /x 0", memfmt=fmt)["fmt"]
    assert (r.count, r.format, r.size) == (1, "x", 1)
    r = parse(spec, " /d 0", memfmt=fmt)["fmt"]
    assert (r.count, r.format, r.size) == (1, "d", 1)
    r = parse(spec, " /010wx 0", memfmt=fmt)["fmt"]
    assert (r.count, r.format, r.size) == (10, "x", 4)
    r = parse(spec, " /1xL 0", memfmt=fmt)["fmt"]
    assert r.size == 8


@pytest.mark.parametrize("text,bad", [(" /zz 0", "z"), (" /4tb 0", "t"), (" /-1xb 0", "-"),
                                      (" /0x4xb 0", "4"), (" /s 0", "s")])
def test_format_errors(text, bad):
    fmt = MemFormat()
    with pytest.raises(ArgError) as e:
        parse("fmt:/,addr:l", text, memfmt=fmt)
    assert str(e.value) == f"invalid char in format: '{bad}'"
    assert (fmt.format, fmt.size) == ("x", 4)  # a format that fails to parse changes nothing


def test_bool_and_flags():
    assert parse("name:s,option:b", " ev on") == {"name": "ev", "option": True}
    with pytest.raises(ArgError) as e:
        parse("name:s,option:b", " ev maybe")
    assert str(e.value) == "Expected 'on' or 'off'"
    assert parse("detach:-d,uri:s", " -d tcp:1") == {"detach": True, "uri": "tcp:1"}
    assert parse("detach:-d,uri:s", " tcp:1") == {"detach": False, "uri": "tcp:1"}


def test_registers():
    regs = {"pc": 0x1234}.get
    assert eval_expr("$pc+4", regs) == 0x1238
    with pytest.raises(ArgError):
        eval_expr("$nosuch", regs)
