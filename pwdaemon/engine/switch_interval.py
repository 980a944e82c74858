"""Hand the GIL back to serving threads sooner while the engine runs Python here.

Loads and validation run on worker threads of the serving process. CPython's default
switch interval (5 ms) lets such a thread add up to 5 ms to a request each time it
holds the GIL; lowering it for the duration keeps serving latency flat.
"""

from __future__ import annotations

import contextlib
import sys
import threading
from collections.abc import Iterator

# The switch interval is process-wide and the engines of all attached models share it:
# the first user lowers it, the last one restores what was there before.
_lock = threading.Lock()
_users = 0
_saved = 0.005


@contextlib.contextmanager
def gil_friendly(interval: float | None) -> Iterator[None]:
    """Lower `sys.setswitchinterval` to `interval` (None: leave it) inside the block.

    Safe from any thread and re-entrant across engines: a reference count under a lock
    decides who saves and who restores.
    """
    global _users, _saved
    if interval is None:
        yield
        return
    with _lock:
        if _users == 0:
            _saved = sys.getswitchinterval()
            sys.setswitchinterval(min(interval, _saved))
        _users += 1
    try:
        yield
    finally:
        with _lock:
            _users -= 1
            if _users == 0:
                sys.setswitchinterval(_saved)
