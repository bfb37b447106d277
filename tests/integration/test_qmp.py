"""QMP: qmon driven by QEMU's own client library (asyncio and legacy) and by qmp-shell."""

import asyncio
import json
import os
import shutil
import socket
import sys
import time

import pytest

from conftest import free_port
from qemu_helpers import QEMU, Qemu

qmp = pytest.importorskip("qemu.qmp")
from qemu.qmp import QMPClient  # noqa: E402
from qemu.qmp.legacy import QEMUMonitorProtocol  # noqa: E402


def qmp_path(tmp_path, name="qmp.sock"):
    return str(tmp_path / name)


@pytest.fixture
def qmon_with_qmp(qmon_proc, tmp_path):
    def start(*args, name="qmp.sock"):
        path = qmp_path(tmp_path, name)
        p = qmon_proc(*args, "-qmp", f"unix:{path},server=on,wait=off", "-snapshot-dir",
                      str(tmp_path / "snaps"))
        p.cmd("info status")  # the monitor answers: the QMP socket is listening too
        return p, path
    return start


class Raw:
    """A bare socket client, to see the bytes the server sends."""

    def __init__(self, path):
        self.s = socket.socket(socket.AF_UNIX)
        self.s.connect(path)
        self.f = self.s.makefile("rb")

    def line(self) -> bytes:
        self.s.settimeout(10)
        return self.f.readline()

    def msg(self) -> dict:
        line = self.line()
        assert line.endswith(b"\r\n"), line
        return json.loads(line)

    def reply(self) -> dict:
        while True:
            m = self.msg()
            if "event" not in m:
                return m

    def send(self, data: bytes):
        self.s.sendall(data)


BAD_INPUTS = [
    (b'{"execute":"query-status"}',
     {"error": {"class": "CommandNotFound",
                "desc": "Expecting capabilities negotiation with 'qmp_capabilities'"}}),
    (b'{"execute":"qmp_capabilities","id":1}', {"return": {}, "id": 1}),
    (b'{"execute":"qmp_capabilities"}',
     {"error": {"class": "CommandNotFound",
                "desc": "Capabilities negotiation is already complete, command ignored"}}),
    (b'42 ', {"error": {"class": "GenericError", "desc": "QMP input must be a JSON object"}}),
    (b'[1,2]', {"error": {"class": "GenericError", "desc": "QMP input must be a JSON object"}}),
    (b'{"foo":1}', {"error": {"class": "GenericError",
                              "desc": "QMP input member 'foo' is unexpected"}}),
    (b'{"execute":1}', {"error": {"class": "GenericError",
                                  "desc": "QMP input member 'execute' must be a string"}}),
    (b'{"execute":"nosuch","id":"x"}',
     {"id": "x", "error": {"class": "CommandNotFound",
                           "desc": "The command nosuch has not been found"}}),
    (b'{"execute":"migrate","arguments":{}}',
     {"error": {"class": "GenericError", "desc": "Parameter 'uri' is missing"}}),
    (b'{"execute":"migrate","arguments":{"uri":5}}',
     {"error": {"class": "GenericError",
                "desc": "Invalid parameter type for 'uri', expected: string"}}),
    (b'{"execute":"migrate","arguments":{"uri":"tcp:1:1","bogus":1}}',
     {"error": {"class": "GenericError", "desc": "Parameter 'bogus' is unexpected"}}),
    (b'{"execute":"query-status","arguments":[]}',
     {"error": {"class": "GenericError",
                "desc": "QMP input member 'arguments' must be an object"}}),
    (b'{"execute":"migrate-set-capabilities","arguments":{"capabilities":'
     b'[{"capability":"bogus","state":true}]}}',
     {"error": {"class": "GenericError",
                "desc": "Parameter 'capability' does not accept value 'bogus'"}}),
    (b'{"execute":"migrate-set-parameters","arguments":{"downtime-limit":9999999999}}',
     {"error": {"class": "GenericError", "desc": "Parameter 'downtime_limit' expects an "
                "integer in the range of 0 to (2000 * 1000) ms"}}),
    (b'{"execute":"human-monitor-command","arguments":{"command-line":"nosuch"}}',
     {"return": "unknown command: 'nosuch'\r\n"}),
    (b'{"execute":"query-migrate"}', {"return": {}}),
    (b'{"execute": "query-status", "id": {"a": [1]}}',
     {"return": {"status": "prelaunch", "singlestep": False, "running": False},
      "id": {"a": [1]}}),
]


def _bad_input_replies(path):
    c = Raw(path)
    greeting = c.msg()
    got = []
    for data, _ in BAD_INPUTS:
        c.send(data)
        got.append(c.reply())
    return greeting, got


def test_protocol_rules_and_bad_input(qmon_with_qmp):
    p, path = qmon_with_qmp("-M", "none", "-m", "1M", "-S")
    greeting, got = _bad_input_replies(path)
    assert greeting == {"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7},
                                            "package": ""}, "capabilities": []}}
    for (data, expected), reply in zip(BAD_INPUTS, got):
        assert reply == expected, data
    # several values in one send, no newline; not JSON; a huge message: the server goes on
    c = Raw(path)
    c.msg()
    c.send(b'{"execute":"qmp_capabilities"}{"execute":"query-status","id":2}')
    assert c.reply() == {"return": {}}
    assert c.reply()["id"] == 2
    c.send(b"nonsense ")
    assert c.reply() == {"error": {"class": "GenericError",
                                   "desc": "JSON parse error, invalid keyword 'nonsense'"}}
    c.send(b'{"execute":"query-status","id":"' + b"x" * (17 << 20))
    assert c.reply() == {"error": {"class": "GenericError",
                                   "desc": "JSON token size limit exceeded"}}
    c.send(b'"}{"execute":"query-status","id":3}')
    assert c.reply()["id"] == 3
    assert p.cmd("info status") == ["VM status: paused (prelaunch)"]


@pytest.mark.skipif(QEMU is None, reason="qemu-system-x86_64 is not installed")
def test_the_same_bad_input_against_real_qemu(tmp_path):
    q = Qemu(tmp_path, "-S")  # its own QMP socket is taken by the helper: open a second one
    q.close()
    path = str(tmp_path / "q2.sock")
    import subprocess
    proc = subprocess.Popen([QEMU, "-M", "none", "-m", "16M", "-nodefaults", "-display",
                             "none", "-S", "-qmp", f"unix:{path},server=on,wait=off"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(100):
            if os.path.exists(path):
                break
            time.sleep(0.05)
        greeting, got = _bad_input_replies(path)
        assert set(greeting["QMP"]) == {"version", "capabilities"}
        for (data, expected), reply in zip(BAD_INPUTS, got):
            assert reply == expected, data
    finally:
        proc.kill()
        proc.wait()


def test_asyncio_client_session(qmon_with_qmp):
    p, path = qmon_with_qmp("-M", "none", "-m", "4M")

    async def session():
        client = QMPClient("test")
        await client.connect(path)
        events = []

        async def collect():
            async for ev in client.events:
                events.append(ev["event"])

        task = asyncio.create_task(collect())
        assert (await client.execute("query-status"))["status"] == "running"
        assert await client.execute("stop") == {}
        assert (await client.execute("query-status"))["running"] is False
        assert await client.execute("cont") == {}
        hmp = await client.execute("human-monitor-command", {"command-line": "savevm qs1"})
        assert hmp == ""
        listing = await client.execute("human-monitor-command",
                                       {"command-line": "info snapshots"})
        assert listing.startswith("List of snapshots present on all disks:\r\n")
        assert "qs1" in listing and listing.endswith("\r\n")
        version = await client.execute("query-version")
        assert version["qemu"]["major"] == 7
        names = {c["name"] for c in await client.execute("query-commands")}
        assert {"migrate", "query-migrate", "human-monitor-command", "quit"} <= names
        await asyncio.sleep(0.2)
        await client.disconnect()
        task.cancel()
        return events

    events = asyncio.run(session())
    assert events[:2] == ["STOP", "RESUME"]


def test_legacy_client_and_quit(qmon_with_qmp):
    p, path = qmon_with_qmp("-M", "none", "-m", "4M", "-S")
    q = QEMUMonitorProtocol(path)
    greeting = q.connect(negotiate=True)
    assert "QMP" in greeting
    assert q.cmd("query-status") == {"status": "prelaunch", "singlestep": False,
                                     "running": False}
    q.cmd("cont")
    ev = q.pull_event(wait=5)
    assert ev["event"] == "RESUME" and set(ev["timestamp"]) == {"seconds", "microseconds"}
    q.cmd("quit")
    ev = q.pull_event(wait=5)
    assert ev["event"] == "SHUTDOWN" and ev["data"] == {"guest": False,
                                                        "reason": "host-qmp-quit"}
    try:
        q.close()
    except EOFError:
        pass  # the server is gone; the library says so on close (real QEMU alike)
    assert p.proc.wait(10) == 0


def test_a_live_migration_driven_only_through_qmp(qmon_with_qmp, tmp_path):
    port = free_port()
    dst, dpath = qmon_with_qmp("-m", "8M", "-S", "-incoming", "defer", "-mem-path",
                               str(tmp_path / "d.ram"), name="d.sock")
    src, spath = qmon_with_qmp("-m", "8M", "-workload", "counter,speed=2000", "-mem-path",
                               str(tmp_path / "s.ram"), name="s.sock")

    async def run():
        d, s = QMPClient("dst"), QMPClient("src")
        await d.connect(dpath)
        await s.connect(spath)
        events = []

        async def collect():
            async for ev in s.events:
                events.append((ev["event"], ev.get("data")))

        task = asyncio.create_task(collect())
        caps = {"capabilities": [{"capability": "events", "state": True}]}
        assert await s.execute("migrate-set-capabilities", caps) == {}
        await s.execute("migrate-set-parameters", {"max-bandwidth": 32 << 20})
        params = await s.execute("query-migrate-parameters")
        assert params["max-bandwidth"] == 32 << 20 and params["downtime-limit"] == 300
        await d.execute("migrate-incoming", {"uri": f"tcp:127.0.0.1:{port}"})
        info = await d.execute("query-migrate")
        assert info["socket-address"] == [{"type": "inet", "host": "127.0.0.1",
                                           "port": str(port)}]
        assert await s.execute("migrate", {"uri": f"tcp:127.0.0.1:{port}"}) == {}
        for _ in range(400):
            info = await s.execute("query-migrate")
            if info["status"] in ("completed", "failed"):
                break
            await asyncio.sleep(0.05)
        assert info["status"] == "completed", info
        assert set(info) >= {"status", "total-time", "downtime", "setup-time", "ram"}
        assert info["ram"]["total"] == 8 << 20
        caps = await s.execute("query-migrate-capabilities")
        assert {"capability": "events", "state": True} in caps
        for _ in range(100):
            status = await d.execute("query-status")
            if status["status"] == "paused":
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.2)
        await d.disconnect()
        await s.disconnect()
        task.cancel()
        return events, status

    events, status = asyncio.run(run())
    migration = [d["status"] for e, d in events if e == "MIGRATION"]
    assert migration[0] == "setup" and "active" in migration and migration[-1] == "completed"
    assert any(e == "MIGRATION_PASS" for e, _ in events)
    assert ("STOP", None) in events
    assert status == {"status": "paused", "singlestep": False, "running": False}
    assert (tmp_path / "d.ram").read_bytes() == (tmp_path / "s.ram").read_bytes()


QMP_SHELL = shutil.which("qmp-shell")


@pytest.mark.skipif(QMP_SHELL is None, reason="qmp-shell (qemu.qmp) is not installed")
@pytest.mark.parametrize("hmp", [False, True])
def test_qmp_shell(qmon_with_qmp, hmp):
    import pexpect

    p, path = qmon_with_qmp("-M", "none", "-m", "1M")
    args = ["-H", path] if hmp else [path]
    sh = pexpect.spawn(QMP_SHELL, args, encoding="utf-8", timeout=15)
    try:
        if hmp:
            sh.expect(r"\(QEMU\) ")
            sh.sendline("info status")
            sh.expect("VM status: running")
            sh.sendline("stop")
            sh.sendline("info status")
            sh.expect("VM status: paused")
        else:
            sh.expect(r"\(QEMU\) ")
            sh.sendline("query-status")
            sh.expect(r'"status": "running"')
            sh.sendline("stop")
            sh.expect(r"\{\}")
            sh.sendline("query-status")
            sh.expect(r'"running": false')
    finally:
        sh.close(force=True)
    assert p.cmd("info status") == ["VM status: paused"]
