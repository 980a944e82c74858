"""What a demo run records: per size, per swap, per mismatch, and the run's result."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from pwdaemon.engine.events import EntryStatus, SwapEvent
from pwdaemon.serving.range_table import Tier

__all__ = ("DemoResult", "Mismatch", "SizeRecord", "SpeedRow", "SwapRecord")


@dataclass
class SizeRecord:
    """What the demo saw of one size."""

    calls: int = 0
    latencies: list[float] = field(default_factory=list)
    tiers: Counter[str] = field(default_factory=Counter)
    hot_at: float | None = None  # when the size reached the policy's hot_calls
    checked_tiers: set[str] = field(default_factory=set)


@dataclass(frozen=True)
class SwapRecord:
    """A swap event and when the demo saw it."""

    at: float  # seconds since the demo started
    event: SwapEvent


@dataclass(frozen=True)
class Mismatch:
    """A served output that differed from the eager reference beyond ATOL/RTOL."""

    index: int
    size: int
    tier: str
    max_abs_diff: float


@dataclass(frozen=True)
class SpeedRow:
    """Median seconds of one recorded input through each tier's runnable."""

    size: int
    eager_s: float
    general_s: float | None
    size_s: float


@dataclass
class DemoResult:
    """Everything the summary reports, for tests and for the benchmarks."""

    duration: float = 0.0
    calls: int = 0
    checked: int = 0
    mismatches: list[Mismatch] = field(default_factory=list)
    swaps: list[SwapRecord] = field(default_factory=list)
    sizes: dict[int, SizeRecord] = field(default_factory=dict)
    entries: list[EntryStatus] = field(default_factory=list)
    calls_by_tier: Counter[str] = field(default_factory=Counter)
    hot_to_swap: dict[int, float] = field(default_factory=dict)
    first_call_s: float = 0.0
    warmup_end_s: float = 0.0
    warmup_max_ms: float = 0.0
    warmup_max_size: int = 0
    warmup_max_tier: str = ""
    median_ms: float = 0.0
    warmup_worst_vs_own_median: float = 0.0
    warmup_worst_own_size: int = 0
    speed: list[SpeedRow] = field(default_factory=list)
    graph_pieces: int = 0
    error: str | None = None

    @property
    def specialized_swaps(self) -> list[SwapRecord]:
        """Swaps to a size, range or CUDA-graph runnable (not the general one)."""
        return [s for s in self.swaps if s.event.tier in (Tier.SIZE, Tier.RANGE, Tier.GRAPH)]

    @property
    def exit_code(self) -> int:
        """0: every checked call matched; 1: mismatches or an error; 130: interrupted."""
        if self.mismatches:
            return 1
        if self.error == "interrupted":
            return 130
        return 1 if self.error else 0
