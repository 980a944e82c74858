"""Catching up where serving leaves no CPU: slices of gated work that serving waits for.

The gate (`gate.py`) parks pwdaemon's Python work while serving calls run, and its
threads run at the lowest CPU priority (`priority.py`). Where serving keeps every CPU
busy that starves them: with transformers' `generate()` called back to back on this
2-core VM (its model calls are 70-80 % of the time, its own Python the rest), GPT-2's
first trace (about 2 s alone) took 100 s at niceness 19 and 14 s at niceness 0, and
pwdaemon served eager for minutes (`bench/generate.py`). A thread's priority cannot be
raised again without a privilege, and the gate's short slices (`SLICE_S` per
`MAX_PAUSE_S`) run beside serving's threads, which win every CPU.

So a gated thread that, over a window of `WINDOW_S`, got less than `STARVED_SHARE` of
the time it was not parked (runnable, waiting for a CPU) sets a schedule, for as long
as the traffic lasts (until its hook comes off): the first `SLICE_S` of every
`PERIOD_S` is its slice, and a serving call that begins inside one waits for its end
(a call in progress runs on), so serving's threads leave the CPUs to it. The schedule
is set ahead, not slice by slice: a starved thread could not take its next slice in
time. It lapses `EXPIRY_S` after the thread last renewed it (it renews it at every
Python call it makes while serving calls come), so a thread stuck in a long C call or a
subprocess does not hold serving back for long. Such a server queues
anyway; what relieves it is the compiled code the work leads to. Under paced traffic a
gated thread runs in the gaps (it was never starved in the benches here), so its calls
never wait.
"""

from __future__ import annotations

import threading
import time

# The window over which a gated thread's share of the CPU is measured: long enough that
# a burst of a few seconds does not slow serving down, short next to a starved trace.
WINDOW_S = 5.0
# Below this share of the time it was not parked, the thread is starved: at niceness 19
# beside busy serving threads it gets ~1.5 % of a CPU; with a CPU to spare, nearly all.
STARVED_SHARE = 0.1
# Each slice and the period it recurs at: gated work gets a third of the time, a call
# waits at most SLICE_S.
SLICE_S = 0.025
PERIOD_S = 0.075
# See above: a few periods, short next to a trace.
EXPIRY_S = 1.0


class Yield:
    """The catch-up schedule: calls that begin inside a slice wait for its end.

    Set by a starved gated thread (two starved threads share the first one's schedule);
    read lock-free on the call path (`expires` first: 0 when there is none)."""

    def __init__(self) -> None:
        self.start = 0.0  # the first slice's start; slices recur every PERIOD_S
        self.expires = 0.0
        self._ended = threading.Event()

    def renew(self, now: float) -> None:
        if now >= self.expires:
            self.start = now
            self._ended.clear()
        self.expires = now + EXPIRY_S

    def end(self) -> None:
        self.expires = 0.0
        self._ended.set()

    def left(self, now: float) -> float:
        """Seconds left of the slice under way at `now`; 0 outside one."""
        if now >= self.expires:
            return 0.0
        phase = (now - self.start) % PERIOD_S
        return SLICE_S - phase if phase < SLICE_S else 0.0

    def until_next(self, now: float) -> float:
        """Seconds from `now` to the next slice's start (0 inside one)."""
        phase = (now - self.start) % PERIOD_S
        return 0.0 if phase < SLICE_S else PERIOD_S - phase

    def wait(self) -> None:
        """On a serving thread: inside a slice, wait for its end."""
        left = self.left(time.monotonic())
        if left > 0:
            self._ended.wait(left)  # set early where the gated work ends


class CatchUp:
    """Whether one gated thread is starved of the CPU; used on that thread alone (from
    its hook)."""

    def __init__(self, now: float) -> None:
        self._window_start = now
        self._cpu_at_start = time.thread_time()
        self._parked = 0.0  # seconds of this measuring window parked by the gate
        self.active = False  # once starved, for as long as this traffic lasts

    def parked(self, seconds: float) -> None:
        self._parked += seconds

    def starved(self, now: float) -> bool:
        """Whether the thread catches up (measured once per `WINDOW_S` until it does)."""
        if self.active or now - self._window_start < WINDOW_S:
            return self.active
        cpu = time.thread_time()
        runnable = now - self._window_start - self._parked
        # Judged only where it wanted the CPU for half the window or more.
        starved = cpu - self._cpu_at_start < STARVED_SHARE * runnable
        self.active = runnable >= WINDOW_S / 2 and starved
        self._window_start, self._cpu_at_start, self._parked = now, cpu, 0.0
        return self.active
