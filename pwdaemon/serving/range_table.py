"""Ranges, tiers and the immutable, versioned range table a dispatcher reads per call.

A table is never mutated: `with_entry` builds a new one with `version + 1`, and the
dispatcher publishes it with one reference assignment, so a reader holds one consistent
table for a whole call without a lock.
"""

from __future__ import annotations

import enum
from bisect import bisect_right
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

Runnable = Callable[..., Any]


class Tier(enum.Enum):
    """How a call is answered; `level` orders them (higher is faster, usually)."""

    EAGER = "eager"
    GENERAL = "general"
    RANGE = "range"
    SIZE = "size"
    GRAPH = "graph"

    @property
    def level(self) -> int:
        return _LEVELS[self]


# The first segment bound: below any size, so a bisect always lands on a segment.
_BELOW_EVERY_SIZE = -(2**63)

_LEVELS = {Tier.EAGER: 0, Tier.GENERAL: 1, Tier.RANGE: 2, Tier.SIZE: 2, Tier.GRAPH: 3}


# The end of a range open above (the range of every size above 1 that replaces a general
# refused at size 1, `engine.runner.ABOVE_ONE_RANGE`): the largest size a symbol holds.
OPEN_END = 2**31 - 1


@dataclass(frozen=True, order=True)
class Range:
    """Sizes `start..end`, both inclusive; a single size is a range of one."""

    start: int
    end: int

    def __post_init__(self) -> None:
        for name, value in (("start", self.start), ("end", self.end)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"Range {name} must be an int, got {value!r}")
            if value <= 0:
                raise ValueError(f"Range {name} must be a size >= 1, got {value}")
        if self.start > self.end:
            raise ValueError(f"Range start {self.start} is greater than its end {self.end}")

    @classmethod
    def of(cls, size: int) -> Range:
        return cls(size, size)

    @property
    def width(self) -> int:
        return self.end - self.start + 1

    @property
    def is_size(self) -> bool:
        return self.start == self.end

    def __contains__(self, size: object) -> bool:
        return isinstance(size, int) and self.start <= size <= self.end

    def overlaps(self, other: Range) -> bool:
        return self.start <= other.end and other.start <= self.end

    def __str__(self) -> str:
        return str(self.start) if self.is_size else f"{self.start}-{self.end}"


class TargetKind(enum.Enum):
    """What one compile job produces; each kind publishes one tier."""

    GENERAL = "general"  # one runnable for every size (symbolic)
    RANGE = "range"  # a runnable for a range of sizes
    SIZE = "size"  # a runnable for one concrete size
    GRAPH = "graph"  # a CUDA graph of one size's tier-2 runnable

    @property
    def tier(self) -> Tier:
        return Tier(self.value)


@dataclass(frozen=True)
class Target:
    """What one job compiles: `general`, a `range`, one `size`, or the `graph` of a size.

    `label` ("general", "size:8", "range:1-16", "graph:8") is the stable text form used
    in artifact keys, status and metrics; `parse` reads it back.
    """

    kind: TargetKind
    start: int = 0
    end: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.kind, TargetKind):
            try:
                object.__setattr__(self, "kind", TargetKind(self.kind))
            except ValueError:
                raise ValueError(f"unknown target kind {self.kind!r}") from None

    @classmethod
    def general(cls) -> Target:
        return cls(TargetKind.GENERAL)

    @classmethod
    def size(cls, n: int) -> Target:
        return cls(TargetKind.SIZE, n, n)

    @classmethod
    def of_range(cls, r: Range) -> Target:
        return cls(TargetKind.RANGE, r.start, r.end)

    @classmethod
    def graph(cls, n: int) -> Target:
        return cls(TargetKind.GRAPH, n, n)

    @classmethod
    def parse(cls, label: str) -> Target:
        """ "general", "size:8", "range:1-16", "graph:8" -> Target; ValueError otherwise."""
        if label == TargetKind.GENERAL.value:
            return cls.general()
        kind, _, rest = label.partition(":")
        try:
            if kind in (TargetKind.SIZE.value, TargetKind.GRAPH.value):
                n = int(rest)
                return cls(TargetKind(kind), n, n)
            if kind == TargetKind.RANGE.value:
                start, _, end = rest.partition("-")
                return cls(TargetKind.RANGE, int(start), int(end))
        except ValueError:
            pass
        raise ValueError(f"not a target label: {label!r}")

    @property
    def tier(self) -> Tier:
        return self.kind.tier

    @property
    def range(self) -> Range | None:
        """The sizes it serves; None for general (every size)."""
        if self.kind is TargetKind.GENERAL:
            return None
        return Range(self.start, self.end)

    @property
    def label(self) -> str:
        if self.kind is TargetKind.GENERAL:
            return self.kind.value
        if self.kind is TargetKind.RANGE:
            return f"range:{self.start}-{self.end}"
        return f"{self.kind.value}:{self.start}"

    def __str__(self) -> str:
        return self.label


@dataclass(frozen=True, slots=True)
class Entry:
    """One runnable in a table: what it serves (`range`, None for eager/general) and how."""

    tier: Tier
    runnable: Runnable
    range: Range | None = None
    info: Mapping[str, Any] = field(default_factory=dict)

    @property
    def run(self) -> Runnable:
        return self.runnable


@dataclass(frozen=True)
class RangeTable:
    """Immutable lookup from a size to the best ready entry.

    Lookup order: exact size, then the narrowest range holding the size, then the
    general entry, then eager. A size outside every range is served by general (or
    eager), never an error.
    """

    eager: Entry
    general: Entry | None = None
    exact: Mapping[int, Entry] = field(default_factory=lambda: MappingProxyType({}))
    ranges: tuple[Entry, ...] = ()  # narrowest first, then by start
    version: int = 0
    # Derived at construction (writer side), so that a lookup is one dict probe and, on
    # a miss, one bisect: no per-call scan of the ranges. `_segments[i]` serves sizes
    # from `_bounds[i]` up to the next bound; the first bound is below every size and
    # segments no range covers hold the fallback (general, else eager).
    _exact_get: Callable[[int], Entry | None] = field(init=False, repr=False, compare=False)
    _bounds: list[int] = field(init=False, repr=False, compare=False)
    _segments: tuple[Entry, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for e in self.ranges:
            if e.range is None:
                raise ValueError(f"a range entry needs a range, got {e!r}")
        # A private copy: a caller's dict mutated later cannot change this table.
        exact = dict(self.exact)
        set_ = object.__setattr__
        set_(self, "exact", MappingProxyType(exact))
        set_(self, "_exact_get", exact.get)
        fallback = self.general or self.eager
        # Coverage only changes at a range's start or one past its end: between two
        # such points one entry (the narrowest holding them) serves every size.
        points = {_BELOW_EVERY_SIZE}
        for e in self.ranges:
            assert e.range is not None
            points.add(e.range.start)
            points.add(e.range.end + 1)
        bounds = sorted(points)
        segments: list[Entry] = []
        for p in bounds:
            best: Entry | None = None
            best_key = (0, 0)
            for e in self.ranges:
                r = e.range
                assert r is not None
                if r.start <= p <= r.end:
                    key = (r.width, r.start)
                    if best is None or key < best_key:
                        best, best_key = e, key
            segments.append(best if best is not None else fallback)
        set_(self, "_bounds", bounds)
        set_(self, "_segments", tuple(segments))

    @classmethod
    def initial(cls, eager: Runnable) -> RangeTable:
        return cls(eager=Entry(Tier.EAGER, eager))

    def lookup(self, size: int) -> Entry:
        # Dispatcher.__call__ inlines these lines: change both together.
        entry = self._exact_get(size)
        if entry is None:
            entry = self._segments[bisect_right(self._bounds, size) - 1]
        return entry

    def with_entry(
        self,
        range_: Range | None,
        tier: Tier,
        runnable: Runnable,
        info: Mapping[str, Any] | None = None,
    ) -> RangeTable:
        """A new table with `runnable` serving `range_` (None: general or eager)."""
        entry = Entry(tier, runnable, range_, MappingProxyType(dict(info or {})))
        version = self.version + 1
        if range_ is None:
            if tier is Tier.EAGER:
                return RangeTable(entry, self.general, self.exact, self.ranges, version)
            return RangeTable(self.eager, entry, self.exact, self.ranges, version)
        if range_.is_size:
            exact = dict(self.exact)
            exact[range_.start] = entry
            return RangeTable(
                self.eager, self.general, MappingProxyType(exact), self.ranges, version
            )
        kept = [e for e in self.ranges if e.range != range_]
        kept.append(entry)
        kept.sort(key=lambda e: (e.range.width, e.range.start) if e.range else (0, 0))
        return RangeTable(self.eager, self.general, self.exact, tuple(kept), version)

    def entries(self) -> Iterator[Entry]:
        """Every entry, eager and general first, then sizes and ranges in order."""
        yield self.eager
        if self.general is not None:
            yield self.general
        yield from (self.exact[s] for s in sorted(self.exact))
        yield from sorted(self.ranges, key=lambda e: e.range or Range(1, 1))
