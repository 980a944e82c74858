"""CPython's switch interval, lowered while gated work meets serving calls (`gate.py`).

The interval is process-wide and shared by every gated thread and engine: the first
user lowers it, the last one restores what was there before. A serving call that meets
gated work takes `INTERVAL_LOCK` (`ServingGate.call`), so the gate's hook never parks a
thread holding it.
"""

from __future__ import annotations

import contextlib
import sys
import threading
from collections.abc import Iterator

INTERVAL_LOCK = threading.Lock()
_users = 0
_saved = 0.005


@contextlib.contextmanager
def lower_switch_interval(interval: float | None) -> Iterator[None]:
    """Lower `sys.setswitchinterval` to `interval` (None: leave it) inside the block.

    Safe from any thread and re-entrant: a reference count under a lock decides who
    saves and who restores.
    """
    if interval is None:
        yield
        return
    lower_interval(interval)
    try:
        yield
    finally:
        restore_interval()


def lower_interval(interval: float) -> None:
    """One more user of the lowered interval (the first lowers it)."""
    global _users, _saved
    with INTERVAL_LOCK:
        if _users == 0:
            _saved = sys.getswitchinterval()
            sys.setswitchinterval(min(interval, _saved))
        _users += 1


def restore_interval() -> None:
    """One user fewer (the last restores the interval it found)."""
    global _users
    with INTERVAL_LOCK:
        _users -= 1
        if _users == 0:
            sys.setswitchinterval(_saved)
