"""Plain counters the engine keeps and the metrics collector reads at scrape time.

Nothing here is touched on the serving path: the dispatcher bumps its own size
histogram, and the engine's periodic tick folds that into these structures.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

# Compiles take from a fraction of a second (a cache hit) to many minutes (a large
# model with autotuning): buckets from 0.1 s to 30 min.
COMPILE_SECONDS_BUCKETS: tuple[float, ...] = (
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    20.0,
    30.0,
    60.0,
    120.0,
    300.0,
    600.0,
    1800.0,
)


@dataclass
class HistogramCounts:
    """A cumulative-free histogram: per-bucket counts, sum and count (Prometheus style)."""

    bounds: tuple[float, ...] = COMPILE_SECONDS_BUCKETS
    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    count: int = 0

    def __post_init__(self) -> None:
        if not self.counts:
            self.counts = [0] * (len(self.bounds) + 1)  # last slot is +Inf

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value
        self.count += 1

    def cumulative(self) -> list[tuple[float, int]]:
        """(upper bound, cumulative count) pairs ending with (+inf, count)."""
        out: list[tuple[float, int]] = []
        running = 0
        for bound, c in zip((*self.bounds, float("inf")), self.counts, strict=True):
            running += c
            out.append((bound, running))
        return out


@dataclass(frozen=True)
class PieceMetrics:
    """One graph piece (one dispatcher) as the collector sees it."""

    graph: int
    table_version: int
    calls_by_tier: Mapping[str, int]  # tier name -> cumulative calls
    distinct_sizes: int  # sizes counted individually (bounded by the histogram cap)
    overflow_calls: int  # calls of sizes past the cap, counted as "other"
    live_entries_by_tier: Mapping[str, int]


@dataclass(frozen=True)
class TraceMetrics:
    """What dynamo's tracing did for one model, as counts with low-cardinality keys only
    (strategy and cause names: never a reason string or an input signature)."""

    pieces_by_strategy: Mapping[str, int] = field(default_factory=dict)  # strategy -> pieces
    graph_breaks: int = 0  # graph breaks dynamo counted during tracing calls
    recompiles_by_cause: Mapping[str, int] = field(default_factory=dict)  # cause -> count
    miss_calls: int = 0  # calls no captured piece served (ran eager)
    error_calls: int = 0  # calls that raised on pwdaemon's path and were re-run eager
    fallbacks_by_strategy: Mapping[str, int] = field(default_factory=dict)  # failed strategy
    pieces_on_eager: int = 0  # pieces with no compiled runnable after their plan


@dataclass(frozen=True)
class ModelMetrics:
    """Everything one attached model exports; `model` is its label value."""

    model: str
    pieces: Sequence[PieceMetrics]
    jobs_by_outcome: Mapping[tuple[str, str], int]  # (target kind, outcome) -> count
    compile_seconds: HistogramCounts
    hot_to_swap_seconds: HistogramCounts
    queue_depth: int
    in_flight: int
    validation_rejects_by_reason: Mapping[str, int]
    failures_by_reason: Mapping[str, int]
    worker_restarts: int
    loads_by_source: Mapping[str, int]  # "compiled" | "store" | "peer"
    store_bytes: int
    store_artifacts: int
    store_write_errors: int
    trace: TraceMetrics = field(default_factory=TraceMetrics)
    cuda_graphs: int = 0  # live CUDA graphs (tier 3)
    cuda_graph_bytes: int = 0  # their memory in the model's graph pool


class MetricsSource(Protocol):
    """What the collector needs from an attached model (the engine implements it)."""

    def metrics_snapshot(self) -> ModelMetrics:
        """Called on the metrics HTTP server's thread at every scrape.

        Must not block on the serving path and must not raise (a source that raises
        is skipped and counted). Return copies (as `dict(...)`), not live containers
        the engine keeps mutating, so one scrape reads consistent numbers. `model`
        must be unique among the sources registered in a process.
        """
        ...


def percentile(values: Sequence[float], q: float, *, empty: float = 0.0) -> float:
    """The q-th percentile (q in 0..100) of `values` by nearest rank; `empty` for no values.

    Nearest rank rather than interpolation: the result is always a latency that was
    actually observed, which is what the demo's and the benchmarks' tables report.
    """
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"percentile q must be in 0..100, got {q!r}")
    if not values:
        return empty
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, math.ceil(q / 100.0 * len(ordered)) - 1))
    return ordered[rank]
