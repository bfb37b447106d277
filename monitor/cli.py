"""qmon's command line, in QEMU's spellings, and the choice of front end."""

from __future__ import annotations

import os
import sys
import threading

from machine import QEMU_VERSION, __version__

USAGE = """\
usage: qmon [options]

A QEMU monitor you can learn from: a simulated machine that saves, restores and live-migrates
itself with QEMU 7.2's savevm protocol (version 3), driven by QEMU's human monitor commands.

Options (QEMU's spellings):
  -m SIZE            guest RAM (default 128M; K, M, G suffixes; a bare number is MiB)
  -M TYPE            machine type: lab (default) or none; '-M help' lists them
  -S                 start paused, in 'paused (prelaunch)'
  -name NAME         the machine's name ('info name')
  -workload SPEC     the guest program: idle | counter[,start=A][,size=S][,speed=PAGES/S]
                     | dirty,rate=BYTES/S,wss=SIZE[,start=A][,seed=N]
                     (default: counter on lab, idle on none)
  -mem-path FILE     back guest RAM with a shared mapping of FILE (created or extended)
  -snapshot-dir DIR  where snapshots live (default $QMON_SNAPSHOT_DIR, else
                     $XDG_DATA_HOME/qmon/snapshots, i.e. ~/.local/share/qmon/snapshots)
  -serial stdio|none where the guest's serial output goes (default none)
  -drive file=PATH[,id=NAME]
                     give the machine a disk (a raw file, a whole number of MiB) that the
                     counter workload writes a log to; migrate -b sends it
  -incoming URI      wait in 'paused (inmigrate)' for a migration stream: tcp:HOST:PORT,
                     unix:PATH, exec:CMD (reads CMD's stdout), or defer (then
                     migrate_incoming URI); listeners bind 127.0.0.1 unless HOST says else
  -qmp tcp:HOST:PORT,server=on,wait=off | unix:PATH,server=on,wait=off
                     a QMP server beside the console (qemu.qmp, qmp-shell)
  -trace PATTERN     turn on trace events from the start (also -trace enable=PATTERN)
  -f FILE            run monitor commands from FILE, one a line, printing a transcript
  --version          print the version and exit
  --help, -h         print this help and exit

Without -f, commands are read from stdin when it is not a terminal; otherwise the interactive
console starts. Scripted runs exit with status 1 if any command failed.
"""

# QEMU options that qmon accepts and ignores, so QEMU command lines can be pasted.
_IGNORED_WITH_ARG = {"-display", "-monitor", "-nographic"}
_IGNORED_FLAGS = {"-nodefaults", "-no-user-config"}


class UsageError(Exception):
    pass


def default_snapshot_dir() -> str:
    env = os.environ.get("QMON_SNAPSHOT_DIR")
    if env:
        return env
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local",
                                                            "share")
    return os.path.join(base, "qmon", "snapshots")


def parse_argv(argv: list[str]) -> dict:
    from machine.units import parse_size

    opts = {"ram": 128 << 20, "machine": "lab", "paused": False, "name": None,
            "workload": None, "mem_path": None, "snapshot_dir": None, "script": None,
            "serial": "none", "action": None, "incoming": None, "trace": [],
            "drive": None, "drive_id": "disk0", "qmp": []}
    i = 0

    def value(opt):
        nonlocal i
        if i + 1 >= len(argv):
            raise UsageError(f"{opt}: requires an argument")
        i += 1
        return argv[i]

    while i < len(argv):
        a = argv[i]
        if a.startswith("--") and a not in ("--help", "--version"):
            a = a[1:]  # QEMU accepts --opt for -opt
        if a in ("--help", "-h", "-help"):
            opts["action"] = "help"
        elif a in ("--version", "-version"):
            opts["action"] = "version"
        elif a == "-m":
            v = value(a)
            v = v[5:] if v.startswith("size=") else v
            try:
                opts["ram"] = parse_size(v, default_suffix="M")
            except ValueError:
                raise UsageError(f"-m {v}: invalid RAM size") from None
            if opts["ram"] <= 0 or opts["ram"] % 4096:
                raise UsageError(f"-m {v}: RAM size must be a positive multiple of 4 KiB")
        elif a in ("-M", "-machine"):
            v = value(a).split(",")[0]
            v = v[5:] if v.startswith("type=") else v
            opts["machine"] = v
        elif a == "-S":
            opts["paused"] = True
        elif a == "-name":
            opts["name"] = value(a).split(",")[0]
        elif a == "-workload":
            opts["workload"] = value(a)
        elif a == "-mem-path":
            opts["mem_path"] = value(a)
        elif a == "-snapshot-dir":
            opts["snapshot_dir"] = value(a)
        elif a == "-serial":
            v = value(a)
            if v not in ("stdio", "none"):
                raise UsageError(f"-serial {v}: qmon supports 'stdio' and 'none'")
            opts["serial"] = v
        elif a == "-drive":
            for item in value(a).split(","):
                k, _, v = item.partition("=")
                if k == "file":
                    opts["drive"] = v
                elif k == "id":
                    opts["drive_id"] = v
                elif k not in ("if", "format", "media", "cache"):
                    raise UsageError(f"-drive: unknown option '{k}'")
            if not opts["drive"]:
                raise UsageError("-drive: needs file=PATH")
        elif a == "-qmp":
            opts["qmp"].append(value(a))
        elif a == "-trace":
            v = value(a)
            opts["trace"].append(v[7:] if v.startswith("enable=") else v)
        elif a == "-incoming":
            opts["incoming"] = value(a)
        elif a == "-f":
            opts["script"] = value(a)
        elif a in _IGNORED_WITH_ARG:
            if a != "-nographic":
                value(a)
        elif a in _IGNORED_FLAGS:
            pass
        else:
            raise UsageError(f"{a}: invalid option")
        i += 1
    return opts


def machine_help() -> str:
    from machine.machine import MACHINE_ALIASES, MACHINE_TYPES

    lines = ["Supported machines are:"]
    for alias, target in MACHINE_ALIASES.items():
        lines.append(f"{alias:<20} {MACHINE_TYPES[target].desc} (alias of {target})")
    for mt in MACHINE_TYPES.values():
        lines.append(f"{mt.name:<20} {mt.desc}{' (default)' if mt.is_default else ''}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # A migration's writer thread comes back from each sendmsg wanting the GIL while the
    # machine thread builds the next batch; at the default 5 ms it waited that long, and the
    # wire sat idle (1 GiB to a sink: 0.77 s, at 0.5 ms 0.68 s). The monitor answers sooner too.
    sys.setswitchinterval(0.0005)
    # Bytes that are not UTF-8 (a tag typed in another encoding) pass through unharmed.
    for stream, errors in ((sys.stdin, "surrogateescape"), (sys.stdout, "surrogateescape"),
                           (sys.stderr, "backslashreplace")):
        try:
            stream.reconfigure(errors=errors)
        except (AttributeError, ValueError):
            pass
    try:
        opts = parse_argv(argv)
    except UsageError as e:
        print(f"qmon: {e}", file=sys.stderr)
        return 1
    if opts["action"] == "help":
        print(USAGE, end="")
        return 0
    if opts["action"] == "version":
        print(f"qmon version {__version__} (QEMU {'.'.join(map(str, QEMU_VERSION))} "
              "savevm protocol and monitor)")
        return 0
    from machine.machine import MACHINE_ALIASES, MACHINE_TYPES

    if opts["machine"] in ("help", "?"):
        print(machine_help())
        return 0
    if opts["machine"] not in MACHINE_TYPES and opts["machine"] not in MACHINE_ALIASES:
        print(f"qmon: -M {opts['machine']}: unsupported machine type\n"
              "Use -machine help to list supported machines", file=sys.stderr)
        return 1
    try:
        return _run(opts)
    except KeyboardInterrupt:
        return 130


def _run(opts) -> int:
    from machine.machine import Machine
    from machine.snapshots import SnapshotStore
    from machine.disk import DiskError
    from machine.workloads import WorkloadError

    from .session import Session

    try:
        machine = Machine(opts["machine"], opts["ram"], opts["mem_path"], opts["workload"],
                          opts["name"], serial_stdio=opts["serial"] == "stdio",
                          drive=opts["drive"], drive_id=opts["drive_id"])
    except WorkloadError as e:
        print(f"qmon: -workload: {e}", file=sys.stderr)
        return 1
    except DiskError as e:
        print(f"qmon: -drive: {e}", file=sys.stderr)
        return 1
    except (OSError, ValueError, OverflowError, MemoryError) as e:
        what = f"-mem-path {opts['mem_path']}" if opts["mem_path"] else f"-m {opts['ram']}"
        reason = getattr(e, "strerror", None) or str(e) or type(e).__name__
        print(f"qmon: {what}: cannot map guest RAM: {reason}", file=sys.stderr)
        return 1
    try:
        store = SnapshotStore(opts["snapshot_dir"] or default_snapshot_dir())
    except OSError as e:
        print(f"qmon: -snapshot-dir: {e.strerror or e}", file=sys.stderr)
        return 1

    lock = threading.Lock()
    closed = []

    def out(text: str):
        # A reader that went away (qmon ... | head) must not stop the machine mid-command:
        # the rest of the output is dropped.
        if closed:
            return
        with lock:
            try:
                print(text, flush=True)
            except BrokenPipeError:
                closed.append(True)
                try:
                    sys.stdout = open(os.devnull, "w")
                except OSError:
                    pass

    machine.output = out

    def fatal(message):
        # QEMU ends the process when an incoming migration fails; so does qmon, status 1.
        print(f"qmon: {message}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        store.close()
        os._exit(1)

    machine.on_fatal = fatal

    def quit_now():
        # A moment for the QMP replies already sent to be read before the sockets go.
        sys.stdout.flush()
        store.close()
        threading.Timer(0.2, os._exit, (0,)).start()

    machine.on_quit = quit_now
    from machine.trace import TraceError
    for pattern in opts["trace"]:
        try:
            machine.trace.set_state(pattern, True)
        except TraceError as e:
            print(f"qmon: -trace {pattern}: {e}", file=sys.stderr)
            return 1
    from machine.machine import MachineError
    try:
        machine.start(paused=opts["paused"], incoming=opts["incoming"])
    except MachineError as e:
        print(f"qmon: -incoming {opts['incoming']}: {e}", file=sys.stderr)
        return 1
    session = Session(machine, store, out)
    from .qmp import QMPServer
    servers = []
    for spec in opts["qmp"]:
        try:
            servers.append(QMPServer(machine, store, spec))
        except (ValueError, OSError) as e:
            print(f"qmon: -qmp {spec}: {e}", file=sys.stderr)
            return 1
    for server in servers:
        server.start()
    try:
        if opts["script"] is not None:
            from .batch import run_batch
            try:
                f = open(opts["script"], encoding="utf-8", errors="surrogateescape")
            except OSError as e:
                print(f"qmon: -f {opts['script']}: {e.strerror}", file=sys.stderr)
                return 1
            with f:
                return run_batch(session, f, out)
        if not sys.stdin.isatty():
            from .batch import run_batch
            return run_batch(session, sys.stdin, out)
        from .console import run_console
        banner = (f"QEMU {'.'.join(map(str, QEMU_VERSION))} monitor (qmon {__version__}) - "
                  "type 'help' for more information")
        return run_console(session, banner)
    finally:
        machine.shutdown()
        store.close()


if __name__ == "__main__":
    sys.exit(main())
