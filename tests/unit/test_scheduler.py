"""The engine's scheduling logic with the in-process FakeExecutor (no Inductor).

Real compiles in real worker processes are in test_background_compile.py; these tests
pin down ordering, hotness, budget, retries, faults, the gate and callbacks quickly
(validation: test_scheduler_validation.py; the store: test_scheduler_store.py).
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
import torch
from scheduling import (
    FAST,
    HOLDS_ABOVE_ONE,
    HOLDS_AT_ONE_ONLY,
    call_sizes,
    compiler_config,
    job_labels,
)
from torch import nn

import pwdaemon as pwd
from pwdaemon.engine.runner import ABOVE_ONE_RANGE
from pwdaemon.serving.gate import GATE
from pwdaemon.serving.range_table import Target
from pwdaemon.testing import FakeExecutor, inject_fault
from pwdaemon.workers.executor import JobSpec
from pwdaemon.workers.process import CompileError


def test_general_first_then_configured_then_hot(mlp: nn.Module) -> None:
    gate = threading.Event()
    ex = FakeExecutor(gate=gate)
    h = pwd.attach(
        mlp,
        sizes=[4],
        ranges=[(16, 32)],
        policy=FAST,
        compiler=compiler_config(),
        executor=ex,
        store=False,
    )
    try:
        call_sizes(mlp, [2, 7, 7, 7])
        gate.set()
        assert h.wait(sizes=[4, 7], timeout=20)
        labels = job_labels(ex.jobs)
        assert labels[:3] == ["general", "size:4", "range:16-32"]
        assert "size:7" in labels[3:]
        assert "size:2" not in labels  # one call is not hot
        tiers = {e.target: (e.tier, e.state) for e in h.status().pieces[0].entries}
        assert tiers["size:7"] == (pwd.Tier.SIZE, "live")
        assert tiers["range:16-32"] == (pwd.Tier.RANGE, "live")
        assert h.table().lookup(20).tier is pwd.Tier.RANGE
        assert h.table().lookup(3).tier is pwd.Tier.GENERAL
    finally:
        h.detach()


def test_budget_caps_specializations(mlp: nn.Module) -> None:
    ex = FakeExecutor()
    policy = pwd.PolicyConfig(hot_calls=1, budget=2, tick_s=0.01)
    h = pwd.attach(mlp, policy=policy, compiler=compiler_config(), executor=ex, store=False)
    swaps = threading.Semaphore(0)
    # Registered before any call: a swap that lands early is still counted.
    h.on_swap(lambda e: swaps.release())
    try:
        call_sizes(mlp, [3, 3, 5, 5, 9, 9])
        for _ in range(3):  # general, then the two sizes the budget allows
            assert swaps.acquire(timeout=20)
        h.engine.flush()  # one more tick: a third size would be planned by now
        planned = [e.target for e in h.status().pieces[0].entries if e.target.startswith("size:")]
        assert len(planned) == 2, planned
        sized = [t for t in job_labels(ex.jobs) if t.startswith("size:")]
        assert len(sized) == 2
    finally:
        h.detach()


def test_failures_retry_with_backoff_then_give_up(mlp: nn.Module, reference: nn.Module) -> None:
    ex = FakeExecutor(fail={"size:4": "failed"})
    h = pwd.attach(
        mlp, sizes=[4], policy=FAST, compiler=compiler_config(retries=2), executor=ex, store=False
    )
    try:
        call_sizes(mlp, [4])
        assert h.wait(sizes=[4], timeout=20) is False
        entry = next(e for e in h.status().pieces[0].entries if e.target == "size:4")
        assert entry.state == "failed"
        assert entry.attempts == 3
        assert "after 3 attempts" in (entry.reason or "") and "injected failed" in (
            entry.reason or ""
        )
        # Serving stays on the previous tier, and right.
        assert h.table().lookup(4).tier is pwd.Tier.GENERAL
        x = torch.randn(4, 16)
        torch.testing.assert_close(mlp(x), reference(x))
    finally:
        h.detach()


class _WorkersKilledAtClose(FakeExecutor):
    """As a real pool at detach: `close` kills the worker of the job in flight, whose
    run then ends as a crash, and returns once the engine has dealt with that job."""

    def __init__(self, dealt_with: threading.Event) -> None:
        super().__init__()
        self.started, self.killed = threading.Event(), threading.Event()
        self.dealt_with = dealt_with

    def run(self, spec: JobSpec, timeout: float) -> dict[str, Any]:
        self.jobs.append(spec.target)
        self.started.set()
        self.killed.wait(timeout)
        raise CompileError("crashed", "worker died mid-job (killed by signal 9)")

    def close(self, timeout: float) -> None:
        self.killed.set()
        self.dealt_with.wait(timeout)


def test_a_compile_cut_short_by_detach_is_cancelled_not_counted_as_a_crash(
    mlp: nn.Module, caplog: pytest.LogCaptureFixture
) -> None:
    # Detach kills the workers; a job in flight then ends as a crash. It is a
    # cancellation: counted as one, not in the failure metrics, and no warning.
    dealt_with = threading.Event()
    ex = _WorkersKilledAtClose(dealt_with)
    h = pwd.attach(mlp, policy=FAST, compiler=compiler_config(), executor=ex, store=False)
    publisher = h.engine.publisher
    fail = publisher.fail

    def noted_fail(*args: Any, **kwargs: Any) -> None:
        fail(*args, **kwargs)
        dealt_with.set()

    publisher.fail = noted_fail  # type: ignore[method-assign]
    call_sizes(mlp, [4])
    assert ex.started.wait(20), "no job started"  # the general's, in flight
    with caplog.at_level(logging.DEBUG, logger="pwdaemon"):
        h.detach()
    assert dealt_with.is_set()
    counters = h.engine.counters
    assert counters.jobs_by_outcome[("general", "cancelled")] == 1
    assert ("general", "crashed") not in counters.jobs_by_outcome
    assert not counters.failures_by_reason
    gave_up = [r for r in caplog.records if "gave up on general" in r.getMessage()]
    assert [r.levelno for r in gave_up] == [logging.DEBUG]


def test_callbacks_fire_off_the_serving_thread_and_survive_a_raising_one(
    mlp: nn.Module,
) -> None:
    gate = threading.Event()  # compiles finish only after the first call recorded size 2
    ex = FakeExecutor(gate=gate)
    h = pwd.attach(
        mlp, sizes=[2, 3], policy=FAST, compiler=compiler_config(), executor=ex, store=False
    )
    events: list[pwd.SwapEvent] = []
    threads: set[int] = set()
    plans: list[pwd.PlanCompleteEvent] = []
    plan_done = threading.Event()

    def bad(event: pwd.SwapEvent) -> None:
        raise RuntimeError("a user's callback bug")

    def good(event: pwd.SwapEvent) -> None:
        threads.add(threading.get_ident())
        events.append(event)

    h.on_swap(bad)
    h.on_swap(good)

    def on_plan(e: pwd.PlanCompleteEvent) -> None:
        plans.append(e)
        plan_done.set()

    h.on_plan_complete(on_plan)
    try:
        call_sizes(mlp, [2])
        gate.set()
        assert plan_done.wait(20)
        assert h.wait(timeout=5)
        assert [(e.range, e.tier) for e in events] == [
            (None, pwd.Tier.GENERAL),
            (pwd.Range.of(2), pwd.Tier.SIZE),
            (pwd.Range.of(3), pwd.Tier.SIZE),
        ]
        assert [e.version for e in events] == [1, 2, 3]
        assert all(e.source == "compiled" and e.graph == 0 for e in events)
        assert events[0].validated and events[1].validated  # a size-2 input was recorded
        assert events[2].validated  # no size-3 call yet: size 2's input, tiled to 3
        assert threading.get_ident() not in threads
        assert len(plans) == 1 and plans[0].live == 3 and plans[0].failed == 0
        late: list[pwd.PlanCompleteEvent] = []
        late_done = threading.Event()

        def on_late(e: pwd.PlanCompleteEvent) -> None:
            late.append(e)
            late_done.set()

        h.on_plan_complete(on_late)
        assert late_done.wait(10)
        assert late == plans  # a late registrant gets the event that fired
    finally:
        h.detach()


def test_cold_queued_sizes_are_dropped(mlp: nn.Module) -> None:
    gate = threading.Event()
    ex = FakeExecutor(gate=gate)
    policy = pwd.PolicyConfig(hot_calls=1, tick_s=0.01, cold_after_s=0.05)
    h = pwd.attach(mlp, policy=policy, compiler=compiler_config(), executor=ex, store=False)
    try:
        call_sizes(mlp, [5])  # general compile now holds the only worker at the gate
        dropped = threading.Event()

        def watch() -> None:
            while not dropped.is_set():
                e = [x for x in h.status().pieces[0].entries if x.target == "size:5"]
                if e and e[0].state == "dropped":
                    dropped.set()
                    return
                if gate.wait(0.01):
                    return

        t = threading.Thread(target=watch)
        t.start()
        assert dropped.wait(10)
        gate.set()
        t.join(5)
        entry = next(x for x in h.status().pieces[0].entries if x.target == "size:5")
        assert "went cold" in (entry.reason or "")
    finally:
        gate.set()
        h.detach()


@pytest.mark.parametrize("fault", ["raise", "crash", "hang"])
def test_injected_faults_are_reported(mlp: nn.Module, fault: str) -> None:
    ex = FakeExecutor()
    h = pwd.attach(
        mlp, sizes=[3], policy=FAST, compiler=compiler_config(retries=0), executor=ex, store=False
    )
    inject_fault(h, "size:3", fault)
    try:
        call_sizes(mlp, [3])
        assert h.wait(sizes=[3], timeout=20) is False
        entry = next(x for x in h.status().pieces[0].entries if x.target == "size:3")
        expected = {"raise": "failed", "crash": "crashed", "hang": "timeout"}[fault]
        assert entry.reason is not None and entry.reason.startswith(expected)
        assert h.engine.jobs_by_outcome[("size", expected)] == 1
    finally:
        h.detach()


def test_queued_hot_sizes_follow_their_current_calls(mlp: nn.Module) -> None:
    # Priority is a size's calls now, not when it was queued (a size that got hotter
    # while waiting must not stay behind cooler ones).
    gate = threading.Event()
    ex = FakeExecutor(gate=gate)
    policy = pwd.PolicyConfig(hot_calls=3, tick_s=0.01, queue_pressure=1000)
    h = pwd.attach(
        mlp, policy=policy, compiler=compiler_config(general=False), executor=ex, store=False
    )
    try:
        call_sizes(mlp, [n for n in range(1, 9) for _ in range(3)])
        h.engine.flush()
        call_sizes(mlp, [100] * 40)
        h.engine.flush()
        call_sizes(mlp, [n for n in (2, 3, 4, 5) for _ in range(200)])
        h.engine.flush()
        gate.set()
        assert h.wait(sizes=[1, 2, 3, 4, 5, 6, 7, 8, 100], timeout=20)
        order = [t.start for t in ex.jobs]
        first, rest = order[0], order[1:]  # the first was running before the flood
        assert first in range(1, 9)
        assert rest.index(100) > max(rest.index(n) for n in (2, 3, 4, 5) if n != first)
        assert rest.index(100) < min(rest.index(n) for n in (6, 7, 8) if n != first)
    finally:
        h.detach()


def test_switch_interval_is_lowered_only_while_serving_calls_meet_engine_work(
    mlp: nn.Module,
) -> None:
    seen: list[tuple[str, float]] = []

    def record(target: Target, fn: Callable[..., Any]) -> Callable[..., Any]:
        def run(*a: Any) -> Any:
            # On the engine's gated thread, validating (the runnable serves calls too):
            # first with nobody calling, then after a serving call from another thread.
            if threading.current_thread().name == "pwdaemon-torch-work":
                seen.append(("alone", sys.getswitchinterval()))
                caller = threading.Thread(target=call_sizes, args=(mlp, [4]))
                caller.start()
                caller.join(10)
                seen.append(("after a call", sys.getswitchinterval()))
            return fn(*a)

        return run

    before = sys.getswitchinterval()
    ex = FakeExecutor(transform=record)
    h = pwd.attach(
        mlp,
        policy=FAST,
        compiler=compiler_config(switch_interval_s=0.0005),
        executor=ex,
        store=False,
    )
    try:
        call_sizes(mlp, [4, 4, 4])
        assert h.wait(sizes=[4], timeout=20)
        # Lowered for a call (the interval is process-wide), not for the engine's work
        # alone: gated threads hand the GIL to each other at that rate too.
        lowered = [v for what, v in seen if what == "after a call"]
        assert lowered and all(abs(v - 0.0005) < 1e-9 for v in lowered), seen
        assert all(v in (before, 0.0005) for _, v in seen), seen
    finally:
        h.detach()
    pwd.prewarm().join(60)  # the loader's set-up is gated work too
    assert sys.getswitchinterval() == before  # back once no gated work runs


class _StartSignalling(FakeExecutor):
    """A fake executor that says when a job reaches it."""

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.started = threading.Event()

    def run(self, spec: JobSpec, timeout: float) -> dict[str, Any]:
        self.started.set()
        return super().run(spec, timeout)


def test_the_engine_holds_the_gate_from_attach_to_plan_completion_and_during_each_job(
    mlp: nn.Module,
) -> None:
    # Held, the gate counts every serving call, so gated work that starts during a call
    # parks for it (tests/unit/test_gate_start.py shows the race the hold closes).
    pwd.prewarm().join(60)  # the loader's set-up, gated work of its own, is over
    assert GATE.working == 0
    release = threading.Event()
    ex = _StartSignalling(gate=release)  # every job waits for `release`
    h = pwd.attach(mlp, policy=FAST, compiler=compiler_config(), executor=ex, store=False)
    try:
        assert GATE.working >= 1  # held by attach() itself, before any gated thread
        call_sizes(mlp, [4])
        assert ex.started.wait(20)  # the general job, in flight
        release.set()
        assert h.wait(None, timeout=20)  # the plan completes...
        h.engine.flush()  # ...and the next tick lets the gate go
        assert GATE.working == 0
        release.clear()
        ex.started.clear()
        call_sizes(mlp, [8, 8, 8])  # hot: a job after the plan
        assert ex.started.wait(20)
        assert GATE.working == 2  # held by that job while it runs, and its worker call gated
        release.set()
        assert h.wait(sizes=[8], timeout=20)
    finally:
        release.set()
        h.detach()


def test_status_carries_enums_that_compare_as_text(mlp: nn.Module) -> None:
    ex = FakeExecutor()
    h = pwd.attach(
        mlp, sizes=[4], policy=FAST, compiler=compiler_config(), executor=ex, store=False
    )
    try:
        call_sizes(mlp, [4])
        assert h.wait(sizes=[4], timeout=20)
        entries = {e.target: e for e in h.status().pieces[0].entries}
        size4, eager = entries["size:4"], entries["eager"]
        assert size4.state is pwd.JobState.LIVE and size4.state == "live"
        assert size4.why is pwd.JobReason.CONFIGURED and size4.why == "configured"
        assert size4.source is pwd.JobSource.COMPILED and f"{size4.source}" == "compiled"
        assert entries["general"].why is pwd.JobReason.GENERAL
        assert eager.why is pwd.JobReason.TRACE and eager.state is pwd.JobState.LIVE
        assert "size:4           size     live" in str(h.status())
        assert dict(h.engine.loads_by_source) == {"compiled": 2}
    finally:
        h.detach()


def test_injected_fault_counts_compiles_then_lets_them_through(mlp: nn.Module) -> None:
    ex = FakeExecutor()
    h = pwd.attach(
        mlp, sizes=[3], policy=FAST, compiler=compiler_config(retries=1), executor=ex, store=False
    )
    inject_fault(h, "size:3", "raise", times=1)  # the first attempt fails, the retry not
    try:
        call_sizes(mlp, [3])
        assert h.wait(sizes=[3], timeout=20)
        entry = next(x for x in h.status().pieces[0].entries if x.target == "size:3")
        assert entry.state is pwd.JobState.LIVE and entry.attempts == 2
        assert job_labels(ex.jobs).count("size:3") == 2
        assert h.engine.jobs_by_outcome[("size", "failed")] == 1
    finally:
        h.detach()


@pytest.mark.parametrize(
    ("label", "fault", "times", "match"),
    [
        ("size:3", "explode", 1, r"fault must be one of raise, crash, hang, got 'explode'"),
        ("size:x", "raise", 1, r"not a target label: 'size:x'"),
        ("size:3", "raise", -1, r"times must be >= 0, got -1"),
    ],
)
def test_inject_fault_rejects_what_would_inject_nothing(
    mlp: nn.Module, label: str, fault: str, times: int, match: str
) -> None:
    h = pwd.attach(mlp, compile=False, store=False)
    try:
        with pytest.raises(ValueError, match=match):
            inject_fault(h, label, fault, times=times)
    finally:
        h.detach()


def test_status_right_after_the_first_call_shows_its_pieces(mlp: nn.Module) -> None:
    # Pieces are planned by the engine's tick; a slow tick must not hide them from a
    # status taken as soon as the call that traced them returns.
    gate = threading.Event()
    slow = pwd.PolicyConfig(hot_calls=2, tick_s=3600)  # no tick after the first one
    h = pwd.attach(
        mlp,
        sizes=[5],
        policy=slow,
        compiler=compiler_config(),
        executor=FakeExecutor(gate=gate),
        store=False,
    )
    try:
        call_sizes(mlp, [5])
        entries = {e.target: e for e in h.status().pieces[0].entries}
        assert entries["size:5"].state in ("queued", "compiling")
    finally:
        gate.set()
        h.detach()


def test_wait_for_a_tier_the_device_cannot_give_returns_false_at_once(mlp: nn.Module) -> None:
    ex = FakeExecutor()
    h = pwd.attach(
        mlp, sizes=[4], policy=FAST, compiler=compiler_config(), executor=ex, store=False
    )
    try:
        call_sizes(mlp, [4])
        assert h.wait(sizes=[4], timeout=20)  # default: the best tier here, a compiled size
        assert h.wait(sizes=[4], timeout=20, tier=pwd.Tier.SIZE)
        started = time.monotonic()
        assert h.wait(sizes=[4], timeout=60, tier=pwd.Tier.GRAPH) is False  # no GPU
        assert time.monotonic() - started < 30  # answered, not timed out
    finally:
        h.detach()


class _ReplayedCapture:
    """What the engine keeps of a capture, minus the GPU: the tier-2 runnable, called."""

    def __init__(self, runnable: Callable[..., Any]) -> None:
        self.runnable = runnable
        self.nbytes = 0
        self.replays = 0
        self.instantiated_on: list[str] = []  # the threads that instantiated it

    def instantiate(self) -> None:
        self.instantiated_on.append(threading.current_thread().name)

    def __call__(self, *args: Any) -> Any:
        self.replays += 1
        return self.runnable(*args)


def test_two_captures_of_one_piece_both_get_their_graph(
    mlp: nn.Module, reference: nn.Module, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Two workers run two graph jobs of one piece at once. Each handed its capture to
    # the piece's next serving call through one slot; the second took the slot over and
    # the first waited forever, "compiling" (H200: nn.Sequential sizes 2 and 8). The GPU
    # is faked (capture = the tier-2 runnable), the engine's hand-off is real.
    from pwdaemon.engine import graphs, loop, publish

    class Pool:
        def __init__(self, device: torch.device) -> None:
            self.device, self.lock, self.bytes, self.graphs = device, threading.Lock(), 0, 0

    captured: list[_ReplayedCapture] = []

    def capture(runnable: Callable[..., Any], *rest: Any, **options: Any) -> _ReplayedCapture:
        assert options["instantiate"] is False  # the engine instantiates, off the call
        time.sleep(0.05)  # a capture pauses its serving call: the other job comes meanwhile
        captured.append(_ReplayedCapture(runnable))
        return captured[-1]

    for module in (graphs, loop, publish):
        monkeypatch.setattr(module, "wants_graph", lambda config, piece: True)
    monkeypatch.setattr(graphs, "GraphPool", Pool)
    monkeypatch.setattr(graphs, "capture_graph", capture)
    # No GPU to warm up. The fake warm-up waits (up to 5 s) until both jobs are in theirs:
    # a job that checked the slot before its warm-up and took it after took it over from
    # the other, which then waited forever (a fresh-clone CI run failed so).
    warming: list[int] = []
    both_warming = threading.Event()

    def warm_up(*args: Any) -> None:
        warming.append(1)
        if len(warming) >= 2:
            both_warming.set()
        both_warming.wait(5.0)

    monkeypatch.setattr(graphs, "warm_up", warm_up)
    compiler = pwd.CompileConfig(workers=2, backoff_s=0.01)
    h = pwd.attach(
        mlp, sizes=[2, 8], policy=FAST, compiler=compiler, executor=FakeExecutor(), store=False
    )
    try:
        call_sizes(mlp, [2, 8])
        assert h.wait(sizes=[2, 8], tier=pwd.Tier.SIZE, timeout=30), str(h.status())
        # Sparse traffic (a call per 0.3 s): both graph jobs get to the slot before a
        # serving call takes either.
        deadline = time.monotonic() + 30
        while not h.wait(sizes=[2, 8], tier=pwd.Tier.GRAPH, timeout=0.3):
            assert time.monotonic() < deadline, str(h.status())
            call_sizes(mlp, [2])  # serving calls: captures run at their start
        assert both_warming.is_set()  # the two jobs did overlap: the race was run
        # Each graph instantiated once, before it went live, on the engine's torch thread.
        assert [c.instantiated_on for c in captured] == [["pwdaemon-torch-work"]] * 2
        for n in (2, 8):
            assert h.pieces[0].dispatcher.table.lookup(n).tier is pwd.Tier.GRAPH
            x = torch.randn(n, 16)
            torch.testing.assert_close(mlp(x), reference(x))
    finally:
        h.detach()


@pytest.mark.parametrize(
    "refusal", [HOLDS_ABOVE_ONE, HOLDS_AT_ONE_ONLY], ids=["above_1_only", "at_1_only"]
)
def test_a_general_that_holds_on_one_side_of_size_1_is_replaced_by_the_range_above_and_size_1(
    mlp: nn.Module, reference: nn.Module, refusal: tuple[str, str]
) -> None:
    # A conv net's general was refused (it assumed a batch above 1), and so was BERT's
    # compiled at the hint 1 (it assumed a batch of 1): every size without its own compile
    # stayed on eager. Now the range of every size above 1 (compiled from the hint 2) and
    # size 1 are compiled in its place, before the plan completes.
    ex = FakeExecutor(fail={"general": refusal})
    with pwd.attach(mlp, policy=FAST, compiler=compiler_config(), executor=ex, store=False) as h:
        call_sizes(mlp, [3])
        assert h.wait(timeout=20), str(h.status())
        above = Target.of_range(ABOVE_ONE_RANGE).label
        assert job_labels(ex.jobs)[:3] == ["general", above, "size:1"]
        entries = {e.target: e for e in h.status().pieces[0].entries}
        assert entries["general"].state == "failed"
        assert entries[above].state == "live" and entries["size:1"].state == "live"
        assert h.table().lookup(1).tier is pwd.Tier.SIZE
        for n in (2, 3, 1000):
            assert h.table().lookup(n).tier is pwd.Tier.RANGE
            x = torch.randn(n, 16)
            torch.testing.assert_close(mlp(x), reference(x))
    # A general refused for another reason is not replaced.
    plain = FakeExecutor(fail={"general": "failed"})
    with pwd.attach(mlp, policy=FAST, compiler=compiler_config(retries=0), executor=plain,
                    store=False) as h:  # fmt: skip
        call_sizes(mlp, [3])
        assert h.wait(timeout=20), str(h.status())
        assert job_labels(plain.jobs) == ["general"]
