"""Per-call overhead of pwdaemon's dispatcher over calling the runnable directly.

    .venv/bin/python bench/dispatch_overhead.py [--batches 201] [--calls 2000]

Rows (one process, one run):

- `exact`: a table holding an entry for the call's size (the common case once a size
  is compiled): `dispatcher(*args)` against `runnable(*args)`.
- `range (8 ranges + 64 sizes)`: the size is in no exact entry and in the widest of 8
  ranges, so lookup scans every range before it finds its entry (worst case).
- `general (miss)`: the size is in no range or exact entry: every range is scanned,
  then the general entry serves.
- `model(x)`: the whole serving path of an attached model (dynamo guards, pwdaemon's
  input marking, the dispatcher, eager graph) against the same model under
  `torch.compile(backend="eager")`, which pays the same dynamo guards.

Each row times the two callables in interleaved batches of `--calls` calls (so drift
in CPU frequency or cache state hits both alike), takes the per-call time of each
batch, and reports the medians over batches, the added time (median of the per-batch
differences) and the ratio. The garbage collector is off while timing.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

import pwdaemon
from pwdaemon import Dispatcher, Range, Tier

TARGET_NS = 500.0


def _batch_ns(fn: Callable[..., Any], args: tuple[Any, ...], calls: int) -> float:
    loop = range(calls)
    t0 = time.perf_counter_ns()
    for _ in loop:
        fn(*args)
    return (time.perf_counter_ns() - t0) / calls


def compare(
    subject: Callable[..., Any],
    baseline: Callable[..., Any],
    args: tuple[Any, ...],
    *,
    batches: int,
    calls: int,
) -> dict[str, float]:
    """Median per-call ns of `subject` and `baseline`, timed in interleaved batches."""
    for _ in range(3):  # warm up: caches, first-call paths, dynamo
        _batch_ns(subject, args, calls)
        _batch_ns(baseline, args, calls)
    subj: list[float] = []
    base: list[float] = []
    diff: list[float] = []
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for i in range(batches):
            # Alternate which goes first so neither always runs on a warmer cache.
            if i % 2:
                b = _batch_ns(baseline, args, calls)
                s = _batch_ns(subject, args, calls)
            else:
                s = _batch_ns(subject, args, calls)
                b = _batch_ns(baseline, args, calls)
            subj.append(s)
            base.append(b)
            diff.append(s - b)
    finally:
        if gc_was_enabled:
            gc.enable()
    s_med = statistics.median(subj)
    b_med = statistics.median(base)
    return {
        "subject_ns": s_med,
        "baseline_ns": b_med,
        "added_ns": statistics.median(diff),
        "ratio": s_med / b_med,
    }


def _runnable(n: int, x: torch.Tensor) -> tuple[torch.Tensor]:
    # A trivial runnable shaped like a graph piece: (size, input) -> tuple of outputs.
    return (x,)


def _eager(n: int, x: torch.Tensor) -> tuple[torch.Tensor]:
    return (x,)


def dispatcher_rows(batches: int, calls: int) -> list[tuple[str, dict[str, float]]]:
    rows = []
    x = torch.randn(1, 8)

    # One exact entry for the call's size.
    d = Dispatcher(0, _eager, size_index=0)
    d.install(Range.of(1), Tier.SIZE, _runnable)
    assert d.table.lookup(1).runnable is _runnable
    rows.append(("exact", compare(d, _runnable, (1, x), batches=batches, calls=calls)))

    # 8 ranges (widths 2, 4, ..., 256, disjoint) + 64 exact sizes elsewhere.
    d = Dispatcher(0, _eager, size_index=0)
    start = 1000
    widest: Range | None = None
    for k in range(1, 9):
        widest = Range(start, start + 2**k - 1)
        d.install(widest, Tier.RANGE, _eager)
        start = widest.end + 1
    assert widest is not None
    for s in range(1, 65):
        d.install(Range.of(s), Tier.SIZE, _eager)
    d.install(None, Tier.GENERAL, _eager)
    size = widest.start + 1  # only the widest range holds it: scanned last
    d.install(widest, Tier.RANGE, _runnable)
    assert len(d.table.ranges) == 8 and len(d.table.exact) == 64
    assert d.table.lookup(size).runnable is _runnable
    rows.append(
        (
            "range (8 ranges + 64 sizes)",
            compare(d, _runnable, (size, x), batches=batches, calls=calls),
        )
    )

    # Same shape of table, a size nothing specialised holds: general serves.
    d.install(None, Tier.GENERAL, _runnable)
    miss = 10**6
    assert d.table.lookup(miss).runnable is _runnable
    rows.append(
        ("general (miss, 8 ranges scanned)", compare(d, _runnable, (miss, x), batches=batches, calls=calls))
    )
    return rows


class _Tiny(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + 1


def model_row(batches: int, calls: int) -> tuple[str, dict[str, float]]:
    x = torch.randn(1, 8)
    ours = _Tiny()
    handle = pwdaemon.attach(ours, background=False)
    theirs = torch.compile(_Tiny(), backend="eager")
    try:
        with torch.no_grad():
            torch.testing.assert_close(ours(x), theirs(x))
            assert len(handle.pieces) == 1
            result = compare(ours, theirs, (x,), batches=batches, calls=calls)
    finally:
        handle.detach()
    return ("model(x) vs torch.compile(eager)", result)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batches", type=int, default=201)
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--model-calls", type=int, default=200)
    parser.add_argument("--model-batches", type=int, default=51)
    args = parser.parse_args(argv)

    rows = dispatcher_rows(args.batches, args.calls)
    rows.append(model_row(args.model_batches, args.model_calls))

    print(
        f"python {sys.version.split()[0]}, torch {torch.__version__}, "
        f"{args.batches} batches x {args.calls} calls (model: "
        f"{args.model_batches} x {args.model_calls}); medians, ns per call"
    )
    header = f"{'row':<34} {'pwdaemon':>10} {'baseline':>10} {'added':>9} {'ratio':>7}"
    print(header)
    print("-" * len(header))
    for name, r in rows:
        print(
            f"{name:<34} {r['subject_ns']:>10.0f} {r['baseline_ns']:>10.0f} "
            f"{r['added_ns']:>9.0f} {r['ratio']:>6.2f}x"
        )
    worst = max(r["added_ns"] for name, r in rows[:-1])
    verdict = "met" if worst <= TARGET_NS else "MISSED"
    print(f"target: dispatcher adds <= {TARGET_NS:.0f} ns per call: {verdict} (worst {worst:.0f} ns)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
