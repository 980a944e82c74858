"""What callbacks receive and what `handle.status()` returns: plain, frozen records."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from pwdaemon.engine.jobs import JobReason, JobSource, JobState
from pwdaemon.serving.range_table import Range, Tier


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


@dataclass(frozen=True)
class PieceStatus:
    """One graph piece: its table's version and its entries."""

    graph: int
    table_version: int
    specializable: bool
    note: str | None
    sizes_seen: int
    entries: Sequence[EntryStatus]


@dataclass(frozen=True)
class HandleStatus:
    """What `handle.status()` returns; `str()` of it is a readable table."""

    model: str
    pieces: Sequence[PieceStatus]
    queue_depth: int
    in_flight: int
    plan_complete: bool
    worker_pids: Sequence[int]

    def __str__(self) -> str:
        lines = [
            f"pwdaemon model {self.model}: queue {self.queue_depth}, in flight "
            f"{self.in_flight}, plan {'complete' if self.plan_complete else 'running'}"
        ]
        for p in self.pieces:
            lines.append(
                f"  graph {p.graph}: table v{p.table_version}, {p.sizes_seen} sizes seen"
                + (f" ({p.note})" if p.note else "")
            )
            for e in p.entries:
                secs = f"{e.compile_seconds:.1f}s" if e.compile_seconds is not None else "-"
                extra = f"  {e.reason}" if e.reason else ""
                lines.append(
                    f"    {e.target:<16} {e.tier.value:<8} {e.state:<10} hits={e.hits:<8}"
                    f" compile={secs}{extra}"
                )
        return "\n".join(lines)
