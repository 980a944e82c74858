"""What callbacks receive and what `handle.status()` returns: plain, frozen records."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from pwdaemon.engine.jobs import JobReason, JobSource, JobState
from pwdaemon.serving.range_table import Range, Tier
from pwdaemon.serving.saved_trace import SavedTraceOutcome
from pwdaemon.serving.strategy import ShapeStrategy
from pwdaemon.serving.trace_record import (
    FASTPATH_HINT,
    AttemptOutcome,
    GraphBreak,
    MissState,
    Recompile,
)


@dataclass(frozen=True)
class SwapEvent:
    """One runnable published into a graph piece's table."""

    graph: int
    range: Range | None  # None for the general entry
    tier: Tier
    version: int  # the table version it was published in
    compile_seconds: float
    source: JobSource  # compiled (here), store (a previous run), peer, captured
    validated: bool

    @property
    def size(self) -> int | None:
        """The size, when the swap published one size's runnable."""
        return self.range.start if self.range is not None and self.range.is_size else None


@dataclass(frozen=True)
class PlanCompleteEvent:
    """Every planned compile (general, configured sizes and ranges) reached an end."""

    model: str
    live: int
    failed: int
    seconds_since_attach: float


@dataclass(frozen=True)
class EntryStatus:
    """One entry of a piece: the eager entry, then one per job (its `Target`)."""

    target: str  # the Target's label ("general", "size:8", "range:1-16", "graph:8"), or "eager"
    range: Range | None
    tier: Tier
    state: JobState  # StrEnum: compares equal to "live", "failed", ...
    why: JobReason  # why the job exists; TRACE for the eager entry
    hits: int
    compile_seconds: float | None
    attempts: int
    reason: str | None  # a wait, failure, rejection or drop, in words
    source: JobSource | None  # where the live runnable came from
    graph_bytes: int | None = None  # a live CUDA graph's memory in the model's pool


@dataclass(frozen=True)
class PieceStatus:
    """One graph piece: its table's version and its entries."""

    graph: int
    table_version: int
    specializable: bool
    note: str | None
    sizes_seen: int
    entries: Sequence[EntryStatus]
    strategy: ShapeStrategy | None = None  # the shape strategy it was captured with
    # Set once the piece's planned jobs ended with no compiled runnable serving it
    # (general failed, general off and not specializable...): why it serves eager.
    on_eager_reason: str | None = None


@dataclass(frozen=True)
class AttemptStatus:
    """One shape strategy tried for the model (a copy of the tracer's record)."""

    strategy: ShapeStrategy
    outcome: AttemptOutcome
    reason: str  # why it fell back, in dynamo's words; "" while active
    discarded: int  # graphs it captured before failing (never served)


@dataclass(frozen=True)
class MissStatus:
    """Calls with one input signature that no captured piece served (run eager)."""

    signature: str
    calls: int
    state: MissState


# Lines of dynamo's graph-break text that point elsewhere rather than say what broke.
_NOISE = ("Developer debug context:", "For more details")


def one_line(reason: str) -> str:
    """Dynamo's multi-line reason (what, Explanation, Hint...) as one line for a table;
    the records keep the full text."""
    kept = [ln.strip() for ln in reason.splitlines() if ln.strip()]
    return " ".join(ln for ln in kept if not ln.startswith(_NOISE))


@dataclass(frozen=True)
class TraceStatus:
    """What dynamo's tracing did: strategies, graph breaks, recompiles, misses, errors."""

    settled: bool = False  # a whole call captured nothing new: the pieces are known
    strategy: ShapeStrategy | None = None  # the strategy serving now
    attempts: Sequence[AttemptStatus] = ()
    graph_breaks: Sequence[GraphBreak] = ()
    recompiles: Sequence[Recompile] = ()
    misses: Sequence[MissStatus] = ()
    miss_calls: int = 0  # calls no piece served, all signatures together
    error_calls: int = 0  # calls that raised on pwdaemon's path and were re-run eager
    errors_by_type: Mapping[str, int] = field(default_factory=dict)
    trace_error: str | None = None  # a background capture that failed
    # attach(guards="rechecked") only (see serving.direct); None: dynamo checks every call
    direct_signatures: int | None = None  # signatures on the direct path now
    direct_calls: int = 0  # calls they took without dynamo in front
    direct_dropped: Mapping[str, int] = field(default_factory=dict)  # reason -> count
    direct_refused: int = 0  # signatures kept on dynamo's path (a graph break)
    saved_trace: SavedTraceOutcome = SavedTraceOutcome.NONE  # see serving.saved_trace
    saved_trace_detail: str = ""  # how long it took, or why not

    def lines(self, pieces: int) -> list[str]:
        """The readable form `HandleStatus.__str__` prints (indented two spaces)."""
        head = "settled" if self.settled else "settling"
        strategy = self.strategy.value if self.strategy is not None else "-"
        out = [f"  trace: {head}, {pieces} piece(s), strategy {strategy}"]
        if self.saved_trace is not SavedTraceOutcome.NONE:
            detail = f": {one_line(self.saved_trace_detail)}" if self.saved_trace_detail else ""
            out.append(f"    saved trace: {self.saved_trace.value.replace('_', ' ')}{detail}")
        if self.settled and not pieces:
            out.append("    no graph captured: the model serves eager")
            if any(b.fake_tensor_break for b in self.graph_breaks):
                out.append(f"    hint: {FASTPATH_HINT}")
        for a in self.attempts:
            if a.outcome is AttemptOutcome.FELL_BACK:
                dropped = f", {a.discarded} graph(s) dropped" if a.discarded else ""
                reason = one_line(a.reason)
                out.append(f"    strategy {a.strategy.value}: fell back{dropped}: {reason}")
            elif a.outcome is AttemptOutcome.SKIPPED:
                out.append(f"    strategy {a.strategy.value}: skipped, {one_line(a.reason)}")
        for b in self.graph_breaks:
            where = f" (pieces {', '.join(map(str, b.pieces))})" if b.pieces else ""
            out.append(f"    graph break x{b.count}{where}: {one_line(b.reason)}")
        for r in self.recompiles:
            detail = f" {r.detail}" if r.detail else ""
            pieces_ = ", ".join(map(str, r.pieces))
            out.append(f"    recompile ({r.cause.value}{detail}): pieces {pieces_}")
        if self.direct_signatures is not None:
            left = "".join(f"; left it ({why}) x{n}" for why, n in self.direct_dropped.items())
            refused = (
                f"; {self.direct_refused} kept on dynamo's path" if self.direct_refused else ""
            )
            out.append(
                f"    direct calls: {self.direct_signatures} signature(s), "
                f"{self.direct_calls} call(s){left}{refused}"
            )
        if self.miss_calls:
            out.append(f"    {self.miss_calls} call(s) no piece served (ran eager):")
            for m in self.misses:
                out.append(f"      {m.calls} x {m.signature} [{m.state.value}]")
        if self.error_calls:
            kinds = ", ".join(f"{k} x{n}" for k, n in sorted(self.errors_by_type.items()))
            out.append(f"    {self.error_calls} call(s) raised and were re-run eager: {kinds}")
        if self.trace_error:
            out.append(f"    background capture failed: {self.trace_error}")
        return out


@dataclass(frozen=True)
class HandleStatus:
    """What `handle.status()` returns; `str()` of it is a readable table."""

    model: str
    pieces: Sequence[PieceStatus]
    queue_depth: int
    in_flight: int
    plan_complete: bool
    worker_pids: Sequence[int]
    trace: TraceStatus = field(default_factory=TraceStatus)

    @property
    def graph_memory_bytes(self) -> int:
        """Pool memory the live CUDA graphs of the model took when captured."""
        return sum(e.graph_bytes or 0 for p in self.pieces for e in p.entries)

    @property
    def on_eager(self) -> Mapping[int, str]:
        """Graph index -> why it still serves eager after its plan completed."""
        return {p.graph: p.on_eager_reason for p in self.pieces if p.on_eager_reason}

    def __str__(self) -> str:
        lines = [
            f"pwdaemon model {self.model}: queue {self.queue_depth}, in flight "
            f"{self.in_flight}, plan {'complete' if self.plan_complete else 'running'}"
        ]
        if self.graph_memory_bytes:
            lines.append(f"  CUDA graphs: {self.graph_memory_bytes / 2**20:.1f} MiB")
        lines.extend(self.trace.lines(len(self.pieces)))
        for p in self.pieces:
            strategy = f" [{p.strategy.value}]" if p.strategy is not None else ""
            lines.append(
                f"  graph {p.graph}{strategy}: table v{p.table_version}, {p.sizes_seen} sizes seen"
                + (f" ({p.note})" if p.note else "")
            )
            if p.on_eager_reason:
                lines.append(f"    ON EAGER after its plan: {p.on_eager_reason}")
            for e in p.entries:
                secs = f"{e.compile_seconds:.1f}s" if e.compile_seconds is not None else "-"
                extra = f"  {e.reason}" if e.reason else ""
                if e.graph_bytes is not None:
                    extra = f"  graph {e.graph_bytes / 2**20:.1f} MiB{extra}"
                lines.append(
                    f"    {e.target:<16} {e.tier.value:<8} {e.state:<10} hits={e.hits:<8}"
                    f" compile={secs}{extra}"
                )
        return "\n".join(lines)
