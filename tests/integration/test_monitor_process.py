"""Real qmon processes driven by scripts: QEMU 7.2's text, run states, exit status."""

import os

import pytest

from conftest import run_qmon, transcript_outputs


def session(args, commands, snapdir, **kw):
    status, out, err = run_qmon(list(args) + ["-snapshot-dir", snapdir], "\n".join(commands) + "\n",
                                **kw)
    assert "Traceback" not in out + err
    return status, transcript_outputs(out), err


def outputs(args, commands, snapdir):
    return [lines for _, lines in session(args, commands, snapdir)[1]]


def test_transcript_echo_and_exit_status(snapdir):
    status, t, _ = session(["-M", "none", "-m", "16M"], ["info status", "stop", "info status"],
                           snapdir)
    assert status == 0
    assert t == [("info status", ["VM status: running"]), ("stop", []),
                 ("info status", ["VM status: paused"])]
    status, t, _ = session(["-M", "none"], ["nosuch", "info status"], snapdir)
    assert status == 1
    assert t[0] == ("nosuch", ["unknown command: 'nosuch'"])


def test_quit_ends_the_script(snapdir):
    status, t, _ = session(["-M", "none"], ["info status", "quit", "info status"], snapdir)
    assert status == 0
    assert [c for c, _ in t] == ["info status", "quit"]
    status, t, _ = session(["-M", "none"], ["quit now", "info name"], snapdir)
    assert t[0][1] == ["quit|q: extraneous characters at the end of line",
                       'Try "help quit" for more information']
    assert status == 1


def test_script_file(tmp_path, snapdir):
    script = tmp_path / "s.hmp"
    script.write_text("info status\nstop\ninfo status\n")
    status, out, err = run_qmon(["-M", "none", "-f", str(script), "-snapshot-dir", snapdir])
    assert status == 0
    assert out.splitlines() == ["(qemu) info status", "VM status: running", "(qemu) stop",
                                "(qemu) info status", "VM status: paused"]


def test_qemu_texts(snapdir):
    # Each expected output was recorded from qemu-system-x86_64 7.2 -M none -m 16M.
    cases = [
        ("loadvm", ["loadvm: string expected", 'Try "help loadvm" for more information']),
        ("delvm", ["delvm: string expected", 'Try "help delvm" for more information']),
        ("stop extra", ["stop|s: extraneous characters at the end of line",
                        'Try "help stop" for more information']),
        ("cont x", ["cont|c: extraneous characters at the end of line",
                    'Try "help cont" for more information']),
        ("info status x", ["status: extraneous characters at the end of line",
                           'Try "help info status" for more information']),
        ("x", ["unexpected end of expression", 'Try "help x" for more information']),
        ("x /zz 0", ["invalid char in format: 'z'", 'Try "help x" for more information']),
        ("x /4xb foo", ["invalid char 'f' in expression", 'Try "help x" for more information']),
        ("x /4xb 0x", ["x: extraneous characters at the end of line",
                       'Try "help x" for more information']),
        ("xp /2xb (1", ["')' expected", 'Try "help xp" for more information']),
        ("pmemsave 0", ["unexpected end of expression", 'Try "help pmemsave" for more information']),
        ("pmemsave 0 16 ", ["pmemsave: string expected",
                            'Try "help pmemsave" for more information']),
        ("savevm a b", ["savevm: extraneous characters at the end of line",
                        'Try "help savevm" for more information']),
        ("info nosuch", ["unknown command: 'info nosuch'"]),
        ("nosuch arg", ["unknown command: 'nosuch'"]),
        ("inf status", ["unknown command: 'inf'"]),
        ("STOP", ["unknown command: 'STOP'"]),
        ("info status;stop", ["unknown command: 'info status;stop'"]),
        ("", []),
        ("   ", []),
        ("help a b", ["unknown command: 'a'"]),
        ("help info nosuch", ["unknown command: 'info nosuch'"]),
        ("system_reset x", ["system_reset: extraneous characters at the end of line",
                            'Try "help system_reset" for more information']),
        ("x /16xb 0", ["Can not dump without CPU"]),
        ("info registers", ["No CPU available"]),
        ("xp /4xb $pc", ["unknown register", 'Try "help xp" for more information']),
        ("info name", []),
        ("loadvm nosuch", ["Error: Snapshot 'nosuch' does not exist in one or more devices"]),
        ("delvm nosuch", []),
        ("info snapshots", ["There is no snapshot available."]),
        ("xp /16xb 0", ["0000000000000000: 0x00 0x00 0x00 0x00 0x00 0x00 0x00 0x00",
                        "0000000000000008: 0x00 0x00 0x00 0x00 0x00 0x00 0x00 0x00"]),
        ("xp /1xw 0xfffffe", ["0000000000fffffe: Cannot access memory"]),
        ("xp /0xb 0", []),
        ("trace-nosuch", ["unknown command: 'trace-nosuch'"]),
    ]
    got = outputs(["-M", "none", "-m", "16M"], [c for c, _ in cases], snapdir)
    assert len(got) == len(cases)
    for (cmd, expected), lines in zip(cases, got):
        assert lines == expected, cmd


def test_help_lines_have_qemus_shape(snapdir):
    (help_all, help_stop, help_info, info_alone, help_info_status, help_q) = outputs(
        ["-M", "none"], ["help", "help stop", "help info", "info", "help info status", "? q"],
        snapdir)
    names = [line.split(" ")[0] for line in help_all]
    assert names == sorted(names)
    for line in help_all:
        assert " -- " in line
    assert "stop|s  -- " in "\n".join(help_all)
    assert help_stop == [next(l for l in help_all if l.startswith("stop|s "))]
    assert help_info == info_alone
    assert all(l.startswith("info ") for l in help_info)
    assert help_info_status[0].startswith("info status  -- ")
    assert help_q[0].startswith("quit|q  -- ")
    for needed in ("savevm tag -- ", "loadvm tag -- ", "delvm tag -- ", "x /fmt addr -- ",
                   "xp /fmt addr -- ", "pmemsave addr size file -- ", "info [subcommand] -- ",
                   "help|? [cmd] -- ", "cont|c  -- ", "system_reset  -- "):
        assert any(l.startswith(needed) for l in help_all), needed


def test_runstate_sequence_with_S_as_qemu(snapdir):
    # The sequence observed on QEMU 7.2 with -S (reference section 4 and notes).
    cmds = ["info status", "savevm a", "info status", "loadvm a", "info status", "cont",
            "info status", "stop", "loadvm a", "info status", "cont", "info status",
            "loadvm zz", "info status", "system_reset", "info status", "cont", "stop", "stop",
            "info status", "system_reset", "info status", "cont", "system_reset", "info status",
            "savevm b", "info status", "loadvm b", "info status"]
    got = outputs(["-M", "none", "-S"], cmds, snapdir)
    status = [lines[0] for c, lines in zip(cmds, got) if c == "info status"]
    assert status == [
        "VM status: paused (prelaunch)", "VM status: paused (prelaunch)",
        "VM status: paused (prelaunch)", "VM status: running", "VM status: paused",
        "VM status: running", "VM status: paused (restore-vm)", "VM status: paused (prelaunch)",
        "VM status: paused", "VM status: paused (prelaunch)", "VM status: running",
        "VM status: running", "VM status: running"]
    assert got[cmds.index("loadvm zz")] == [
        "Error: Snapshot 'zz' does not exist in one or more devices"]


def test_machine_help_version_and_bad_options():
    status, out, _ = run_qmon(["-M", "help"])
    assert status == 0 and out.splitlines()[0] == "Supported machines are:"
    lines = out.splitlines()
    assert any(l.startswith("lab-2.0 ") and l.endswith("(default)") for l in lines)
    assert any(l.startswith("lab-1.0 ") for l in lines)
    assert any(l.startswith("lab ") and l.endswith("(alias of lab-2.0)") for l in lines)
    assert any(l.startswith("none ") for l in out.splitlines())
    status, out, _ = run_qmon(["--version"])
    assert status == 0 and "qmon version" in out
    status, out, _ = run_qmon(["--help"])
    assert status == 0 and "-snapshot-dir" in out and "-workload" in out
    for bad, msg in ((["-M", "pc"], "unsupported machine type"), (["-m", "12Q"], "invalid RAM"),
                     (["-bogus"], "invalid option"), (["-workload", "spin"], "unknown workload"),
                     (["-workload", "dirty,rate=1M"], "needs rate")):
        status, out, err = run_qmon(bad)
        assert status == 1 and msg in err and "Traceback" not in err


def test_info_name_version_registers_workload(snapdir):
    got = outputs(["-name", "guest1", "-m", "4M", "-S", "-workload", "counter,speed=1000"],
                  ["info name", "info version", "info registers", "info workload"], snapdir)
    assert got[0] == ["guest1"]
    assert got[1][0].startswith("7.2.")
    assert got[2][0].startswith("RAX=") and got[2][4].startswith("RIP=")
    assert got[3][0] == "workload: counter" and got[3][-1] == "invariant: ok"


def test_xp_and_pmemsave_on_a_mem_path_file(tmp_path, snapdir):
    ram = tmp_path / "ram.bin"
    content = bytes(range(256)) * (16 * 4096 // 256)
    ram.write_bytes(content + bytes((4 << 20) - len(content)))
    dump = tmp_path / "dump.bin"
    got = outputs(["-M", "none", "-m", "4M", "-S", "-mem-path", str(ram)],
                  ["xp /16xb 0", "xp /4dw 0", "xp /5db 0xfe", "xp /2 0x10",
                   f'pmemsave 0x100 8192 "{dump}"', "pmemsave 0 16 \"/nonexistent/dir/x\""],
                  snapdir)
    assert got[0] == ["0000000000000000: 0x00 0x01 0x02 0x03 0x04 0x05 0x06 0x07",
                      "0000000000000008: 0x08 0x09 0x0a 0x0b 0x0c 0x0d 0x0e 0x0f"]
    assert got[1] == ["0000000000000000:   50462976  117835012  185207048  252579084"]
    assert got[2] == ["00000000000000fe: 254 255   0   1   2"]
    assert got[3] == ["0000000000000010:  16  17"]  # count 2, format d and size b sticky
    assert dump.read_bytes() == content[0x100:0x100 + 8192]
    assert got[5] == ["Error: Could not open '/nonexistent/dir/x': No such file or directory"]


def test_mem_path_is_extended_and_shared(tmp_path, snapdir):
    ram = tmp_path / "ram.bin"
    ram.write_bytes(b"\x11" * 4096)
    session(["-M", "none", "-m", "1M", "-S", "-mem-path", str(ram)], ["info status"], snapdir)
    data = ram.read_bytes()
    assert len(data) == 1 << 20 and data[:4096] == b"\x11" * 4096


def test_serial_stdio_prints_guest_output(make_machine):
    import queue

    lines = queue.Queue()
    m = make_machine("lab", 1 << 20, paused=True, workload="counter,speed=100000",
                     serial_stdio=True)
    m.output = lines.put
    m.run(m.vm_start)
    assert lines.get(timeout=5).startswith("counter: lap 1 done")


def test_bytes_that_are_not_utf8_are_handled(snapdir):
    import subprocess
    import sys

    from conftest import ROOT

    env = dict(os.environ, PYTHONPATH=ROOT)
    p = subprocess.run([sys.executable, "-m", "monitor.cli", "-M", "none", "-m", "1M", "-S",
                        "-snapshot-dir", snapdir],
                       input=b"savevm \xfe\xff\ninfo snapshots\nloadvm \xfe\xff\n",
                       capture_output=True, env=env, cwd=ROOT, timeout=60)
    assert p.returncode == 0, p.stdout
    assert b"internal error" not in p.stdout and b"Traceback" not in p.stderr
    assert b"\n--        \xfe\xff " in p.stdout  # the tag comes back as the bytes typed
