"""The serving gate: gated background Python work parks while serving calls run."""

from __future__ import annotations

import sys
import threading
import time

from pwdaemon.serving.gate import GATE, GATED_SWITCH_INTERVAL_S, MAX_PAUSE_S


class GatedCounter:
    """A gated thread that counts loop turns (each turn makes a Python call)."""

    def __init__(self) -> None:
        self.turns = 0
        self.stop = threading.Event()
        self._marks: list[tuple[int, threading.Event]] = []
        self._lock = threading.Lock()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _step(self) -> None:
        self.turns += 1

    def _run(self) -> None:
        with GATE.background():
            while not self.stop.is_set():
                self._step()
                with self._lock:
                    for target, event in self._marks:
                        if self.turns >= target:
                            event.set()

    def reached(self, turns: int) -> threading.Event:
        """An event set once the counter has made `turns` turns."""
        event = threading.Event()
        with self._lock:
            self._marks.append((turns, event))
        return event

    def __enter__(self) -> GatedCounter:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(10)


def test_gated_work_parks_while_a_serving_call_runs() -> None:
    with GatedCounter() as counter:
        assert counter.reached(1_000).wait(10)
        with GATE.call():
            before = counter.turns
            time.sleep(MAX_PAUSE_S / 2)  # a window to measure in, shorter than a pause
            during = counter.turns - before
        assert during <= 1, f"gated work made {during} turns during a serving call"
        assert counter.reached(counter.turns + 1_000).wait(10)  # and resumes after


def test_gated_work_still_progresses_under_calls_that_never_pause() -> None:
    with GatedCounter() as counter:
        assert counter.reached(1_000).wait(10)
        with GATE.call():
            # Past MAX_PAUSE_S the parked thread takes slices: it must not starve.
            assert counter.reached(counter.turns + 100).wait(10)


def test_the_switch_interval_is_lowered_only_while_gated_work_runs() -> None:
    # Gated work of an earlier test's engine may still be ending (a loaded machine):
    # this test's own work must leave the count where it found it, or lower.
    working_before = GATE.working
    before = sys.getswitchinterval()
    seen: list[float] = []

    def work() -> None:
        with GATE.background():
            seen.append(sys.getswitchinterval())

    thread = threading.Thread(target=work)
    thread.start()
    thread.join(10)
    assert seen == [min(GATED_SWITCH_INTERVAL_S, before)]
    assert sys.getswitchinterval() == before
    assert GATE.working <= working_before
