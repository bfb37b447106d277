"""Migration channels: tcp:, unix: and exec: as byte sinks (outgoing) and sources (incoming).

The savevm code only sees ``writev(buffers)`` on the way out and ``recv_into(buf)`` on the way in;
which transport carries the bytes is decided here.
"""

from __future__ import annotations

import os
import queue
import socket
import subprocess
import threading


class ChannelError(Exception):
    pass


def parse_uri(uri: str):
    """(kind, address) for a migration URI, with QEMU's messages for bad ones."""
    kind, sep, rest = uri.partition(":")
    if not sep or kind not in ("tcp", "unix", "exec", "file"):
        raise ChannelError("Parameter 'uri' expects a valid migration protocol")
    if kind == "tcp":
        host, sep, port = rest.rpartition(":")
        if not sep or not port:
            raise ChannelError(f"error parsing address '{rest}'")
        host = host.strip("[]")
        try:
            port_n = int(port)
        except ValueError:
            raise ChannelError(f"error parsing address '{rest}'") from None
        if not 0 <= port_n <= 65535:
            raise ChannelError(f"error parsing address '{rest}'")
        return "tcp", (host, port_n)
    if not rest:
        raise ChannelError(f"error parsing address '{rest}'")
    return kind, rest


# Outgoing -------------------------------------------------------------------------------------


class SocketSink:
    IOV_MAX = 1024

    def __init__(self, sock: socket.socket):
        self.sock = sock

    def writev(self, buffers):
        from ..savevm.stream import write_vectored

        write_vectored(self.sock.sendmsg, buffers, self.IOV_MAX)

    def close(self):
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()


class ExecSink:
    """``exec:CMD``: the stream goes into a shell command's stdin."""

    def __init__(self, command: str):
        from ..savevm.stream import FdSink

        self.proc = subprocess.Popen(["/bin/sh", "-c", command], stdin=subprocess.PIPE)
        self._fd = FdSink(self.proc.stdin.fileno())

    def writev(self, buffers):
        self._fd.writev(buffers)

    def close(self):
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        self.proc.wait()

    def abort(self):
        """Cancelled: the command must not keep the monitor waiting for it to finish."""
        try:
            self.proc.kill()
        except OSError:
            pass
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        threading.Thread(target=self.proc.wait, daemon=True).start()


class FileSink:
    """``file:PATH`` (qmon's; QEMU 7.2 has none): a seekable target, which version 2 needs."""

    def __init__(self, path: str):
        from ..savevm.stream import FdSink

        self.f = open(path, "wb")
        self._fd = FdSink(self.f.fileno())

    def writev(self, buffers):
        self._fd.writev(buffers)

    def close(self):
        self.f.close()


def connect(uri: str, timeout: float = 10.0):
    """Open an outgoing channel; raises ChannelError with QEMU's wording."""
    kind, addr = parse_uri(uri)
    if kind == "file":
        try:
            return FileSink(addr)
        except OSError as e:
            raise ChannelError(f"Could not open '{addr}': {e.strerror}") from None
    if kind == "exec":
        try:
            return ExecSink(addr)
        except OSError as e:
            raise ChannelError(f"Failed to start '{addr}': {e.strerror}") from None
    if kind == "tcp":
        host, port = addr
        try:
            sock = socket.create_connection((host or "127.0.0.1", port), timeout=timeout)
        except OSError as e:
            raise ChannelError(f"Failed to connect to '{host}:{port}': "
                               f"{e.strerror or e}") from None
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    else:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(addr)
        except OSError as e:
            sock.close()
            raise ChannelError(f"Failed to connect to '{addr}': {e.strerror or e}") from None
    # A stalled peer must not hang the migration forever.
    sock.settimeout(timeout)
    return SocketSink(sock)


class ThreadedSink:
    """Hands batches of buffers to a writer thread, so the machine thread never blocks on the
    network and the kernel's copying overlaps the Python work of building the next batch.

    ``queued`` tells the producer how far ahead of the wire it is. An error in the writer
    thread is raised from the next ``writev`` or from ``close``.
    """

    def __init__(self, sink, max_queued: int = 16 << 20, on_space=None):
        self.sink = sink
        self.max_queued = max_queued
        # Called from the writer thread, once, after a producer asked with want_space() and
        # the queue has fallen to half: the producer need not poll.
        self.on_space = on_space
        self._space_wanted = False
        self.queued = 0
        self.sent = 0
        self.error: BaseException | None = None
        self._q: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="migration-writer", daemon=True)
        self._thread.start()

    def _run(self):
        while True:
            item = self._q.get()
            if item is None:
                return
            item, n = item
            try:
                if self.error is None:
                    self.sink.writev(item)
            except BaseException as e:
                self.error = e
            with self._lock:
                self.queued -= n
                self.sent += n
                wake = self._space_wanted and self.queued <= self.max_queued // 2
                if wake:
                    self._space_wanted = False
            if wake and self.on_space is not None:
                self.on_space()

    def writev(self, buffers):
        if self.error is not None:
            raise self.error
        n = sum(map(len, buffers))
        with self._lock:
            self.queued += n
        self._q.put((list(buffers), n))

    @property
    def full(self) -> bool:
        return self.queued >= self.max_queued

    def want_space(self):
        """Ask for on_space once the queue has room again."""
        with self._lock:
            self._space_wanted = True

    def drain(self, timeout: float | None = None):
        """Wait until everything queued reached the underlying sink."""
        self._q.put(None)
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise TimeoutError("the migration stream stalled")
        if self.error is not None:
            raise self.error

    def close(self):
        self.sink.close()

    def abort(self):
        """Stop at once: later batches are dropped, the channel is closed, the writer ends."""
        self.error = self.error or ChannelError("cancelled")
        try:
            (getattr(self.sink, "abort", None) or self.sink.close)()
        except OSError:
            pass
        self._q.put(None)


# Incoming -------------------------------------------------------------------------------------


class Listener:
    """An ``-incoming`` listener. It accepts one connection, then closes."""

    def __init__(self, uri: str):
        kind, addr = parse_uri(uri)
        self.kind = kind
        self.proc = None
        self.sock = None
        if kind == "tcp":
            host, port = addr
            # Listen on loopback unless the user named another address.
            host = host or "127.0.0.1"
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            self.sock = socket.socket(family, socket.SOCK_STREAM)
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                self.sock.bind((host, port))
            except OSError as e:
                self.sock.close()
                raise ChannelError(f"Failed to bind socket: {e.strerror}") from None
            self.sock.listen(1)
            h, p = self.sock.getsockname()[:2]
            self.address = f"tcp:{h}:{p}"
        elif kind == "unix":
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                if os.path.exists(addr) and not os.path.isfile(addr):
                    os.unlink(addr)
                self.sock.bind(addr)
            except OSError as e:
                self.sock.close()
                raise ChannelError(f"Failed to bind socket to {addr}: {e.strerror}") from None
            self.sock.listen(1)
            self.path = addr
            self.address = f"unix:{addr}"
        elif kind == "file":
            self.address = f"file:{addr}"
            self.path = addr
        else:
            self.address = f"exec:{addr}"
            self.command = addr

    def accept(self):
        """Block until the stream starts; returns an object with recv_into() and close()."""
        if self.kind == "file":
            try:
                return _FileSource(open(self.path, "rb"))
            except OSError as e:
                raise ChannelError(f"Could not open '{self.path}': {e.strerror}") from None
        if self.kind == "exec":
            try:
                self.proc = subprocess.Popen(["/bin/sh", "-c", self.command],
                                             stdout=subprocess.PIPE)
            except OSError as e:
                raise ChannelError(f"Failed to start '{self.command}': {e.strerror}") from None
            return _PipeSource(self.proc)
        conn, _ = self.sock.accept()
        self.close()  # one connection only
        return conn

    def close(self):
        if self.sock is not None:
            try:
                self.sock.close()
            except OSError:
                pass
            if self.kind == "unix":
                try:
                    os.unlink(self.path)
                except OSError:
                    pass
            self.sock = None


class _FileSource:
    def __init__(self, f):
        self.f = f

    def recv_into(self, buf) -> int:
        return self.f.readinto(buf) or 0

    def close(self):
        self.f.close()


class _PipeSource:
    def __init__(self, proc):
        self.proc = proc
        self.f = proc.stdout

    def recv_into(self, buf) -> int:
        return self.f.readinto(buf) or 0

    def close(self):
        try:
            self.f.close()
        except OSError:
            pass
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
