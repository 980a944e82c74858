"""The Dispatcher: histogram, samples, output structure, and publishing under load.

Proves: the size histogram counts per size and stays bounded (sizes past `size_cap`
count in `overflow_calls`); samples keep one copy per size within the byte budget and
never copy an `nn.Parameter`; `match_output_structure` gives the graph's structure; and,
with 16 threads serving an attached model while another thread installs 1,000
runnables, every call is answered by a runnable of a table version no older than the
last install that returned before the call began, with versions seen per thread only
going up, and no exception.
"""

from __future__ import annotations

import copy
import random
import threading
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

import pwdaemon as pwd
from pwdaemon import Dispatcher, Range, Tier
from pwdaemon.serving.dispatch import match_output_structure

TIMEOUT = 30.0


def echo_size(n: int, *rest: Any) -> tuple[str, int]:
    return ("eager", n)


# ---- histogram -------------------------------------------------------------------------


def test_histogram_counts_each_size() -> None:
    d = Dispatcher(0, echo_size, size_index=0)
    for n in [3, 1, 3, 7, 3, 1]:
        assert d(n) == ("eager", n)
    assert d.histogram() == {3: 3, 1: 2, 7: 1}
    assert d.overflow_calls == 0
    snapshot = d.histogram()
    d(3)
    assert snapshot[3] == 3 and d.histogram()[3] == 4  # histogram() is a copy


def test_histogram_is_bounded_by_size_cap() -> None:
    d = Dispatcher(0, echo_size, size_index=0, size_cap=3)
    for n in [1, 2, 3, 4, 5, 4, 1, 1, 6]:
        assert d(n) == ("eager", n)  # served whatever the histogram does
    assert d.histogram() == {1: 3, 2: 1, 3: 1}
    assert d.overflow_calls == 4  # 4, 5, 4, 6
    assert set(d.samples) == {1, 2, 3}  # nothing recorded past the cap either


def test_size_index_reads_the_symint_argument() -> None:
    d = Dispatcher(0, lambda w, n, x: n * 10, size_index=1)
    d.install(Range.of(5), Tier.SIZE, lambda w, n, x: -n)
    assert d("w", 4, "x") == 40
    assert d("w", 5, "x") == -5
    assert d.histogram() == {4: 1, 5: 1}


def test_piece_without_size_symbol_counts_under_zero_and_serves_general() -> None:
    d = Dispatcher(0, lambda x: "eager", size_index=None)
    assert d("x") == "eager"
    d.install(None, Tier.GENERAL, lambda x: "general")
    assert d("x") == "general"
    assert d.histogram() == {0: 2}


# ---- samples ---------------------------------------------------------------------------


def _args(n: int, param: nn.Parameter) -> tuple[Any, ...]:
    return (param, n, torch.full((n, 4), float(n)))


def test_samples_one_copy_per_size_and_parameters_not_copied() -> None:
    param = nn.Parameter(torch.randn(4, 4))
    d = Dispatcher(0, lambda p, n, x: (x @ p,), size_index=1)
    first = _args(2, param)
    d(*first)
    first[2].fill_(-1.0)  # the caller reuses its buffer after the call
    d(*_args(2, param))  # same size again: the first sample stays
    d(*_args(3, param))
    assert set(d.samples) == {2, 3}
    p, n, x = d.samples[2]
    assert p is param  # live weights by reference, never copied
    assert n == 2
    assert torch.equal(x, torch.full((2, 4), 2.0))  # a copy taken at call time
    assert x.data_ptr() != first[2].data_ptr()
    assert d.sample_for(Range(3, 8)) == (3, d.samples[3])
    assert d.sample_for(Range(4, 8)) is None
    assert d.sample_for(None) is not None


def test_samples_stay_within_the_byte_budget() -> None:
    param = nn.Parameter(torch.randn(1000, 1000))  # 4 MB: never counted
    one = 3 * 4 * 4  # bytes of the (3, 4) float input
    d = Dispatcher(0, lambda p, n, x: (x,), size_index=1, sample_bytes=one + 4 * 4)
    d(*_args(3, param))
    assert set(d.samples) == {3} and d.sample_bytes_left == 16
    d(*_args(2, param))  # 32 bytes > 16 left: not recorded, still counted and served
    assert set(d.samples) == {3} and d.sample_bytes_left == 16
    d(*_args(1, param))  # exactly the 16 left
    assert set(d.samples) == {3, 1} and d.sample_bytes_left == 0
    assert d.histogram() == {3: 1, 2: 1, 1: 1}


def test_a_size_first_seen_twice_is_sampled_and_charged_once() -> None:
    # Two serving threads can both find a new size uncounted (no lock on the path):
    # both take the slow path. Replay that: forget the count between two calls.
    param = nn.Parameter(torch.randn(4, 4))
    d = Dispatcher(0, lambda p, n, x: (x,), size_index=1, sample_bytes=1000)
    first = _args(2, param)
    d(*first)
    del d.counts[2]
    d(*_args(2, param)[:2], torch.zeros(2, 4))
    assert d.sample_bytes_left == 1000 - 2 * 4 * 4
    assert torch.equal(d.samples[2][2], first[2])  # the first copy stays


def test_no_samples_when_recording_is_off() -> None:
    d = Dispatcher(0, lambda n, x: (x,), size_index=0)
    d.record_samples = False
    d(2, torch.ones(2, 4))
    assert d.samples == {} and d.histogram() == {2: 1}


# ---- publishing --------------------------------------------------------------------------


def test_install_publishes_a_new_version() -> None:
    d = Dispatcher(0, echo_size, size_index=0)
    old = d.table
    new = d.install(Range(1, 8), Tier.RANGE, lambda n: ("range", n), {"k": 1})
    assert d.table is new and new.version == old.version + 1
    assert d(4) == ("range", 4) and d(9) == ("eager", 9)
    assert old.lookup(4).tier is Tier.EAGER  # what a reader already holds is unchanged
    assert d.entry_for(4).info["k"] == 1


def test_concurrent_writers_lose_no_install() -> None:
    d = Dispatcher(0, echo_size, size_index=0)
    barrier = threading.Barrier(4, timeout=TIMEOUT)
    errors: list[BaseException] = []

    def writer(w: int) -> None:
        try:
            barrier.wait()
            for i in range(250):
                d.install(Range.of(1 + (w * 250 + i) % 97), Tier.SIZE, echo_size)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT)
    assert not errors
    assert d.table.version == 1000  # every install got its own version
    assert len(d.table.exact) == 97


def test_mark_outputs_sees_every_output_when_set() -> None:
    d = Dispatcher(0, lambda n: (n,), size_index=0)
    seen: list[Any] = []
    d.mark_outputs = seen.append
    d(3)
    d.mark_outputs = None
    d(4)
    assert seen == [(3,)]


# ---- output structure ------------------------------------------------------------------


def test_match_output_structure() -> None:
    def as_list(*args: Any) -> list[Any]:
        return list(args)

    assert match_output_structure(as_list, returns_tuple=False) is as_list
    wrapped = match_output_structure(as_list, returns_tuple=True)
    out = wrapped(1, 2)
    assert type(out) is tuple and out == (1, 2)
    same = (1, 2)
    assert match_output_structure(lambda: same, returns_tuple=True)() is same


# ---- many readers, one writer publishing 1,000 runnables ------------------------------


class Small(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.lin(x))


N_READERS = 16
N_INSTALLS = 1000
CALLS_PER_INSTALL = 4  # the writer waits for this many calls between installs
SIZES = range(1, 61)  # exact installs use 1..30, ranges lie in 1..50: 51..60 hit general


def _targets(rng: random.Random) -> list[Range | None]:
    out: list[Range | None] = []
    for _ in range(N_INSTALLS):
        kind = rng.random()
        if kind < 0.4:
            out.append(None)
        elif kind < 0.7:
            out.append(Range.of(rng.randint(1, 30)))
        else:
            a = rng.randint(1, 49)
            out.append(Range(a, rng.randint(a + 1, 50)))
    return out


def test_readers_see_only_published_versions_in_order() -> None:
    torch.manual_seed(0)
    model = Small().eval()
    reference = copy.deepcopy(model)
    handle = pwd.attach(model, compile=False)
    try:
        model(torch.randn(3, 8))  # capture the graph
        assert len(handle.pieces) == 1
        eager = handle.table(0).eager.runnable
        served = threading.local()

        def make(k: int) -> Callable[..., Any]:
            def run(*args: Any) -> Any:
                served.k = k
                (out,) = eager(*args)
                return (out + k,)

            return run

        rng = random.Random(1)
        targets = _targets(rng)
        tables = [handle.table(0)]
        assert tables[0].version == 0
        installs_done = [0]  # installs that have returned (the writer's progress)
        installs_begun = [0]
        calls = [0]
        progress = threading.Condition()
        stop = threading.Event()
        barrier = threading.Barrier(N_READERS + 1, timeout=TIMEOUT)
        errors: list[BaseException] = []
        # per reader: (size, installs done before, version seen before, k, installs begun after)
        logs: list[list[tuple[int, int, int, int, int]]] = [[] for _ in range(N_READERS)]

        def reader(r: int) -> None:
            try:
                local = random.Random(100 + r)
                gen = torch.Generator().manual_seed(r)
                inputs = {n: torch.randn(n, 8, generator=gen) for n in local.sample(SIZES, 12)}
                with torch.no_grad():
                    expected = {n: reference(x) for n, x in inputs.items()}
                    barrier.wait()
                    log = logs[r]
                    last = False
                    while True:
                        n = local.choice(list(inputs))
                        before = installs_done[0]
                        version = handle.table(0).version
                        served.k = 0  # eager does not set it
                        out = model(inputs[n])
                        k = served.k
                        after = installs_begun[0]
                        torch.testing.assert_close(out, expected[n] + k)
                        log.append((n, before, version, k, after))
                        with progress:
                            calls[0] += 1
                            progress.notify_all()
                        if last:
                            break
                        last = stop.is_set()  # one more call after the final install
            except BaseException as exc:
                errors.append(exc)
                with progress:
                    progress.notify_all()

        threads = [
            threading.Thread(target=reader, args=(r,), daemon=True) for r in range(N_READERS)
        ]
        for t in threads:
            t.start()
        barrier.wait()
        try:
            for i, target in enumerate(targets, start=1):
                with progress:
                    want = (i - 1) * CALLS_PER_INSTALL

                    def progressed(want: int = want) -> bool:
                        return bool(errors) or calls[0] >= want

                    assert progress.wait_for(progressed, timeout=TIMEOUT), (
                        "readers made no progress"
                    )
                if errors:
                    break
                tier = (
                    Tier.GENERAL
                    if target is None
                    else (Tier.SIZE if target.is_size else Tier.RANGE)
                )
                installs_begun[0] = i
                table = handle.install(0, target, tier, make(i), {"k": i})
                installs_done[0] = i
                assert table.version == i
                tables.append(table)
        finally:
            stop.set()
            for t in threads:
                t.join(TIMEOUT)
        assert not errors, errors[0]
        assert not any(t.is_alive() for t in threads)

        def k_of(table: pwd.RangeTable, n: int) -> int:
            return int(table.lookup(n).info.get("k", 0))

        served_after_last = 0
        for log in logs:
            assert log
            floor = 0  # the newest version this reader can have seen so far
            seen_before = 0
            for n, before, version, k, after in log:
                assert version >= seen_before  # the published version never goes back
                seen_before = version
                assert before <= version <= after
                # the versions whose table would serve size n with runnable k ...
                fits = [v for v in range(max(before, floor), after + 1) if k_of(tables[v], n) == k]
                # ... include one no older than the last install done before the call
                # and no older than what this reader saw before
                assert fits, (n, before, after, k, floor)
                floor = fits[0]
                if before == N_INSTALLS:
                    served_after_last += 1
                    assert k == k_of(tables[-1], n)
        assert served_after_last >= N_READERS
        # the calls really interleaved with the installs
        ks = {k for log in logs for _, _, _, k, _ in log}
        assert len(ks) > N_INSTALLS // 5
        total = sum(len(log) for log in logs)
        # counts are bumped without a lock: a race may lose one, never many
        assert sum(handle.dispatchers[0].histogram().values()) > total // 2
    finally:
        handle.detach()


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(pytest.main([__file__, "-q"]))
