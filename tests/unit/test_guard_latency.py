"""Dynamo's guard-latency measurement runs without its cache flush in pwdaemon's traces
only (`pwdaemon.serving.guard_latency`): real dynamo traces, torch's profiler replaced
by a counting stand-in where it is looked up."""

from __future__ import annotations

import threading
from typing import Any

import pytest
import torch
from conftest import Plain
from torch._C._dynamo import guards as compiled_guards

import pwdaemon as pwd
from pwdaemon.serving import guard_latency

FLUSHED_LATENCY_US = 123456.0  # what the stand-in for torch's profiler answers


class FlushCounter:
    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, root: Any, f_locals: Any, *rest: Any) -> float:
        self.calls += 1
        return FLUSHED_LATENCY_US


@pytest.fixture
def flushes(monkeypatch: pytest.MonkeyPatch) -> FlushCounter:
    assert guard_latency.install()
    counter = FlushCounter()
    monkeypatch.setattr(compiled_guards, "profile_guard_manager", counter)
    return counter


def trace_once() -> None:
    torch._dynamo.reset()
    fn = torch.compile(lambda x: (x * 2).relu(), backend="eager")
    fn(torch.randn(3, 4))


def test_guards_built_inside_unflushed_are_timed_without_torchs_flush(
    flushes: FlushCounter,
) -> None:
    with guard_latency.unflushed():
        trace_once()
    assert flushes.calls == 0


def test_guards_built_outside_it_keep_torchs_measurement(flushes: FlushCounter) -> None:
    trace_once()
    assert flushes.calls == 1


def test_another_thread_keeps_torchs_measurement_while_one_is_inside(
    flushes: FlushCounter,
) -> None:
    inside, done = threading.Event(), threading.Event()

    def hold() -> None:
        with guard_latency.unflushed():
            inside.set()
            assert done.wait(60)

    holder = threading.Thread(target=hold)
    holder.start()
    try:
        assert inside.wait(60)
        trace_once()  # this thread is outside
    finally:
        done.set()
        holder.join(60)
    assert flushes.calls == 1


def test_the_unflushed_figure_is_the_guard_check_time() -> None:
    class Root:
        def __init__(self) -> None:
            self.checked: list[object] = []

        def check(self, f_locals: object) -> bool:
            self.checked.append(f_locals)
            return True

    root, scope = Root(), {"x": 1}
    with guard_latency.unflushed():
        latency = guard_latency.profile_guard_manager(root, scope, 3)
    assert root.checked == [scope] * 3
    assert 0.0 <= latency < FLUSHED_LATENCY_US


def test_pwdaemons_trace_of_a_model_flushes_nothing(flushes: FlushCounter) -> None:
    torch.manual_seed(0)
    model = Plain()
    with pwd.attach(model, compile=False) as handle:
        x = torch.randn(5, 8)
        model(x)
        assert handle.wait_traced(60)
        assert handle.pieces
    assert flushes.calls == 0
