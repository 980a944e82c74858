"""What the engine reports: `handle.status()` and the metrics a scrape reads.

Both run on the caller's thread (a user's, or the metrics server's) while the loop
thread goes on changing jobs: they read without a lock and copy what they read, so a
report can be a moment old, never torn within one field.
"""

from __future__ import annotations

import collections
import copy
from collections.abc import Sequence

from pwdaemon.engine.events import EntryStatus, HandleStatus, PieceStatus
from pwdaemon.engine.jobs import Counters, JobReason, JobState, PieceState
from pwdaemon.metrics.stats import ModelMetrics, PieceMetrics
from pwdaemon.serving.range_table import Tier


def status(
    name: str,
    pieces: Sequence[PieceState],
    *,
    queue_depth: int,
    in_flight: int,
    plan_complete: bool,
    worker_pids: Sequence[int],
) -> HandleStatus:
    """Per graph piece: table version, and each entry's tier, state, hits and timings."""
    return HandleStatus(
        name,
        tuple(_piece_status(st) for st in list(pieces)),
        queue_depth,
        in_flight,
        plan_complete,
        tuple(worker_pids),
    )


def _piece_status(st: PieceState) -> PieceStatus:
    d = st.piece.dispatcher
    entries = [
        EntryStatus(
            target="eager",
            range=None,
            tier=Tier.EAGER,
            state=JobState.LIVE,
            why=JobReason.TRACE,
            hits=st.calls_by_tier.get("eager", 0),
            compile_seconds=None,
            attempts=0,
            reason=None,
            source=None,
        )
    ]
    for job in sorted(list(st.jobs.values()), key=lambda j: j.priority):
        entries.append(
            EntryStatus(
                target=job.target.label,
                range=job.target.range,
                tier=job.target.tier,
                state=job.state,
                why=job.why,
                hits=job.hits,
                compile_seconds=job.compile_seconds,
                attempts=job.attempts,
                reason=job.reason,
                source=job.source,
            )
        )
    note = None
    if st.piece.size_index is None:
        note = "no dynamic size: general tier only"
    elif st.piece.extra_symbols:
        note = (
            f"more than one dynamic size ({', '.join(st.piece.extra_symbols)}): general tier only"
        )
    return PieceStatus(
        st.piece.index,
        d.table.version,
        st.piece.specializable,
        note,
        len(d.counts),
        tuple(entries),
    )


def metrics_snapshot(
    name: str,
    pieces: Sequence[PieceState],
    counters: Counters,
    *,
    queue_depth: int,
    worker_restarts: int,
    store_stats: tuple[int, int],
    store_write_errors: int,
) -> ModelMetrics:
    """The model's metrics now (`store_stats`: bytes and artifacts, as last read)."""
    out = []
    for st in list(pieces):
        d = st.piece.dispatcher
        live: collections.Counter[str] = collections.Counter(
            e.tier.value for e in d.table.entries()
        )
        out.append(
            PieceMetrics(
                st.piece.index,
                d.table.version,
                dict(st.calls_by_tier),
                len(d.counts),
                d.overflow_calls,
                dict(live),
            )
        )
    return ModelMetrics(
        model=name,
        pieces=out,
        jobs_by_outcome=dict(counters.jobs_by_outcome),
        compile_seconds=copy.deepcopy(counters.compile_hist),
        hot_to_swap_seconds=copy.deepcopy(counters.hot_to_swap_hist),
        queue_depth=queue_depth,
        in_flight=counters.in_flight,
        validation_rejects_by_reason=dict(counters.rejects_by_reason),
        failures_by_reason=dict(counters.failures_by_reason),
        worker_restarts=worker_restarts,
        loads_by_source=dict(counters.loads_by_source),
        store_bytes=store_stats[0],
        store_artifacts=store_stats[1],
        store_write_errors=store_write_errors,
    )
