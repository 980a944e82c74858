"""Where a serving call's wall time went that its CPU time does not explain (bench/stalls.py).

A slow call whose thread spent little CPU waited: for the GIL, inside a C function (a
lock, the GPU, the CUDA driver), or for a CPU (the kernel's run queue, which
`/proc/.../schedstat` counts). The stack sampler cannot tell the first two apart. This
probe is a profile hook on the serving thread alone (`sys.setprofile`, installed for each
call and removed after it) that times

- every C function call (`c_call` to `c_return`), wall and thread CPU: one far longer
  in wall than in CPU blocked inside C. Whether it kept the GIL meanwhile, the stack
  sampler's lateness tells (a torch op keeps it; a synchronize, a sleep or a lock wait
  releases it);
- every interval between two consecutive events of the thread longer than the
  threshold: the interpreter only waits between bytecodes for the GIL (CPython's eval
  breaker), so such an interval with little CPU is a wait for the GIL, which another
  thread held (its C call, or its switch interval).

Its own cost (a Python call per event, a few microseconds each) slows every call alike;
the medians it gives are not the product's.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from types import FrameType
from typing import Any

from _stack_sampler import _short


@dataclass(frozen=True)
class Wait:
    kind: str  # "in C" or "between events"
    what: str  # the C function, or the event before the interval
    where: str  # the Python line that called it, or stood at the interval's start
    wall_ms: float
    cpu_ms: float


@dataclass
class CallWaits:
    """The waits of one call over the threshold, longest first (the worst `KEEP`)."""

    waits: list[Wait] = field(default_factory=list)

    KEEP = 4

    def add(self, wait: Wait) -> None:
        self.waits.append(wait)
        self.waits.sort(key=lambda w: -w.wall_ms)
        del self.waits[self.KEEP :]


class WaitProbe:
    """`begin()` before a call and `end()` after it, on the serving thread."""

    def __init__(self, threshold_ms: float) -> None:
        self.threshold_s = threshold_ms / 1e3
        self.current = CallWaits()
        # (perf_counter, thread_time, name, where) per C call in progress, innermost last.
        self._c_calls: list[tuple[float, float, str, str]] = []
        self._last = (0.0, 0.0, "", "")  # the last event: wall, CPU, event, where

    def begin(self) -> None:
        self.current = CallWaits()
        self._c_calls.clear()
        self._last = (time.perf_counter(), time.thread_time(), "begin", "")
        sys.setprofile(self._event)

    def end(self) -> CallWaits:
        sys.setprofile(None)
        return self.current

    def _event(self, frame: FrameType, event: str, arg: Any) -> None:
        now = time.perf_counter()
        last_wall, last_cpu, last_event, last_where = self._last
        returning = event in ("c_return", "c_exception") and bool(self._c_calls)
        # An interval that ends at a C call's return lies inside that call: its own
        # record below has it.
        if not returning and now - last_wall > self.threshold_s:
            cpu = time.thread_time()
            self.current.add(
                Wait(
                    "between events",
                    last_event,
                    last_where,
                    (now - last_wall) * 1e3,
                    (cpu - last_cpu) * 1e3,
                )
            )
        if event == "c_call":
            where = f"{_short(frame.f_code.co_filename)}:{frame.f_lineno}"
            self._c_calls.append((now, time.thread_time(), _name(arg), where))
            self._last = (now, time.thread_time(), f"call of {_name(arg)}", where)
            return
        if returning:
            start, cpu0, name, where = self._c_calls.pop()
            cpu = time.thread_time()
            if now - start > self.threshold_s:
                self.current.add(Wait("in C", name, where, (now - start) * 1e3, (cpu - cpu0) * 1e3))
            self._last = (now, cpu, f"return of {name}", where)
            return
        # Python call and return events: only the interval's start moves. Its CPU is not
        # read here (a system call per event); an interval over the threshold counts
        # its CPU from the last C event's reading, an upper bound.
        self._last = (now, last_cpu, event, f"{_short(frame.f_code.co_filename)}:{frame.f_lineno}")


def _name(function: Any) -> str:
    module = getattr(function, "__module__", None) or ""
    name = getattr(function, "__qualname__", None) or getattr(function, "__name__", "?")
    return f"{module}.{name}" if module else str(name)
