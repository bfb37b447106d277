"""The savevm container (QEMU's migration/savevm.c): begin, iterate, complete; and load.

Saving: ``OutgoingStream`` writes the header and configuration, a START section for every live
handler, PART rounds until the live handlers are done, then END sections, a FULL section for
each device in registration order, EOF and the vmdesc JSON. A snapshot and a migration run this
same sequence; only the sink differs.

Loading: ``Loader`` consumes records from the one parser, checks each against the local machine
and, when ``apply`` is set, writes RAM as it goes. Device state is only staged; ``commit()``
applies it once the whole stream has been read. A loadvm from a file runs the loader twice:
once to check everything without touching the machine, then to apply, so a broken stream
leaves the machine exactly as it was.
"""

from __future__ import annotations

import json
import time

from ..devices import LoadError
from ..vmstate import VMStateError
from . import format as F
from .records import (EOF, Configuration, DeviceState, End, Footer, Header, Parser, RamEOS,
                      RamMemSize, RamPage, RamXbzrle, RamZero, SectionHeader, StreamError,
                      V2Record, VMDesc, BlockChunk, Command)
from .block import BlockLoadState
from .ram import RamLoadState

# One iterate round of a savevm runs at most this long (QEMU's MAX_WAIT in ram_save_iterate).
ITERATE_ROUND_S = 0.05


def _section_header(w, se, section_type):
    w.put_u8(section_type)
    w.put_be32(se.section_id)
    if section_type in (F.QEMU_VM_SECTION_START, F.QEMU_VM_SECTION_FULL):
        w.put_counted(se.idstr.encode())
        w.put_be32(se.instance_id)
        w.put_be32(se.version_id)


def _section_footer(w, se):
    w.put_u8(F.QEMU_VM_SECTION_FOOTER)
    w.put_be32(se.section_id)


class OutgoingStream:
    """One outgoing stream of ``machine``'s state into writer ``w``."""

    def __init__(self, machine, w, trace=None, opt_in=()):
        """``opt_in``: idstrs of opt-in live sections to send too ("block" for migrate -b)."""
        self.machine = machine
        self.w = w
        self.entries = [se for se in machine.entries
                        if se.active and (not se.opt_in or se.idstr in opt_in)]
        # Each live handler keeps per-stream state (its dirty bitmap, its cursor).
        self.live = [(se, se.live()) for se in self.entries if se.live is not None]
        self.trace = trace or (lambda name, *args: None)

    def open_return_path(self):
        """Ask the destination to answer on the same channel (QEMU's return-path capability):
        OPEN_RETURN_PATH, then a PING it must answer with a PONG."""
        w = self.w
        w.put_u8(F.QEMU_VM_COMMAND)
        w.put_be16(F.MIG_CMD_OPEN_RETURN_PATH)
        w.put_be16(0)
        w.put_u8(F.QEMU_VM_COMMAND)
        w.put_be16(F.MIG_CMD_PING)
        w.put_be16(4)
        w.put_be32(1)

    def header(self):
        self.trace("savevm_state_header")
        w = self.w
        w.put_be32(F.QEMU_VM_FILE_MAGIC)
        w.put_be32(F.QEMU_VM_FILE_VERSION)
        name = self.machine.config_name.encode()
        w.put_u8(F.QEMU_VM_CONFIGURATION)
        w.put_be32(len(name))
        w.put_bytes(name)

    def setup(self):
        self.trace("savevm_state_setup")
        for se, state in self.live:
            # QEMU traces no section_start/end for the setup round.
            _section_header(self.w, se, F.QEMU_VM_SECTION_START)
            state.setup(self.w)
            _section_footer(self.w, se)

    def iterate(self, deadline=None, max_bytes=None) -> bool:
        """One PART round of every live section; True when all of them have nothing left."""
        self.trace("savevm_state_iterate")
        done = True
        for se, state in self.live:
            self.trace("savevm_section_start", se.idstr, se.section_id)
            _section_header(self.w, se, F.QEMU_VM_SECTION_PART)
            finished = state.iterate(self.w, deadline, max_bytes)
            _section_footer(self.w, se)
            self.trace("savevm_section_end", se.idstr, se.section_id, 1 if finished else 0)
            done = done and finished
        return done

    def complete(self, hold_eof: bool = False):
        """END for live sections, FULL for devices, EOF, vmdesc. The guest must be stopped.
        With ``hold_eof`` the EOF and vmdesc wait for ``finish()``: until that last byte goes,
        a destination cannot complete, so the source may still call the migration off."""
        for _ in self.complete_steps(hold_eof):
            pass

    def complete_steps(self, hold_eof: bool = False, step_s=None, step_bytes=None):
        """complete() as a generator that yields after each share (``step_s`` seconds or
        ``step_bytes`` bytes) of the pages left, so that a migration's machine thread answers
        the monitor, and its writer thread gets the wire, while hundreds of MiB go out. The
        bytes are the same: nothing else is written to the stream between the shares."""
        self.trace("savevm_state_complete_precopy")
        w = self.w
        # Device state as it is now, with the guest just stopped: a monitor command served
        # between the shares (system_reset, say) must not reach the stream, as in QEMU, where
        # it waits for the final stage to end.
        saved = [(se, se.device.save()) for se in self.entries if se.device is not None]
        for se, state in self.live:
            self.trace("savevm_section_start", se.idstr, se.section_id)
            _section_header(w, se, F.QEMU_VM_SECTION_END)
            steps = getattr(state, "complete_steps", None)
            if steps is None:
                state.complete(w)
            else:
                yield from steps(w, step_s, step_bytes)
            _section_footer(w, se)
            self.trace("savevm_section_end", se.idstr, se.section_id, 0)
        devices = []
        for se, payload in saved:
            self.trace("savevm_section_start", se.idstr, se.section_id)
            _section_header(w, se, F.QEMU_VM_SECTION_FULL)
            w.put_bytes(payload)
            _section_footer(w, se)
            self.trace("savevm_section_end", se.idstr, se.section_id, 0)
            devices.append(se.device.vmsd.vmdesc(se.idstr, se.instance_id))
        self._devices = devices
        if not hold_eof:
            self.finish()
        else:
            w.flush()

    def finish(self):
        w = self.w
        w.put_u8(F.QEMU_VM_EOF)
        desc = json.dumps({"page_size": F.TARGET_PAGE_SIZE, "devices": self._devices}).encode()
        w.put_u8(F.QEMU_VM_VMDESCRIPTION)
        w.put_be32(len(desc))
        w.put_bytes(desc)
        w.flush()

    def cleanup(self):
        self.trace("savevm_state_cleanup")


def save_stream(machine, w, trace=None, keep: list | None = None) -> int:
    """Write a whole savevm stream of a stopped machine; returns its size in bytes.
    ``keep`` receives the OutgoingStream, for its counters."""
    out = OutgoingStream(machine, w, trace)
    if keep is not None:
        keep.append(out)
    try:
        out.header()
        out.setup()
        while not out.iterate(deadline=time.monotonic() + ITERATE_ROUND_S):
            pass
        out.complete()
    finally:
        out.cleanup()
    return w.bytes_written


def save_stream_v2(machine, f) -> int:
    """The version 2 container (reference section 6) into a seekable binary file ``f``:
    every handler's state as one record whose length is filled in afterwards, hence the seek.
    No configuration, no section types, no footers, no vmdesc. Returns the size."""
    import struct

    from .stream import FdSink, StreamWriter

    f.write(struct.pack(">IIQ", F.QEMU_VM_FILE_MAGIC, F.QEMU_VM_FILE_VERSION_COMPAT, 0))
    stats = None
    for se in machine.entries:
        if not se.active:
            continue
        name = se.idstr.encode()
        f.write(bytes([len(name)]) + name + struct.pack(">III", se.instance_id, se.version_id, 0))
        start = f.tell()
        if se.live is not None:
            f.flush()
            w = StreamWriter(FdSink(f.fileno()))
            state = se.live()
            state.save_all(w)
            w.flush()
            f.seek(0, 2)
            stats = state.stats
        else:
            f.write(se.device.save())
        length = f.tell() - start
        if length >= 1 << 32:
            raise ValueError(f"'{se.idstr}' does not fit a v2 record (lengths are 32-bit)")
        f.seek(start - 4)
        f.write(struct.pack(">I", length))
        f.seek(0, 2)
    total = f.tell() - 16
    f.seek(8)
    f.write(struct.pack(">Q", total))
    f.seek(0, 2)
    f.flush()
    return total + 16, stats


class Loader:
    """Checks (and with ``apply``, loads) a stream into ``machine``, record by record."""

    def __init__(self, machine, apply: bool, trace=None):
        self.machine = machine
        self.apply = apply
        self.trace = trace or (lambda name, *args: None)
        self.by_name = {(se.idstr, se.instance_id): se for se in machine.entries}
        self.ram = RamLoadState(machine.ram)
        self.block = BlockLoadState(machine.disk)
        self.staged: dict[str, dict] = {}  # idstr -> decoded device values
        self.section: SectionHeader | None = None
        self.warning: str | None = None
        self.finished = False
        self.warnings: list[str] = []  # what the lax version 2 loader let through
        self.on_command = None  # callable(cmd, data): the incoming side's return path
        self.parser = Parser(self.describe, self.describe_v2, keep_vmdesc=False)

    def describe(self, idstr, instance_id, version_id):
        se = self.by_name.get((idstr, instance_id))
        if se is None or not se.active:
            raise StreamError(
                f"Unknown savevm section or instance '{idstr}' {instance_id}. Make sure that "
                "your current VM setup matches your saved VM setup, including any hotplugged "
                "devices", self.parser.offset)
        if version_id > se.version_id:
            raise StreamError(f"savevm: unsupported version {version_id} for '{idstr}' "
                              f"v{se.version_id}", self.parser.offset)
        if version_id < se.minimum_version_id:
            name = se.device.vmsd.name if se.device is not None else idstr
            raise StreamError(f"{name}: incoming version_id {version_id} is too old for local "
                              f"minimum version_id  {se.minimum_version_id}", self.parser.offset)
        if se.live is not None:
            return se.kind, None
        return "device", se.device.vmsd.size(version_id)

    def describe_v2(self, idstr, instance_id, version_id):
        """The version 2 loader, lax on purpose (what version 3's strict checks replaced): an
        unknown record is skipped with a warning, a newer version is loaded as if it were
        ours."""
        se = self.by_name.get((idstr, instance_id))
        if se is None or not se.active:
            note = f"savevm: unknown section '{idstr}' {instance_id} in a v2 stream: skipped"
            self.warnings.append(note)
            return ("skip", note)
        if se.live is not None:
            return ("ram", None)
        vmsd = se.device.vmsd
        use = min(max(version_id, vmsd.minimum_version_id), vmsd.version_id)
        note = None
        if use != version_id:
            note = f"v2: '{idstr}' version {version_id} loaded as version {use}"
        return ("device", vmsd.size(use), note, use)

    def feed(self, data):
        self.parser.feed(data)
        self._drain()

    def fill(self, readinto, size: int) -> int:
        """Read up to ``size`` bytes from a source straight into the parser and load what they
        complete; 0 when the source is exhausted (then call ``feed_eof``)."""
        n = self.parser.fill(readinto, size)
        if n:
            self._drain()
        return n

    def feed_eof(self):
        self.parser.feed_eof()
        self._drain()
        if not self.finished:
            raise StreamError("truncated stream: it ends before its EOF section",
                              self.parser.offset)

    def _drain(self):
        parser = self.parser
        ram = self.ram
        apply = self.apply
        run = ram.run
        while not self.finished:
            run(parser, apply)
            rec = parser.next()
            if rec is None:
                return
            t = type(rec)
            if t is RamPage:
                ram.page(rec, apply)
            elif t is RamZero:
                ram.zero(rec, apply)
            elif t is RamXbzrle:
                ram.xbzrle(rec, apply)
            elif t is BlockChunk:
                self.block.chunk(rec, apply)
            else:
                self._record(rec)

    def _record(self, rec):
        t = type(rec)
        if t is SectionHeader:
            self.section = rec
            self.trace("qemu_loadvm_state_section", rec.section_type)
            if rec.section_type in (F.QEMU_VM_SECTION_START, F.QEMU_VM_SECTION_FULL):
                self.trace("qemu_loadvm_state_section_startfull", rec.section_id, rec.idstr,
                           rec.instance_id, rec.version_id)
            else:
                self.trace("qemu_loadvm_state_section_partend", rec.section_id)
        elif t is RamMemSize:
            self.ram.mem_size(rec)
        elif t is Command:
            if self.on_command is None:
                raise StreamError("a migration command (return path) in a stream that is not "
                                  "an incoming migration", rec.offset)
            self.on_command(rec.cmd, rec.data)
        elif t is V2Record:
            self.section = rec  # carries idstr and instance_id as a section header does
        elif t is DeviceState:
            se = self.by_name[(rec.idstr, self.section.instance_id)]
            try:
                values = se.device.vmsd.decode(rec.data, rec.version_id)
                se.device.check(values)
            except (LoadError, VMStateError) as e:
                raise StreamError(str(e), rec.offset) from None
            self.staged[rec.idstr] = values
        elif t is Header:
            self.trace("loadvm_state_setup")
        elif t is Configuration:
            local = self.machine.config_name
            # QEMU compares only as many bytes as it received (strncmp with the received length).
            if not local.startswith(rec.name):
                raise StreamError(f"Machine type received is '{rec.name}' and local is "
                                  f"'{local}'", rec.offset)
        elif t is EOF:
            self.trace("qemu_loadvm_state_section", F.QEMU_VM_EOF)
            self.trace("qemu_loadvm_state_post_main", 0)
        elif t is End:
            self.warning = rec.warning
            self.finished = True
        elif t in (Footer, RamEOS, VMDesc):
            pass

    def commit(self):
        """Apply the staged device state (after every byte of the stream was accepted).

        QEMU resets the machine before it loads, so a device the stream does not mention
        ends in its reset state."""
        self.trace("loadvm_state_cleanup")
        for se in self.machine.entries:
            if se.device is None:
                continue
            values = self.staged.get(se.idstr)
            if values is not None:
                se.device.post_load(values)
            else:
                se.device.reset()


class ApplyError(Exception):
    """The second pass failed (an I/O error): RAM is half-written, the state is not whole."""


def _feed_file(loader, f, chunk):
    while loader.fill(f.readinto, chunk):
        pass
    loader.feed_eof()


def check_then_load(machine, f, trace=None, chunk: int = 1 << 20):
    """All-or-nothing load from a seekable binary file.

    The first pass checks every record and stages device state without writing anything (a
    StreamError leaves the machine untouched); only then does a second pass, over the same open
    file, write RAM, and the staged state is applied. Returns the loader's warning, if any.
    """
    _feed_file(Loader(machine, False), f, chunk)
    loader = Loader(machine, True, trace)
    f.seek(0)
    try:
        _feed_file(loader, f, chunk)
    except (StreamError, OSError) as e:
        raise ApplyError(getattr(e, "message", None) or str(e)) from None
    loader.commit()
    return loader.warning
