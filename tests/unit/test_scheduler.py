"""The engine's scheduling logic with the in-process FakeExecutor (no Inductor).

Real compiles in real worker processes are in test_background_compile.py; these tests
pin down ordering, hotness, budget, retries, validation and callbacks quickly.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import pwdaemon as pwd
from pwdaemon.engine.store_link import StoreLink
from pwdaemon.serving.gate import GATE
from pwdaemon.serving.range_table import Target, TargetKind
from pwdaemon.testing import FakeExecutor, inject_fault
from pwdaemon.workers.executor import JobSpec
from pwdaemon.workers.process import CompileError

FAST = pwd.PolicyConfig(hot_calls=2, tick_s=0.01)


def _compiler(workers: int = 1, **kw: Any) -> pwd.CompileConfig:
    return pwd.CompileConfig(workers=workers, backoff_s=0.01, **kw)


def _call_sizes(model: nn.Module, sizes: list[int], width: int = 16) -> None:
    for n in sizes:
        model(torch.randn(n, width))


def _labels(jobs: list[Target]) -> list[str]:
    return [t.label for t in jobs]


def test_general_first_then_configured_then_hot(mlp: nn.Module) -> None:
    gate = threading.Event()
    ex = FakeExecutor(gate=gate)
    h = pwd.attach(
        mlp,
        sizes=[4],
        ranges=[(16, 32)],
        policy=FAST,
        compiler=_compiler(),
        executor=ex,
        store=False,
    )
    try:
        _call_sizes(mlp, [2, 7, 7, 7])
        gate.set()
        assert h.wait(sizes=[4, 7], timeout=20)
        labels = _labels(ex.jobs)
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
    h = pwd.attach(mlp, policy=policy, compiler=_compiler(), executor=ex, store=False)
    swaps = threading.Semaphore(0)
    # Registered before any call: a swap that lands early is still counted.
    h.on_swap(lambda e: swaps.release())
    try:
        _call_sizes(mlp, [3, 3, 5, 5, 9, 9])
        for _ in range(3):  # general, then the two sizes the budget allows
            assert swaps.acquire(timeout=20)
        h.engine.flush()  # one more tick: a third size would be planned by now
        planned = [e.target for e in h.status().pieces[0].entries if e.target.startswith("size:")]
        assert len(planned) == 2, planned
        sized = [t for t in _labels(ex.jobs) if t.startswith("size:")]
        assert len(sized) == 2
    finally:
        h.detach()


def test_failures_retry_with_backoff_then_give_up(mlp: nn.Module, reference: nn.Module) -> None:
    ex = FakeExecutor(fail={"size:4": "failed"})
    h = pwd.attach(
        mlp, sizes=[4], policy=FAST, compiler=_compiler(retries=2), executor=ex, store=False
    )
    try:
        _call_sizes(mlp, [4])
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
    h = pwd.attach(mlp, policy=FAST, compiler=_compiler(), executor=ex, store=False)
    publisher = h.engine.publisher
    fail = publisher.fail

    def noted_fail(*args: Any, **kwargs: Any) -> None:
        fail(*args, **kwargs)
        dealt_with.set()

    publisher.fail = noted_fail  # type: ignore[method-assign]
    _call_sizes(mlp, [4])
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


def test_validation_rejects_wrong_runnable_and_keeps_old_tier(mlp: nn.Module) -> None:
    def off_by_one(target: Target, fn: Callable[..., Any]) -> Callable[..., Any]:
        if target.kind is not TargetKind.SIZE:
            return fn
        return lambda *a: tuple(o + 1 for o in fn(*a))

    ex = FakeExecutor(transform=off_by_one)
    h = pwd.attach(mlp, policy=FAST, compiler=_compiler(retries=0), executor=ex, store=False)
    try:
        _call_sizes(mlp, [6, 6, 6])
        assert h.wait(sizes=[6], timeout=20) is False
        entry = next(e for e in h.status().pieces[0].entries if e.target == "size:6")
        assert entry.state == "failed"
        assert "validation on size 6" in (entry.reason or "")
        assert "differs beyond" in (entry.reason or "")
        assert h.table().lookup(6).tier is pwd.Tier.GENERAL
        assert h.engine.rejects_by_reason["mismatch"] == 1
    finally:
        h.detach()


def test_a_size_no_call_has_brought_yet_is_validated_on_a_recorded_input_tiled_to_it(
    mlp: nn.Module, reference: nn.Module
) -> None:
    # Configured (or loaded from the store on a warm restart) before any call of its
    # size: it went live unchecked, and its first serving call paid the compiled code's
    # first-invocation costs. Checked now on size 2's recorded rows, repeated to 5.
    def off_by_one_at_5(target: Target, fn: Callable[..., Any]) -> Callable[..., Any]:
        if target.label != "size:5":
            return fn
        return lambda *a: tuple(o + 1 for o in fn(*a))

    gate = threading.Event()
    ex = FakeExecutor(transform=off_by_one_at_5, gate=gate)
    h = pwd.attach(
        mlp, sizes=[3, 5], policy=FAST, compiler=_compiler(retries=0), executor=ex, store=False
    )
    events: list[pwd.SwapEvent] = []
    h.on_swap(events.append)
    try:
        _call_sizes(mlp, [2])
        gate.set()
        assert h.wait(sizes=[3], timeout=20)
        assert h.wait(timeout=20)  # the plan ended: size 5 given up
        entry = next(e for e in h.status().pieces[0].entries if e.target == "size:5")
        assert entry.state == "failed", str(entry)
        reason = entry.reason or ""
        assert "validation on size 5, an input tiled from a recorded one of size 2" in reason
        assert "differs beyond" in reason
        assert h.engine.rejects_by_reason["mismatch"] == 1
        (size_3,) = [e for e in events if e.range == pwd.Range.of(3)]
        assert size_3.validated
        assert h.table().lookup(5).tier is pwd.Tier.GENERAL
        x = torch.randn(5, 16)
        torch.testing.assert_close(mlp(x), reference(x))
    finally:
        h.detach()


def test_a_general_runnable_is_validated_at_its_smallest_and_largest_sizes(
    mlp: nn.Module, reference: nn.Module
) -> None:
    # Right at small sizes, wrong past 2 (as a general compile that kept one size as a
    # constant was): checked at the first size recorded alone, it went live and served
    # wrong outputs at the others.
    def wrong_past_2(target: Target, fn: Callable[..., Any]) -> Callable[..., Any]:
        if target.kind is not TargetKind.GENERAL:
            return fn
        return lambda *a: tuple(o + (o.shape[0] > 2) for o in fn(*a))

    gate = threading.Event()
    ex = FakeExecutor(transform=wrong_past_2, gate=gate)
    h = pwd.attach(mlp, policy=FAST, compiler=_compiler(retries=0), executor=ex, store=False)
    try:
        _call_sizes(mlp, [2, 7])  # both recorded before the general compile finishes
        gate.set()
        assert h.wait(timeout=20)  # the plan (the general) ended
        entry = next(e for e in h.status().pieces[0].entries if e.target == "general")
        assert entry.state == "failed", str(entry)
        assert "validation on size 7" in (entry.reason or "")
        x = torch.randn(7, 16)
        torch.testing.assert_close(mlp(x), reference(x))
    finally:
        h.detach()


def test_a_serving_runnable_that_raises_is_replaced_after_checking_against_eager(
    mlp: nn.Module, reference: nn.Module
) -> None:
    # Seen on an H200: a general compile's cuDNN attention raised at one size, so the
    # size's own compile could not be compared with it, and the job failed as an
    # internal error on every retry while that size kept raising into eager.
    def general_raises_at_6(target: Target, fn: Callable[..., Any]) -> Callable[..., Any]:
        if target.kind is not TargetKind.GENERAL:
            return fn

        def run(*a: Any) -> Any:
            out = fn(*a)
            if out[0].shape[0] == 6:
                raise RuntimeError("mha_graph.execute(...) is_good() was false")
            return out

        return run

    ex = FakeExecutor(transform=general_raises_at_6)
    h = pwd.attach(mlp, policy=FAST, compiler=_compiler(retries=0), executor=ex, store=False)
    try:
        _call_sizes(mlp, [2, 2])
        assert h.wait(sizes=[2], timeout=20)  # the general went live first, checked at 2
        x = torch.randn(6, 16)
        torch.testing.assert_close(mlp(x), reference(x))  # the general raised: eager
        _call_sizes(mlp, [6, 6])
        assert h.wait(sizes=[6], timeout=20), str(h.status().pieces[0].entries)
        assert h.table().lookup(6).tier is pwd.Tier.SIZE
        torch.testing.assert_close(mlp(x), reference(x))
        assert sum(h.engine.rejects_by_reason.values()) == 0
    finally:
        h.detach()


def test_validation_can_be_turned_off(mlp: nn.Module) -> None:
    def off_by_one(target: Target, fn: Callable[..., Any]) -> Callable[..., Any]:
        return (lambda *a: tuple(o + 1 for o in fn(*a))) if target.kind is TargetKind.SIZE else fn

    ex = FakeExecutor(transform=off_by_one)
    h = pwd.attach(mlp, policy=FAST, compiler=_compiler(validate=False), executor=ex, store=False)
    try:
        _call_sizes(mlp, [6, 6, 6])
        assert h.wait(sizes=[6], timeout=20)
        assert h.pieces[0].dispatcher.samples == {}  # nothing recorded either
    finally:
        h.detach()


def test_callbacks_fire_off_the_serving_thread_and_survive_a_raising_one(
    mlp: nn.Module,
) -> None:
    gate = threading.Event()  # compiles finish only after the first call recorded size 2
    ex = FakeExecutor(gate=gate)
    h = pwd.attach(mlp, sizes=[2, 3], policy=FAST, compiler=_compiler(), executor=ex, store=False)
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
        _call_sizes(mlp, [2])
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
    h = pwd.attach(mlp, policy=policy, compiler=_compiler(), executor=ex, store=False)
    try:
        _call_sizes(mlp, [5])  # general compile now holds the only worker at the gate
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
        mlp, sizes=[3], policy=FAST, compiler=_compiler(retries=0), executor=ex, store=False
    )
    inject_fault(h, "size:3", fault)
    try:
        _call_sizes(mlp, [3])
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
    h = pwd.attach(mlp, policy=policy, compiler=_compiler(general=False), executor=ex, store=False)
    try:
        _call_sizes(mlp, [n for n in range(1, 9) for _ in range(3)])
        h.engine.flush()
        _call_sizes(mlp, [100] * 40)
        h.engine.flush()
        _call_sizes(mlp, [n for n in (2, 3, 4, 5) for _ in range(200)])
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
                caller = threading.Thread(target=_call_sizes, args=(mlp, [4]))
                caller.start()
                caller.join(10)
                seen.append(("after a call", sys.getswitchinterval()))
            return fn(*a)

        return run

    before = sys.getswitchinterval()
    ex = FakeExecutor(transform=record)
    h = pwd.attach(
        mlp, policy=FAST, compiler=_compiler(switch_interval_s=0.0005), executor=ex, store=False
    )
    try:
        _call_sizes(mlp, [4, 4, 4])
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
    h = pwd.attach(mlp, policy=FAST, compiler=_compiler(), executor=ex, store=False)
    try:
        assert GATE.working >= 1  # held by attach() itself, before any gated thread
        _call_sizes(mlp, [4])
        assert ex.started.wait(20)  # the general job, in flight
        release.set()
        assert h.wait(None, timeout=20)  # the plan completes...
        h.engine.flush()  # ...and the next tick lets the gate go
        assert GATE.working == 0
        release.clear()
        ex.started.clear()
        _call_sizes(mlp, [8, 8, 8])  # hot: a job after the plan
        assert ex.started.wait(20)
        assert GATE.working == 2  # held by that job while it runs, and its worker call gated
        release.set()
        assert h.wait(sizes=[8], timeout=20)
    finally:
        release.set()
        h.detach()


class _GateRecording(FakeExecutor):
    """A fake executor that records whether the engine called it from gated work."""

    def __init__(self) -> None:
        super().__init__()
        self.gated: dict[str, bool] = {}

    def start(self) -> None:
        self.gated["start"] = GATE.gates_this_thread()

    def run(self, spec: JobSpec, timeout: float) -> dict[str, Any]:
        self.gated.setdefault("run", GATE.gates_this_thread())
        return super().run(spec, timeout)


def test_the_engines_store_lookups_and_worker_calls_run_gated(
    mlp: nn.Module, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Off the loop thread but in the serving process: ungated, this Python work held the
    # GIL during a warm restart's first call (31 ms of CPU in a 184 ms BERT call).
    looked: list[bool] = []
    lookup = StoreLink.lookup

    def recording_lookup(self: StoreLink, key: Any) -> Any:
        looked.append(GATE.gates_this_thread())
        return lookup(self, key)

    monkeypatch.setattr(StoreLink, "lookup", recording_lookup)
    ex = _GateRecording()
    h = pwd.attach(mlp, sizes=[4], policy=FAST, compiler=_compiler(), executor=ex, store=tmp_path)
    try:
        _call_sizes(mlp, [4])
        assert h.wait(sizes=[4], timeout=20)
    finally:
        h.detach()
    assert looked and all(looked)
    assert ex.gated == {"start": True, "run": True}


def _attach_recording_loads(
    mlp: nn.Module, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, workers: int = 1
) -> tuple[pwd.Handle, FakeExecutor, list[str]]:
    """Attach `mlp` (size 4, a store in `tmp_path`, a fake executor, `workers` runners)
    with every artifact load recorded by path; the eager runnable stands in for what was
    loaded."""
    from pwdaemon.engine import runner as runner_module

    handles: list[pwd.Handle] = []
    loaded: list[str] = []

    def load_recorded(path: str) -> Any:
        loaded.append(path)
        return handles[0].table().eager.runnable

    monkeypatch.setattr(runner_module, "load_artifact", load_recorded)
    ex = FakeExecutor()
    h = pwd.attach(
        mlp, sizes=[4], policy=FAST, compiler=_compiler(workers), executor=ex, store=tmp_path
    )
    handles.append(h)
    return h, ex, loaded


@pytest.mark.parametrize("peer_holds_the_claim", [False, True])
def test_a_key_a_peer_published_before_the_claim_is_loaded_not_compiled(
    mlp: nn.Module, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, peer_holds_the_claim: bool
) -> None:
    # Seen in CI: two replicas compiled one key twice. The job looked the key up (a
    # miss), waited for its workers to start, and by the time it claimed the key the peer
    # had compiled it, published it and released its claim. Or the peer has published
    # and still holds the claim: the job loads at once, not after its retry (an hour
    # here), as the watcher's word of the artifact may have come while it was taken.
    from pwdaemon.engine import runner as runner_module
    from pwdaemon.store.store import ArtifactStore

    published = threading.Event()  # by the "peer", between our lookup and our claim
    peer_artifact = tmp_path / "peer.bin"
    lookup, claim = StoreLink.lookup, ArtifactStore.claim

    def peer_lookup(self: StoreLink, key: Any) -> Any:
        if key.target == "size:4":
            return peer_artifact if published.is_set() else None
        return lookup(self, key)

    def claim_after_the_peer(self: ArtifactStore, key: Any) -> Any:
        if getattr(key, "target", None) != "size:4":
            return claim(self, key)
        published.set()
        return None if peer_holds_the_claim else claim(self, key)

    monkeypatch.setattr(StoreLink, "lookup", peer_lookup)
    monkeypatch.setattr(ArtifactStore, "claim", claim_after_the_peer)
    monkeypatch.setattr(runner_module, "_CLAIMED_RETRY_S", 3600.0)
    h, ex, loaded = _attach_recording_loads(mlp, tmp_path, monkeypatch)
    try:
        _call_sizes(mlp, [4])
        assert h.wait(sizes=[4], timeout=20), str(h.status().pieces[0].entries)
        entry = next(e for e in h.status().pieces[0].entries if e.target == "size:4")
        assert entry.source == "store", entry
    finally:
        h.detach()
    assert published.is_set() and loaded == [str(peer_artifact)]
    assert "size:4" not in _labels(ex.jobs)  # claimed, looked up again, not compiled


def test_a_peer_artifact_announced_during_the_jobs_own_lookup_is_loaded_once(
    mlp: nn.Module, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Seen in CI: a replica loaded one key twice ({"compiled": 1, "store": 2, "peer": 1}
    # for three keys). The watcher announced the peer's artifact while the job's own
    # store lookup ran on a thread, the job still queued: both loaded it.
    from pwdaemon.engine.loop import Engine
    from pwdaemon.store.manifest import Manifest
    from pwdaemon.store.store import ArtifactStore

    peer_artifact = tmp_path / "peer.bin"
    handles: list[pwd.Handle] = []
    announced: list[Any] = []  # the size-4 key, once the "peer" has announced it
    peer_handled = threading.Event()  # the engine has acted on the announcement
    lookup, manifest, peer_task = StoreLink.lookup, ArtifactStore.manifest, Engine._peer_artifact

    def lookup_during_which_the_peer_publishes(self: StoreLink, key: Any) -> Any:
        if key.target != "size:4":
            return lookup(self, key)
        if not announced:  # the job's own lookup: the peer publishes meanwhile
            announced.append(key)
            handles[0].engine._on_store_event(key.digest, peer_artifact)
            assert peer_handled.wait(10), "the engine never acted on the peer's artifact"
        return peer_artifact

    def peer_manifest(self: ArtifactStore, key: Any) -> Any:
        if announced and key in (announced[0], announced[0].digest):
            return Manifest(announced[0], "0" * 64, 0, 1.0, 0.0, 0.0, peer_artifact)
        return manifest(self, key)

    async def recorded_peer_task(self: Engine, digest: str) -> None:
        try:
            await peer_task(self, digest)
        finally:
            peer_handled.set()

    monkeypatch.setattr(StoreLink, "lookup", lookup_during_which_the_peer_publishes)
    monkeypatch.setattr(ArtifactStore, "manifest", peer_manifest)
    monkeypatch.setattr(Engine, "_peer_artifact", recorded_peer_task)
    h, ex, loaded = _attach_recording_loads(mlp, tmp_path, monkeypatch)
    handles.append(h)
    try:
        _call_sizes(mlp, [4])
        assert h.wait(sizes=[4], timeout=20), str(h.status().pieces[0].entries)
    finally:
        h.detach()
    assert peer_handled.is_set() and loaded == [str(peer_artifact)]
    assert "size:4" not in _labels(ex.jobs)


def test_a_job_in_its_own_lookup_is_not_queued_again_by_the_store_plan(
    mlp: nn.Module, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Found reading the code: the warm-restart plan queues a queued planned job again
    # with the store's priority. A job in the middle of its own store lookup was still
    # queued, so it was pushed again and a second runner loaded it beside the first.
    from pwdaemon.engine.planner import Planner
    from pwdaemon.engine.runner import Runner

    stored_artifact = tmp_path / "stored.bin"
    looking = threading.Event()  # size 4's job is in its first lookup
    planned = threading.Event()  # the store's plan for the piece has run
    requeued = threading.Event()  # size 4 was pushed onto the queue a second time
    second_run = threading.Event()  # a runner took size 4's job a second time
    pushes: list[Any] = []
    runs: list[Any] = []
    plan_from_store, enqueue, run = Planner.plan_from_store, Planner.enqueue, Runner.run

    def stored_targets(self: StoreLink, piece: Any) -> list[Target]:
        assert looking.wait(10), "size 4's job never looked itself up"
        return [Target.size(4)]

    async def recorded_plan(self: Planner, st: Any) -> None:
        try:
            await plan_from_store(self, st)
        finally:
            planned.set()

    def recorded_enqueue(self: Planner, st: Any, job: Any) -> None:
        if job.target.label == "size:4":
            pushes.append(job)
            if len(pushes) > 1:
                requeued.set()
        enqueue(self, st, job)

    async def recorded_run(self: Runner, job: Any) -> None:
        if job.target.label == "size:4":
            runs.append(job)
            if len(runs) > 1:
                second_run.set()
        await run(self, job)

    def lookup_outlasting_the_store_plan(self: StoreLink, key: Any) -> Any:
        if key.target != "size:4":
            return None  # the general compiles (fake executor)
        if not looking.is_set():
            looking.set()
            assert planned.wait(10), "the store's plan never ran"
            if requeued.is_set():  # give the second runner its chance to take it too
                second_run.wait(10)
        return stored_artifact

    monkeypatch.setattr(StoreLink, "stored_targets", stored_targets)
    monkeypatch.setattr(StoreLink, "lookup", lookup_outlasting_the_store_plan)
    monkeypatch.setattr(Planner, "plan_from_store", recorded_plan)
    monkeypatch.setattr(Planner, "enqueue", recorded_enqueue)
    monkeypatch.setattr(Runner, "run", recorded_run)
    h, _, loaded = _attach_recording_loads(mlp, tmp_path, monkeypatch, workers=2)
    try:
        _call_sizes(mlp, [4])
        assert h.wait(sizes=[4], timeout=20), str(h.status().pieces[0].entries)
    finally:
        h.detach()
    assert looking.is_set() and planned.is_set()
    assert loaded == [str(stored_artifact)], (loaded, len(pushes), len(runs))


def test_status_carries_enums_that_compare_as_text(mlp: nn.Module) -> None:
    ex = FakeExecutor()
    h = pwd.attach(mlp, sizes=[4], policy=FAST, compiler=_compiler(), executor=ex, store=False)
    try:
        _call_sizes(mlp, [4])
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
        mlp, sizes=[3], policy=FAST, compiler=_compiler(retries=1), executor=ex, store=False
    )
    inject_fault(h, "size:3", "raise", times=1)  # the first attempt fails, the retry not
    try:
        _call_sizes(mlp, [3])
        assert h.wait(sizes=[3], timeout=20)
        entry = next(x for x in h.status().pieces[0].entries if x.target == "size:3")
        assert entry.state is pwd.JobState.LIVE and entry.attempts == 2
        assert _labels(ex.jobs).count("size:3") == 2
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
        compiler=_compiler(),
        executor=FakeExecutor(gate=gate),
        store=False,
    )
    try:
        _call_sizes(mlp, [5])
        entries = {e.target: e for e in h.status().pieces[0].entries}
        assert entries["size:5"].state in ("queued", "compiling")
    finally:
        gate.set()
        h.detach()


def test_wait_for_a_tier_the_device_cannot_give_returns_false_at_once(mlp: nn.Module) -> None:
    ex = FakeExecutor()
    h = pwd.attach(mlp, sizes=[4], policy=FAST, compiler=_compiler(), executor=ex, store=False)
    try:
        _call_sizes(mlp, [4])
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

    def capture(runnable: Callable[..., Any], *rest: Any, **options: Any) -> _ReplayedCapture:
        time.sleep(0.05)  # a capture pauses its serving call: the other job comes meanwhile
        return _ReplayedCapture(runnable)

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
        _call_sizes(mlp, [2, 8])
        assert h.wait(sizes=[2, 8], tier=pwd.Tier.SIZE, timeout=30), str(h.status())
        # Sparse traffic (a call per 0.3 s): both graph jobs get to the slot before a
        # serving call takes either.
        deadline = time.monotonic() + 30
        while not h.wait(sizes=[2, 8], tier=pwd.Tier.GRAPH, timeout=0.3):
            assert time.monotonic() < deadline, str(h.status())
            _call_sizes(mlp, [2])  # serving calls: captures run at their start
        assert both_warming.is_set()  # the two jobs did overlap: the race was run
        for n in (2, 8):
            assert h.pieces[0].dispatcher.table.lookup(n).tier is pwd.Tier.GRAPH
            x = torch.randn(n, 16)
            torch.testing.assert_close(mlp(x), reference(x))
    finally:
        h.detach()
