"""Claims: "I am compiling this key", so that processes sharing a store compile it once.

A claim is a small JSON file `claims/<digest>.claim` holding the holder's pid, host, time
and a random token. It is created atomically (complete on appearance); one directory
lock covers check-break-create, and a claim whose holder died (same host, pid gone) or
that is older than the stale limit is broken.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from pwdaemon.store.files import CLAIM_SUFFIX, create_new, dir_lock, write_atomically

__all__ = ("Claim", "ClaimBook")

log = logging.getLogger(__name__)


class ClaimBook:
    """The claims directory of one store: takes, reads, refreshes and breaks claims.

    `stale_claim_s`: age after which a claim is broken even if its pid looks alive (pid
    reuse, another host). `clock`: wall-clock source for claim times. `host`: this host's
    name, to tell our own processes (whose pids we can check) from others'.
    """

    def __init__(
        self,
        directory: Path,
        *,
        file_mode: int,
        stale_claim_s: float,
        clock: Callable[[], float],
        host: str,
    ) -> None:
        self.directory = directory
        self.file_mode = file_mode
        self.stale_claim_s = stale_claim_s
        self._clock = clock
        self._host = host

    def path(self, digest: str) -> Path:
        """Where the claim on `digest` lives."""
        return self.directory / f"{digest}{CLAIM_SUFFIX}"

    def record(self, token: str) -> dict[str, object]:
        """What a claim of this process says about its holder."""
        return {"pid": os.getpid(), "host": self._host, "time": self._clock(), "token": token}

    def read(self, path: Path) -> dict[str, Any] | None:
        """The claim's record, {} if unreadable, None if there is no claim."""
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError:
            return {}
        try:
            data = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError):
            return {}
        return data if isinstance(data, dict) else {}

    def stale_reason(self, path: Path, info: Mapping[str, Any]) -> str | None:
        """Why a claim may be broken, or None if its holder may still be compiling."""
        pid, host, created = info.get("pid"), info.get("host"), info.get("time")
        if not isinstance(pid, int) or not isinstance(created, int | float):
            # Unreadable: judge by the file's age (wall clock, like mtimes).
            try:
                age = time.time() - os.stat(path).st_mtime
            except FileNotFoundError:
                return "gone"
            return f"unreadable claim {age:.0f} s old" if age > self.stale_claim_s else None
        if host == self._host:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return f"holder pid {pid} is gone"
            except PermissionError:
                pass  # alive, another user's
        age = self._clock() - created
        if age > self.stale_claim_s:
            return f"claim is {age:.0f} s old (stale after {self.stale_claim_s:.0f} s)"
        return None

    def take(self, digest: str) -> Claim | None:
        """Claim `digest` for this process; None if a live process holds it.

        The claims directory must exist. Raises OSError if claims cannot be written.
        """
        path = self.path(digest)
        # One lock over check-break-create, so two processes breaking the same stale
        # claim cannot remove each other's fresh one.
        with dir_lock(self.directory, exclusive=True):
            for _attempt in range(2):
                info = self.read(path)
                if info is not None:
                    why = self.stale_reason(path, info)
                    if why is None:
                        return None
                    log.info("breaking claim on %s: %s", digest[:12], why)
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(path)
                token = uuid.uuid4().hex
                data = json.dumps(self.record(token)).encode()
                if create_new(path, data, file_mode=self.file_mode):
                    return Claim(self, digest, path, token)
                # Lost to a process that could not take the lock (no flock): look again.
        return None


class Claim:
    """Exclusive right to compile one key, held by this process until released."""

    def __init__(self, book: ClaimBook, digest: str, path: Path, token: str) -> None:
        self.book = book
        self.digest = digest
        self.path = path
        self.token = token
        self._held = True

    @property
    def held(self) -> bool:
        """False once released, or once a refresh found the claim broken by another."""
        return self._held

    def release(self) -> None:
        """Remove the claim if it is still ours (it may have been broken as stale)."""
        if not self._held:
            return
        self._held = False
        with dir_lock(self.book.directory, exclusive=True):
            info = self.book.read(self.path)
            if info is not None and info.get("token") == self.token:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.path)

    def refresh(self) -> bool:
        """Restart the stale timer for a long compile; False if the claim is no longer ours."""
        if not self._held:
            return False
        with dir_lock(self.book.directory, exclusive=True) as dir_fd:
            info = self.book.read(self.path)
            if info is None or info.get("token") != self.token:
                self._held = False
                return False
            record = self.book.record(self.token)
            write_atomically(
                self.path.parent,
                self.path.name,
                [json.dumps(record).encode()],
                file_mode=self.book.file_mode,
                dir_fd=dir_fd,
            )
            return True

    def __enter__(self) -> Claim:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __repr__(self) -> str:
        return f"Claim({self.digest[:12]}, held={self._held})"
