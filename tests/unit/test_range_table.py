"""Range, Entry and the immutable, versioned RangeTable (no dynamo, no torch calls).

Proves: Range validation and semantics; `with_entry` returns a new table one version up
and leaves the old one untouched; lookup order exact > narrowest range > general >
eager, with sizes outside every range served by general (or eager); and, by a
hypothesis property, that `RangeTable.lookup` and the dispatcher's inlined copy of it
agree with a brute-force reference over random tables.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pwdaemon import Dispatcher, Entry, Range, RangeTable, Tier


def tag(name: object) -> Callable[..., Any]:
    """A runnable that says who it is (and is distinct from every other)."""

    def run(*args: Any) -> object:
        return name

    run.__qualname__ = f"run[{name}]"
    return run


EAGER = tag("eager")


# ---- Range -------------------------------------------------------------------------


def test_range_basics() -> None:
    r = Range(4, 16)
    assert (r.start, r.end, r.width, r.is_size) == (4, 16, 13, False)
    assert 4 in r and 16 in r and 10 in r
    assert 3 not in r and 17 not in r
    assert "4" not in r and 4.0 not in r  # sizes are ints
    assert str(r) == "4-16"
    one = Range.of(7)
    assert one == Range(7, 7) and one.is_size and one.width == 1 and str(one) == "7"
    assert sorted([Range(5, 6), Range(1, 9), Range(1, 2)]) == [
        Range(1, 2),
        Range(1, 9),
        Range(5, 6),
    ]
    assert hash(Range(1, 2)) == hash(Range(1, 2))


def test_range_overlap_is_inclusive() -> None:
    assert Range(1, 4).overlaps(Range(4, 8))  # share size 4
    assert Range(4, 8).overlaps(Range(1, 4))
    assert not Range(1, 4).overlaps(Range(5, 8))
    assert Range(1, 100).overlaps(Range(50, 50))
    assert not Range(5, 8).overlaps(Range(1, 4))


@pytest.mark.parametrize(
    ("start", "end", "exc", "match"),
    [
        (5, 2, ValueError, r"start 5 is greater than its end 2"),
        (0, 3, ValueError, r"start must be a size >= 1, got 0"),
        (1, -1, ValueError, r"end must be a size >= 1, got -1"),
        (1.5, 3, TypeError, r"start must be an int, got 1\.5"),
        (1, "8", TypeError, r"end must be an int, got '8'"),
        (True, 2, TypeError, r"start must be an int, got True"),
    ],
)
def test_range_rejects(start: Any, end: Any, exc: type[Exception], match: str) -> None:
    with pytest.raises(exc, match=match):
        Range(start, end)


def test_tier_levels_order_the_tiers() -> None:
    assert Tier.EAGER.level < Tier.GENERAL.level < Tier.RANGE.level < Tier.GRAPH.level
    assert Tier.RANGE.level == Tier.SIZE.level


# ---- with_entry: versions and immutability ------------------------------------------


def test_with_entry_returns_new_table_and_leaves_old_untouched() -> None:
    t0 = RangeTable.initial(EAGER)
    assert t0.version == 0 and t0.general is None and not t0.exact and not t0.ranges
    t1 = t0.with_entry(Range.of(8), Tier.SIZE, tag("s8"), {"key": "abc"})
    t2 = t1.with_entry(Range(1, 16), Tier.RANGE, tag("r1-16"))
    t3 = t2.with_entry(None, Tier.GENERAL, tag("general"))
    assert [t.version for t in (t0, t1, t2, t3)] == [0, 1, 2, 3]
    assert len({id(t) for t in (t0, t1, t2, t3)}) == 4
    # every older table still answers as it did
    assert t0.lookup(8).runnable is EAGER and t0.lookup(3).runnable is EAGER
    assert t1.lookup(8).runnable() == "s8" and t1.lookup(3).runnable is EAGER
    assert t2.lookup(3).runnable() == "r1-16" and t2.lookup(99).runnable is EAGER
    assert t3.lookup(99).runnable() == "general"
    assert dict(t0.exact) == {} and t0.ranges == () and t0.general is None
    assert list(t1.exact) == [8] and t1.ranges == ()
    # the entry keeps what it was given
    e = t3.lookup(8)
    assert (e.tier, e.range, dict(e.info)) == (Tier.SIZE, Range.of(8), {"key": "abc"})
    assert e.run is e.runnable


def test_table_cannot_be_mutated() -> None:
    t = RangeTable.initial(EAGER).with_entry(Range.of(2), Tier.SIZE, tag(2))
    with pytest.raises(dataclasses.FrozenInstanceError):
        t.version = 7  # type: ignore[misc]
    with pytest.raises(TypeError):
        t.exact[3] = t.eager  # type: ignore[index]
    with pytest.raises(TypeError):
        t.lookup(2).info["x"] = 1  # type: ignore[index]
    with pytest.raises(dataclasses.FrozenInstanceError):
        t.eager.runnable = EAGER  # type: ignore[misc]


def test_table_built_from_a_callers_dict_does_not_follow_its_changes() -> None:
    mine = {4: Entry(Tier.SIZE, tag(4), Range.of(4))}
    t = RangeTable(eager=Entry(Tier.EAGER, EAGER), exact=mine)
    mine[5] = Entry(Tier.SIZE, tag(5), Range.of(5))
    del mine[4]
    assert t.lookup(4).runnable() == 4
    assert t.lookup(5).runnable is EAGER
    assert list(t.exact) == [4]


def test_range_entry_without_range_is_rejected() -> None:
    with pytest.raises(ValueError, match="needs a range"):
        RangeTable(eager=Entry(Tier.EAGER, EAGER), ranges=(Entry(Tier.RANGE, EAGER),))


# ---- lookup order --------------------------------------------------------------------


def test_lookup_order_exact_then_narrowest_range_then_general_then_eager() -> None:
    t = RangeTable.initial(EAGER)
    t = t.with_entry(Range(1, 64), Tier.RANGE, tag("wide"))
    t = t.with_entry(Range(8, 15), Tier.RANGE, tag("narrow"))
    t = t.with_entry(Range.of(10), Tier.SIZE, tag("exact10"))
    # no general yet: outside every range is eager
    assert t.lookup(65).tier is Tier.EAGER and t.lookup(65).runnable is EAGER
    t = t.with_entry(None, Tier.GENERAL, tag("general"))
    served = {n: t.lookup(n).runnable() for n in (1, 7, 8, 10, 11, 15, 16, 64, 65, 10**9)}
    assert served == {
        1: "wide",
        7: "wide",
        8: "narrow",
        10: "exact10",  # exact beats a narrower range
        11: "narrow",
        15: "narrow",
        16: "wide",
        64: "wide",
        65: "general",  # outside every range: general, no error
        10**9: "general",
    }
    # a newer, wider range does not shadow a narrower one, whatever the order
    t2 = t.with_entry(Range(1, 1000), Tier.RANGE, tag("widest"))
    assert t2.lookup(9).runnable() == "narrow" and t2.lookup(500).runnable() == "widest"


def test_same_target_is_replaced_not_duplicated() -> None:
    t = RangeTable.initial(EAGER)
    t = t.with_entry(Range(1, 8), Tier.RANGE, tag("a"))
    t = t.with_entry(Range(1, 8), Tier.RANGE, tag("b"))
    t = t.with_entry(Range.of(3), Tier.SIZE, tag("c"))
    t = t.with_entry(Range.of(3), Tier.GRAPH, tag("d"))
    t = t.with_entry(None, Tier.GENERAL, tag("g1"))
    t = t.with_entry(None, Tier.GENERAL, tag("g2"))
    assert len(t.ranges) == 1 and len(t.exact) == 1
    assert t.lookup(5).runnable() == "b"
    assert t.lookup(3).runnable() == "d" and t.lookup(3).tier is Tier.GRAPH
    assert t.lookup(9).runnable() == "g2"
    # replacing eager keeps everything else
    t = t.with_entry(None, Tier.EAGER, tag("eager2"))
    assert t.eager.runnable() == "eager2" and t.lookup(9).runnable() == "g2"
    assert [e.runnable() for e in t.entries()] == ["eager2", "g2", "d", "b"]


def test_equal_width_overlap_prefers_lower_start() -> None:
    t = RangeTable.initial(EAGER)
    t = t.with_entry(Range(5, 9), Tier.RANGE, tag("5-9"))
    t = t.with_entry(Range(3, 7), Tier.RANGE, tag("3-7"))
    assert [t.lookup(n).runnable() for n in (3, 4, 5, 7, 8, 9)] == [
        "3-7",
        "3-7",
        "3-7",
        "3-7",
        "5-9",
        "5-9",
    ]


def test_lookup_of_size_zero_and_huge_sizes() -> None:
    # size 0 is what a dispatcher uses for a piece without a size symbol
    t = RangeTable.initial(EAGER).with_entry(Range(1, 4), Tier.RANGE, tag("r"))
    assert t.lookup(0).runnable is EAGER
    assert t.lookup(2**62).runnable is EAGER
    t = t.with_entry(None, Tier.GENERAL, tag("g"))
    assert t.lookup(0).runnable() == "g"


# ---- property: lookup agrees with a brute-force reference ----------------------------

MAX_SIZE = 40

_target = st.one_of(
    st.none(),
    st.integers(1, MAX_SIZE).map(Range.of),
    st.tuples(st.integers(1, MAX_SIZE), st.integers(0, MAX_SIZE // 2)).map(
        lambda t: Range(t[0], t[0] + t[1])
    ),
)
_op = st.tuples(_target, st.sampled_from([Tier.GENERAL, Tier.SIZE, Tier.RANGE, Tier.EAGER]))


class Reference:
    """The lookup rules written the slow, obvious way."""

    def __init__(self) -> None:
        self.eager: object = "eager"
        self.general: object | None = None
        self.exact: dict[int, object] = {}
        self.ranges: dict[Range, object] = {}

    def apply(self, target: Range | None, tier: Tier, name: object) -> None:
        if target is None:
            if tier is Tier.EAGER:
                self.eager = name
            else:
                self.general = name
        elif target.start == target.end:
            self.exact[target.start] = name
        else:
            self.ranges[target] = name

    def lookup(self, size: int) -> object:
        if size in self.exact:
            return self.exact[size]
        holding = [r for r in self.ranges if r.start <= size <= r.end]
        if holding:
            return self.ranges[min(holding, key=lambda r: (r.end - r.start, r.start))]
        return self.general if self.general is not None else self.eager


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=st.lists(_op, max_size=30), extra_queries=st.lists(st.integers(0, 10**6)))
def test_lookup_agrees_with_reference(
    ops: list[tuple[Range | None, Tier]], extra_queries: list[int]
) -> None:
    ref = Reference()
    table = RangeTable.initial(tag("eager"))
    dispatcher = Dispatcher(0, tag("eager"), size_index=0, size_cap=4)
    snapshots: list[tuple[RangeTable, dict[int, object]]] = []
    queries = [*range(0, MAX_SIZE + 3), *extra_queries]
    for i, (target, tier) in enumerate(ops):
        name = f"op{i}"
        table = table.with_entry(target, tier, tag(name))
        published = dispatcher.install(target, tier, tag(name))
        ref.apply(target, tier, name)
        assert table.version == published.version == i + 1
        expected = {n: ref.lookup(n) for n in queries}
        for n in queries:
            assert table.lookup(n).runnable() == expected[n], n
            # the dispatcher's inlined lookup serves the same runnable
            assert dispatcher(n) == expected[n], n
        snapshots.append((table, expected))
    # every earlier table still answers as it did when it was built
    for old, expected in snapshots:
        for n in queries:
            assert old.lookup(n).runnable() == expected[n]
