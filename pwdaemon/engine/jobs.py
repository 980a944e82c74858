"""What the engine schedules: jobs, their states and reasons, and per-piece bookkeeping.

A `Job` is one (graph piece, `Target`) and its life. Every field of a job is written on
the engine's loop thread; `state` changes that a waiter may be blocked on are made under
`Waiters.cond` (see `waiters.py`), so `handle.wait()` on a serving thread wakes on them.
"""

from __future__ import annotations

import collections
import enum
from dataclasses import dataclass, field

from pwdaemon.engine.policy import PiecePolicy
from pwdaemon.metrics.stats import HistogramCounts
from pwdaemon.serving.piece import GraphPiece
from pwdaemon.serving.range_table import Target


class JobState(enum.StrEnum):
    """Where a job is: queued -> compiling -> live | failed (or dropped, cancelled).

    A `StrEnum`, so `JobState.LIVE == "live"` holds for code that compares with text.
    """

    QUEUED = "queued"
    COMPILING = "compiling"  # compiling, loading, validating or capturing
    LIVE = "live"  # published into the piece's table
    FAILED = "failed"  # gave up after its retries (or a non-retryable failure)
    DROPPED = "dropped"  # a hot size that went cold while queued
    CANCELLED = "cancelled"  # the model was detached first

    @property
    def terminal(self) -> bool:
        """No further change: the job will never run (again)."""
        return self in _TERMINAL


_TERMINAL = frozenset((JobState.LIVE, JobState.FAILED, JobState.DROPPED, JobState.CANCELLED))


class JobReason(enum.StrEnum):
    """Why a job exists (`EntryStatus.why`)."""

    # The general (dynamic-shape) runnable, planned first; for a piece that one size
    # alone can reach, that size's runnable in its place.
    GENERAL = "general"
    CONFIGURED = "configured"  # a size or range given to attach()
    HOT = "hot"  # a size traffic made hot
    PROFILE = "profile"  # a size the previous run's profile found hot (warm restart)
    STORE = "store"  # the store holds an artifact for it (warm restart)
    PEER = "peer"  # another process published an artifact for it
    GRAPH = "graph"  # a CUDA graph of a size whose tier-2 runnable went live
    TRACE = "trace"  # not a job: the eager entry dynamo's trace created

    @property
    def planned(self) -> bool:
        """Part of the plan that `on_plan_complete` reports on."""
        return self in (JobReason.GENERAL, JobReason.CONFIGURED)


class PriorityBand(enum.IntEnum):
    """The first half of a job's priority: lower runs first, then the rank within."""

    STORE = -1  # loading what is already compiled costs least and serves soonest
    GENERAL = 0
    CONFIGURED = 1  # configured sizes, then ranges, in the order given; then profile
    HOT = 2  # ranked by the size's calls now (hotter first)
    GRAPH = 3  # ranked by size


class JobSource(enum.StrEnum):
    """Where a published runnable came from (`SwapEvent.source`, `EntryStatus.source`)."""

    COMPILED = "compiled"  # a worker of this process compiled it
    STORE = "store"  # a previous run's artifact
    PEER = "peer"  # another process's artifact, seen by the store watcher
    CAPTURED = "captured"  # a CUDA graph captured in this process


Priority = tuple[PriorityBand, int]


@dataclass
class Job:
    """One (graph piece, target) and its life, from planning to live or given up."""

    piece: GraphPiece
    target: Target
    why: JobReason
    priority: Priority
    state: JobState = JobState.QUEUED
    attempts: int = 0
    not_before: float = 0.0  # monotonic time before which the queue does not hand it out
    reason: str | None = None  # a wait, failure, rejection or drop, in words
    compile_seconds: float | None = None
    source: JobSource | None = None
    hot_since: float | None = None
    hits: int = 0  # calls its published runnable served
    graph_bytes: int | None = None  # a live CUDA graph's pool memory (graph jobs only)

    @property
    def terminal(self) -> bool:
        """Live, failed, dropped or cancelled: it will not run again."""
        return self.state.terminal


@dataclass
class PieceState:
    """The engine's bookkeeping for one graph piece (touched on the loop thread only)."""

    piece: GraphPiece
    policy: PiecePolicy
    jobs: dict[str, Job] = field(default_factory=dict)  # by target label
    last_hist: dict[int, int] = field(default_factory=dict)
    calls_by_tier: collections.Counter[str] = field(default_factory=collections.Counter)
    graph_bytes: bytes | None = None  # the pickled graph, made once for all its jobs

    def add(self, job: Job) -> Job:
        """Record `job` as the piece's job for its target (replacing an older one)."""
        self.jobs[job.target.label] = job
        return job


@dataclass
class Counters:
    """Plain counters for metrics: written on the loop thread, read at scrape time.

    A scrape copies them on its own thread without a lock: a copy can be one update
    behind (a histogram's bucket counted before its sum), which the next scrape shows.
    """

    jobs_by_outcome: collections.Counter[tuple[str, str]] = field(
        default_factory=collections.Counter
    )
    failures_by_reason: collections.Counter[str] = field(default_factory=collections.Counter)
    rejects_by_reason: collections.Counter[str] = field(default_factory=collections.Counter)
    loads_by_source: collections.Counter[str] = field(default_factory=collections.Counter)
    compile_hist: HistogramCounts = field(default_factory=HistogramCounts)
    hot_to_swap_hist: HistogramCounts = field(default_factory=HistogramCounts)
    in_flight: int = 0  # jobs in a worker right now
