"""The Machine: RAM, devices, a virtual clock and a runstate, owned by one thread.

The machine thread runs QEMU's main loop in miniature: drain requests from the monitor; if the
guest runs, run a guest tick (the workload writes RAM, marking pages dirty; the virtual clock
advances); then run one bounded step of each active job (a migration later). Nothing outside
this thread touches machine state: the monitor submits functions with ``call()`` and waits on
the returned future.
"""

from __future__ import annotations

import os
import queue
import sys
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass

# Everything a migration or a snapshot needs is imported with the machine, not on first use: a
# first `migrate` paid about 10 ms of imports.
from .devices.cpu import Cpu
from .devices.globalstate import GlobalState
from .devices.serial import Serial
from .devices.timer import Timer
from .disk import Disk
from .migration import state as S
from .migration.channels import ChannelError, parse_uri
from .migration.incoming import IncomingMigration
from .migration.precopy import OutgoingMigration
from .migration.state import CAPABILITIES, PARAMETER_DEFAULTS, MigrationState
from .ram import RAMBlock
from .runstate import NEEDS_RESET, RunState, check_transition
from .savevm.block import BlockSaveState
from .savevm.format import RAM_SECTION_VERSION
from .savevm.ram import RamSaveState
from .savevm.records import StreamError
from .savevm.registry import register
from .savevm.savevm import ApplyError, check_then_load, save_stream, save_stream_v2
from .savevm.stream import FdSink, StreamWriter
from .snapshots import truncate_tag
from .trace import Tracer
from .workloads import make_workload

TICK_S = 0.01  # one guest tick of virtual time while running
NOTIFY_S = 0.2  # how often listeners (the toolbar) hear about a running clock


class MachineError(Exception):
    """A command that failed; the message is what the monitor prints after 'Error: '."""


@dataclass(frozen=True)
class MachineType:
    name: str
    desc: str
    ram_name: str
    devices: tuple = ()
    default_workload: str = "idle"
    is_default: bool = False
    cpu_version: int = 2
    # The name the configuration section carries. The lab versions share "lab", so that a
    # stream's device versions, not the machine name, decide what loads: the point of v3's
    # strict section versions.
    config_name: str = ""
    alias_of: str | None = None


_LAB = "qmon teaching machine (cpu v{}, timer, serial, globalstate, ram)"
MACHINE_TYPES = {
    "lab-2.0": MachineType("lab-2.0", _LAB.format(2), "lab.ram", (Cpu, Serial), "counter",
                           True, 2, "lab"),
    "lab-1.0": MachineType("lab-1.0", _LAB.format(1), "lab.ram", (Cpu, Serial), "counter",
                           False, 1, "lab"),
    "none": MachineType("none", "empty machine (the sections of QEMU's -M none)", "ram",
                        config_name="none"),
}
MACHINE_ALIASES = {"lab": "lab-2.0"}
DEFAULT_MACHINE = "lab"


def machine_type(name: str) -> MachineType:
    return MACHINE_TYPES[MACHINE_ALIASES.get(name, name)]


class VirtualClock:
    """QEMU_CLOCK_VIRTUAL: follows host time while the guest runs, frozen while it is paused."""

    # (ns at the last start/stop/set, host monotonic ns since then or None while stopped),
    # replaced whole so that a reader on another thread (the toolbar) never sees half of it.

    def __init__(self):
        self._state = (0, None)

    def now_ns(self) -> int:
        base, since = self._state
        if since is None:
            return base
        return base + time.monotonic_ns() - since

    def start(self):
        if self._state[1] is None:
            self._state = (self._state[0], time.monotonic_ns())

    def stop(self):
        if self._state[1] is not None:
            self._state = (self.now_ns(), None)

    def set_ns(self, ns: int):
        running = self._state[1] is not None
        self._state = (ns, time.monotonic_ns() if running else None)


class Machine:
    def __init__(self, type_name: str = DEFAULT_MACHINE, ram_size: int = 128 << 20,
                 mem_path: str | None = None, workload: str | None = None,
                 name: str | None = None, serial_stdio: bool = False,
                 drive: str | None = None, drive_id: str = "disk0"):
        mt = machine_type(type_name)
        self.type = mt
        self.type_name = mt.name
        self.config_name = mt.config_name
        self.name = name
        self.ram = RAMBlock(mt.ram_name, ram_size, mem_path)
        self.clock = VirtualClock()
        self.runstate = RunState.PRELAUNCH
        self.serial_stdio = serial_stdio

        # Registration order gives section ids; it follows QEMU's -M none (timer 0, block 1,
        # ram 2, dirty-bitmap 3, globalstate 4), and the lab devices come after.
        self.entries: list = []
        self.timer = Timer(self)
        register(self.entries, "timer", Timer.vmsd.version_id, device=self.timer)

        self.disk = Disk(drive, drive_id) if drive else None
        if self.disk is not None:
            register(self.entries, "block", 1, live=lambda: BlockSaveState(self.disk),
                     opt_in=True, kind="block")
        else:
            register(self.entries, "block", 1, active=False)
        register(self.entries, "ram", RAM_SECTION_VERSION, live=lambda: RamSaveState(self.ram))
        register(self.entries, "dirty-bitmap", 1, active=False)
        self.globalstate = GlobalState(self)
        register(self.entries, "globalstate", 1, device=self.globalstate)
        self.devices = {"timer": self.timer, "globalstate": self.globalstate}
        for cls in mt.devices:
            dev = cls(self, mt.cpu_version) if cls is Cpu else cls(self)
            register(self.entries, cls.idstr, dev.vmsd.version_id, device=dev)
            self.devices[cls.idstr] = dev
        self.cpu = self.devices.get("cpu")
        self.serial = self.devices.get("serial")

        self.workload = make_workload(workload or mt.default_workload, self.ram)
        self.workload.attach(self)
        self.workload.resync()


        self.migration = MigrationState()  # the outgoing side, as 'info migrate' shows it
        self.incoming_state = MigrationState()
        self.migration_job = None
        self.incoming = None
        self.incoming_deferred = False
        self.params = dict(PARAMETER_DEFAULTS)
        self.caps = {c: False for c in CAPABILITIES}
        self.autostart = True

        # Trace events (QEMU's names and text); lines go where the machine's messages go.
        self.trace = Tracer(lambda line: self.message(line))
        self.event_listeners: list = []  # callables(name, data): QMP-style events
        self.on_fatal = None  # callable(message): the front end ends the process
        self.on_quit = None  # callable(): the front end ends the process, status 0

        self.output = None  # callable(str): messages for the user (serial lines, events)
        self._listeners: list = []
        self._requests: queue.Queue = queue.Queue()
        self.jobs: list = []  # objects with step() -> bool (False: finished)
        self._thread: threading.Thread | None = None
        self._stopped = threading.Event()
        self._quit = False

    # Thread plumbing ---------------------------------------------------------------------------
    def start(self, paused: bool = False, incoming: str | None = None):
        """Start the machine thread. With ``incoming`` the guest waits for a migration stream
        in 'paused (inmigrate)' (``defer``: until migrate_incoming names the URI)."""
        self.autostart = not paused
        self._thread = threading.Thread(target=self._main_loop, name="machine", daemon=True)
        self._thread.start()
        if incoming is not None:
            self.run(self.set_runstate, RunState.INMIGRATE)
            if incoming == "defer":
                self.incoming_deferred = True
            else:
                self.run(self.start_incoming, incoming)
        elif not paused:
            self.run(self.vm_start)

    def call(self, fn, *args, **kwargs) -> Future:
        fut: Future = Future()
        self._requests.put((fut, fn, args, kwargs))
        return fut

    def run(self, fn, *args, timeout: float | None = None, **kwargs):
        """Run ``fn`` on the machine thread and return its result (or raise its exception)."""
        if threading.current_thread() is self._thread:
            return fn(*args, **kwargs)
        return self.call(fn, *args, **kwargs).result(timeout)

    def shutdown(self):
        if self._thread is None or self._quit:
            return
        self._quit = True
        self._requests.put(None)
        self._thread.join(5)

    def wake(self):
        """Cut short the machine thread's wait: a job that was waiting (for a writer thread, say)
        can go on. Any thread may call it."""
        self._requests.put(False)

    def add_listener(self, fn):
        self._listeners.append(fn)

    def notify(self):
        for fn in self._listeners:
            try:
                fn()
            except Exception:
                pass

    def _main_loop(self):
        last_tick = time.monotonic()
        last_notify = last_tick
        while not self._quit:
            busy = self.runstate == RunState.RUNNING or self.jobs
            try:
                if any(getattr(job, "ready", False) for job in self.jobs):
                    item = self._requests.get_nowait()  # a job has work: don't sleep
                else:
                    item = self._requests.get(timeout=TICK_S if busy else NOTIFY_S)
            except queue.Empty:
                item = False
            while item is not False:
                if item is None:
                    return
                fut, fn, args, kwargs = item
                if fut.set_running_or_notify_cancel():
                    try:
                        fut.set_result(fn(*args, **kwargs))
                    except BaseException as e:  # handed to the caller, never lost here
                        fut.set_exception(e)
                try:
                    item = self._requests.get_nowait()
                except queue.Empty:
                    item = False
            now = time.monotonic()
            if self.runstate == RunState.RUNNING:
                self.workload.tick(now - last_tick)
            last_tick = now
            for job in list(self.jobs):
                try:
                    keep = job.step()
                except Exception:  # a job must never take the machine thread down
                    keep = False
                if not keep:
                    self.jobs.remove(job)
            if now - last_notify >= NOTIFY_S:
                last_notify = now
                self.notify()

    # Run states --------------------------------------------------------------------------------
    def set_runstate(self, new: RunState):
        check_transition(self.runstate, new)
        self.runstate = new
        self.notify()

    def is_running(self) -> bool:
        return self.runstate == RunState.RUNNING

    def vm_stop(self, state: RunState = RunState.PAUSED):
        """QEMU's vm_stop(): only a running guest changes state (and says STOP)."""
        if self.runstate == RunState.RUNNING:
            self.clock.stop()
            self.set_runstate(state)
            self.emit_event("STOP")

    def vm_start(self):
        if self.runstate != RunState.RUNNING:
            self.set_runstate(RunState.RUNNING)
            self.clock.start()
            self.emit_event("RESUME")

    def stop(self):
        """The stop command (QEMU's qmp_stop): a waiting destination just won't autostart."""
        if self.runstate == RunState.INMIGRATE:
            self.autostart = False
        else:
            self.vm_stop(RunState.PAUSED)

    def request_quit(self):
        """quit from QMP (or HMP through it): the front end ends the process."""
        fn = self.on_quit
        if fn is not None:
            fn()

    def cont(self):
        if self.runstate in NEEDS_RESET:
            raise MachineError("Resetting the Virtual Machine is required")
        if self.runstate == RunState.INMIGRATE:
            self.autostart = True  # the incoming side starts the guest once loaded
            return
        if self.runstate == RunState.FINISH_MIGRATE:
            raise MachineError("Migration is not finalized yet")
        self.vm_start()

    def system_reset(self):
        for dev in self.devices.values():
            if dev not in (self.timer, self.globalstate):
                dev.reset()
        self.workload.resync()
        if self.runstate not in (RunState.RUNNING, RunState.INMIGRATE,
                                 RunState.FINISH_MIGRATE):
            self.set_runstate(RunState.PRELAUNCH)

    # Events and fatal errors -------------------------------------------------------------------
    def emit_event(self, name: str, data: dict | None = None):
        for fn in list(self.event_listeners):
            try:
                fn(name, data)
            except Exception:
                pass

    def emit_migration_status(self, status: str):
        if self.caps.get("events"):
            self.emit_event("MIGRATION", {"status": status})
        self.notify()

    def fatal(self, message: str):
        """An error QEMU ends the process for (a failed incoming migration)."""
        if self.on_fatal is not None:
            self.on_fatal(message)
        else:
            print(f"qmon: {message}", file=sys.stderr, flush=True)
            os._exit(1)

    # Migration ----------------------------------------------------------------------------------
    def migrate(self, uri: str, blk: bool = False):
        if self.migration.status in (S.SETUP, S.ACTIVE, S.CANCELLING, S.PRE_SWITCHOVER,
                                     S.DEVICE):
            raise MachineError("There's a migration process in progress")
        if self.runstate == RunState.INMIGRATE:
            raise MachineError("Guest is waiting for an incoming migration")
        if self.runstate == RunState.POSTMIGRATE:
            raise MachineError("Can't migrate the vm that was paused due to previous migration")
        try:
            kind, addr = parse_uri(uri)
        except ChannelError as e:
            raise MachineError(str(e)) from None
        if self.params.get("x-stream-version") == 2:
            if kind != "file":
                raise MachineError(
                    f"x-stream-version 2 cannot go to '{kind}:': its writer seeks back to fill "
                    "in record lengths, which only a file allows (use file:PATH)")
            return self._save_v2_file(addr)
        self.migration = S.MigrationState()
        if blk and self.disk is None:
            raise MachineError("migrate -b: this machine has no disk (start qmon with "
                               "-drive file=PATH)")
        job = OutgoingMigration(self, uri, self.params, self.caps, self.migration, blk)
        self.migration_job = job
        job.start()
        self.jobs.append(job)
        return self.migration

    def _save_v2_file(self, path: str):
        """A whole-machine save in the version 2 container: not live (v2 cannot stream), so
        the guest stops first, and ends in postmigrate like any finished migration."""

        st = self.migration = S.MigrationState(status=S.ACTIVE, start_ms=S.now_ms(),
                                               total=self.ram.size)
        was_running = self.is_running()
        self.globalstate.store(self.runstate)
        if was_running:
            self.vm_stop(RunState.FINISH_MIGRATE)
        else:
            self.set_runstate(RunState.FINISH_MIGRATE)
        try:
            with open(path, "wb") as f:
                size, stats = save_stream_v2(self, f)
        except (OSError, ValueError) as e:
            st.status, st.error = S.FAILED, getattr(e, "strerror", None) or str(e)
            if was_running:
                self.vm_start()
            else:
                self.set_runstate(RunState.POSTMIGRATE)
            return st
        finally:
            self.globalstate.stored = None
        st.status = S.COMPLETED
        st.total_ms = st.downtime_ms = S.now_ms() - st.start_ms
        st.transferred = st.downtime_bytes = stats.bytes
        st.duplicate, st.normal = stats.zero_pages, stats.normal_pages
        st.dirty_sync_count = 1
        self.set_runstate(RunState.POSTMIGRATE)
        self.emit_migration_status(S.COMPLETED)
        return st

    def migrate_cancel(self):
        job = self.migration_job
        if job is not None:
            job.cancel()

    def migrate_continue(self, state: str):
        job = self.migration_job
        if job is None or self.migration.status != state:
            raise MachineError(f"Migration not in expected state: {self.migration.status}")
        if state != S.PRE_SWITCHOVER:
            raise MachineError(f"Migration not in expected state: {self.migration.status}")
        job.continue_requested = True

    def start_incoming(self, uri: str):
        try:
            inc = IncomingMigration(self, uri)
        except ChannelError as e:
            raise MachineError(str(e)) from None
        self.incoming = inc
        inc.start()

    def migrate_incoming(self, uri: str):
        if self.runstate != RunState.INMIGRATE:
            raise MachineError("'-incoming' was not specified on the command line")
        if not self.incoming_deferred:
            raise MachineError("For use with '-incoming defer'")
        if self.incoming is not None:
            raise MachineError("The incoming migration has already been started")
        self.start_incoming(uri)

    def migration_active(self) -> bool:
        return self.migration.status not in (S.NONE,) + tuple(S.FINISHED)

    # Guest side --------------------------------------------------------------------------------
    def guest_print(self, text: str):
        if self.serial is not None:
            self.serial.write_line(text)

    def emit_serial(self, text: str):
        if self.serial_stdio:
            self.message(text)

    def message(self, text: str):
        out = self.output
        if out is not None:
            out(text)

    def guest_disk_log(self, lap: int, text: str):
        """The guest keeps a log on its disk, one 4 KiB record a lap, round the disk."""
        d = self.disk
        if d is not None:
            off = (lap * 4096) % d.size
            d.write(off, text.encode().ljust(4096, b"\0"))

    def guest_registers(self, rax=None, rbx=None, rcx=None, rip=None):
        if self.cpu is None:
            return
        regs = self.cpu.state["regs"]
        for i, v in ((0, rax), (1, rbx), (2, rcx)):
            if v is not None:
                regs[i] = v & 0xFFFFFFFFFFFFFFFF
        if rip is not None:
            self.cpu.state["rip"] = rip

    # Snapshots (QEMU's save_snapshot / load_snapshot, run on the machine thread) ---------------
    def save_snapshot(self, store, tag: str | None):
        if self.migration_active():
            # A snapshot would reset the dirty log the migration depends on.
            raise MachineError("There's a migration process in progress")
        if self.runstate == RunState.INMIGRATE:
            raise MachineError("Guest is waiting for an incoming migration")
        if tag is None:
            tag = time.strftime("vm-%Y%m%d%H%M%S")
        tag = truncate_tag(tag)
        was_running = self.is_running()
        self.globalstate.store(self.runstate)
        self.vm_stop(RunState.SAVE_VM)
        try:
            vm_clock = self.clock.now_ns()
            outgoing = []

            def write(fd):
                return save_stream(self, StreamWriter(FdSink(fd)), self.trace, outgoing)

            info = store.save(tag, write, vm_clock, self.type_name, self.ram.size)
            self._record_snapshot_migration(outgoing[0])
            return info
        except OSError as e:
            raise MachineError(f"Error while writing VM state: {e.strerror or e}") from None
        finally:
            self.globalstate.stored = None
            if was_running:
                self.vm_start()

    def _record_snapshot_migration(self, out):
        """QEMU counts a savevm as a completed migration: 'info migrate' shows its counters,
        all of them sent with the guest stopped (downtime ram), times not measured."""

        ram = out.live[0][1].stats
        self.migration = MigrationState(
            status=S.COMPLETED, transferred=ram.bytes, downtime_bytes=ram.bytes,
            total=self.ram.size, duplicate=ram.zero_pages, normal=ram.normal_pages,
            dirty_sync_count=ram.dirty_sync_count)

    def load_snapshot(self, store, tag: str):
        """All-or-nothing: on a bad stream nothing changes, the runstate included. A missing
        snapshot behaves as in QEMU: a running guest is left paused (restore-vm)."""

        if self.migration_active():
            raise MachineError("There's a migration process in progress")
        if self.runstate == RunState.INMIGRATE:
            raise MachineError("Guest is waiting for an incoming migration")
        was_running = self.is_running()
        self.vm_stop(RunState.RESTORE_VM)
        info = store.find(tag)
        if info is None:
            raise MachineError(f"Snapshot '{tag}' does not exist in one or more devices")
        path = store.stream_path(info)
        try:
            with open(path, "rb") as f:
                warning = check_then_load(self, f, self.trace)
        except StreamError as e:
            if was_running:
                self.vm_start()
            raise MachineError(e.message) from None
        except ApplyError as e:
            # RAM is half old, half new: keep the guest stopped, as QEMU leaves it.
            raise MachineError(f"Error while loading VM state: {e}") from None
        except OSError as e:
            if was_running:
                self.vm_start()
            raise MachineError(f"Could not read snapshot '{tag}': {e.strerror or e}") from None
        self.workload.resync()
        if warning:
            self.message(warning)
        if was_running:
            self.vm_start()

    def delete_snapshot(self, store, tag: str):
        try:
            store.delete(tag)
        except OSError as e:
            raise MachineError(f"Could not delete snapshot '{tag}': {e.strerror or e}") from None
