"""The snapshot store: one plain stream file per snapshot, beside a small JSON metadata file.

Layout of the snapshot directory:

- ``<name>.json``: metadata (tag, id, date, virtual clock at save, size, stream file name),
  where ``<name>`` is the tag with every byte outside ``[A-Za-z0-9_-]`` written as ``%XX``, so
  no tag can name a path outside the directory.
- ``<name>.<pid>-<nonce>.vmstate``: exactly the bytes of the savevm stream.
- ``.tmp-<pid>-<nonce>.*``: files being written.

A save writes the stream to a temporary file, fsyncs and renames it, then does the same for the
metadata, whose rename is the moment the snapshot (or its replacement) exists. A crash at any
point leaves either the old snapshot or the new one, never a partial one; leftovers of a dead
writer are removed when a store is opened.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import stat
import time
from dataclasses import dataclass

# What qmon's own writers leave behind: temporary files, and stream files named after the
# writer's pid and a nonce (unreferenced once their metadata is gone or was never written).
_OURS = re.compile(r"^(?:\.tmp-(\d+)-[0-9a-f]{8}\.(?:vmstate|json)|"
                   r"[A-Za-z0-9_%~-]+\.(\d+)-[0-9a-f]{8}\.vmstate)$")

_MAX_META = 1 << 20

# QEMU keeps snapshot names in a 256-byte field and cuts longer ones.
MAX_TAG_BYTES = 255


class SnapshotError(Exception):
    pass


def truncate_tag(tag: str) -> str:
    """QEMU cuts snapshot names to 255 bytes; cut on a character boundary."""
    data = tag.encode("utf-8", "surrogateescape")
    if len(data) <= MAX_TAG_BYTES:
        return tag
    return data[:MAX_TAG_BYTES].decode("utf-8", "surrogateescape")


@dataclass
class SnapshotInfo:
    tag: str
    id: int
    date: float  # seconds since the epoch
    vm_clock_ns: int
    vm_state_size: int
    stream: str  # file name inside the directory
    machine: str = ""
    ram_size: int = 0


def _encode(tag: str) -> str:
    out = []
    for b in tag.encode("utf-8", "surrogateescape"):
        c = chr(b)
        out.append(c if (c.isascii() and (c.isalnum() or c in "_-")) else f"%{b:02X}")
    stem = "".join(out) or "%"  # the empty tag, which QEMU allows, still needs a file name
    if len(stem) > 160:
        # Keep file names under NAME_MAX: a readable prefix and a hash of the whole tag.
        digest = hashlib.sha256(tag.encode("utf-8", "surrogateescape")).hexdigest()[:24]
        stem = stem[:120] + "~" + digest
    return stem


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _fsync_dir(path: str):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class SnapshotStore:
    def __init__(self, directory: str):
        self.dir = os.path.abspath(os.path.expanduser(directory))
        os.makedirs(self.dir, exist_ok=True)
        # The stream file of a snapshot that a newer one replaced, kept (under a temporary name
        # of this process) for the next save to write over: rewriting a file's blocks costs
        # half what allocating new ones does (1 GiB here: 0.7 s against 0.9 to 3.5 s with the
        # fsync). QEMU's qcow2 image reuses its freed clusters in the same way.
        self._spare = None  # (name, (st_dev, st_ino)) of the spare stream file
        self.cleanup()

    def close(self):
        """Give back the spare stream file's space (at exit)."""
        spare, self._spare = self._spare, None
        if spare is not None:
            self._unlink(spare[0])

    # Reading ---------------------------------------------------------------------------------
    def list(self) -> list[SnapshotInfo]:
        out = []
        try:
            names = os.listdir(self.dir)
        except OSError as e:
            raise SnapshotError(f"Could not read snapshot directory '{self.dir}': "
                                f"{e.strerror}") from None
        for name in names:
            if name.startswith(".") or not name.endswith(".json"):
                continue
            info = self._read_meta(name)
            if info is not None:
                out.append(info)
        out.sort(key=lambda i: i.id)
        return out

    def _read_meta(self, name: str) -> SnapshotInfo | None:
        """Metadata whose stream file is present; anything unreadable is ignored (never an
        exception: the directory is the user's, anything may be in it)."""
        path = os.path.join(self.dir, name)
        try:
            if not stat.S_ISREG(os.stat(path).st_mode) or os.path.getsize(path) > _MAX_META:
                return None
            with open(path, encoding="utf-8") as f:
                d = json.load(f)
            info = SnapshotInfo(tag=str(d["tag"]), id=int(d["id"]), date=float(d["date"]),
                                vm_clock_ns=int(d["vm_clock_ns"]),
                                vm_state_size=int(d["vm_state_size"]), stream=str(d["stream"]),
                                machine=str(d.get("machine", "")),
                                ram_size=int(d.get("ram_size", 0)))
            time.localtime(info.date)
        except Exception:
            return None
        if not (0 <= info.id < 1 << 62 and 0 <= info.vm_clock_ns < 1 << 63
                and 0 <= info.vm_state_size < 1 << 62):
            return None
        if os.path.basename(info.stream) != info.stream or _encode(info.tag) + ".json" != name:
            return None
        # The metadata is renamed into place only after its stream is complete, so a stream
        # that is missing or of another size was damaged from outside: still list it, and let
        # loadvm say what is wrong with it.
        if not os.path.exists(os.path.join(self.dir, info.stream)):
            return None
        return info

    def find(self, tag: str) -> SnapshotInfo | None:
        name = _encode(tag) + ".json"
        if not os.path.exists(os.path.join(self.dir, name)):
            return None
        return self._read_meta(name)

    def stream_path(self, info: SnapshotInfo) -> str:
        return os.path.join(self.dir, info.stream)

    # Writing ---------------------------------------------------------------------------------
    def save(self, tag: str, write_stream, vm_clock_ns: int, machine: str = "",
             ram_size: int = 0) -> SnapshotInfo:
        """Write a snapshot atomically. ``write_stream(fd)`` writes the stream and returns its
        size. An existing snapshot with the same tag is replaced only once the new one is
        complete; on any failure every earlier snapshot is left as it was."""
        nonce = f"{os.getpid()}-{secrets.token_hex(4)}"
        enc = _encode(tag)
        fd, tmp_stream = self._open_stream(nonce)
        final_stream = f"{enc}.{nonce}.vmstate"
        tmp_meta = os.path.join(self.dir, f".tmp-{nonce}.json")
        old = self.find(tag)
        committed = False
        try:
            try:
                size = write_stream(fd)
                os.ftruncate(fd, size)  # a spare may have been longer
                os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(tmp_stream, os.path.join(self.dir, final_stream))
            # The stream's rename must be durable before the metadata points at it.
            _fsync_dir(self.dir)
            ids = [i.id for i in self.list()]
            info = SnapshotInfo(tag=tag, id=max(ids, default=0) + 1, date=time.time(),
                                vm_clock_ns=vm_clock_ns, vm_state_size=size,
                                stream=final_stream, machine=machine, ram_size=ram_size)
            with open(tmp_meta, "x", encoding="utf-8") as f:
                json.dump(info.__dict__, f)
                f.flush()
                os.fsync(f.fileno())
            os.rename(tmp_meta, os.path.join(self.dir, enc + ".json"))
            committed = True  # from here on the new snapshot exists: never undo it
            _fsync_dir(self.dir)
        except BaseException:
            if not committed:
                for p in (tmp_stream, tmp_meta, os.path.join(self.dir, final_stream)):
                    try:
                        os.unlink(p)
                    except OSError:
                        pass
            raise
        if old is not None and old.stream != final_stream:
            self._keep_spare(old.stream)
        return info

    def _open_stream(self, nonce: str):
        """(fd, path) of the file a new stream goes into: the spare if there is a usable one,
        else a new file. The spare must still be the same plain file with no other name (a
        hard link or symlink made since would be written through)."""
        spare, self._spare = self._spare, None
        if spare is not None:
            path = os.path.join(self.dir, spare[0])
            try:
                fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW)
                st = os.fstat(fd)
                if (st.st_dev, st.st_ino) == spare[1] and st.st_nlink == 1:
                    return fd, path
                os.close(fd)
            except OSError:
                pass  # gone or replaced: a new file will do
        path = os.path.join(self.dir, f".tmp-{nonce}.vmstate")
        return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), path

    def _keep_spare(self, name: str):
        """Keep a replaced stream file for the next save to write over, if it is a plain file
        with no other name (a hard link would be a backup of it)."""
        if self._spare is None:
            spare = f".tmp-{os.getpid()}-{secrets.token_hex(4)}.vmstate"
            old, new = os.path.join(self.dir, name), os.path.join(self.dir, spare)
            try:
                st = os.lstat(old)
                if stat.S_ISREG(st.st_mode) and st.st_nlink == 1:
                    os.rename(old, new)
                    self._spare = (spare, (st.st_dev, st.st_ino))
                    return
            except OSError:
                pass
        self._unlink(name)

    def delete(self, tag: str) -> bool:
        info = self.find(tag)
        if info is None:
            return False
        # Removing the metadata is the atomic step; the stream file is then an orphan.
        os.unlink(os.path.join(self.dir, _encode(tag) + ".json"))
        _fsync_dir(self.dir)
        self._unlink(info.stream)
        return True

    def _unlink(self, name: str):
        try:
            os.unlink(os.path.join(self.dir, name))
        except OSError:
            pass

    def cleanup(self):
        """Remove what dead writers left: temporary files and unreferenced stream files."""
        try:
            names = os.listdir(self.dir)
        except OSError:
            return
        referenced = {i.stream for i in self.list()}
        for name in names:
            m = _OURS.match(name)
            if m is None or name in referenced:
                continue  # not a file qmon writes: never touch it
            stem = name.split(".", 1)[0]
            if m.group(2) and os.path.exists(os.path.join(self.dir, stem + ".json")) and \
                    self._read_meta(stem + ".json") is None:
                continue  # its metadata exists but cannot be read: keep the data
            pid = int(m.group(1) or m.group(2))
            if pid != os.getpid() and _pid_alive(pid):
                continue  # another live qmon is writing it
            self._unlink(name)
