"""Typed, checked configuration for `attach()`: what to specialize, how hot is hot.

Every knob has its default here and a line saying why. Each config's `check()` runs at
construction and again at attach time, so a bad value fails loudly before any traffic,
naming the value.

Words: `check()` is a config checking its own values; "validate" is reserved for
output validation, comparing a compiled runnable with the one it replaces
(`CompileConfig.validate`, `pwdaemon.engine.validation`).
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pwdaemon.serving.range_table import Range


def _check_int(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def _check_seconds(name: str, value: object, *, zero_ok: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name} must be a number of seconds, got {value!r}")
    if value < 0 or (value == 0 and not zero_ok) or value != value:  # NaN too
        raise ValueError(f"{name} must be {'>=' if zero_ok else '>'} 0, got {value}")


def default_workers() -> int:
    """Default `CompileConfig.workers`: a quarter of the CPUs, at least one."""
    # One compile saturates a core or two; leave the rest to serving. On 2 cores: 1.
    return max(1, (os.cpu_count() or 2) // 4)


@dataclass(frozen=True)
class PolicyConfig:
    """When a size observed in traffic earns its own compile (HotSpot-style tiers)."""

    hot_calls: int = 3
    """Calls of one size before it is hot. Small: compiles run in the background."""
    budget: int = 32
    """Specialized sizes per graph piece (configured `sizes` count against it)."""
    queue_pressure: int = 4
    """Queue length past which the hot threshold rises (doubles per this many jobs)."""
    cold_after_s: float = 60.0
    """A queued size not called for this long is cold and its job is dropped."""
    tick_s: float = 0.05
    """How often the engine folds the dispatchers' counters into the policy."""

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        """Raise ValueError/TypeError naming the first bad value."""
        _check_int("hot_calls", self.hot_calls, 1)
        _check_int("budget", self.budget, 0)
        _check_int("queue_pressure", self.queue_pressure, 1)
        _check_seconds("cold_after_s", self.cold_after_s)
        _check_seconds("tick_s", self.tick_s)


@dataclass(frozen=True)
class CompileConfig:
    """How jobs are run: worker processes, timeouts, retries."""

    workers: int = field(default_factory=default_workers)
    """Long-lived compile processes (plain subprocesses, never forked)."""
    timeout_s: float = 600.0
    """Bounds one compile: a job running longer is killed with its worker and counted as
    hung. It starts when the job is handed to a started worker, so a worker's start-up
    (below) never counts against it, however loaded the machine."""
    start_timeout_s: float = 120.0
    """Bounds a worker's start (Python, torch and Inductor imports, a CPU probe: 2-6 s on
    an idle 2-core machine, several times that niced under load). Past it the start
    counts as crashed: at that point an import hangs or the environment is broken."""
    retries: int = 2
    """Failed jobs are retried this many times, with backoff, then given up."""
    backoff_s: float = 1.0
    """First retry delay; doubles per attempt."""
    niceness: int = 5
    """The nice increment of workers not under SCHED_IDLE (below). 5: beside one busy
    nice-0 process on a core, such a worker gets about a quarter of it (10 gave a
    tenth: a 30 s compile took 5 minutes on a busy host)."""
    idle_priority: bool = True
    """Workers run under Linux's SCHED_IDLE policy: only on CPU time serving leaves idle.
    A worker that gets no CPU for 10 s (every core busy) is replaced by one at
    `niceness` while the host stays busy, so compiles still progress
    (`pwdaemon.workers.starvation`); False: always at `niceness`."""
    pause_during_calls: bool | None = None
    """Stop the SCHED_IDLE workers (SIGSTOP, their compilers too) while a serving call
    is in progress, and continue them when it ends, giving them at least a quarter of
    each second under saturating traffic (`pwdaemon.serving.pause`). None: only where
    serving is on the CPU and its torch threads plus the workers exceed the CPUs this
    process may use (`pwdaemon.engine.cpu_budget`); there, priority alone left calls
    10-60x slower while a worker compiled."""
    options: Mapping[str, Any] = field(default_factory=dict)
    """Inductor options passed to every compile (part of the artifact key)."""
    validate: bool = True
    """Compare a candidate with the published runnable on a recorded input before a swap."""
    general: bool = True
    """Compile the general (dynamic-shape) runnable first."""
    switch_interval_s: float | None = 0.0005
    """While the engine loads or validates in the serving process, CPython's GIL switch
    interval is lowered to this (restored after); None leaves it alone."""

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        """Raise ValueError/TypeError naming the first bad value."""
        _check_int("workers", self.workers, 1)
        _check_seconds("timeout_s", self.timeout_s)
        _check_seconds("start_timeout_s", self.start_timeout_s)
        _check_int("retries", self.retries, 0)
        _check_seconds("backoff_s", self.backoff_s, zero_ok=True)
        _check_int("niceness", self.niceness, 0)
        if not isinstance(self.idle_priority, bool):
            raise TypeError(f"idle_priority must be a bool, got {self.idle_priority!r}")
        if self.pause_during_calls is not None and not isinstance(self.pause_during_calls, bool):
            raise TypeError(
                f"pause_during_calls must be a bool or None, got {self.pause_during_calls!r}"
            )
        if self.switch_interval_s is not None:
            _check_seconds("switch_interval_s", self.switch_interval_s)
        if not isinstance(self.options, Mapping):
            raise TypeError(f"options must be a mapping of Inductor options, got {self.options!r}")


def parse_sizes(sizes: Sequence[int]) -> tuple[int, ...]:
    """`attach(sizes=...)` -> distinct positive ints, in the order given."""
    if isinstance(sizes, int | str | bytes):
        raise TypeError(f"sizes is a sequence of ints, got {sizes!r}")
    out: list[int] = []
    for s in sizes:
        if isinstance(s, bool) or not isinstance(s, int):
            raise TypeError(f"sizes must be ints, got {s!r}")
        if s <= 0:
            raise ValueError(f"sizes must be >= 1, got {s}")
        if s not in out:
            out.append(s)
    return tuple(out)


def parse_ranges(ranges: Sequence[Range | tuple[int, int]]) -> tuple[Range, ...]:
    """`attach(ranges=...)` -> sorted, non-overlapping `Range`s."""
    parsed: list[Range] = []
    for r in ranges:
        if isinstance(r, Range):
            parsed.append(r)
            continue
        if not isinstance(r, tuple | list) or len(r) != 2:
            raise ValueError(f"a range is (start, end), got {r!r}")
        parsed.append(Range(*r))
    ordered = sorted(parsed)
    for a, b in itertools.pairwise(ordered):
        if a.overlaps(b):
            raise ValueError(f"ranges {a.start}..{a.end} and {b.start}..{b.end} overlap")
    return tuple(ordered)


def parse_dynamic(dynamic: Mapping[str, int] | None) -> dict[str, int] | None:
    """`attach(dynamic=...)` -> {argument name: dim}, checked for types."""
    if dynamic is None:
        return None
    if not isinstance(dynamic, Mapping):
        raise TypeError(f"dynamic maps argument names to dims, got {dynamic!r}")
    out: dict[str, int] = {}
    for name, dim in dynamic.items():
        if not isinstance(name, str):
            raise TypeError(f"dynamic maps argument names to dims, got key {name!r}")
        if isinstance(dim, bool) or not isinstance(dim, int):
            raise TypeError(f"dynamic[{name!r}] must be an int dim, got {dim!r}")
        out[name] = dim
    if not out:
        raise ValueError("dynamic={} marks nothing; leave it out for the default (dim 0)")
    return out
