"""Old objects kept out of the garbage collector's way while models are attached.

A full collection walks every object the collector tracks, holding the GIL: in a process
holding torch, transformers and dynamo (~400,000 objects) one took 190-510 ms on this
project's 2-core box. Allocation decides when one comes, and dynamo's trace, Inductor's
imports and artifact loads allocate a lot: every serving call in progress then waits for
it. In a BERT run on the CPU (2026-12-01) the two worst warm-up calls, 265 and 331 ms
against a 3 ms median, were such collections, as was a 507 ms call in another run.

`gc.freeze()` moves every object alive now to a permanent generation that no collection
visits (one list splice, no walk): pwdaemon freezes at attach, after its one-time set-up
and after each trace settles, so a collection walks only what came since. Objects frozen
stay alive until unfrozen even if they become cyclic garbage, so the last detach gives
them back with `gc.unfreeze()`, unless the process had frozen objects of its own before
the first attach (a server that froze before forking): those are its to manage, and
pwdaemon leaves everything frozen. `attach(freeze_heap=False)` opts out.
"""

from __future__ import annotations

import gc
import threading


class FrozenHeap:
    """Reference-counted `gc.freeze()` for the attached handles of a process."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._holders = 0
        self._unfreeze_on_release = False

    def hold(self) -> None:
        """One more holder; freezes what is alive now."""
        with self._lock:
            if self._holders == 0:
                self._unfreeze_on_release = gc.get_freeze_count() == 0
            self._holders += 1
            gc.freeze()

    def refreeze(self) -> None:
        """Freeze what is alive now, if anyone holds the heap (after a trace, a set-up)."""
        with self._lock:
            if self._holders:
                gc.freeze()

    def release(self) -> None:
        """One holder fewer; the last gives the frozen objects back to the collector."""
        with self._lock:
            if self._holders == 0:
                return
            self._holders -= 1
            if self._holders == 0 and self._unfreeze_on_release:
                gc.unfreeze()


HEAP = FrozenHeap()
"""The process's frozen heap, shared by every attached model."""
