"""The service's socket: binding it safely, and one accepted client connection.

`bind_socket` creates the listening Unix socket with the right mode and without a
window in which anyone could connect; `Connection` wraps an accepted anyio stream with
the exact-read that framing wants and a send lock (replies come from several tasks).
"""

from __future__ import annotations

import contextlib
import os
import socket
import stat
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import anyio.abc

_RECV_CHUNK = 1 << 16


@dataclass(eq=False)
class Connection:
    """One accepted client. Replies may come from job tasks, so sends are serialised."""

    id: str
    client: str  # the peer process ("uid/pid"): fairness and hotness are per client
    stream: anyio.abc.SocketStream
    send_lock: anyio.Lock = field(default_factory=anyio.Lock)
    waiting: set[str] = field(default_factory=set)
    closed: bool = False

    async def send(self, data: bytes) -> None:
        if self.closed:
            return
        async with self.send_lock:
            try:
                await self.stream.send(data)
            except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                # The client went away; its reader notices EOF and cleans up.
                self.closed = True

    async def read_exact(self, n: int) -> bytes:
        """Exactly n bytes, or fewer at end of stream (what framing expects)."""
        buf = bytearray()
        while len(buf) < n:
            try:
                chunk = await self.stream.receive(min(n - len(buf), _RECV_CHUNK))
            except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError):
                break
            buf += chunk
        return bytes(buf)


def _socket_address(path: str) -> str:
    return "\0" + path[1:] if path.startswith("@") else path


def bind_socket(path: str, mode: int) -> socket.socket:
    """A listening Unix socket at `path` with `mode` (0660: owner and service group).

    A stale socket file left by a crash is replaced; one a live service still answers
    on is not (two services on one socket would split the host's queue).
    """
    address = _socket_address(path)
    if not path.startswith("@"):
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            if not stat.S_ISSOCK(p.lstat().st_mode):
                raise OSError(f"{path} exists and is not a socket; refusing to replace it")
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.settimeout(1.0)
                probe.connect(address)
            except OSError:
                p.unlink()  # nobody listens: a leftover
            else:
                raise OSError(f"another service is listening on {path}")
            finally:
                probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        # Bind under a umask that leaves nothing open, then chmod: there is no window
        # in which the socket is connectable by everybody.
        old = os.umask(0o177)
        try:
            sock.bind(address)
        finally:
            os.umask(old)
        if not path.startswith("@"):
            os.chmod(path, mode)
        sock.listen(128)
    except BaseException:
        sock.close()
        raise
    return sock
