"""Tests for pwdaemon.demo.traffic: the seeded synthetic traffic the demo and benchmarks use."""

from __future__ import annotations

import itertools
from collections import Counter

import pytest

from pwdaemon.demo.traffic import Call, Traffic, TrafficConfig, phase_summary


def calls(config: TrafficConfig, n: int) -> list[Call]:
    return Traffic(config).take(n)


def test_same_seed_same_calls() -> None:
    config = TrafficConfig(seed=7, rate=100.0)
    assert calls(config, 3000) == calls(config, 3000)


def test_different_seeds_differ() -> None:
    a = [c.size for c in calls(TrafficConfig(seed=1), 500)]
    b = [c.size for c in calls(TrafficConfig(seed=2), 500)]
    assert a != b


def test_sequence_is_pinned() -> None:
    # Python's random.Random is specified bit for bit: a seed's first sizes never change
    # between runs or platforms. A change to the generator shows up here on purpose.
    first = Traffic(TrafficConfig(seed=0)).sizes(12)
    assert first == [112, 112, 2, 1, 96, 12, 2, 112, 96, 2, 112, 1]


def test_iteration_matches_take() -> None:
    config = TrafficConfig(seed=3)
    it = iter(Traffic(config))
    assert [next(it) for _ in range(200)] == calls(config, 200)


def test_sizes_within_bounds_and_kinds() -> None:
    config = TrafficConfig(seed=0, decode_max=256, prefill_max=2048)
    out = calls(config, 20_000)
    for c in out:
        if c.kind == "decode":
            assert 1 <= c.size <= 256
        else:
            assert c.kind == "prefill"
            assert 256 < c.size <= 2048
    kinds = Counter(c.kind for c in out)
    assert kinds["decode"] > 0.9 * len(out)
    assert kinds["prefill"] > 0


def test_decode_is_heavy_tailed() -> None:
    # The tail alone (no popular sizes, no prefill): most calls are small...
    config = TrafficConfig(seed=0, burst_prob=0.0, popular_share=0.0)
    out = [c.size for c in calls(config, 20_000)]
    small = sum(1 for s in out if s <= 16)
    assert small > 0.6 * len(out)
    # ...yet large sizes still show up, and many distinct sizes arrive.
    assert max(out) > 128
    assert len(set(out)) > 100


def test_popular_sizes_dominate_their_phase() -> None:
    config = TrafficConfig(seed=5, burst_prob=0.0, phase_calls=5000, popular=4, shift=2)
    traffic = Traffic(config)
    out = traffic.take(5000)
    popular = traffic.popular_sizes(0)
    assert len(popular) == 4 and len(set(popular)) == 4
    share = sum(1 for c in out if c.size in popular) / len(out)
    assert share >= config.popular_share - 0.05
    # The most popular size of the phase is the most called one.
    assert Counter(c.size for c in out).most_common(1)[0][0] == popular[0]


def test_phases_shift_the_popular_sizes() -> None:
    config = TrafficConfig(seed=11, phase_calls=500, popular=4, shift=2)
    traffic = Traffic(config)
    out = traffic.take(3000)
    assert {c.phase for c in out} == set(range(6))
    for phase in range(1, 6):
        before, now = traffic.popular_sizes(phase - 1), traffic.popular_sizes(phase)
        assert len(now) == 4
        assert len(set(now) & set(before)) == 2  # two kept, two new
        new = set(now) - set(before)
        earlier = {s for p in range(phase) for s in traffic.popular_sizes(p)}
        assert not new & earlier  # the new ones were never popular before
    # New sizes keep arriving: every phase brings sizes unseen in earlier phases.
    per_phase = phase_summary(out)
    seen: set[int] = set()
    for phase in sorted(per_phase):
        fresh = set(per_phase[phase]) - seen
        if phase:
            assert fresh
        seen |= set(per_phase[phase])


def test_prefill_bursts_are_runs_with_full_chunks() -> None:
    config = TrafficConfig(seed=2, burst_prob=0.02, burst_calls=(2, 6), prefill_max=2048)
    out = calls(config, 20_000)
    runs: list[int] = []
    length = 0
    for c in out:
        if c.kind == "prefill":
            length += 1
        elif length:
            runs.append(length)
            length = 0
    assert runs
    assert min(runs) >= 2
    prefill = [c.size for c in out if c.kind == "prefill"]
    full = sum(1 for s in prefill if s == 2048) / len(prefill)
    assert 0.35 < full < 0.65  # about full_chunk_share of them are a full chunk


def test_no_prefill_when_off() -> None:
    out = calls(TrafficConfig(seed=0, burst_prob=0.0, decode_max=64, prefill_max=64), 5000)
    assert all(c.kind == "decode" and c.size <= 64 for c in out)


def test_demo_caps() -> None:
    config = TrafficConfig(seed=0, decode_max=128, prefill_max=512)
    assert config.max_size == 512
    assert max(c.size for c in calls(config, 10_000)) <= 512


def test_arrival_times() -> None:
    config = TrafficConfig(seed=0, rate=200.0, burst_prob=0.0)
    out = calls(config, 4000)
    ats = [c.at for c in out]
    assert ats == sorted(ats)
    assert ats[0] > 0
    # Poisson arrivals at 200/s: 4000 calls take about 20 s.
    assert 18.0 < ats[-1] < 22.0
    assert all(c.at == 0.0 for c in calls(TrafficConfig(seed=0), 100))


def test_bursts_arrive_back_to_back() -> None:
    config = TrafficConfig(seed=1, rate=100.0, burst_prob=0.05, burst_gap_s=0.0)
    out = calls(config, 5000)
    same = sum(
        1 for a, b in itertools.pairwise(out) if a.kind == b.kind == "prefill" and a.at == b.at
    )
    assert same > 0


def test_with_seed() -> None:
    config = TrafficConfig(seed=1, decode_max=32, prefill_max=64)
    other = config.with_seed(2)
    assert other.seed == 2 and other.decode_max == 32


@pytest.mark.parametrize(
    "kwargs",
    [
        {"decode_max": 0},
        {"decode_max": 256, "prefill_max": 256},
        {"tail_alpha": 0.0},
        {"popular": -1},
        {"popular_share": 1.5},
        {"burst_prob": -0.1},
        {"burst_calls": (0, 3)},
        {"burst_calls": (4, 3)},
        {"phase_calls": 0},
        {"popular": 2, "shift": 3},
        {"rate": -1.0},
    ],
)
def test_bad_config_is_refused(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        TrafficConfig(**kwargs)  # type: ignore[arg-type]


def test_popular_sizes_rejects_negative_phase() -> None:
    with pytest.raises(ValueError):
        Traffic().popular_sizes(-1)


def test_small_decode_range_terminates() -> None:
    # As many popular sizes as there are sizes: the generator must still finish.
    traffic = Traffic(
        TrafficConfig(seed=0, decode_max=4, prefill_max=8, popular=4, shift=2, phase_calls=10)
    )
    out = traffic.take(100)
    assert {c.phase for c in out} == set(range(10))
    for phase in range(10):
        assert sorted(traffic.popular_sizes(phase)) == [1, 2, 3, 4]
