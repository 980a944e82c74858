"""Imports as the serving gate sees them (`pwdaemon.serving.gate`).

A gated thread inside an import is parked only while no thread outside the gated ones
waits for a module it is importing, and a gated thread is hooked when it imports, not
only when it collects garbage.
"""

from __future__ import annotations

import importlib._bootstrap
import sys
import threading
import weakref
from types import FrameType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pwdaemon.serving.gate import ServingGate


def in_import(frame: FrameType | None) -> bool:
    """Whether `frame` runs inside an import (importlib's frames are on its stack)."""
    while frame is not None:
        if frame.f_code.co_filename.startswith("<frozen importlib"):
            return True
        frame = frame.f_back
    return False


def import_awaited(gated: set[int]) -> bool:
    """Whether a thread not in `gated` waits for a module lock this thread holds."""
    me = threading.get_ident()
    try:
        # importlib's own record of who blocks on which module lock (the one its
        # deadlock detection reads): a dict of thread id -> lock in 3.11; from 3.12 a
        # weak-value dict (entries in `.data`) of thread id -> list of locks.
        table = importlib._bootstrap._blocking_on  # type: ignore[attr-defined]
        entries = list(getattr(table, "data", table).items())
    except Exception:  # another layout: assume someone waits, never park in an import
        return True
    for waiter, entry in entries:
        if waiter in gated:
            # Another gated thread (the loader's set-up waiting for the trace thread's
            # import of dynamo, say): it parks too, so it must not keep this one
            # running beside serving calls (a demo call took 356 ms that way).
            continue
        if isinstance(entry, weakref.ref):
            entry = entry()
        for lock in entry if isinstance(entry, list) else (entry,):
            if getattr(lock, "owner", None) == me:
                return True
    return False


class ImportWatch:
    """A meta-path finder that finds nothing: it hooks gated threads as they import.

    Import-heavy gated work (the loader's set-up: Inductor's imports, ~1.5 s) allocates
    few tracked objects per millisecond, so its collections came 5-48 ms apart, and a
    call waited that long at each torch op's GIL hand-off before the hook came on (a
    49 ms demo first call against 7 ms). Every import of a module not yet loaded asks
    each finder on `sys.meta_path` in turn, on the importing thread: this one, first,
    installs the hook there as a collection would. It stays on `sys.meta_path` for the
    process's life: importlib iterates the live list on every thread, and removing an
    entry while another thread's import walks it would skip the finder after it.
    """

    def __init__(self) -> None:
        # Gates whose collection watch is on (set changes under each gate's lock; read
        # here as one C-level copy).
        self.gates: set[ServingGate] = set()

    def find_spec(self, name: str, path: object = None, target: object = None) -> None:
        if self.gates:
            for gate in tuple(self.gates):
                gate._hook_if_called()
        return None


IMPORT_WATCH = ImportWatch()
if not any(isinstance(f, ImportWatch) for f in sys.meta_path):
    sys.meta_path.insert(0, IMPORT_WATCH)
