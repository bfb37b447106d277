"""Outgoing pre-copy migration, run in bounded steps on the machine thread between guest ticks.

QEMU's migration_iteration_run() in miniature. Each step either sends one PART round of dirty
pages (bounded by the bandwidth window, a byte budget and a deadline) or, once the pending dirty
bytes fall to the threshold (measured bandwidth x downtime-limit), stops the guest and completes:
END sections, device state, EOF and vmdesc. The same OutgoingStream writes a snapshot.

Bytes go through a ThreadedSink: the machine thread queues views of RAM and goes back to the
guest and the monitor, a writer thread puts them on the wire.
"""

from __future__ import annotations

import os
import struct
import threading
import time

from ..runstate import RunState
from ..savevm import format as F
from ..savevm.savevm import OutgoingStream
from ..savevm.stream import StreamWriter
from . import state as S
from .channels import ChannelError, ThreadedSink, connect

BUFFER_DELAY_MS = 100  # QEMU's window for measuring bandwidth and applying the rate limit
STEP_MAX_BYTES = 8 << 20  # one step's share, so ticks and monitor requests keep flowing
STEP_MAX_S = 0.01  # a monitor request waits for the step under way: at most this
# QEMU switches over once what is left would take downtime-limit to send at the measured
# bandwidth, so its downtime lands on the limit, and past it when the wire slows or the
# destination lags. The downtime a user sees runs from the source's stop to the destination
# running, so it also covers the destination finishing the last bytes (20-30 ms here), and
# the destination's page allocation now and then runs at half speed on this machine for a
# few hundred ms. qmon aims at half the limit so that the limit holds through such a dip
# (at 3/4 of it: 214 ms median, but 607 ms in one run of five).
DOWNTIME_AIM = 0.5
# A peer that takes nothing for this long fails the migration (QEMU leaves it to TCP; a
# teaching tool wants an answer). QMON_MIGRATION_STALL_TIMEOUT sets it, in seconds.
STALL_TIMEOUT_S = float(os.environ.get("QMON_MIGRATION_STALL_TIMEOUT", "30"))


class ReturnPath:
    """Reads the destination's messages (QEMU's return path): be16 type, be16 length, data.
    Only SHUT matters here: 0 when the destination loaded the stream, 1 when it failed."""

    def __init__(self, sock):
        self.sock = sock
        self.status: int | None = None
        self.closed = False
        self.since = time.monotonic()
        threading.Thread(target=self._run, name="migration-return-path", daemon=True).start()

    def _run(self):
        buf = b""
        while True:
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                break
            if not data:
                break
            buf += data
            while len(buf) >= 4:
                kind, n = struct.unpack_from(">HH", buf)
                if len(buf) < 4 + n:
                    break
                body, buf = buf[4:4 + n], buf[4 + n:]
                if kind == F.MIG_RP_MSG_SHUT and n == 4:
                    self.status = int.from_bytes(body, "big")
                    self.closed = True
                    return
        self.closed = True


class OutgoingMigration:
    def __init__(self, machine, uri: str, params: dict, caps: dict, state: S.MigrationState,
                 blk: bool = False):
        self.machine = machine
        self.uri = uri
        # Parameters are read live (a user relaxes downtime-limit mid-migration); capabilities
        # cannot change while a migration runs, so a copy is enough.
        self.params = params
        self.caps = dict(caps)
        self.st = state
        self.sink: ThreadedSink | None = None
        self.out: OutgoingStream | None = None
        self.ram = None
        self.blk = None  # the block section's state with migrate -b
        self.with_block = blk
        self.vm_was_running = False
        self.stopped_guest = False
        self.continue_requested = False
        self._connected = None  # the channel, once the connect thread has one
        self._connect_error: str | None = None
        self.phase = "setup"  # setup, iterate, switchover-wait, completing, draining
        self._waiting = False  # the last step was held back by the rate limit or a full queue
        self.committed = False  # the stream's EOF has been handed to the writer
        self.rp = None  # the return path's reader, with the return-path capability

    # Lifecycle -----------------------------------------------------------------------------------
    def start(self):
        st = self.st
        st.status = S.SETUP
        st.start_ms = S.now_ms()
        st.total = self.machine.ram.size
        self.machine.emit_migration_status(S.SETUP)
        threading.Thread(target=self._connect, name="migration-connect", daemon=True).start()

    def _connect(self):
        try:
            conn = connect(self.uri, timeout=STALL_TIMEOUT_S)
        except ChannelError as e:
            self._connect_error = str(e)
            self.machine.wake()
            return
        if self.st.status in S.FINISHED:
            conn.close()  # cancelled while connecting: the peer must not get a stream
        else:
            self._connected = conn
            self.machine.wake()  # the setup step need not wait for the next tick

    def cancel(self):
        if self.st.status in S.FINISHED:
            return
        if self.committed:
            # The EOF that lets the destination run is on its way: the source must not run
            # too. Too late to cancel; it completes.
            return
        self.st.status = S.CANCELLING
        self._finish(S.CANCELLED, None)

    @property
    def ready(self) -> bool:
        """True when the next step has work to do at once, so the machine thread should not
        sleep before it. A full queue wakes the machine thread itself once it has room."""
        return self.phase in ("iterate", "completing") and not self._waiting

    def step(self) -> bool:
        """One bounded step; False once the migration has ended."""
        st = self.st
        try:
            if self.phase == "setup":
                return self._setup()
            if self.phase == "iterate":
                return self._iterate()
            if self.phase == "switchover-wait":
                if self.continue_requested:
                    st.status = S.DEVICE
                    self.machine.emit_migration_status(S.DEVICE)
                    self._send_rest()
                return True
            if self.phase == "completing":
                return self._complete_step()
            if self.phase == "draining":
                return self._wait_drained()
        except ChannelError as e:
            self._finish(S.FAILED, str(e))
        except OSError as e:
            self._finish(S.FAILED, f"Unable to write to socket: {e.strerror or e}")
        except Exception as e:  # a bug of ours: the source keeps running, the user is told
            self._finish(S.FAILED, f"internal error: {type(e).__name__}: {e}")
        return st.status not in S.FINISHED

    # Setup --------------------------------------------------------------------------------------
    def _setup(self) -> bool:
        if self._connect_error is not None:
            self._finish(S.FAILED, self._connect_error)
            return False
        if self._connected is None:
            return True
        self.sink = ThreadedSink(self._connected, on_space=self.machine.wake)
        w = StreamWriter(self.sink)
        self.out = OutgoingStream(self.machine, w, self.machine.trace,
                                  opt_in=("block",) if self.with_block else ())
        xb = self.params["xbzrle-cache-size"] if self.caps.get("xbzrle") else None
        for se, live in self.out.live:
            if se.idstr == "block":
                self.blk = live
                continue
            if xb:
                live.enable_xbzrle(xb)
            self.ram = live
        self.out.header()
        if self.caps.get("return-path"):
            sock = getattr(self._connected, "sock", None)
            if sock is None:
                raise ChannelError("return-path needs a two-way channel (tcp: or unix:)")
            self.out.open_return_path()
            self.rp = ReturnPath(sock)
        self.out.setup()
        w.flush()
        st = self.st
        st.setup_ms = S.now_ms() - st.start_ms
        st.status = S.ACTIVE
        self.phase = "iterate"
        # QEMU shows the limit as the expected downtime until it has measured a dirty rate.
        st.expected_downtime_ms = self.params["downtime-limit"]
        self._window_start = S.now_ms()
        self._window_bytes0 = self.sink.sent
        self._window_written0 = self.out.w.bytes_written
        self._window_pages0 = 0
        self._threshold = 0.0
        self._bandwidth = 0.0
        self._last_sync_ms = S.now_ms()
        self._xfer_prev = 0
        self._dirty_high = 0
        self._period_dirty = 0
        self._pass = st.current_pass = S.PassRecord(1, S.now_ms())
        self._pass_stats0 = (0, 0)
        if self.caps.get("events"):
            self.machine.emit_event("MIGRATION_PASS", {"pass": 1})
        self.machine.emit_migration_status(S.ACTIVE)
        return True

    # Iterate ------------------------------------------------------------------------------------
    def _iterate(self) -> bool:
        st, out, ram = self.st, self.out, self.ram
        if self.sink.error is not None:
            raise self.sink.error
        now = S.now_ms()
        self._update_counters(now)
        limit = self.params["max-bandwidth"]
        window_budget = limit * BUFFER_DELAY_MS / 1000 if limit else float("inf")
        sent_in_window = out.w.bytes_written - self._window_written0
        if sent_in_window >= window_budget:
            self._waiting = True
            return True  # rate limited: wait for the next window (the next tick)
        if self.sink.full:
            return self._wait_for_wire()
        self._waiting = False
        pending = self._pending()
        if pending < self._threshold:
            self._sync(now)
            pending = self._pending()
        st.remaining = ram.pending_pages() * 4096
        if pending and pending >= self._threshold:
            if pending == self.sink.queued:
                return self._wait_for_wire()  # nothing dirty to send, only the wire behind
            budget = int(min(STEP_MAX_BYTES, window_budget - sent_in_window))
            before = ram.stats.bytes
            out.iterate(deadline=time.monotonic() + STEP_MAX_S, max_bytes=max(budget, 4096))
            out.w.flush()
            # QEMU files each byte under precopy or downtime by the run state it went in.
            if self.machine.is_running():
                st.precopy_bytes += ram.stats.bytes - before
            else:
                st.downtime_bytes += ram.stats.bytes - before
            self._count()
            return True
        self._complete()
        return True

    def _pending(self) -> int:
        """What is left to send: dirty pages, dirty disk chunks, and what the writer thread
        still holds (it all has to go before the destination can run)."""
        pending = self.ram.pending_pages() * 4096 + self.sink.queued
        if self.blk is not None:
            pending += self.blk.pending_bytes()
        return pending

    def _sync(self, now):
        """A dirty sync: ends a pass, feeds the dirty rate and auto-converge."""
        ram, st = self.ram, self.st
        ram.sync()
        if self.blk is not None:
            self.blk.sync()
        st.dirty_sync_count = ram.stats.dirty_sync_count
        pending = ram.pending_pages() * 4096
        # QEMU's rule: once a dirty rate was measured, the expected downtime is what the last
        # sync left over the bandwidth.
        if st.dirty_pages_rate and st.transferred > 10000 and self._bandwidth:
            st.expected_downtime_ms = pending / self._bandwidth
        p = self._end_pass(now, pending)
        self._pass = st.current_pass = S.PassRecord(p.number + 1, now)
        self._period_dirty += p.dirtied
        if now - self._last_sync_ms > 1000:
            period = now - self._last_sync_ms
            st.dirty_pages_rate = int(self._period_dirty * 1000 / period)
            self._auto_converge()
            self._period_dirty = 0
            self._last_sync_ms = now
            self._xfer_prev = ram.stats.bytes
        if self.caps.get("events"):
            self.machine.emit_event("MIGRATION_PASS", {"pass": st.dirty_sync_count})

    def _auto_converge(self):
        """QEMU's migration_trigger_throttle(): throttle the guest when it dirtied more than
        throttle-trigger-threshold % of what was sent in the period, twice in a row."""
        if not self.caps.get("auto-converge"):
            return
        xfer = self.ram.stats.bytes - self._xfer_prev
        dirty = self._period_dirty * 4096
        if dirty > xfer * self.params["throttle-trigger-threshold"] / 100:
            self._dirty_high += 1
            if self._dirty_high >= 2:
                self._dirty_high = 0
                wl = self.machine.workload
                if wl.throttle == 0:
                    wl.throttle = self.params["cpu-throttle-initial"]
                else:
                    wl.throttle = min(wl.throttle + self.params["cpu-throttle-increment"],
                                      self.params["max-cpu-throttle"])

    def _update_counters(self, now):
        """QEMU's migration_update_counters(): every ~100 ms, the bandwidth and threshold."""
        spent = now - self._window_start
        if spent < BUFFER_DELAY_MS:
            return
        out, st = self.out, self.st
        # Bandwidth is what reached the wire, not what was queued for it.
        transferred = self.sink.sent - self._window_bytes0
        pages = self._pages_total() - self._window_pages0
        bandwidth = transferred / spent  # bytes/ms
        self._bandwidth = bandwidth
        self._threshold = bandwidth * self.params["downtime-limit"] * DOWNTIME_AIM
        st.mbps = transferred * 8 / (spent / 1000) / 1e6
        st.pages_per_second = pages / (spent / 1000)
        self._window_start = now
        self._window_bytes0 = self.sink.sent
        self._window_written0 = out.w.bytes_written
        self._window_pages0 = self._pages_total()

    def _pages_total(self):
        s = self.ram.stats
        return s.normal_pages + s.zero_pages + s.xbzrle_pages

    def _fill_pass(self, p):
        """A pass's counters so far: what was sent since it began."""
        pages0, zero0 = self._pass_stats0
        p.pages = self._pages_total() - pages0
        p.zero_pages = self.ram.stats.zero_pages - zero0
        p.bandwidth = self._bandwidth

    def _end_pass(self, now, pending: int):
        """Close the pass under way (at a dirty sync, or when the stream completes)."""
        p, s = self._pass, self.ram.stats
        self._fill_pass(p)
        p.duration_ms = now - p.start_ms
        p.dirtied = s.dirtied_last_sync
        p.pending_bytes = pending
        p.expected_downtime_ms = self.st.expected_downtime_ms
        self.st.passes.append(p)
        self.st.current_pass = None
        self._pass_stats0 = (self._pages_total(), s.zero_pages)
        return p

    def _count(self):
        st, s = self.st, self.ram.stats
        if st.current_pass is not None:
            self._fill_pass(st.current_pass)  # the pass under way, as far as it got
        st.transferred = s.bytes
        st.duplicate = s.zero_pages
        st.normal = s.normal_pages
        st.dirty_sync_count = s.dirty_sync_count
        st.remaining = self.ram.pending_pages() * 4096
        if self.blk is not None:
            d = self.machine.disk
            st.disk = {"transferred": self.blk.stats.bytes,
                       "remaining": self.blk.pending_bytes(), "total": d.size}
        if self.ram.xbzrle is not None:
            miss_rate = s.xbzrle_cache_miss / max(1, self._pages_total())
            enc_rate = (s.xbzrle_encoded_input / s.xbzrle_bytes) if s.xbzrle_bytes else 0.0
            st.xbzrle = {"cache-size": self.ram.xbzrle.size, "bytes": s.xbzrle_bytes,
                         "pages": s.xbzrle_pages, "cache-miss": s.xbzrle_cache_miss,
                         "cache-miss-rate": miss_rate, "encoding-rate": enc_rate,
                         "overflow": s.xbzrle_overflow}

    # Completion ---------------------------------------------------------------------------------
    def _complete(self):
        m, st = self.machine, self.st
        self._downtime_start = S.now_ms()
        self._bytes_at_stop = self.ram.stats.bytes
        self.vm_was_running = m.is_running()
        m.globalstate.store(m.runstate)
        if m.is_running():
            m.vm_stop(RunState.FINISH_MIGRATE)
        else:
            m.set_runstate(RunState.FINISH_MIGRATE)
        self.stopped_guest = True
        if self.caps.get("pause-before-switchover"):
            st.status = S.PRE_SWITCHOVER
            self.phase = "switchover-wait"
            m.emit_migration_status(S.PRE_SWITCHOVER)
            return
        self._send_rest()  # QEMU stays 'active' through the final stage

    def _send_rest(self):
        self.phase = "completing"
        self._waiting = False
        self._final = self.out.complete_steps(hold_eof=True, step_s=STEP_MAX_S,
                                              step_bytes=STEP_MAX_BYTES)

    def _complete_step(self) -> bool:
        """One share of the final stage (guest stopped), as an iterate step is one of a pass."""
        if self.sink.error is not None:
            raise self.sink.error
        if self.sink.full:
            return self._wait_for_wire()
        self._waiting = False
        try:
            next(self._final)
            self.out.w.flush()
            self._count()
            return True
        except StopIteration:
            pass
        self.phase = "draining"
        self.out.cleanup()
        if self.caps.get("events"):
            self.machine.emit_event("MIGRATION_PASS", {"pass": self.ram.stats.dirty_sync_count})
        self._count()
        self.st.downtime_bytes += self.ram.stats.bytes - self._bytes_at_stop
        self._end_pass(S.now_ms(), 0)
        return True

    def _wait_for_wire(self) -> bool:
        """Sleep until the writer thread has taken some of its queue; it wakes the machine
        thread then. (Stepping again at once would spin, and starve the writer of the GIL.)"""
        self._waiting = True
        self.sink.want_space()
        return True

    def _wait_drained(self) -> bool:
        if self.sink.error is not None:
            raise self.sink.error
        if self.sink.queued:
            return self._wait_for_wire()
        if not self.committed:
            # Everything but the EOF reached the wire: now the point of no return (without a
            # return path; with one, the destination's answer decides).
            self.committed = True
            self.out.finish()
            return True
        if self.rp is not None:
            if self.rp.status is None and not self.rp.closed:
                if time.monotonic() - self.rp.since > STALL_TIMEOUT_S:
                    raise TimeoutError("no answer from the destination on the return path")
                return True
            if self.rp.status != 0:
                # The destination could not load what we sent: it is not running, so the
                # source must run on.
                self._finish(S.FAILED, "the destination failed to load the stream "
                                       "(reported on the return path)")
                return False
        self.sink.drain(STALL_TIMEOUT_S)
        self.sink.close()
        self._finish(S.COMPLETED, None)
        return False

    def _finish(self, status: str, error: str | None):
        m, st = self.machine, self.st
        self.phase = "done"
        if self.sink is not None and status != S.COMPLETED:
            self.sink.abort()
        elif self._connected is not None and self.sink is None:
            try:
                self._connected.close()
            except OSError:
                pass
        now = S.now_ms()
        st.status = status
        st.error = error
        st.total_ms = now - st.start_ms
        m.globalstate.stored = None
        m.workload.throttle = 0
        if status == S.COMPLETED:
            st.downtime_ms = now - self._downtime_start
            st.remaining = 0
            transfer_ms = st.total_ms - st.setup_ms
            if transfer_ms > 0:
                st.mbps = self.out.w.bytes_written * 8 / transfer_ms / 1000
            m.set_runstate(RunState.POSTMIGRATE)
        elif self.stopped_guest:
            # The source still holds the only good copy: let it run again.
            if self.vm_was_running:
                m.vm_start()
            elif m.runstate == RunState.FINISH_MIGRATE:
                m.set_runstate(RunState.POSTMIGRATE)
        m.emit_migration_status(status)
        m.notify()
