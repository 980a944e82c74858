"""The serving gate: gated background Python work parks while serving calls run."""

from __future__ import annotations

import gc
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pwdaemon.serving.gate import (
    GATE,
    GATED_FULL_COLLECTION_THRESHOLD,
    GATED_GC_THRESHOLD,
    GATED_SWITCH_INTERVAL_S,
    MAX_PAUSE_S,
    ServingGate,
)


def _hooked() -> bool:
    return sys.getprofile() is not None


class GatedCounter:
    """A gated thread that counts loop turns (each turn makes a Python call and leaves
    a little cyclic garbage, as dynamo's tracing and unpickling do: the gate notices a
    serving call at the thread's next garbage collection)."""

    def __init__(self) -> None:
        self.turns = 0
        self.stop = threading.Event()
        self.hooked = threading.Event()  # set on a turn that ran with the gate's hook
        self.unhooked_after_hook = threading.Event()
        self._marks: list[tuple[int, threading.Event]] = []
        self._lock = threading.Lock()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _step(self) -> None:
        garbage: list[object] = []
        garbage.append(garbage)  # a cycle: freed by a collection, not by refcount
        self.turns += 1

    def _run(self) -> None:
        with GATE.background():
            while not self.stop.is_set():
                self._step()
                if _hooked():
                    self.hooked.set()
                elif self.hooked.is_set():
                    self.unhooked_after_hook.set()
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
        # Unparked it makes ~10,000 turns in that window. It parks at its first
        # collection after the call began; each turn leaves one object for the
        # collector, so one comes within the threshold's count of turns (a few times
        # that when a collection on another thread reset the count just before).
        assert during <= 5 * GATED_GC_THRESHOLD, f"{during} turns during a serving call"
        assert counter.reached(counter.turns + 1_000).wait(10)  # and resumes after


def test_gated_work_still_progresses_under_calls_that_never_pause() -> None:
    with GatedCounter() as counter:
        assert counter.reached(1_000).wait(10)
        with GATE.call():
            # Past MAX_PAUSE_S the parked thread takes slices: it must not starve.
            assert counter.reached(counter.turns + 100).wait(10)


def test_the_switch_interval_is_lowered_only_while_serving_calls_meet_gated_work() -> None:
    # Gated work of an earlier test's engine may still be ending (a loaded machine):
    # this test's own work must leave the count where it found it, or lower.
    working_before = GATE.working
    before = sys.getswitchinterval()
    seen: list[float] = []
    called = threading.Event()

    def work() -> None:
        with GATE.background():
            seen.append(sys.getswitchinterval())  # nobody calls: left alone
            called.wait(10)
            seen.append(sys.getswitchinterval())  # a call came: lowered

    thread = threading.Thread(target=work)
    thread.start()
    with GATE.call():
        called.set()
    thread.join(10)
    assert seen == [before, min(GATED_SWITCH_INTERVAL_S, before)]
    assert sys.getswitchinterval() == before
    assert GATE.working <= working_before


def test_gated_work_runs_without_a_hook_while_nobody_calls() -> None:
    # Any profile hook slows the thread it is on about 2x (dynamo's trace: 1.2 s bare,
    # 2.5 s hooked): with no serving call, gated work runs unhooked. (A gate of its own:
    # the process's gate saw calls of earlier tests, and work that starts soon after a
    # call is hooked from its start.)
    gate = ServingGate()
    seen: list[bool] = []

    def work() -> None:
        with gate.background():
            gc.collect()  # a collection with no call in progress installs nothing
            seen.append(_hooked())

    thread = threading.Thread(target=work)
    thread.start()
    thread.join(10)
    assert seen == [False]


def test_the_hook_comes_off_once_serving_goes_idle() -> None:
    with GatedCounter() as counter:
        assert counter.reached(1_000).wait(10)
        with GATE.call():
            assert counter.hooked.wait(10)
        assert counter.unhooked_after_hook.wait(10)
        assert counter.reached(counter.turns + 1_000).wait(10)


@pytest.fixture
def collections_off() -> Iterator[None]:
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def test_with_automatic_collection_off_the_hook_covers_the_whole_block(
    collections_off: None,
) -> None:
    seen: list[bool] = []

    def work() -> None:
        with GATE.background():
            seen.append(_hooked())
        seen.append(_hooked())

    thread = threading.Thread(target=work)
    thread.start()
    thread.join(10)
    assert seen == [True, False]


def test_collection_thresholds_change_only_while_a_call_meets_gated_work() -> None:
    before = gc.get_threshold()
    seen: list[tuple[int, int, int]] = []
    called = threading.Event()

    def work() -> None:
        with GATE.background():
            seen.append(gc.get_threshold())
            called.wait(10)
            seen.append(gc.get_threshold())

    thread = threading.Thread(target=work)
    thread.start()
    with GATE.call():
        inside = gc.get_threshold()
        called.set()
        thread.join(10)
    assert seen[0] == before
    assert inside[0] == min(GATED_GC_THRESHOLD, before[0])
    # Full collections (unparkable, 50-100 ms over the unfrozen heap) wait meanwhile.
    assert inside[2] == max(GATED_FULL_COLLECTION_THRESHOLD, before[2])
    assert gc.get_threshold() == before


def test_full_collections_stay_deferred_between_calls_until_the_gated_work_ends() -> None:
    before = gc.get_threshold()
    between: list[tuple[int, int, int]] = []
    call_ended, looked = threading.Event(), threading.Event()

    def work() -> None:
        with GATE.background():
            call_ended.wait(10)
            between.append(gc.get_threshold())  # gated work, traffic, no call now
            looked.set()

    thread = threading.Thread(target=work)
    thread.start()
    with GATE.call():
        during = gc.get_threshold()
    call_ended.set()
    assert looked.wait(10)
    thread.join(10)
    # Between paced calls a full collection would still come, unparkable, and the next
    # call would wait for it (30-69 ms in bench/gil_holds.py): it waits for the work.
    assert during[2] == between[0][2] == max(GATED_FULL_COLLECTION_THRESHOLD, before[2])
    # The first threshold is lowered only while a call is in progress (the watch).
    assert during[0] == min(GATED_GC_THRESHOLD, before[0])
    assert between[0][:2] == before[:2]
    assert gc.get_threshold() == before


def test_thresholds_a_user_sets_during_gated_work_are_kept_after_it() -> None:
    before = gc.get_threshold()
    mine = (before[0] + 1, before[1] + 1, before[2] + 1)
    call_ended, changed = threading.Event(), threading.Event()

    def work() -> None:
        with GATE.background():
            call_ended.wait(10)
            changed.wait(10)

    thread = threading.Thread(target=work)
    thread.start()
    try:
        with GATE.call():
            pass
        call_ended.set()
        gc.set_threshold(*mine)  # the user's, while full collections are deferred
        changed.set()
        thread.join(10)
        assert gc.get_threshold() == mine
    finally:
        gc.set_threshold(*before)


class SlowModule:
    """A module on sys.path whose body makes many Python calls (each leaving a little
    cyclic garbage); `began` is set once its body runs, `steps[0]` counts its calls."""

    def __init__(self, directory: Path) -> None:
        self.name = "pwdaemon_test_slow_module"
        self.began = threading.Event()
        self.steps = [0]
        (directory / f"{self.name}.py").write_text(
            "import builtins\nbuiltins._pwdaemon_test_slow_module.began.set()\n"
            "steps = builtins._pwdaemon_test_slow_module.steps\n"
            "def step(i):\n    garbage = []\n    garbage.append(garbage)\n"
            "    steps[0] += 1\n    return i * 2\n\n"
            "total = 0\n"
            "for i in range(300_000):\n    total += step(i)\n"
        )

    def import_gated(self) -> threading.Thread:
        """Start importing it on a gated thread."""

        def gated_import() -> None:
            with GATE.background():
                __import__(self.name)

        thread = threading.Thread(target=gated_import)
        thread.start()
        return thread


@pytest.fixture
def slow_module(tmp_path: Path) -> Iterator[SlowModule]:
    import builtins

    module = SlowModule(tmp_path)
    sys.path.insert(0, str(tmp_path))
    builtins._pwdaemon_test_slow_module = module  # type: ignore[attr-defined]
    try:
        yield module
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop(module.name, None)
        del builtins._pwdaemon_test_slow_module  # type: ignore[attr-defined]


def test_gated_work_does_not_park_inside_an_import_a_serving_call_waits_for(
    slow_module: SlowModule,
) -> None:
    # The gated thread imports a module while a serving call is in progress and
    # imports the same module, so the call waits for the module lock. Parked there, the
    # import crawled at 5 ms per 50 ms (a demo call took 4.2 s); the gate now lets an
    # import that someone waits for run on, so the call waits about its own time.
    alone = time.perf_counter()
    __import__(slow_module.name)  # its cost alone, then forgotten
    alone = time.perf_counter() - alone
    del sys.modules[slow_module.name]
    slow_module.began.clear()

    with GATE.call():  # a serving call in progress all along
        worker = slow_module.import_gated()
        assert slow_module.began.wait(10)
        t0 = time.perf_counter()
        __import__(slow_module.name)  # waits for the gated thread's import (module lock)
        waited = time.perf_counter() - t0
    worker.join(10)
    # Parked, it took 10-60x the import's own time (5 ms of every 55; 7.5 s for a 0.13 s
    # import here). Hooked but running on, it takes 2-5x: the hook slows the thread.
    assert waited < 6 * alone + 0.2, (waited, alone)


def test_gated_work_parks_inside_an_import_nobody_waits_for(slow_module: SlowModule) -> None:
    # Running every import on made serving calls share the GIL with seconds of dynamo's
    # and Inductor's imports at the switch interval per torch op (~40 ms demo calls).
    worker = slow_module.import_gated()
    assert slow_module.began.wait(10)
    with GATE.call():
        before = slow_module.steps[0]
        time.sleep(MAX_PAUSE_S / 2)  # a window to measure in, shorter than a pause
        during = slow_module.steps[0] - before
    worker.join(30)
    assert not worker.is_alive()  # and the import finished after the call
    # Running on, the body makes tens of thousands of steps in that window.
    assert during <= 5 * GATED_GC_THRESHOLD, during


def test_a_gated_thread_waiting_for_an_import_does_not_keep_it_running(
    slow_module: SlowModule,
) -> None:
    # The loader's set-up (gated) waited for the trace thread's import of dynamo, which
    # then never parked: a demo call took 356 ms beside it.
    importer = slow_module.import_gated()
    assert slow_module.began.wait(10)
    waiter = slow_module.import_gated()  # blocks on the module lock the importer holds
    with GATE.call():
        before = slow_module.steps[0]
        time.sleep(MAX_PAUSE_S / 2)  # a window to measure in, shorter than a pause
        during = slow_module.steps[0] - before
    importer.join(30)
    waiter.join(30)
    assert not importer.is_alive() and not waiter.is_alive()
    assert during <= 5 * GATED_GC_THRESHOLD, during


def _gate_codes_dynamo_converted() -> list[str]:
    """Code of the gate's, the import checks' or threading's that dynamo's frame
    callback was handed (torch's own record of the frames it converted)."""
    from torch._dynamo.convert_frame import input_codes

    from pwdaemon.serving import gate, imports

    files = {gate.__file__, imports.__file__, threading.__file__}
    codes = [ref() for ref in input_codes.seen]
    return [f"{c.co_name} ({c.co_filename})" for c in codes if c and c.co_filename in files]


def test_dynamo_never_converts_what_the_gates_hook_calls(collections_off: None) -> None:
    # The hook runs on a gated thread whatever that thread runs, a compiled call with
    # dynamo's frame callback installed included (the trace thread's first call): what
    # the hook calls must then run as it is, not be converted by dynamo (a frame counted
    # among the model's, and dynamo's per-frame work inside the hook while a serving
    # call waits). With collection off the hook is on for the whole block, so the
    # compiled calls below run hooked, with and without a serving call in progress.
    import torch
    from torch._dynamo.utils import counters

    def plus_one(x: torch.Tensor) -> torch.Tensor:
        return x + 1

    compiled = torch.compile(plus_one, backend="eager")
    x = torch.zeros(2)
    frames = counters["frames"]["ok"]
    calls_made = threading.Event()
    serving = threading.Event()
    done = threading.Event()

    def work() -> None:
        with GATE.background():
            for _ in range(3_000):  # idle: the hook looks at the clock every few events
                compiled(x)
            serving.set()
            calls_made.wait(10)
            for _ in range(300):  # a call in progress: the hook parks and takes slices
                compiled(x)
        done.set()

    thread = threading.Thread(target=work)
    thread.start()
    assert serving.wait(60)
    with GATE.call():
        calls_made.set()
        assert done.wait(60)
    thread.join(10)
    assert _gate_codes_dynamo_converted() == []
    assert counters["frames"]["ok"] - frames == 1  # plus_one, and nothing else
