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


class FakeCpu:
    def __init__(self) -> None:
        self.seconds = 0.0

    def __call__(self) -> float:
        return self.seconds


@pytest.fixture
def cpu(monkeypatch: pytest.MonkeyPatch) -> FakeCpu:
    fake = FakeCpu()
    monkeypatch.setattr(catch_up.time, "thread_time", fake)
    return fake


def test_a_thread_that_got_almost_no_cpu_while_runnable_is_starved(cpu: FakeCpu) -> None:
    state = CatchUp(now=100.0)
    cpu.seconds = 0.01 * WINDOW_S  # 1 % of the window: niceness 19 beside busy serving
    assert not state.starved(100.0 + WINDOW_S / 2)  # judged once a window has gone by
    assert state.starved(100.0 + WINDOW_S)
    assert state.starved(100.0 + WINDOW_S + 0.1)  # and stays so for the traffic's spell


def test_a_thread_that_ran_in_the_gaps_is_not_starved(cpu: FakeCpu) -> None:
    state = CatchUp(now=0.0)
    state.parked(0.4 * WINDOW_S)  # parked during paced calls
    cpu.seconds = 0.5 * WINDOW_S  # and ran most of the rest
    assert not state.starved(WINDOW_S)
    cpu.seconds += STARVED_SHARE * WINDOW_S * 2  # the next window: still enough
    assert not state.starved(2 * WINDOW_S)


def test_a_thread_parked_most_of_the_window_is_not_judged(cpu: FakeCpu) -> None:
    state = CatchUp(now=0.0)
    state.parked(0.8 * WINDOW_S)  # serving busy, the thread parked: not starved by the OS
    assert not state.starved(WINDOW_S)


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
