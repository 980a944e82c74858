"""The engine starts once the model's first call has returned, not inside it.

Starting the engine runs Python in the serving process: its loop thread, the loader's
one-time set-up (Inductor's imports), the store watcher, the first ticks. Started by
`attach()`, all of it shared the GIL and the CPUs with a first call made right after,
gated or not (the loop thread is not gated, and an import cannot park mid-module).
Measured on this project's 2-core CPU box, the demo model on a warm store, 8 fresh
processes per variant, alternated: eager's first call took a median 4.9 ms,
`attach(compile=False)` 6.0 ms, `attach()` starting the engine at once 9.4 ms, and
`attach()` with the engine started once that call had returned 6.0 ms; with this module
(the gate still held from attach), 14 processes each: eager 3.9 ms, before 7.7 ms, after
5.6 ms. The trace thread starts the same way (`pwdaemon.serving.background`).
"""

from __future__ import annotations

import threading
from collections.abc import Callable

# How long the engine waits for a first call to return before it starts anyway: a warm
# restart must load its artifacts without traffic. Long enough for a call made right
# after attach() to return on a CPU (first calls of 4-90 ms here); short next to a warm
# restart's 2-5 s. A first call still running then (a GPU's first call, ~1 s) shares the
# process with the engine's start, as every first call did before.
FIRST_CALL_WAIT_S = 0.2


class DeferredStart:
    """Calls `start` once, on a thread of its own, when `first_call_returned` is set or
    `FIRST_CALL_WAIT_S` has passed, whichever comes first; or at once on `start_now`."""

    def __init__(
        self, start: Callable[[], None], first_call_returned: threading.Event, name: str
    ) -> None:
        self._start = start
        self._wake = first_call_returned
        # Held while `start` runs: `cancel` then waits for it, so that whoever closes the
        # engine afterwards finds it started (and stops it) or never to be started.
        self._lock = threading.Lock()
        self._settled = False  # started or cancelled: `start` is never called again
        self.started = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name=f"pwdaemon-start-{name}", daemon=True
        )
        self._thread.start()

    def _run(self) -> None:
        self._wake.wait(FIRST_CALL_WAIT_S)
        self.start_now()

    def start_now(self) -> None:
        """Start the engine now, on this thread, unless started or cancelled already."""
        with self._lock:
            if self._settled:
                return
            self._settled = True
            self._start()
            self.started.set()

    def cancel(self, timeout: float) -> None:
        """Never start (unless started already); the waiting thread ends."""
        with self._lock:
            self._settled = True
        self._wake.set()  # only the model's first call sets it otherwise: nothing waits on it
        if self._thread is not threading.current_thread():
            self._thread.join(timeout)
