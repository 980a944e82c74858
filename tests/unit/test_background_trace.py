"""The background trace tries again after an error, so a serving call is left to trace
inline only when every try failed (the step here stands in for dynamo's tracing call)."""

from __future__ import annotations

import os
import threading
from typing import Any

import pytest
import torch

from pwdaemon.serving import background
from pwdaemon.serving.background import TRACE_TRIES, BackgroundTrace, SettleStep
from pwdaemon.serving.priority import LOWEST_NICENESS


class FailingStep:
    """Raises on its first `failures` calls, then settles."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.calls = 0
        self.called = threading.Event()

    def __call__(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
        self.calls += 1
        self.called.set()
        if self.calls <= self.failures:
            raise RuntimeError("dictionary changed size during iteration")
        return True


def _run(step: SettleStep) -> BackgroundTrace:
    trace = BackgroundTrace(step, size_cap=8)
    thread = trace.prepare((torch.ones(2, 3),), {})
    assert thread is not None
    thread.start()
    return trace


def test_a_trace_that_failed_once_settles_on_its_next_try(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(background, "BACKOFF_S", 0.01)
    step = FailingStep(failures=1)
    trace = _run(step)
    assert trace.traced.wait(10)
    assert trace.error is None and step.calls == 2  # no serving call traces inline


def test_a_trace_that_fails_every_try_reports_its_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(background, "BACKOFF_S", 0.01)
    step = FailingStep(failures=TRACE_TRIES)
    trace = _run(step)
    assert trace.traced.wait(10)
    assert isinstance(trace.error, RuntimeError) and step.calls == TRACE_TRIES


def test_detach_cuts_the_wait_between_tries_short(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(background, "BACKOFF_S", 60.0)
    step = FailingStep(failures=TRACE_TRIES)
    trace = _run(step)
    assert step.called.wait(10)
    assert trace.stop(timeout=10)  # ends within the timeout, not after the 60 s wait
    assert step.calls == 1 and trace.traced.is_set() and trace.error is None


def _niceness() -> int:
    return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())


def test_the_trace_runs_at_the_lowest_niceness_and_serving_keeps_its_own() -> None:
    # Seen with bench/stalls.py: calls before a warm BERT trace ended waited 12-31 ms for
    # a CPU while the trace thread ran beside them, inside C code the gate cannot park.
    seen: list[int] = []

    def step(args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
        seen.append(_niceness())
        return True

    serving = _niceness()
    trace = _run(step)
    assert trace.traced.wait(10) and trace.error is None
    assert seen == [max(serving, LOWEST_NICENESS)]
    assert _niceness() == serving


def test_a_join_waits_for_a_thread_whose_start_is_still_pending(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The trace thread is started by a helper after the first call returns. A detach that
    # came before the helper ran took "not started" for "will not run" and returned; the
    # thread started after it (CI: test_detach_waits_for_a_background_trace_under_way).
    pending: list[Any] = []
    monkeypatch.setattr(
        background._thread, "start_new_thread", lambda fn, args: pending.append((fn, args))
    )
    release = threading.Event()
    thread = threading.Thread(target=release.wait, args=(30,), daemon=True)
    background.start_without_waiting(thread)
    joined = threading.Event()
    results: list[bool] = []

    def join() -> None:
        results.append(background.join_if_started(thread, 30))
        joined.set()

    threading.Thread(target=join, daemon=True).start()
    assert not joined.wait(0.2)  # the start is pending: the join waits for it
    ((start, args),) = pending
    start(*args)  # the helper runs: the thread starts
    release.set()  # and ends
    assert joined.wait(30)
    assert results == [True] and not thread.is_alive()
