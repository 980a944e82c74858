"""Catching up where serving leaves no CPU: slices of gated work that serving waits for.

The gate (`gate.py`) parks pwdaemon's Python work while serving calls run, and its
threads run at the lowest CPU priority (`priority.py`). Where serving keeps every CPU
busy that starves them: with transformers' `generate()` called back to back on this
2-core VM (its model calls are 70-80 % of the time, its own Python the rest), GPT-2's
first trace (about 2 s alone) took 100 s at niceness 19 and 14 s at niceness 0, and
pwdaemon served eager for minutes (`bench/generate.py`). A thread's priority cannot be
raised again without a privilege, and the gate's own short slices (`gate.SLICE_S` per
`gate.MAX_PAUSE_S`) run beside serving's threads, which win every CPU.

So a gated thread that, over a window of `WINDOW_S`, was runnable (on a CPU or waiting
for one, per the kernel's `/proc/thread-self/schedstat`) for half of it or more, and
got a CPU for less than `STARVED_SHARE` of that, sets a schedule, for as long as the
traffic lasts (until its hook comes off): the first `SLICE_S` of every `PERIOD_S` is
its slice, and a serving call that begins inside one waits for its end (a call in
progress runs on), so serving's threads leave the CPUs to it. Time a thread spends
parked by the gate or blocked (a lock, a subprocess, I/O) is not runnable: measured as
wall time not parked, a Llama warm-up under paced calls caught up for a thread that
waited, not one that starved. Without schedstat nothing catches up. The schedule is set
ahead, not slice by slice: a starved thread could not take its next slice in time. It
lapses `EXPIRY_S` after the thread last renewed it (it renews it at every Python call it
makes while serving calls come), so a thread stuck in a long C call does not hold
serving back for long.
"""

from __future__ import annotations

import threading
import time

# The window over which a gated thread's share of the CPU is measured: long enough that
# a burst of a few seconds does not slow serving down, short next to a starved trace.
WINDOW_S = 5.0
# Below this share of the time it was runnable, the thread is starved: at niceness 19
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


def thread_schedstat() -> tuple[float, float] | None:
    """This thread's seconds on a CPU and waiting for one (runnable), from the kernel;
    None where it does not say (not Linux, no schedstat)."""
    try:
        with open("/proc/thread-self/schedstat", "rb") as f:
            on_cpu, waiting = f.read().split()[:2]
        return int(on_cpu) / 1e9, int(waiting) / 1e9
    except (OSError, ValueError):
        return None


class CatchUp:
    """Whether one gated thread is starved of the CPU; used on that thread alone (from
    its hook)."""

    def __init__(self) -> None:
        # The first window begins at the first look, not when the hook is made: reading
        # schedstat releases the GIL, and the hook is made as a gated block begins.
        self._window_start = -1.0
        self._at_start: tuple[float, float] | None = None
        self.active = False  # once starved, for as long as this traffic lasts

    def starved(self, now: float) -> bool:
        """Whether the thread catches up (measured once per `WINDOW_S` until it does)."""
        if self._window_start < 0:
            self._window_start, self._at_start = now, thread_schedstat()
            return False
        if self.active or now - self._window_start < WINDOW_S:
            return self.active
        stat, before = thread_schedstat(), self._at_start
        if stat is not None and before is not None:
            on_cpu, waiting = stat[0] - before[0], stat[1] - before[1]
            runnable = on_cpu + waiting
            # Runnable for half the window or more, and on a CPU for a sliver of it.
            self.active = runnable >= WINDOW_S / 2 and on_cpu < STARVED_SHARE * runnable
        self._window_start, self._at_start = now, stat
        return self.active
