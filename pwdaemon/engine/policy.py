"""Which sizes earn a compile, in what order: tiered compilation in HotSpot's spirit.

Pure bookkeeping over the counters the dispatchers keep; no torch, no I/O, so the
scheduler can be unit-tested with a clock it controls.

- A size is hot after `hot_calls` calls; hotter sizes are compiled first.
- While the queue is long the threshold rises (doubling per `queue_pressure` jobs), so
  a flood of new sizes does not bury the hottest ones.
- Each graph piece specializes at most `budget` sizes (configured sizes count).
- A queued size not called for `cold_after_s` is cold: its job is dropped.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from pwdaemon.config import PolicyConfig


@dataclass
class SizeStats:
    calls: int = 0
    last_seen: float = 0.0
    first_hot: float | None = None


@dataclass
class PiecePolicy:
    """Hotness of the sizes of one graph piece."""

    config: PolicyConfig
    sizes: dict[int, SizeStats] = field(default_factory=dict)
    specialized: set[int] = field(default_factory=set)  # planned, queued, live or failed

    def observe(self, histogram: Mapping[int, int], now: float) -> None:
        """Fold a histogram snapshot (cumulative calls per size) in."""
        for size, calls in histogram.items():
            st = self.sizes.get(size)
            if st is None:
                st = self.sizes[size] = SizeStats()
            if calls != st.calls:
                st.calls = calls
                st.last_seen = now

    def threshold(self, queue_len: int) -> int:
        """Calls that make a size hot with `queue_len` jobs queued."""
        return self.config.hot_calls * (2 ** (queue_len // self.config.queue_pressure))

    def hot_candidates(self, queue_len: int, now: float) -> list[int]:
        """Sizes to enqueue now, hottest first, within the remaining budget."""
        room = self.config.budget - len(self.specialized)
        if room <= 0:
            return []
        limit = self.threshold(queue_len)
        hot = [s for s, st in self.sizes.items() if st.calls >= limit and s not in self.specialized]
        for s in hot:
            st = self.sizes[s]
            if st.first_hot is None:
                st.first_hot = now
        hot.sort(key=lambda s: (-self.sizes[s].calls, s))
        return hot[:room]

    def reserve(self, sizes: Iterable[int]) -> None:
        """Count `sizes` against the budget (planned, queued, live or failed)."""
        self.specialized.update(sizes)

    def release(self, size: int) -> None:
        """A dropped job gives its budget slot back."""
        self.specialized.discard(size)

    def is_cold(self, size: int, now: float) -> bool:
        """Not called for `cold_after_s` (a never-seen, configured size never is)."""
        st = self.sizes.get(size)
        if st is None:
            return False  # never seen (a configured size): never cold
        return now - st.last_seen > self.config.cold_after_s

    def calls(self, size: int) -> int:
        """Calls of `size` seen so far."""
        st = self.sizes.get(size)
        return st.calls if st else 0

    def hot_since(self, size: int) -> float | None:
        """When `size` first counted as hot (None: never)."""
        st = self.sizes.get(size)
        return st.first_hot if st else None
