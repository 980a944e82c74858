"""Seeded synthetic serving traffic: the sizes (batches) a model is called with, in order.

Used by `pwdaemon demo` and by the benchmarks, so both see the same kind of traffic and
a seed reproduces a run's sizes exactly. The shape of it follows an LLM server's step
sizes:

- **decode** calls: sizes 1..`decode_max`, heavy-tailed (a Zipf-like law, so most calls
  are small) plus a handful of *popular* sizes that take `popular_share` of them (what a
  steady number of concurrent requests looks like);
- **prefill** bursts: now and then a run of a few large calls, sizes above `decode_max`
  up to `prefill_max`, half of them exactly `prefill_max` (a full chunk of chunked
  prefill), the rest log-uniform below it;
- **phases**: every `phase_calls` calls the mix shifts: `shift` of the popular sizes are
  replaced by new ones, so new sizes keep turning hot during a run.

Every call also carries a scheduled arrival time (`Call.at`, Poisson arrivals at `rate`
calls per second; 0 for back-to-back), so a driver can pace itself without its own
randomness. Everything derives from `TrafficConfig.seed`: same config, same calls, on
any platform (Python's `random.Random` is specified bit for bit).
"""

from __future__ import annotations

import bisect
import itertools
import math
import random
from collections.abc import Iterator
from dataclasses import dataclass, field, replace

__all__ = ["Call", "Traffic", "TrafficConfig", "phase_summary"]


@dataclass(frozen=True)
class TrafficConfig:
    """What traffic to generate; every field has a default that resembles LLM serving."""

    seed: int = 0
    decode_max: int = 256
    """Largest decode size (decode sizes are 1..decode_max)."""
    prefill_max: int = 2048
    """Largest prefill size; prefill sizes are decode_max+1..prefill_max."""
    tail_alpha: float = 1.3
    """Exponent of the heavy tail: P(size n) ~ n**-alpha over 1..decode_max."""
    popular: int = 4
    """Popular decode sizes per phase."""
    popular_share: float = 0.6
    """Share of decode calls that go to the popular sizes (the rest: the tail)."""
    burst_prob: float = 0.01
    """Chance that a call starts a prefill burst (0: no prefill at all)."""
    burst_calls: tuple[int, int] = (2, 6)
    """Calls per prefill burst, inclusive bounds."""
    full_chunk_share: float = 0.5
    """Share of prefill calls of exactly prefill_max (a full chunk)."""
    phase_calls: int = 1000
    """Calls per phase; the popular sizes shift at every phase boundary."""
    shift: int = 2
    """Popular sizes replaced at each phase boundary."""
    rate: float = 0.0
    """Mean calls per second for `Call.at` (Poisson arrivals); 0: all at time 0."""
    burst_gap_s: float = 0.0
    """Gap between the calls of one prefill burst (0: back-to-back)."""

    def __post_init__(self) -> None:
        if self.decode_max < 1:
            raise ValueError(f"decode_max must be >= 1, got {self.decode_max}")
        if self.burst_prob > 0 and self.prefill_max <= self.decode_max:
            raise ValueError(
                f"prefill_max ({self.prefill_max}) must exceed decode_max "
                f"({self.decode_max}) when prefill bursts are on (burst_prob > 0)"
            )
        if self.tail_alpha <= 0:
            raise ValueError(f"tail_alpha must be > 0, got {self.tail_alpha}")
        if not 0 <= self.popular <= self.decode_max:
            raise ValueError(f"popular must be in 0..decode_max, got {self.popular}")
        for name in ("popular_share", "burst_prob", "full_chunk_share"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be within 0..1, got {value}")
        lo, hi = self.burst_calls
        if not 1 <= lo <= hi:
            raise ValueError(f"burst_calls must be (lo, hi) with 1 <= lo <= hi, got {lo, hi}")
        if self.phase_calls < 1:
            raise ValueError(f"phase_calls must be >= 1, got {self.phase_calls}")
        if not 0 <= self.shift <= self.popular:
            raise ValueError(f"shift must be in 0..popular, got {self.shift}")
        if self.rate < 0 or self.burst_gap_s < 0:
            raise ValueError("rate and burst_gap_s must be >= 0")

    @property
    def max_size(self) -> int:
        """The largest size this traffic can bring."""
        return self.prefill_max if self.burst_prob > 0 else self.decode_max

    def with_seed(self, seed: int) -> TrafficConfig:
        """The same traffic shape with another seed."""
        return replace(self, seed=seed)


@dataclass(frozen=True)
class Call:
    """One call of the traffic."""

    index: int
    size: int
    kind: str  # "decode" | "prefill"
    phase: int
    at: float  # scheduled arrival, seconds from the start


@dataclass
class Traffic:
    """An endless, deterministic stream of `Call`s for one `TrafficConfig`.

    Iterate it (`for call in traffic`), or `take(n)`. Phases follow the call index
    (`index // phase_calls`); `popular_sizes(phase)` says which sizes a phase favours.
    """

    config: TrafficConfig = field(default_factory=TrafficConfig)

    def __post_init__(self) -> None:
        c = self.config
        self._rng = random.Random(f"pwdaemon-traffic:{c.seed}:calls")
        self._clock_rng = random.Random(f"pwdaemon-traffic:{c.seed}:clock")
        weights = [n**-c.tail_alpha for n in range(1, c.decode_max + 1)]
        self._tail_cum = list(itertools.accumulate(weights))
        self._popular: list[tuple[int, ...]] = []
        self._index = 0
        self._clock = 0.0
        self._burst_left = 0

    # ---- phases -----------------------------------------------------------------

    def popular_sizes(self, phase: int) -> tuple[int, ...]:
        """The popular decode sizes of `phase`, most popular first."""
        if phase < 0:
            raise ValueError(f"phase must be >= 0, got {phase}")
        while len(self._popular) <= phase:
            self._popular.append(self._next_popular(len(self._popular)))
        return self._popular[phase]

    def _next_popular(self, phase: int) -> tuple[int, ...]:
        c = self.config
        rng = random.Random(f"pwdaemon-traffic:{c.seed}:phase:{phase}")
        if phase == 0:
            kept: list[int] = []
        else:
            previous = list(self._popular[phase - 1])
            # The least popular go; the rest move up a place.
            kept = previous[: c.popular - c.shift]
            rng.shuffle(kept)
        # New popular sizes come from the tail law too, but never one that was popular in
        # an earlier phase: each phase brings sizes the run has not favoured before.
        taken = set(kept) | set(itertools.chain.from_iterable(self._popular))
        fresh: list[int] = []
        tries = 0
        while len(kept) + len(fresh) < c.popular:
            n = self._tail_draw(rng)
            tries += 1
            if (n not in taken or tries > 64 * c.decode_max) and n not in fresh and n not in kept:
                fresh.append(n)
        return tuple(kept + fresh)

    def phase_of(self, index: int) -> int:
        """The phase the `index`-th call belongs to."""
        return index // self.config.phase_calls

    # ---- calls ------------------------------------------------------------------

    def _tail_draw(self, rng: random.Random) -> int:
        x = rng.random() * self._tail_cum[-1]
        return bisect.bisect_right(self._tail_cum, x) + 1

    def _decode_size(self, phase: int) -> int:
        c, rng = self.config, self._rng
        popular = self.popular_sizes(phase)
        if popular and rng.random() < c.popular_share:
            # Within the popular set, Zipf again: the first is the most popular.
            ranks = [1.0 / (i + 1) for i in range(len(popular))]
            return rng.choices(popular, weights=ranks)[0]
        return self._tail_draw(rng)

    def _prefill_size(self) -> int:
        c, rng = self.config, self._rng
        if rng.random() < c.full_chunk_share:
            return c.prefill_max
        lo, hi = math.log(c.decode_max + 1), math.log(c.prefill_max)
        return min(c.prefill_max, max(c.decode_max + 1, round(math.exp(rng.uniform(lo, hi)))))

    def next_call(self) -> Call:
        """The next call: its size, kind (decode or prefill), phase and arrival time."""
        c, rng = self.config, self._rng
        index = self._index
        phase = self.phase_of(index)
        if self._burst_left == 0 and c.burst_prob > 0 and rng.random() < c.burst_prob:
            self._burst_left = rng.randint(*c.burst_calls)
            in_burst = False  # the first call of a burst arrives like any other
        else:
            in_burst = self._burst_left > 0
        if self._burst_left > 0:
            self._burst_left -= 1
            size, kind = self._prefill_size(), "prefill"
        else:
            size, kind = self._decode_size(phase), "decode"
        if in_burst:
            self._clock += c.burst_gap_s
        elif c.rate > 0:
            self._clock += self._clock_rng.expovariate(c.rate)
        self._index += 1
        return Call(index, size, kind, phase, self._clock)

    def __iter__(self) -> Iterator[Call]:
        while True:
            yield self.next_call()

    def take(self, n: int) -> list[Call]:
        """The next `n` calls."""
        return [self.next_call() for _ in range(n)]

    def sizes(self, n: int) -> list[int]:
        """The next `n` sizes (a convenience for benchmarks and tests)."""
        return [call.size for call in self.take(n)]


def phase_summary(calls: list[Call]) -> dict[int, dict[int, int]]:
    """Calls per size within each phase: {phase: {size: calls}}."""
    out: dict[int, dict[int, int]] = {}
    for call in calls:
        per = out.setdefault(call.phase, {})
        per[call.size] = per.get(call.size, 0) + 1
    return out
