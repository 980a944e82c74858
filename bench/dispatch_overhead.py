"""Per-call overhead of pwdaemon's dispatcher over calling the runnable directly.

    .venv/bin/python bench/dispatch_overhead.py [--batches 201] [--calls 2000]

Rows (one process, one run):

- `exact`: a table holding an entry for the call's size (the common case once a size
  is compiled): `dispatcher(*args)` against `runnable(*args)`.
- `range (8 ranges + 64 sizes)`: a table with 8 disjoint ranges, 64 exact sizes and a
  general entry; the size is in no exact entry but in the widest range, so the lookup
  misses the exact map and goes through the ranges (the slowest path).
- `general (miss, 8 ranges)`: the same table, a size no size or range holds: the
  lookup goes through the ranges and lands on the general entry.
- `model(x) vs torch.compile(eager)`: the whole serving path of an attached model
  (dynamo guards, pwdaemon's input marking, the dispatcher, the eager graph) against
  the same model under `torch.compile(backend="eager")`, which pays the same dynamo
  guards. Context only: the target is about the dispatcher rows.

Timing: each row pairs a subject with a baseline and times them in interleaved
batches of `--calls` calls (alternating which goes first), so drift in CPU frequency
or cache state hits both alike; rows are themselves timed round-robin, a few batches
each in turn, so a burst of load from other processes spreads over all rows instead
of spoiling one. Reported per row: the median per-call time of subject and baseline
over all batches, the added time (median of the per-batch differences) and the
ratio of the medians. The garbage collector is off while timing.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

import pwdaemon
from pwdaemon import Dispatcher, Range, Tier

TARGET_NS = 500.0
ROUND = 5  # batches per row per turn of the round-robin


def _batch_ns(fn: Callable[..., Any], args: tuple[Any, ...], calls: int) -> float:
    loop = range(calls)
    t0 = time.perf_counter_ns()
    for _ in loop:
        fn(*args)
    return (time.perf_counter_ns() - t0) / calls


@dataclass
class Row:
    name: str
    subject: Callable[..., Any]
    baseline: Callable[..., Any]
    args: tuple[Any, ...]
    calls: int
    batches: int
    subj: list[float] = field(default_factory=list)
    base: list[float] = field(default_factory=list)
    diff: list[float] = field(default_factory=list)

    def warm_up(self) -> None:
        for _ in range(3):  # caches, first-call paths, dynamo
            _batch_ns(self.subject, self.args, self.calls)
            _batch_ns(self.baseline, self.args, self.calls)

    def run(self, n: int) -> None:
        for _ in range(min(n, self.batches - len(self.subj))):
            # Alternate which goes first so neither always runs on a warmer cache.
            if len(self.subj) % 2:
                b = _batch_ns(self.baseline, self.args, self.calls)
                s = _batch_ns(self.subject, self.args, self.calls)
            else:
                s = _batch_ns(self.subject, self.args, self.calls)
                b = _batch_ns(self.baseline, self.args, self.calls)
            self.subj.append(s)
            self.base.append(b)
            self.diff.append(s - b)

    @property
    def done(self) -> bool:
        return len(self.subj) >= self.batches

    def result(self) -> dict[str, float]:
        s_med = statistics.median(self.subj)
        b_med = statistics.median(self.base)
        return {
            "subject_ns": s_med,
            "baseline_ns": b_med,
            "added_ns": statistics.median(self.diff),
            "ratio": s_med / b_med,
        }


def run_all(rows: list[Row]) -> None:
    for row in rows:
        row.warm_up()
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        while not all(row.done for row in rows):
            for row in rows:
                row.run(ROUND)
    finally:
        if gc_was_enabled:
            gc.enable()


def _runnable(n: int, x: torch.Tensor) -> tuple[torch.Tensor]:
    # A trivial runnable shaped like a graph piece: (size, input) -> tuple of outputs.
    return (x,)


def _eager(n: int, x: torch.Tensor) -> tuple[torch.Tensor]:
    return (x,)


def dispatcher_rows(batches: int, calls: int) -> list[Row]:
    x = torch.randn(1, 8)

    # One exact entry for the call's size.
    exact = Dispatcher(0, _eager, size_index=0)
    exact.install(Range.of(1), Tier.SIZE, _runnable)
    assert exact.table.lookup(1).runnable is _runnable

    # 8 disjoint ranges (widths 2, 4, ..., 256) + 64 exact sizes + a general entry.
    ranged = Dispatcher(0, _eager, size_index=0)
    start = 1000
    widest: Range | None = None
    for k in range(1, 9):
        widest = Range(start, start + 2**k - 1)
        ranged.install(widest, Tier.RANGE, _eager)
        start = widest.end + 1
    assert widest is not None
    for s in range(1, 65):
        ranged.install(Range.of(s), Tier.SIZE, _eager)
    ranged.install(widest, Tier.RANGE, _runnable)
    ranged.install(None, Tier.GENERAL, _runnable)
    size = widest.start + 1  # only the widest range holds it
    miss = 10**6  # nothing specialised holds it: general serves
    table = ranged.table
    assert len(table.ranges) == 8 and len(table.exact) == 64
    assert table.lookup(size).tier is Tier.RANGE and table.lookup(size).runnable is _runnable
    assert table.lookup(miss).tier is Tier.GENERAL and table.lookup(miss).runnable is _runnable

    return [
        Row("exact", exact, _runnable, (1, x), calls, batches),
        Row("range (8 ranges + 64 sizes)", ranged, _runnable, (size, x), calls, batches),
        Row("general (miss, 8 ranges)", ranged, _runnable, (miss, x), calls, batches),
    ]


class _Tiny(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--batches", type=int, default=201)
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--model-batches", type=int, default=51)
    parser.add_argument("--model-calls", type=int, default=200)
    args = parser.parse_args(argv)

    rows = dispatcher_rows(args.batches, args.calls)
    x = torch.randn(1, 8)
    ours = _Tiny()
    handle = pwdaemon.attach(ours, compile=False)
    theirs = torch.compile(_Tiny(), backend="eager")
    try:
        with torch.no_grad():
            torch.testing.assert_close(ours(x), theirs(x))
            assert handle.wait_traced(60)  # attach traces in the background by default
            assert len(handle.pieces) == 1
            rows.append(
                Row(
                    "model(x) vs torch.compile(eager)",
                    ours,
                    theirs,
                    (x,),
                    args.model_calls,
                    args.model_batches,
                )
            )
            run_all(rows)
    finally:
        handle.detach()

    print(
        f"python {sys.version.split()[0]}, torch {torch.__version__}, "
        f"{args.batches} batches x {args.calls} calls (model: "
        f"{args.model_batches} x {args.model_calls}); medians, ns per call"
    )
    header = f"{'row':<34} {'pwdaemon':>10} {'baseline':>10} {'added':>9} {'ratio':>7}"
    print(header)
    print("-" * len(header))
    results = [(row.name, row.result()) for row in rows]
    for name, r in results:
        print(
            f"{name:<34} {r['subject_ns']:>10.0f} {r['baseline_ns']:>10.0f} "
            f"{r['added_ns']:>9.0f} {r['ratio']:>6.2f}x"
        )
    worst = max(r["added_ns"] for _, r in results[:-1])
    verdict = "met" if worst <= TARGET_NS else "MISSED"
    print(
        f"target: dispatcher adds <= {TARGET_NS:.0f} ns per call: {verdict} (worst {worst:.0f} ns)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
