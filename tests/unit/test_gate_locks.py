"""The gate never parks a gated thread while it holds a lock every serving call takes,
and a gated block leaves its thread unhooked."""

from __future__ import annotations

import contextlib
import gc
import sys
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from pwdaemon.serving import gate as gate_module
from pwdaemon.serving.gate import ServingGate
from pwdaemon.serving.pause import PAUSE
from pwdaemon.serving.switch_interval import INTERVAL_LOCK

# The gate's pause in these tests: a thread parked holding the lock holds it this long
# (50 ms in the product, which a loaded CI machine's scheduling could mimic), and one
# that runs on to its release frees it in microseconds.
LONG_PAUSE_S = 5.0
PARKED_WAIT_S = LONG_PAUSE_S / 2

# The locks a serving call takes while gated work runs (`ServingGate.call`), reached the
# way the gate holds them (private: the sections that take them cannot be paused from
# outside at a chosen moment).
SERVING_LOCKS: dict[str, Callable[[ServingGate], threading.Lock]] = {
    "the gate's": lambda gate: gate._lock,
    "the switch interval's": lambda gate: INTERVAL_LOCK,
    "the worker pause's": lambda gate: PAUSE._lock,
}


def _noop() -> None:
    pass


@contextlib.contextmanager
def _call(gate: ServingGate, which: str) -> Iterator[None]:
    # A serving call in progress. `call` counts it under the gate's lock: where the gated
    # thread holds that one, counted as `call` does, without it.
    if which != "the gate's":
        with gate.call():
            yield
        return
    gate.calls += 1
    gate._idle.clear()
    try:
        yield
    finally:
        gate.calls -= 1
        gate._idle.set()


@pytest.mark.parametrize("which", sorted(SERVING_LOCKS))
def test_a_gated_thread_holding_a_lock_a_serving_call_takes_runs_on_to_its_release(
    which: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The hook parks at any event while a call is in progress; one in a section under
    # such a lock (a Python call there, or the GIL changing hands there) parked with the
    # lock held, and the call waited out the whole pause for it.
    monkeypatch.setattr(gate_module, "MAX_PAUSE_S", LONG_PAUSE_S)
    gate = ServingGate()
    gate.hold()
    lock = SERVING_LOCKS[which](gate)
    inside, call_began, left = threading.Event(), threading.Event(), threading.Event()

    def work() -> None:
        gc.disable()  # the hook on for the whole block, not from a collection's chance
        try:
            with gate.background(switch_interval=None):
                with lock:
                    inside.set()
                    call_began.wait(10)  # returns inside the call: an event, lock held
                    _noop()
                left.set()
        finally:
            gc.enable()

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    assert inside.wait(10)
    with _call(gate, which):
        call_began.set()
        start = time.perf_counter()
        got = lock.acquire(timeout=PARKED_WAIT_S)
        waited = time.perf_counter() - start
        if got:
            lock.release()
    thread.join(10)  # a thread parked on: free once the call has ended
    gate.release()
    assert left.is_set()
    assert got, f"the call waited {waited:.1f} s for {which} lock: parked with it held"


def test_a_gated_block_ending_during_a_serving_call_leaves_its_thread_unhooked() -> None:
    # A collection in the block's exit (one after every allocation here) found the
    # thread still in the collection watch and put the hook back: the thread parked with
    # the gate's lock held, and kept the hook after the block.
    gate = ServingGate()
    gate.hold()
    hooks_after: list[object] = []

    def work() -> None:
        with gate.background():
            pass
        hooks_after.append(sys.getprofile())

    before = gc.get_threshold()
    gc.set_threshold(1)
    try:
        with gate.call():
            for _ in range(5):
                thread = threading.Thread(target=work)
                thread.start()
                thread.join(10)
                assert not thread.is_alive()
    finally:
        gc.set_threshold(*before)
        gate.release()
    assert hooks_after == [None] * 5
