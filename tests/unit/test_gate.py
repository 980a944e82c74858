"""The serving gate: gated background Python work parks while serving calls run."""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

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


def test_gated_work_does_not_park_inside_an_import_a_serving_call_waits_for(
    tmp_path: Path,
) -> None:
    # The gated thread imports a module (its body: many Python calls) while a serving
    # call is in progress and imports the same module, so the call waits for the module
    # lock. Parked there, the import crawled at 5 ms per 50 ms (a demo call took 4.2 s);
    # the gate now lets an import run on, so the call waits about the import's own time.
    name = "pwdaemon_test_slow_module"
    (tmp_path / f"{name}.py").write_text(
        "import builtins\nbuiltins._pwdaemon_test_import_began.set()\n"
        "def step(i):\n    return i * 2\n\ntotal = 0\n"
        "for i in range(300_000):\n    total += step(i)\n"
    )
    sys.path.insert(0, str(tmp_path))
    started = threading.Event()  # set by the module's body: the gated import is under way
    import builtins

    builtins._pwdaemon_test_import_began = started  # type: ignore[attr-defined]
    try:
        alone = time.perf_counter()
        __import__(name)  # its cost alone, then forgotten
        alone = time.perf_counter() - alone
        del sys.modules[name]

        started.clear()

        def gated_import() -> None:
            with GATE.background():
                __import__(name)

        worker = threading.Thread(target=gated_import)
        with GATE.call():  # a serving call in progress all along
            worker.start()
            assert started.wait(10)
            t0 = time.perf_counter()
            __import__(name)  # waits for the gated thread's import (the module lock)
            waited = time.perf_counter() - t0
        worker.join(10)
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop(name, None)
        del builtins._pwdaemon_test_import_began  # type: ignore[attr-defined]
    # Parked, it took ~10x the import's own time (5 ms of every 55).
    assert waited < 3 * alone + 0.2, (waited, alone)
