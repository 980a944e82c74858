"""Compile workers stopped while serving calls run, where they share too few CPUs.

Priority alone did not keep a compile worker off serving's CPUs on this project's 2-core
VM (`bench/stalls.py`, demo model, 2 torch threads): a worker under SCHED_IDLE, or a
compiler it started at nice 19, kept one vCPU for the whole of a serving call while
serving's two OpenMP threads shared the other. Eager calls took 30-190 ms against a
2 ms median, the serving thread on a CPU for half of the call (spinning at an OpenMP
barrier for its descheduled partner) and waiting for one for the other half. Wakeup
preemption does not help there: threads that spin never sleep, so they are never woken
onto the CPU the low-priority task holds, and the load balancer did not move them
within a call. Only a worker that is not runnable at all leaves serving both CPUs.

So `PAUSE` stops the process groups of registered workers (SIGSTOP: the worker and the
compilers it started) when a serving call begins and none was in progress, and
continues them (SIGCONT) when the last call in progress ends: one signal per group at
each end of a busy spell. The gate (`pwdaemon.serving.gate`) calls `stop()` and
`resume()` at those two moments, from the serving thread, under its lock. Workers are
registered only where the engine decided that serving and workers do not fit the CPUs
(`CompileConfig.pause_during_calls`).

Under traffic that never leaves a gap the workers would never run: a call that begins
within `BACK_TO_BACK_S` of the previous one stops nothing, a pause begins only while the
workers were stopped for less than `MAX_STOPPED_SHARE` of the current `WINDOW_S`, so
compiles still progress, and a worker's starvation watch does not count the time it was
stopped (`stopped_seconds`).
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable

# The accounting window for the share below: short enough that a burst of saturating
# traffic gives the workers their share within a second, long next to a call.
WINDOW_S = 1.0
# The most of each window the workers may spend stopped. Paced traffic (a 2 ms call
# every 10 ms) stops them ~20 % of the time; back-to-back calls hit the cap, and the
# workers then run beside serving for the rest of the window (a quarter of it at least),
# as they did before pausing existed.
MAX_STOPPED_SHARE = 0.75
# A call that begins this soon after the previous one ended is back-to-back traffic:
# serving keeps the CPUs busy by itself then, and stopping the workers at every call
# would hold back the compiles that traffic waits for. The stalls this module exists
# for came with paced traffic: 10 ms gaps, in which an idle-class worker took a vCPU
# and kept it into the next call.
BACK_TO_BACK_S = 0.002

Signaller = Callable[[int, int], None]


def _killpg(pgid: int, sig: int) -> None:
    os.killpg(pgid, sig)


class ProcessPause:
    """Process groups stopped while serving calls are in progress.

    Threads: `add`/`discard` come from the workers' job threads, `stop`/`resume` from
    serving threads (the gate serializes those two); everything that changes state
    takes `_lock`. `stop` reads `_groups` without it first: an empty set is the common
    case (no busy worker registered), and a stale read costs one lock round or one
    missed pause.
    """

    def __init__(
        self, *, clock: Callable[[], float] = time.monotonic, send: Signaller = _killpg
    ) -> None:
        self._clock = clock
        self._send = send
        self._lock = threading.Lock()
        self._groups: set[int] = set()
        self._stopped: set[int] = set()  # groups stopped by us and not continued yet
        self._since: float | None = None  # when the current pause began
        self._window_start = clock()
        self._window_stopped = 0.0
        self._total = 0.0  # seconds of finished pauses
        self._last_end = -BACK_TO_BACK_S  # when the last busy spell ended
        self.pauses = 0  # pauses begun
        self.skipped = 0  # pauses not begun: back-to-back, or the window's share used up

    # ---- the workers' side ---------------------------------------------------------

    def add(self, pgid: int) -> None:
        """Stop process group `pgid` during serving calls from now on."""
        with self._lock:
            self._groups.add(pgid)

    def discard(self, pgid: int) -> None:
        """Forget `pgid`, continuing it first if it is stopped now (a worker about to
        be told to exit, or killed: a stopped one would not read its pipe)."""
        with self._lock:
            self._groups.discard(pgid)
            if pgid in self._stopped:
                self._stopped.discard(pgid)
                self._signal(pgid, signal.SIGCONT)

    def stopped_seconds(self) -> float:
        """Seconds registered groups have spent stopped, in all (the one under way
        included): what a starvation watch must not count as time the worker had."""
        with self._lock:
            ongoing = self._clock() - self._since if self._since is not None else 0.0
            return self._total + ongoing

    def locked(self) -> bool:
        """Whether someone holds the lock now (the gate's hook does not park then)."""
        return self._lock.locked()

    # ---- the serving side (the gate, under its lock) -------------------------------

    def stop(self) -> None:
        """A serving call began and none was in progress: stop the registered groups,
        unless they were stopped for `MAX_STOPPED_SHARE` of this window already."""
        if not self._groups:
            return
        with self._lock:
            if self._since is not None:
                return  # stopped already (no resume came between two stops)
            now = self._clock()
            if now - self._last_end < BACK_TO_BACK_S:
                self.skipped += 1
                return
            if now - self._window_start >= WINDOW_S:
                self._window_start, self._window_stopped = now, 0.0
            if self._window_stopped >= MAX_STOPPED_SHARE * WINDOW_S:
                self.skipped += 1
                return
            for pgid in list(self._groups):
                if self._signal(pgid, signal.SIGSTOP):
                    self._stopped.add(pgid)
            if self._stopped:
                self._since = now
                self.pauses += 1

    def resume(self) -> None:
        """The last serving call in progress ended: continue what `stop` stopped."""
        self._last_end = self._clock()  # a float store: atomic under the GIL
        if self._since is None:
            return
        with self._lock:
            since = self._since
            if since is None:
                return
            for pgid in list(self._stopped):
                self._signal(pgid, signal.SIGCONT)
            self._stopped.clear()
            self._since = None
            spent = self._clock() - since
            self._window_stopped += spent
            self._total += spent

    def _signal(self, pgid: int, sig: int) -> bool:
        # Under self._lock. A group that is gone (its worker died and was reaped) is
        # forgotten: the serving path never raises because of a worker.
        try:
            self._send(pgid, sig)
        except (ProcessLookupError, PermissionError):
            self._groups.discard(pgid)
            self._stopped.discard(pgid)
            return False
        except OSError:
            return False
        return True


PAUSE = ProcessPause()
