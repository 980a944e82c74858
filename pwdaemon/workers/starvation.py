"""Idle priority with a floor: notice a SCHED_IDLE worker that gets no CPU at all.

Workers run under SCHED_IDLE so that serving always goes first (`process.py` says why).
The price: on a host whose every core stays busy (other processes, or traffic that
saturates the serving process itself), an idle-class task gets ~0.3 % of a core
(measured here: 2 busy loops on 2 cores) and a compile or a worker's start never ends.
Compiled code is what such a host needs most, so a worker that made almost no progress
for `STARVED_WINDOW_S` is replaced by one at the pool's niceness (a small, real share)
for as long as the host stays busy (`process.WorkerPool`).

The replacement also gets a session of its own: with autogroup scheduling (sessions
share the CPU as groups) that is what gives it a fair share beside a busy serving
process, whose session it would otherwise share at nice 5.

Progress is the CPU time of the worker's process group (its own: `process_group=0`), so
the compiler subprocesses and Inductor's compile pool that it starts count too.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

# How long a worker may go without CPU before it counts as starved. Long enough that a
# short burst of traffic (a few seconds at 100 %) does not trigger a restart, which
# costs a worker start (2-6 s of CPU); short next to a compile's 600 s timeout.
STARVED_WINDOW_S = 10.0
# Below this share of one CPU over the window the worker is starved. An idle-class task
# on a host with any idle time gets far more (it runs whenever a core is free); one that
# competes with busy normal tasks gets ~0.003.
STARVED_SHARE = 0.1
# How often the job thread looks (it polls the worker's pipe in slices this long).
CHECK_S = 1.0


def group_cpu_seconds(pgid: int) -> float | None:
    """User + system CPU seconds of every process in process group `pgid`, reaped
    children included; None where /proc cannot tell (not Linux, or the group is gone)."""
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    total = 0
    found = False
    try:
        pids = [p for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return None
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue  # exited meanwhile, or not ours to read
        # Fields after the command name (which may hold spaces and parentheses):
        # state ppid pgrp session ... utime(14) stime cutime cstime (1-based, man 5 proc).
        fields = stat[stat.rfind(b")") + 2 :].split()
        if len(fields) < 15 or int(fields[2]) != pgid:
            continue
        found = True
        total += sum(int(v) for v in fields[11:15])
    return total / tick if found else None


class StarvationWatch:
    """Tells whether a worker's process group got less than `share` of a CPU for
    `window` s.

    Called on the job thread between polls of the worker's pipe; not thread-safe (one
    watch per start or job).
    """

    def __init__(
        self,
        pgid: int,
        *,
        window: float | None = None,
        share: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        cpu: Callable[[int], float | None] = group_cpu_seconds,
        stopped: Callable[[], float] | None = None,
    ) -> None:
        """`stopped`: seconds the worker has spent stopped on purpose, in all (paused
        during serving calls, `pwdaemon.serving.pause`); the window counts only the
        rest, so a worker paused by busy serving is not called starved."""
        # The module constants are read here, not bound as defaults, so a test can
        # shorten the window for a whole pool.
        self._window = STARVED_WINDOW_S if window is None else window
        self._share = STARVED_SHARE if share is None else share
        self._pgid = pgid
        self._clock = clock
        self._cpu = cpu
        self._stopped = stopped or (lambda: 0.0)
        self._since = clock()
        self._stopped_since = self._stopped()
        self._cpu_since = cpu(pgid)

    def starved(self) -> bool:
        """True once a whole window went by with less than `share` of a CPU used."""
        now = self._clock()
        stopped = self._stopped()
        runnable = (now - self._since) - (stopped - self._stopped_since)
        if runnable < self._window:
            return False
        used = self._cpu(self._pgid)
        if used is None or self._cpu_since is None:
            # /proc says nothing: never call a worker starved without evidence.
            self._since, self._stopped_since, self._cpu_since = now, stopped, used
            return False
        if used - self._cpu_since < self._share * runnable:
            return True
        # It progressed: a new window.
        self._since, self._stopped_since, self._cpu_since = now, stopped, used
        return False
