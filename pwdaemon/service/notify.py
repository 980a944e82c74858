"""sd_notify without libsystemd: datagrams to $NOTIFY_SOCKET.

systemd (Type=notify) hands the service a datagram socket path in NOTIFY_SOCKET; each
message is newline-separated KEY=VALUE lines. '@' at the start means Linux's abstract
namespace. The service sends READY=1 once its socket is bound, STATUS= with a queue
summary, WATCHDOG=1 at half of WATCHDOG_USEC, and STOPPING=1 when it starts draining.
Without NOTIFY_SOCKET (run by hand, tests) every call is a no-op.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping

log = logging.getLogger(__name__)


class Notifier:
    """One process's channel to systemd. Sends never raise: systemd going away must not
    take the service down with it (a failed send is logged once)."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        path = env.get("NOTIFY_SOCKET", "")
        self.address: str | None = None
        if path.startswith("@"):
            self.address = "\0" + path[1:]
        elif path.startswith("/"):
            self.address = path
        self.watchdog_usec = self._watchdog_usec(env)
        self._sock: socket.socket | None = None
        self._warned = False
        self.sent: list[str] = []  # what was sent, for `status` and tests

    @staticmethod
    def _watchdog_usec(env: Mapping[str, str]) -> int | None:
        try:
            usec = int(env.get("WATCHDOG_USEC", ""))
        except ValueError:
            return None
        # WATCHDOG_PID names the process the watchdog is for; a child that inherited
        # the environment must not ping on its parent's behalf.
        pid = env.get("WATCHDOG_PID")
        if pid and pid != str(os.getpid()):
            return None
        return usec if usec > 0 else None

    @property
    def enabled(self) -> bool:
        return self.address is not None

    @property
    def watchdog_interval_s(self) -> float | None:
        """How often to send WATCHDOG=1: half the timeout systemd enforces."""
        return self.watchdog_usec / 2e6 if self.watchdog_usec else None

    def send(self, **fields: str | int) -> bool:
        if self.address is None:
            return False
        text = "\n".join(f"{k}={v}" for k, v in fields.items())
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                # Never block the event loop: with a reader that is not reading, a full
                # datagram queue would stall the whole service on a WATCHDOG=1.
                self._sock.setblocking(False)
            self._sock.sendto(text.encode(), self.address)
        except BlockingIOError:
            log.debug("sd_notify queue full, dropped %r", text)
            return False
        except OSError as exc:
            if not self._warned:
                self._warned = True
                log.warning("sd_notify to %r failed: %s", self.address, exc)
            return False
        self.sent.append(text)
        return True

    def ready(self, status: str = "") -> bool:
        fields: dict[str, str | int] = {"READY": 1, "MAINPID": os.getpid()}
        if status:
            fields["STATUS"] = status
        return self.send(**fields)

    def status(self, text: str) -> bool:
        return self.send(STATUS=text.replace("\n", " "))

    def watchdog(self) -> bool:
        return self.send(WATCHDOG=1)

    def stopping(self, status: str = "") -> bool:
        fields: dict[str, str | int] = {"STOPPING": 1}
        if status:
            fields["STATUS"] = status
        return self.send(**fields)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
