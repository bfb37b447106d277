"""Incoming migration: a listener thread receives the stream and loads it as it arrives.

The receiving thread reads straight into the parser's buffer and loads the records each read
completes, so the monitor keeps answering while the stream loads. This is the one place where a
thread other than the machine thread writes guest RAM: the guest does not run while it waits
for its state (run state inmigrate), and every change of state (start, completion, failure,
device state) still happens on the machine thread. Keeping the bytes off the machine thread
saves a hand-off per chunk and leaves that thread free for the monitor.

A destination has nothing to lose, so this is a single pass; device state is still applied
only after the whole stream was accepted. On failure qmon exits with status 1, as QEMU does
("load of migration failed").
"""

from __future__ import annotations

import os
import struct
import threading

from ..runstate import RunState, RunStateError
from ..savevm import format as F
from ..savevm.records import StreamError
from ..savevm.savevm import Loader
from . import state as S
from .channels import ChannelError, Listener

CHUNK = 4 << 20


class IncomingMigration:
    def __init__(self, machine, uri: str):
        self.machine = machine
        self.uri = uri
        self.st = machine.incoming_state
        self.listener = Listener(uri)  # raises ChannelError
        self.st.socket_addresses = [self.listener.address]
        self.loader: Loader | None = None
        self.conn = None
        self.return_path = None  # the connection, once the source asked for answers on it

    def start(self):
        threading.Thread(target=self._run, name="migration-incoming", daemon=True).start()

    def _run(self):
        m = self.machine
        try:
            conn = self.listener.accept()
        except (ChannelError, OSError) as e:
            m.run(self._fail, str(e))
            return
        self.conn = conn
        timeout = os.environ.get("QMON_INCOMING_STALL_TIMEOUT")
        if timeout and hasattr(conn, "settimeout"):
            # Opt-in: like QEMU, a destination waits for its source by default (a source may
            # rightly pause before switchover for as long as its user wants).
            conn.settimeout(float(timeout))
        m.run(self._begin)
        try:
            while True:
                try:
                    n = self.loader.fill(conn.recv_into, CHUNK)
                except StreamError as e:
                    m.run(self._fail, e.message)
                    return
                except OSError:
                    raise
                except Exception as e:  # a bug of ours must still end in a clear failure
                    m.run(self._fail, f"internal error: {type(e).__name__}: {e}")
                    return
                if n == 0:
                    m.run(self._end)
                    return
                if self.loader.finished:
                    m.run(self._done)
                    return
                if self.st.status != S.ACTIVE:
                    return
        except OSError as e:
            m.run(self._fail, f"Unable to read from socket: {e.strerror or e}")
        finally:
            try:
                conn.close()
            except OSError:
                pass

    # On the machine thread -----------------------------------------------------------------------
    def _begin(self):
        self.st.status = S.ACTIVE
        self.st.start_ms = S.now_ms()
        self.st.socket_addresses = []
        self.machine.globalstate.received = None
        self.loader = Loader(self.machine, apply=True, trace=self.machine.trace)
        self.loader.on_command = self._command
        self.return_path = None
        self.machine.emit_migration_status(S.ACTIVE)

    def _end(self):
        if self.st.status != S.ACTIVE:
            return
        try:
            self.loader.feed_eof()
        except StreamError as e:
            self._fail(e.message)
            return
        except Exception as e:
            self._fail(f"internal error: {type(e).__name__}: {e}")
            return
        self._done()

    def _command(self, cmd, data):
        if cmd == F.MIG_CMD_OPEN_RETURN_PATH:
            if not hasattr(self.conn, "sendall"):
                raise StreamError("Unable to open return-path: the channel is one-way", None)
            self.return_path = self.conn
        elif cmd == F.MIG_CMD_PING and len(data) == 4 and self.return_path is not None:
            self._reply(F.MIG_RP_MSG_PONG, data)

    def _reply(self, msg_type: int, data: bytes):
        try:
            self.return_path.sendall(struct.pack(">HH", msg_type, len(data)) + data)
        except OSError:
            pass

    def _shut(self, failed: bool):
        """QEMU's MIG_RP_MSG_SHUT: tell the source, before anything runs, how it ended."""
        if self.return_path is not None:
            self._reply(F.MIG_RP_MSG_SHUT, (1 if failed else 0).to_bytes(4, "big"))

    def _done(self):
        m = self.machine
        self._shut(False)
        self.loader.commit()
        m.workload.resync()
        for note in self.loader.warnings + ([self.loader.warning] if self.loader.warning else []):
            m.message(note)
        st = self.st
        st.status = S.COMPLETED
        st.total_ms = S.now_ms() - st.start_ms
        m.emit_migration_status(S.COMPLETED)
        # QEMU's process_incoming_migration_bh(): run if the source ran (unless -S), or take
        # the state the source was in.
        received = m.globalstate.received
        if received is None or received == RunState.RUNNING:
            if m.autostart:
                m.vm_start()
            else:
                m.set_runstate(RunState.PAUSED)
        else:
            try:
                m.set_runstate(received)
            except RunStateError:
                m.set_runstate(RunState.PAUSED)
        try:
            self.conn.shutdown(2)
        except (OSError, AttributeError):
            pass

    def _fail(self, reason: str):
        self._shut(True)
        st = self.st
        st.status = S.FAILED
        st.error = reason
        self.machine.emit_migration_status(S.FAILED)
        self.machine.fatal(f"load of migration failed: {reason}")
