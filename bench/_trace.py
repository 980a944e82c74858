"""The request trace every system of `bench/peers.py` serves: seeded, shared, JSON-able.

Built on `pwdaemon.demo.traffic` (the generator `pwdaemon demo` uses), with presets sized for
a benchmark where some peers compile once per distinct size:

- decode-like calls, sizes 1..`decode_max` (default 256), heavy-tailed (P(n) ~ n**-alpha)
  plus a few popular sizes that take most calls;
- prefill-like bursts up to `prefill_max` (default 2048), half of them a full chunk;
- phases: the popular sizes shift every `calls / phases` calls, so new sizes keep
  arriving all through the run;
- Poisson arrivals at `rate` calls per second (each call carries its scheduled time).

The number of *distinct* sizes is what the per-size peers pay for (one compile each, 5-20 s
on a 2-core CPU), so the full preset keeps the tail steep enough for ~15 distinct sizes
over 600 calls; `--tail-alpha`, `--calls` and friends widen it for a bigger machine.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, replace
from typing import Any

__all__ = ["FULL", "QUICK", "TraceCall", "TraceSpec", "build_trace", "hot_sizes"]


@dataclass(frozen=True)
class TraceSpec:
    """What trace to generate; `build_trace` turns it into calls."""

    seed: int = 0
    calls: int = 600
    rate: float = 10.0
    """Mean arrivals per second (Poisson); the replay paces itself to these times."""
    decode_max: int = 256
    prefill_max: int = 2048
    tail_alpha: float = 1.6
    popular: int = 4
    popular_share: float = 0.95
    burst_prob: float = 0.004
    burst_calls: tuple[int, int] = (1, 3)
    phases: int = 3
    shift: int = 2

    def with_(self, **changes: Any) -> TraceSpec:
        return replace(self, **{k: v for k, v in changes.items() if v is not None})

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


FULL = TraceSpec()
"""Default CPU preset: 600 calls over ~60 s, 15 distinct sizes (1..154, 420, 2048)."""

QUICK = TraceSpec(
    calls=80,
    rate=20.0,
    decode_max=64,
    prefill_max=256,
    tail_alpha=2.0,
    popular=2,
    popular_share=0.9,
    burst_prob=0.02,
    burst_calls=(1, 2),
    phases=2,
    shift=1,
)
"""`--quick` preset: 80 calls over ~4 s, 6 distinct sizes; proves the harness runs."""


@dataclass(frozen=True)
class TraceCall:
    index: int
    size: int
    at: float  # scheduled arrival, seconds after the trace starts
    kind: str  # decode | prefill
    phase: int


def build_trace(spec: TraceSpec) -> list[TraceCall]:
    """The calls of `spec`, deterministic for its seed (pwdaemon's generator underneath)."""
    from pwdaemon.demo.traffic import Traffic, TrafficConfig

    config = TrafficConfig(
        seed=spec.seed,
        decode_max=spec.decode_max,
        prefill_max=spec.prefill_max,
        tail_alpha=spec.tail_alpha,
        popular=spec.popular,
        popular_share=spec.popular_share,
        burst_prob=spec.burst_prob,
        burst_calls=spec.burst_calls,
        phase_calls=max(1, spec.calls // max(1, spec.phases)),
        shift=spec.shift,
        rate=spec.rate,
    )
    traffic = Traffic(config)
    return [TraceCall(c.index, c.size, c.at, c.kind, c.phase) for c in traffic.take(spec.calls)]


def hot_sizes(trace: list[TraceCall], k: int = 3) -> list[int]:
    """The `k` most frequent sizes of the trace (ties: smaller first), ascending."""
    counts = Counter(c.size for c in trace)
    top = sorted(counts, key=lambda s: (-counts[s], s))[:k]
    return sorted(top)
