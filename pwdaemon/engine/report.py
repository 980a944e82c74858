"""What the engine reports: `handle.status()` and the metrics a scrape reads.

Both run on the caller's thread (a user's, or the metrics server's) while the loop
thread goes on changing jobs and serving threads go on tracing: they read without a
lock and copy what they read, so a report can be a moment old, never torn within one
field.

What dynamo's tracing did comes from the tracer's records, read through `TraceRecords`:
the engine sits below the handle (which owns the tracer) and must not import it, so the
handle hands the engine its tracer typed as this read-only protocol.
"""

from __future__ import annotations

import collections
import copy
import logging
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from pwdaemon.engine.events import (
    AttemptStatus,
    EntryStatus,
    HandleStatus,
    MissStatus,
    PieceStatus,
    TraceStatus,
)
from pwdaemon.engine.jobs import Counters, JobReason, JobState, PieceState
from pwdaemon.metrics.stats import ModelMetrics, PieceMetrics, TraceMetrics
from pwdaemon.serving.direct import DirectCalls
from pwdaemon.serving.piece import GraphPiece
from pwdaemon.serving.range_table import Target, Tier
from pwdaemon.serving.saved_trace import SavedTraceOutcome
from pwdaemon.serving.strategy import ShapeStrategy
from pwdaemon.serving.trace_record import (
    AttemptOutcome,
    ErrorFallbacks,
    GraphBreak,
    MissRecord,
    Recompile,
    RecompileCause,
    StrategyAttempt,
)

log = logging.getLogger(__name__)


class TraceRecords(Protocol):
    """The tracer's records, read-only (`pwdaemon.serving.trace.Tracer` is one).

    Lists only grow and records are written on slow paths (tracing calls, misses,
    errors) by serving threads; readers copy what they read.
    """

    @property
    def pieces(self) -> Sequence[GraphPiece]: ...
    @property
    def strategy(self) -> ShapeStrategy: ...
    @property
    def attempts(self) -> Sequence[StrategyAttempt]: ...
    @property
    def graph_breaks(self) -> Sequence[GraphBreak]: ...
    @property
    def recompiles(self) -> Sequence[Recompile]: ...
    @property
    def misses(self) -> Mapping[str, MissRecord]: ...
    @property
    def miss_calls(self) -> int: ...
    @property
    def errors(self) -> ErrorFallbacks: ...
    @property
    def settled(self) -> bool: ...
    @property
    def trace_error(self) -> BaseException | None: ...
    @property
    def direct(self) -> DirectCalls | None: ...
    @property
    def saved_trace(self) -> SavedTraceOutcome: ...
    @property
    def saved_trace_detail(self) -> str: ...


def status(
    name: str,
    pieces: Sequence[PieceState],
    *,
    queue_depth: int,
    in_flight: int,
    plan_complete: bool,
    worker_pids: Sequence[int],
    trace: TraceRecords | None = None,
) -> HandleStatus:
    """Per graph piece: strategy, table version, each entry's tier, state, hits and
    timings, and why it is on eager after the plan; for the model, what tracing did.

    Pieces the engine has not planned (compile=False, or traced a moment ago) are shown
    from the tracer alone, with their eager entry.
    """
    planned = {st.piece.index: st for st in list(pieces)}
    traced = list(trace.pieces) if trace is not None else []
    out = [_piece_status(st, plan_complete) for st in planned.values()]
    out += [_unplanned_status(p) for p in traced if p.index not in planned]
    out.sort(key=lambda p: p.graph)
    return HandleStatus(
        name,
        tuple(out),
        queue_depth,
        in_flight,
        plan_complete,
        tuple(worker_pids),
        trace=trace_status(trace) if trace is not None else TraceStatus(),
    )


def trace_status(trace: TraceRecords) -> TraceStatus:
    """A copy of the tracer's records, frozen."""
    errors = trace.errors
    error = trace.trace_error
    return TraceStatus(
        settled=trace.settled,
        strategy=trace.strategy,
        attempts=tuple(
            AttemptStatus(a.strategy, a.outcome, a.reason, a.discarded)
            for a in list(trace.attempts)
        ),
        graph_breaks=tuple(trace.graph_breaks),
        recompiles=tuple(trace.recompiles),
        misses=tuple(
            MissStatus(m.signature, m.calls, m.state) for m in list(trace.misses.values())
        ),
        miss_calls=trace.miss_calls,
        error_calls=errors.calls,
        errors_by_type=dict(errors.by_type),
        trace_error=None if error is None else f"{type(error).__name__}: {error}",
        saved_trace=trace.saved_trace,
        saved_trace_detail=trace.saved_trace_detail,
        **_direct_status(trace.direct),
    )


def _direct_status(direct: DirectCalls | None) -> dict[str, Any]:
    if direct is None:
        return {}
    entries = list(direct.entries.values())
    return {
        "direct_signatures": len(entries),
        "direct_calls": sum(e.calls for e in entries),
        "direct_dropped": {r.value: n for r, n in list(direct.dropped.items())},
        "direct_refused": len(direct.refused),
    }


def on_eager_reason(st: PieceState, plan_complete: bool) -> str | None:
    """Why a piece serves eager once the plan completed and its own planned jobs ended
    with no compiled runnable in its table; None while it has one or is still planned."""
    if not plan_complete or st.piece.tensor_free:
        return None  # a tensor-free piece has nothing to compile: its eager is the end
    jobs = list(st.jobs.values())
    planned = [j for j in jobs if j.why.planned]
    if not all(j.terminal for j in planned):
        return None
    if any(e.tier is not Tier.EAGER for e in st.piece.dispatcher.table.entries()):
        return None
    given_up = sorted(
        (j for j in planned if j.state is not JobState.LIVE), key=lambda j: j.priority
    )
    if given_up:
        return "; ".join(
            f"{j.target.label} {j.state.value}: {j.reason or 'no reason recorded'}"
            for j in given_up
        )
    if Target.general().label not in st.jobs:
        off = "general tier off (CompileConfig.general=False)"
        note = _note(st.piece)
        if note is not None:
            return f"{off}; {note}: nothing will compile it"
        return f"{off}; no size compiled yet (sizes compile once hot)"
    return None  # planned jobs live, yet nothing in the table: a moment before publish


def warn_on_eager(name: str, pieces: Sequence[PieceState], checked: set[int]) -> None:
    """Log one WARNING per piece found on eager once its plan ended (loop thread, after
    the plan completed). `checked` holds the pieces already judged, warned or not."""
    for st in list(pieces):
        index = st.piece.index
        if index in checked or not all(j.terminal for j in st.jobs.values() if j.why.planned):
            continue
        checked.add(index)
        reason = on_eager_reason(st, True)
        if reason is not None:
            log.warning(
                "pwdaemon: %s: graph %d stays on eager after its plan: %s", name, index, reason
            )


def _note(piece: GraphPiece) -> str | None:
    if piece.tensor_free:
        return "no tensor operations, only size arithmetic: nothing to compile"
    if piece.size_index is None:
        return "no dynamic size: general tier only"
    if piece.extra_symbols:
        return piece.size_hint or (
            f"more than one dynamic size ({', '.join(piece.extra_symbols)}): general tier only"
        )
    return None


def _eager_entry(hits: int) -> EntryStatus:
    return EntryStatus(
        target="eager",
        range=None,
        tier=Tier.EAGER,
        state=JobState.LIVE,
        why=JobReason.TRACE,
        hits=hits,
        compile_seconds=None,
        attempts=0,
        reason=None,
        source=None,
    )


def _unplanned_status(piece: GraphPiece) -> PieceStatus:
    d = piece.dispatcher
    # No engine tick folds this piece's calls by tier; while eager is all its table
    # holds, every counted call was an eager one.
    only_eager = all(e.tier is Tier.EAGER for e in d.table.entries())
    hits = sum(list(d.counts.values())) + d.overflow_calls if only_eager else 0
    note = _note(piece)
    return PieceStatus(
        piece.index,
        d.table.version,
        piece.specializable,
        "not planned for compiles" + (f"; {note}" if note else ""),
        len(d.counts),
        (_eager_entry(hits),),
        strategy=piece.strategy,
    )


def _piece_status(st: PieceState, plan_complete: bool) -> PieceStatus:
    d = st.piece.dispatcher
    entries = [_eager_entry(st.calls_by_tier.get("eager", 0))]
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
                graph_bytes=job.graph_bytes,
            )
        )
    return PieceStatus(
        st.piece.index,
        d.table.version,
        st.piece.specializable,
        _note(st.piece),
        len(d.counts),
        tuple(entries),
        strategy=st.piece.strategy,
        on_eager_reason=on_eager_reason(st, plan_complete),
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
    plan_complete: bool = False,
    trace: TraceRecords | None = None,
) -> ModelMetrics:
    """The model's metrics now (`store_stats`: bytes and artifacts, as last read)."""
    out = []
    graph_bytes: list[int] = []  # one per live CUDA graph (only they carry a size)
    for st in list(pieces):
        graph_bytes += [j.graph_bytes for j in list(st.jobs.values()) if j.graph_bytes is not None]
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
        trace=trace_metrics(trace, pieces, plan_complete),
        cuda_graphs=len(graph_bytes),
        cuda_graph_bytes=sum(graph_bytes),
    )


def trace_metrics(
    trace: TraceRecords | None, pieces: Sequence[PieceState], plan_complete: bool
) -> TraceMetrics:
    """Tracing as counts. Every strategy and cause is present from the start (at 0),
    so rate() has a baseline before the first event."""
    on_eager = sum(on_eager_reason(st, plan_complete) is not None for st in list(pieces))
    if trace is None:
        return TraceMetrics(pieces_on_eager=on_eager)
    by_strategy = dict.fromkeys((s.value for s in ShapeStrategy), 0)
    for p in list(trace.pieces):
        by_strategy[p.strategy.value] += 1
    causes = dict.fromkeys((c.value for c in RecompileCause), 0)
    for r in list(trace.recompiles):
        causes[r.cause.value] += 1
    fallbacks = dict.fromkeys((s.value for s in ShapeStrategy), 0)
    for a in list(trace.attempts):
        if a.outcome is AttemptOutcome.FELL_BACK:
            fallbacks[a.strategy.value] += 1
    return TraceMetrics(
        pieces_by_strategy=by_strategy,
        graph_breaks=sum(b.count for b in list(trace.graph_breaks)),
        recompiles_by_cause=causes,
        miss_calls=trace.miss_calls,
        error_calls=trace.errors.calls,
        fallbacks_by_strategy=fallbacks,
        pieces_on_eager=on_eager,
    )
