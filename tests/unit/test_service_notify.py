"""sd_notify over a real datagram socket, as systemd would bind it."""

from __future__ import annotations

import os
import socket
import uuid
from pathlib import Path

from pwdaemon.service.notify import Notifier


def _bound(address: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    sock.settimeout(5.0)
    return sock


def test_messages_reach_a_path_socket(tmp_path: Path) -> None:
    path = str(tmp_path / "notify")
    with _bound(path) as sock:
        n = Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "4000000"})
        assert n.enabled and n.watchdog_interval_s == 2.0
        assert n.ready("0 queued")
        assert n.status("1 queued")
        assert n.watchdog()
        assert n.stopping()
        got = [sock.recv(4096).decode() for _ in range(4)]
        n.close()
    assert got[0].splitlines() == ["READY=1", f"MAINPID={os.getpid()}", "STATUS=0 queued"]
    assert got[1:] == ["STATUS=1 queued", "WATCHDOG=1", "STOPPING=1"]


def test_abstract_namespace_socket() -> None:
    name = f"pwdaemon-test-{uuid.uuid4().hex}"
    with _bound("\0" + name) as sock:
        n = Notifier({"NOTIFY_SOCKET": "@" + name})
        assert n.ready()
        assert sock.recv(4096).startswith(b"READY=1")
        n.close()


def test_no_socket_is_a_no_op_and_a_dead_socket_does_not_raise(tmp_path: Path) -> None:
    assert not Notifier({}).ready()
    gone = Notifier({"NOTIFY_SOCKET": str(tmp_path / "nobody")})
    assert not gone.ready() and not gone.watchdog()


def test_watchdog_for_another_pid_is_ignored() -> None:
    n = Notifier({"NOTIFY_SOCKET": "/x", "WATCHDOG_USEC": "1000", "WATCHDOG_PID": "1"})
    assert os.getpid() == 1 or n.watchdog_interval_s is None
    assert Notifier({"WATCHDOG_USEC": "junk"}).watchdog_interval_s is None
