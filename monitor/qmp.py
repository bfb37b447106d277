"""The QMP server: QEMU's JSON machine protocol beside the console (``-qmp tcp:...`` /
``-qmp unix:...,server=on,wait=off``), so QEMU's own client library and qmp-shell drive qmon.

Each client gets a thread. Input is a stream of JSON values with no framing (the client library
sends no newline), so a small scanner finds where each top-level value ends; every reply and
event is one line ending in CRLF. Commands run through the same machine calls as the monitor;
``human-monitor-command`` runs the very same dispatcher.
"""

from __future__ import annotations

import json
import os
import re
import socket
import threading
import time

from machine import QEMU_VERSION
from machine.machine import MachineError
from machine.migration import state as S
from machine.runstate import RunState

MAX_MESSAGE = 16 << 20  # a value larger than this is refused (QEMU: token size limit)
MAX_NESTING = 1024


class QMPError(Exception):
    def __init__(self, desc: str, cls: str = "GenericError"):
        super().__init__(desc)
        self.desc = desc
        self.cls = cls


def timestamp() -> dict:
    t = time.time()
    return {"seconds": int(t), "microseconds": int((t - int(t)) * 1_000_000)}


# --- the JSON stream ---------------------------------------------------------------------------

_STRUCT = re.compile(rb'["{}\[\]]')
_IN_STRING = re.compile(rb'["\\]')


class JSONStream:
    """Splits a byte stream into top-level JSON values without any framing.

    The scan is incremental (each byte is looked at once, the jumps between structural
    characters done by regular expressions in C), so a large message costs linear time. A
    value over MAX_MESSAGE is refused once, and its remaining bytes are passed over until it
    ends, after which the stream goes on.
    """

    def __init__(self):
        self.buf = bytearray()
        self.pos = 0  # where scanning resumes
        self.start = None  # where the value being scanned began
        self.depth = 0
        self.in_str = False
        self.discarding = False

    def feed(self, data: bytes):
        self.buf += data

    def values(self):
        """Yield ("value", obj) or ("error", message) for each complete top-level value."""
        buf = self.buf
        while True:
            if self.start is None:
                i = self.pos
                n = len(buf)
                while i < n and buf[i] in b" \t\r\n":
                    i += 1
                self.pos = i
                if i >= n:
                    break
                c = buf[i]
                if c not in b"{[":
                    item = self._scalar(i)
                    if item is None:
                        break
                    yield item
                    continue
                self.start, self.depth, self.in_str = i, 0, False
            done = self._scan()
            if done is None:
                if not self.discarding and len(buf) - self.start > MAX_MESSAGE:
                    self.discarding = True
                    yield "error", "JSON token size limit exceeded"
                if self.discarding:  # keep only the scan state, not the bytes
                    del buf[:self.pos]
                    self.start, self.pos = 0, 0
                break
            if done < 0:
                yield "error", "JSON nesting depth limit exceeded"
                buf.clear()
                self.pos, self.start = 0, None
                break
            chunk = bytes(buf[self.start:done])
            self.pos, self.start = done, None
            if self.discarding:
                self.discarding = False
                continue
            try:
                yield "value", json.loads(chunk)
            except (ValueError, RecursionError) as e:
                yield "error", f"JSON parse error, {_why(e)}"
        if self.start is None and self.pos:
            del buf[:self.pos]
            self.pos = 0

    def _scan(self):
        """Advance over the current container: its end index, None if incomplete, -1 if
        nested too deep."""
        buf = self.buf
        pos = self.pos if self.pos > self.start else self.start
        while True:
            if self.in_str:
                m = _IN_STRING.search(buf, pos)
                if m is None:
                    self.pos = len(buf)
                    return None
                if buf[m.start()] == 0x5C:  # backslash: skip what it escapes
                    if m.start() + 1 >= len(buf):
                        self.pos = m.start()
                        return None
                    pos = m.start() + 2
                    continue
                self.in_str = False
                pos = m.end()
                continue
            m = _STRUCT.search(buf, pos)
            if m is None:
                self.pos = len(buf)
                return None
            c = buf[m.start()]
            pos = m.end()
            if c == 0x22:
                self.in_str = True
            elif c in b"{[":
                self.depth += 1
                if self.depth > MAX_NESTING:
                    return -1
            else:
                self.depth -= 1
                if self.depth == 0:
                    return pos

    def _scalar(self, i):
        """A top-level scalar or junk token at i: an error item, or None if incomplete."""
        buf = self.buf
        n = len(buf)
        j = i
        if buf[i] == 0x22:
            m = i + 1
            while True:
                k = _IN_STRING.search(buf, m)
                if k is None:
                    return None
                if buf[k.start()] == 0x5C:
                    m = k.start() + 2
                    continue
                j = k.end()
                break
        else:
            while j < n and buf[j] not in b" \t\r\n{}[],:\"":
                j += 1
            if j == n:
                return None  # the delimiter that ends it has not arrived
            if j == i:
                j = i + 1
        token = bytes(buf[i:j])
        self.pos = j
        try:
            json.loads(token)
            return "error", "QMP input must be a JSON object"
        except ValueError:
            text = token.decode("utf-8", "replace")
            if text.isalpha():
                return "error", f"JSON parse error, invalid keyword '{text}'"
            return "error", f"JSON parse error, stray '{text}'"


def _why(e: Exception) -> str:
    if isinstance(e, RecursionError):
        return "nesting too deep"
    return str(e).split(":")[0].lower() if str(e) else "invalid input"


# --- the server --------------------------------------------------------------------------------

def parse_qmp_option(spec: str):
    """``tcp:HOST:PORT,server=on,wait=off`` or ``unix:PATH,server=on,wait=off``."""
    main, *opts = spec.split(",")
    options = dict(o.partition("=")[::2] for o in opts)
    if options.get("server", "on") not in ("on", "yes", "") or \
            options.get("wait", "off") not in ("off", "no"):
        raise ValueError("qmon's QMP is a server that does not wait: use server=on,wait=off")
    kind, _, addr = main.partition(":")
    if kind == "tcp":
        host, _, port = addr.rpartition(":")
        return "tcp", (host or "127.0.0.1", int(port))
    if kind == "unix" and addr:
        return "unix", addr
    raise ValueError(f"unsupported QMP address '{main}' (tcp:HOST:PORT or unix:PATH)")


class QMPServer:
    def __init__(self, machine, store, spec: str):
        self.machine = machine
        self.store = store
        kind, addr = parse_qmp_option(spec)
        if kind == "tcp":
            family = socket.AF_INET6 if ":" in addr[0] else socket.AF_INET
            self.sock = socket.socket(family, socket.SOCK_STREAM)
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        else:
            if os.path.exists(addr) and not os.path.isfile(addr):
                os.unlink(addr)
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(addr)
        self.sock.listen(8)
        self.path = addr if kind == "unix" else None
        self.clients: list[QMPClientConn] = []
        self.lock = threading.Lock()
        machine.event_listeners.append(self.broadcast)

    def start(self):
        threading.Thread(target=self._accept, name="qmp-accept", daemon=True).start()

    def _accept(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            client = QMPClientConn(self, conn)
            with self.lock:
                self.clients.append(client)
            threading.Thread(target=client.run, name="qmp-client", daemon=True).start()

    def broadcast(self, name, data):
        msg = {"timestamp": timestamp(), "event": name}
        if data is not None:
            msg["data"] = data
        with self.lock:
            clients = list(self.clients)
        for c in clients:
            if c.negotiated:
                c.send(msg)

    def remove(self, client):
        with self.lock:
            if client in self.clients:
                self.clients.remove(client)

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass
        if self.path:
            try:
                os.unlink(self.path)
            except OSError:
                pass


class QMPClientConn:
    def __init__(self, server: QMPServer, conn: socket.socket):
        self.server = server
        self.machine = server.machine
        self.conn = conn
        self.negotiated = False
        self.wlock = threading.Lock()
        self.session = None  # the monitor session behind human-monitor-command

    def send(self, obj):
        data = json.dumps(obj).encode() + b"\r\n"
        with self.wlock:
            try:
                self.conn.sendall(data)
            except OSError:
                pass

    def run(self):
        major, minor, micro = QEMU_VERSION
        self.send({"QMP": {"version": {"qemu": {"micro": micro, "minor": minor, "major": major},
                                       "package": ""}, "capabilities": []}})
        stream = JSONStream()
        try:
            while True:
                data = self.conn.recv(65536)
                if not data:
                    break
                stream.feed(data)
                for kind, value in stream.values():
                    if kind == "error":
                        self.send({"error": {"class": "GenericError", "desc": value}})
                    elif self.handle(value) == "quit":
                        return
        except OSError:
            pass
        finally:
            self.server.remove(self)
            try:
                self.conn.close()
            except OSError:
                pass

    def handle(self, msg):
        if not isinstance(msg, dict):
            self.send({"error": {"class": "GenericError",
                                 "desc": "QMP input must be a JSON object"}})
            return None
        has_id = "id" in msg
        reply: dict = {}
        try:
            for key in msg:
                if key not in ("execute", "arguments", "id", "exec-oob"):
                    raise QMPError(f"QMP input member '{key}' is unexpected")
            if "execute" not in msg:
                raise QMPError("QMP input lacks member 'execute'")
            name = msg["execute"]
            if not isinstance(name, str):
                raise QMPError("QMP input member 'execute' must be a string")
            args = msg.get("arguments", {})
            if not isinstance(args, dict):
                raise QMPError("QMP input member 'arguments' must be an object")
            if name == "qmp_capabilities":
                if self.negotiated:
                    raise QMPError("Capabilities negotiation is already complete, command "
                                   "ignored", "CommandNotFound")
                _check_args(args, {"enable": list})
                self.negotiated = True
                reply["return"] = {}
            elif not self.negotiated:
                raise QMPError("Expecting capabilities negotiation with 'qmp_capabilities'",
                               "CommandNotFound")
            else:
                if name not in COMMANDS:
                    raise QMPError(f"The command {name} has not been found", "CommandNotFound")
                fn = COMMANDS[name]
                if name == "quit":
                    self.machine.emit_event("SHUTDOWN", {"guest": False,
                                                         "reason": "host-qmp-quit"})
                    self.send(_with_id({"return": {}}, msg, has_id))
                    try:
                        self.conn.shutdown(socket.SHUT_WR)  # the reply is the last word
                    except OSError:
                        pass
                    self.machine.request_quit()
                    return "quit"
                reply["return"] = fn(self, args)
        except QMPError as e:
            reply = {"error": {"class": e.cls, "desc": e.desc}}
        except MachineError as e:
            reply = {"error": {"class": "GenericError", "desc": str(e)}}
        except Exception as e:  # ours, not the client's: say so, keep serving
            reply = {"error": {"class": "GenericError",
                               "desc": f"internal error: {type(e).__name__}: {e}"}}
        self.send(_with_id(reply, msg, has_id))
        return None


def _with_id(reply, msg, has_id):
    if has_id:
        reply["id"] = msg["id"]
    return reply


_TYPE_NAMES = {str: "string", bool: "boolean", int: "integer", list: "array", dict: "object"}


def _check_args(args: dict, spec: dict, required=()):
    for key in args:
        if key not in spec:
            raise QMPError(f"Parameter '{key}' is unexpected")
    for key in required:
        if key not in args:
            raise QMPError(f"Parameter '{key}' is missing")
    for key, typ in spec.items():
        if key in args:
            v = args[key]
            ok = isinstance(v, typ) and not (typ is int and isinstance(v, bool))
            if not ok:
                raise QMPError(f"Invalid parameter type for '{key}', expected: "
                               f"{_TYPE_NAMES[typ]}")


# --- commands ------------------------------------------------------------------------------------

def _query_version(c, args):
    _check_args(args, {})
    major, minor, micro = QEMU_VERSION
    return {"qemu": {"micro": micro, "minor": minor, "major": major}, "package": ""}


def _query_commands(c, args):
    _check_args(args, {})
    return [{"name": n} for n in ["qmp_capabilities"] + sorted(COMMANDS)]


def _query_status(c, args):
    _check_args(args, {})
    m = c.machine
    state = m.run(lambda: m.runstate)
    return {"status": state.value, "singlestep": False, "running": state == RunState.RUNNING}


def _machine_call(method: str):
    """A command with no arguments that runs one Machine method and returns {}."""
    def handler(c, args):
        _check_args(args, {})
        m = c.machine
        m.run(getattr(m, method))
        return {}
    return handler


def _hmp(c, args):
    _check_args(args, {"command-line": str, "cpu-index": int}, ("command-line",))
    from .session import QuitRequest, Session

    lines: list[str] = []
    if c.session is None:
        c.session = Session(c.machine, c.server.store)
    c.session.out = lines.append
    try:
        c.session.execute(args["command-line"])
    except QuitRequest:
        c.machine.request_quit()
    return "".join(line + "\r\n" for line in lines)


def _migrate(c, args):
    _check_args(args, {"uri": str, "blk": bool, "inc": bool, "detach": bool, "resume": bool},
                ("uri",))
    if args.get("inc"):
        raise QMPError("qmon has no incremental block migration (inc): use blk")
    if args.get("resume"):
        raise QMPError("qmon has no postcopy: there is no paused migration to resume")
    m = c.machine
    m.run(m.migrate, args["uri"], bool(args.get("blk")))
    return {}


def _migrate_incoming(c, args):
    _check_args(args, {"uri": str}, ("uri",))
    m = c.machine
    m.run(m.migrate_incoming, args["uri"])
    return {}


def _query_migrate(c, args):
    _check_args(args, {})
    m = c.machine
    return m.run(query_migrate, m)


def query_migrate(m) -> dict:
    """QEMU's query-migrate from the same facts 'info migrate' prints."""
    out, inc = m.migration, m.incoming_state
    st = out if out.status != S.NONE else inc
    info: dict = {}
    if st.status == S.NONE:
        pass
    elif st is inc:
        info["status"] = st.status
    else:
        info["status"] = st.status
        if st.status in ("active", "cancelling", "pre-switchover", "device", "completed"):
            info["setup-time"] = int(st.setup_ms)
            if st.status == "completed":
                info["total-time"] = int(st.total_ms)
                info["downtime"] = int(st.downtime_ms)
            else:
                info["total-time"] = int(S.now_ms() - st.start_ms)
                info["expected-downtime"] = int(st.expected_downtime_ms)
            ram = {"transferred": st.transferred,
                   "remaining": 0 if st.status == "completed" else st.remaining,
                   "total": st.total, "duplicate": st.duplicate, "skipped": 0,
                   "normal": st.normal, "normal-bytes": st.normal * 4096,
                   "dirty-pages-rate": 0 if st.status == "completed" else st.dirty_pages_rate,
                   "mbps": st.mbps, "dirty-sync-count": st.dirty_sync_count,
                   "postcopy-requests": 0, "page-size": 4096, "multifd-bytes": 0,
                   "pages-per-second": int(st.pages_per_second),
                   "precopy-bytes": st.precopy_bytes, "downtime-bytes": st.downtime_bytes,
                   "postcopy-bytes": 0, "dirty-sync-missed-zero-copy": 0}
            info["ram"] = ram
            if st.disk is not None and st.status != "completed":
                info["disk"] = dict(st.disk)
            if st.xbzrle is not None:
                info["xbzrle-cache"] = dict(st.xbzrle)
            if m.workload.throttle:
                info["cpu-throttle-percentage"] = m.workload.throttle
        if st.status == "failed" and st.error:
            info["error-desc"] = st.error
    if inc.socket_addresses:
        info["socket-address"] = [_socket_address(a) for a in inc.socket_addresses]
    return info


def _socket_address(uri: str) -> dict:
    kind, _, rest = uri.partition(":")
    if kind == "tcp":
        host, _, port = rest.rpartition(":")
        return {"type": "inet", "host": host, "port": port}
    if kind == "unix":
        return {"type": "unix", "path": rest}
    return {"type": kind, "address": rest}


def _set_parameters(c, args):
    spec = {name: int for name in S.PARAMETER_DEFAULTS}
    for key in args:
        if key not in spec and key in S.ALL_PARAMETERS:
            raise QMPError(f"qmon does not implement the migration parameter '{key}'")
    for key, v in args.items():
        if key in spec and (not isinstance(v, int) or isinstance(v, bool) or v < 0):
            raise QMPError(f"Parameter '{key}' expects uint64" if key in S.SIZE_PARAMETERS
                           or key == "downtime-limit" else f"Parameter '{key}' expects uint8_t")
    _check_args(args, spec)
    from .commands import CommandError
    from .commands.migration import check_parameter

    new = {}
    params = dict(c.machine.params)
    for key, v in args.items():
        try:
            new[key] = params[key] = check_parameter(key, v, params)
        except CommandError as e:
            raise QMPError(str(e)) from None
    m = c.machine
    m.run(m.params.update, new)
    return {}


def _query_parameters(c, args):
    _check_args(args, {})
    return dict(c.machine.params)


def _set_capabilities(c, args):
    _check_args(args, {"capabilities": list}, ("capabilities",))
    m = c.machine
    changes = {}
    for item in args["capabilities"]:
        if not isinstance(item, dict):
            raise QMPError("Invalid parameter type for 'capabilities[0]', expected: object")
        _check_args(item, {"capability": str, "state": bool}, ("capability", "state"))
        name = item["capability"]
        if name not in S.CAPABILITIES:
            raise QMPError(f"Parameter 'capability' does not accept value '{name}'")
        if item["state"] and name not in S.IMPLEMENTED_CAPABILITIES:
            raise QMPError(f"qmon does not implement the migration capability '{name}'")
        changes[name] = item["state"]
    if m.migration_active():
        raise QMPError("There's a migration process in progress")
    m.run(m.caps.update, changes)
    return {}


def _query_capabilities(c, args):
    _check_args(args, {})
    return [{"capability": n, "state": c.machine.caps[n]} for n in S.CAPABILITIES]


COMMANDS = {
    "query-version": _query_version,
    "query-commands": _query_commands,
    "query-status": _query_status,
    "stop": _machine_call("stop"),
    "cont": _machine_call("cont"),
    "system_reset": _machine_call("system_reset"),
    "quit": None,  # handled in QMPClientConn.handle (it must reply, then end the process)
    "human-monitor-command": _hmp,
    "migrate": _migrate,
    "migrate_cancel": _machine_call("migrate_cancel"),
    "migrate-incoming": _migrate_incoming,
    "query-migrate": _query_migrate,
    "migrate-set-parameters": _set_parameters,
    "query-migrate-parameters": _query_parameters,
    "migrate-set-capabilities": _set_capabilities,
    "query-migrate-capabilities": _query_capabilities,
}
