"""Background Python work in the serving process runs in the gaps between calls.

pwdaemon does some Python work in the serving process itself: dynamo's trace of the
model (seconds), pickling a graph for the workers, loading artifacts, validating them,
the loader's one-time set-up. All of it needs the GIL, and a serving call that has to win
the GIL back after every torch op (hundreds per forward) waits up to CPython's switch
interval each time. Measured on this project's 2-core CPU box, a transformers BERT (4
layers, hidden 128) whose eager call takes 0.7 ms answered in 40-500 ms while dynamo
traced it on another thread.

So such work runs *gated*: `ServingGate.background()` installs a profile hook on the
working thread (and only there), and the hook parks that thread on an event, GIL
released, whenever a serving call is in progress. A serving call then costs what it costs
alone, plus at most one switch interval to get the GIL at its start (lowered while gated
work runs, see `lower_switch_interval`). Under traffic that never pauses, the parked
thread takes a short slice after `MAX_PAUSE_S`, so the work still finishes.

Serving calls announce themselves with `ServingGate.call()` only while gated work runs
(`working` is read without a lock on every call: a stale 0 lets one call run ungated, a
stale non-zero costs one lock round; neither is wrong).
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from collections.abc import Callable, Iterator
from types import CodeType, FrameType
from typing import Any

# How long gated work waits for serving to pause before it takes a slice anyway: under
# back-to-back traffic it still progresses at SLICE_S / (MAX_PAUSE_S + SLICE_S) ~ 9 %.
MAX_PAUSE_S = 0.05
# The slice it then takes: a serving call arriving meanwhile waits at most this long.
SLICE_S = 0.005
# The switch interval while gated work runs: what a serving call can wait for the GIL at
# its start (the gated thread notices the call at its next Python call and parks). The
# default 5 ms would be 7x a 0.7 ms call; much lower and CPython spends its time switching.
GATED_SWITCH_INTERVAL_S = 0.0005

ProfileHook = Callable[[FrameType, str, Any], object]


class ServingGate:
    """Counts serving calls in progress; parks gated background threads meanwhile."""

    def __init__(self) -> None:
        self.working = 0  # gated threads alive; the serving path checks it lock-free
        self.calls = 0  # serving calls in progress (only counted while working > 0)
        self._lock = threading.Lock()
        self._idle = threading.Event()
        self._idle.set()

    # ---- the serving side ----------------------------------------------------------

    @contextlib.contextmanager
    def call(self) -> Iterator[None]:
        """Mark one serving call in progress (use only when `working` is non-zero)."""
        with self._lock:
            self.calls += 1
            self._idle.clear()
        try:
            yield
        finally:
            with self._lock:
                self.calls -= 1
                if self.calls == 0:
                    self._idle.set()

    # ---- the background side -------------------------------------------------------

    @contextlib.contextmanager
    def background(self, switch_interval: float | None = GATED_SWITCH_INTERVAL_S) -> Iterator[None]:
        """Run the block gated: on this thread, park while serving calls are in progress.

        Also lowers the switch interval to `switch_interval` meanwhile (None: leave it).
        Re-entrant; other threads are not affected by the hook.
        """
        previous = sys.getprofile()
        if previous is not None:  # nested, or someone profiles this thread: leave it be
            with lower_switch_interval(switch_interval):
                yield
            return
        with self._lock:
            self.working += 1
        sys.setprofile(self._hook())
        try:
            with lower_switch_interval(switch_interval):
                yield
        finally:
            sys.setprofile(None)
            with self._lock:
                self.working -= 1

    def _hook(self) -> ProfileHook:
        run_until = 0.0
        idle, monotonic = self._idle, time.monotonic

        def hook(frame: FrameType, event: str, arg: Any) -> None:
            # Called by CPython on every call/return on the gated thread (never on
            # others), with profiling off inside: keep the common case to one read.
            nonlocal run_until
            if not self.calls:
                return
            if run_until and monotonic() < run_until:
                return  # inside a slice taken after a long pause
            if _importing(frame):
                # Never park holding an import lock: a serving call that needs the module
                # would wait for it, while we ran 5 ms per 50 ms (a demo call took 4.2 s
                # right after the trace thread started). Run on for a slice instead.
                run_until = monotonic() + SLICE_S
                return
            # Park, GIL released, until no serving call is in progress. Checked again
            # on waking, with the GIL held (calls are counted under it): back-to-back
            # calls leave gaps of microseconds, and going on into the C function this
            # hook fired for (dynamo's guard building can hold the GIL for milliseconds)
            # while the next call has begun would stall that call.
            deadline = monotonic() + MAX_PAUSE_S
            while self.calls:
                left = deadline - monotonic()
                if left <= 0:
                    run_until = monotonic() + SLICE_S
                    return
                idle.wait(left)
            run_until = 0.0

        return hook


def _importing(frame: FrameType | None) -> bool:
    """Whether `frame` runs inside an import (importlib's frames are on its stack)."""
    while frame is not None:
        if frame.f_code.co_filename.startswith("<frozen importlib"):
            return True
        frame = frame.f_back
    return False


def _skip_in_dynamo(code: CodeType) -> None:
    # CPython runs a profile hook as an ordinary frame, so on a thread where dynamo's
    # frame callback is installed (the trace thread) dynamo would convert the hook itself:
    # a "graph break" on its Event, dynamo's per-call overhead on every profile event, a
    # compiled frame counted among the model's. Tell dynamo to run it as it is.
    try:
        from torch._dynamo.eval_frame import skip_code
    except ImportError:  # not in every torch: the hook then costs more, nothing breaks
        return
    skip_code(code)


_skip_in_dynamo(ServingGate._hook(ServingGate()).__code__)


GATE = ServingGate()
"""The process's gate: calls of every attached model hold back all gated work."""


# The switch interval is process-wide and shared by every gated thread and engine: the
# first user lowers it, the last one restores what was there before.
_interval_lock = threading.Lock()
_interval_users = 0
_saved_interval = 0.005


@contextlib.contextmanager
def lower_switch_interval(interval: float | None) -> Iterator[None]:
    """Lower `sys.setswitchinterval` to `interval` (None: leave it) inside the block.

    Safe from any thread and re-entrant: a reference count under a lock decides who
    saves and who restores.
    """
    global _interval_users, _saved_interval
    if interval is None:
        yield
        return
    with _interval_lock:
        if _interval_users == 0:
            _saved_interval = sys.getswitchinterval()
            sys.setswitchinterval(min(interval, _saved_interval))
        _interval_users += 1
    try:
        yield
    finally:
        with _interval_lock:
            _interval_users -= 1
            if _interval_users == 0:
                sys.setswitchinterval(_saved_interval)
