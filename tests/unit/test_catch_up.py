"""Catching up where serving leaves no CPU (`serving.catch_up`): a starved gated thread
sets a schedule of slices that serving calls beginning inside one wait for."""

from __future__ import annotations

import threading
import time

import pytest

from pwdaemon.serving import catch_up, gate
from pwdaemon.serving.catch_up import (
    EXPIRY_S,
    PERIOD_S,
    SLICE_S,
    STARVED_SHARE,
    WINDOW_S,
    CatchUp,
    Yield,
)
from pwdaemon.serving.gate import GATE


class FakeSchedstat:
    """This thread's (seconds on a CPU, seconds waiting for one), as the test sets them."""

    def __init__(self) -> None:
        self.on_cpu = 0.0
        self.waiting = 0.0

    def __call__(self) -> tuple[float, float]:
        return self.on_cpu, self.waiting


@pytest.fixture
def sched(monkeypatch: pytest.MonkeyPatch) -> FakeSchedstat:
    fake = FakeSchedstat()
    monkeypatch.setattr(catch_up, "thread_schedstat", fake)
    return fake


def test_a_thread_runnable_but_seldom_on_a_cpu_is_starved(sched: FakeSchedstat) -> None:
    state = CatchUp()
    assert not state.starved(100.0)  # the first look begins the window
    # niceness 19 beside busy serving threads: waiting for a CPU nearly all the time
    sched.on_cpu, sched.waiting = 0.015 * WINDOW_S, 0.9 * WINDOW_S
    assert not state.starved(100.0 + WINDOW_S / 2)  # judged once a window has gone by
    assert state.starved(100.0 + WINDOW_S)
    assert state.starved(100.0 + WINDOW_S + 0.1)  # and stays so for the traffic's spell


def test_a_thread_that_ran_in_the_gaps_is_not_starved(sched: FakeSchedstat) -> None:
    state = CatchUp()
    assert not state.starved(0.0)
    sched.on_cpu, sched.waiting = 0.5 * WINDOW_S, 0.1 * WINDOW_S  # parked the rest
    assert not state.starved(WINDOW_S)
    sched.on_cpu += STARVED_SHARE * WINDOW_S * 2  # the next window: still enough
    sched.waiting += 0.5 * WINDOW_S
    assert not state.starved(2 * WINDOW_S)


def test_a_thread_blocked_or_parked_most_of_the_window_is_not_judged(
    sched: FakeSchedstat,
) -> None:
    # A subprocess, a lock or the gate's park: not runnable, so not starved (measured
    # as wall time not parked, a paced Llama warm-up caught up for such a thread).
    state = CatchUp()
    assert not state.starved(0.0)
    sched.on_cpu, sched.waiting = 0.01 * WINDOW_S, 0.2 * WINDOW_S
    assert not state.starved(WINDOW_S)


def test_without_schedstat_nothing_catches_up(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(catch_up, "thread_schedstat", lambda: None)
    state = CatchUp()
    assert not state.starved(0.0)
    assert not state.starved(WINDOW_S)


def test_this_kernel_says_how_long_a_thread_waited_for_a_cpu() -> None:
    stat = catch_up.thread_schedstat()
    assert stat is not None  # Linux with schedstat: CI's machines, the device's
    on_cpu, waiting = stat
    assert on_cpu > 0 and waiting >= 0


def test_calls_wait_inside_a_slice_only_and_the_schedule_lapses() -> None:
    schedule = Yield()
    assert schedule.left(5.0) == 0.0  # no schedule
    schedule.renew(10.0)
    assert schedule.left(10.0) == pytest.approx(SLICE_S)
    assert schedule.left(10.0 + SLICE_S / 2) == pytest.approx(SLICE_S / 2)
    assert schedule.left(10.0 + SLICE_S) == 0.0  # between slices
    assert schedule.until_next(10.0 + SLICE_S) == pytest.approx(PERIOD_S - SLICE_S)
    assert schedule.left(10.0 + PERIOD_S + 0.001) == pytest.approx(SLICE_S - 0.001)
    assert schedule.left(10.0 + EXPIRY_S + 0.001) == 0.0  # not renewed: lapsed
    schedule.renew(10.5)  # renewed in time: the same slices go on
    assert schedule.start == 10.0
    schedule.end()
    assert schedule.left(10.5) == 0.0


def test_a_call_inside_a_slice_waits_until_the_work_ends(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(catch_up, "SLICE_S", 30.0)  # one slice longer than the test
    monkeypatch.setattr(catch_up, "PERIOD_S", 60.0)
    schedule = Yield()
    schedule.renew(time.monotonic())
    waited = threading.Event()

    def call() -> None:
        schedule.wait()
        waited.set()

    caller = threading.Thread(target=call)
    caller.start()
    assert not waited.wait(0.2)  # inside the slice: waiting
    schedule.end()  # the gated work ended: the caller goes on at once
    assert waited.wait(10)
    caller.join(10)


def test_a_starved_gated_thread_sets_a_schedule_and_clears_it_when_its_work_ends(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Starvation itself depends on the machine's load; here it is given, and what is
    # checked is the gate's side: the schedule is set while calls come, and ends with
    # the gated block.
    monkeypatch.setattr(gate.CatchUp, "starved", lambda self, now: True)
    in_schedule = threading.Event()
    stop = threading.Event()

    def work() -> None:
        with GATE.background():
            while not stop.is_set():
                garbage: list[object] = []
                garbage.append(garbage)  # a cycle: the hook comes on at a collection
                if GATE.yielding.expires:
                    in_schedule.set()

    worker = threading.Thread(target=work, daemon=True)
    worker.start()
    try:
        deadline = time.monotonic() + 10
        while not in_schedule.is_set() and time.monotonic() < deadline:
            with GATE.call():
                in_schedule.wait(0.01)  # a serving call in progress
        assert in_schedule.is_set()
    finally:
        stop.set()
        worker.join(10)
    assert GATE.yielding.expires == 0.0
