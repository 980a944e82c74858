"""The serving gate at the edges of gated work: before it starts, and at exit.

A call that began before any gated work existed used to go uncounted, so work starting
during it did not park for it (the demo's first call took 130-280 ms instead of 6-18 ms
in a third of runs); gated threads wait to be hooked until they collect or import; a
daemon thread inside a torch op when the interpreter finalizes aborted the process.
"""

from __future__ import annotations

import contextlib
import gc
import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from pwdaemon.serving.gate import (
    HOOK_IDLE_S,
    MAX_PAUSE_S,
    GateClosed,
    GateHold,
    ServingGate,
)


class Spinner:
    """A thread doing gated work on `gate`: turns of a Python call each, no garbage (so
    no collection can hook it: only an import or a hook from its start can)."""

    def __init__(self, gate: ServingGate, before_work: threading.Event | None = None) -> None:
        self.gate = gate
        self.turns = 0
        self.begun = threading.Event()
        self.stop = threading.Event()
        self.hooked_at_start: bool | None = None
        self._before_work = before_work
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _step(self) -> None:
        self.turns += 1

    def _run(self) -> None:
        if self._before_work is not None:
            self._before_work.wait(10)
        with self.gate.background():
            self.hooked_at_start = sys.getprofile() is not None
            self.begun.set()
            while not self.stop.is_set():
                self._step()

    def turns_in(self, seconds: float) -> int:
        before = self.turns
        time.sleep(seconds)  # a window to measure in, not a synchronisation
        return self.turns - before


def _serving_call(gate: ServingGate) -> contextlib.AbstractContextManager[None]:
    # What the serving path does: announce the call only while the gate is working.
    return gate.call() if gate.working else contextlib.nullcontext()


def test_a_held_gate_counts_a_call_that_began_before_gated_work_started() -> None:
    gate = ServingGate()
    hold = GateHold(gate)
    go = threading.Event()
    spinner = Spinner(gate, before_work=go)
    spinner.thread.start()
    try:
        with _serving_call(gate):  # counted: the gate is held though no work runs yet
            go.set()
            assert spinner.begun.wait(10)
            assert spinner.hooked_at_start  # a call is in progress: hooked at once
            during = spinner.turns_in(4 * MAX_PAUSE_S)
        after = spinner.turns_in(4 * MAX_PAUSE_S)  # no call: it runs (still hooked)
    finally:
        spinner.stop.set()
        spinner.thread.join(10)
        hold.release()
    # Parked for the call, it runs only its slices: SLICE_S of every MAX_PAUSE_S +
    # SLICE_S (9 %). Unheld, the call is not counted and it runs on (next test).
    assert during < 0.3 * after, (during, after)
    assert gate.working == 0


def test_without_a_hold_a_call_that_began_first_is_not_waited_for() -> None:
    # The race the hold closes, shown: this is what the first call after attach() met.
    gate = ServingGate()
    go = threading.Event()
    spinner = Spinner(gate, before_work=go)
    spinner.thread.start()
    try:
        with _serving_call(gate):  # the gate is not working yet: not counted
            go.set()
            assert spinner.begun.wait(10)
            assert not spinner.hooked_at_start
            during = spinner.turns_in(4 * MAX_PAUSE_S)
        after = spinner.turns_in(4 * MAX_PAUSE_S)
    finally:
        spinner.stop.set()
        spinner.thread.join(10)
    assert during > 0.3 * after, (during, after)


def test_a_hold_released_twice_counts_once() -> None:
    gate = ServingGate()
    hold = GateHold(gate)
    assert gate.working == 1
    hold.release()
    hold.release()
    assert gate.working == 0


def test_gated_work_starting_just_after_attach_is_hooked_from_its_start() -> None:
    gate = ServingGate()
    hold = GateHold(gate, expect_call=True)  # what the engine does at attach()
    spinner = Spinner(gate)
    spinner.thread.start()
    try:
        assert spinner.begun.wait(10)
        assert spinner.hooked_at_start
    finally:
        spinner.stop.set()
        spinner.thread.join(10)
        hold.release()
    assert gate.last_call_end > time.monotonic() - HOOK_IDLE_S - 10  # set by the hold


def test_an_import_on_a_gated_thread_hooks_it_while_a_call_runs(tmp_path: Path) -> None:
    # Inductor's imports allocate little: collections came 5-48 ms apart. The gate's
    # meta-path finder hooks a gated thread at its next import instead.
    gate = ServingGate()
    names = [f"pwdaemon_test_plain_{i}" for i in range(50)]
    for name in names:
        (tmp_path / f"{name}.py").write_text("VALUE = 1\n")
    sys.path.insert(0, str(tmp_path))
    seen: list[bool] = []
    in_call = threading.Event()
    old_threshold = gc.get_threshold()
    gc.set_threshold(1_000_000_000)  # no collection can hook it
    try:

        def work() -> None:
            with gate.background():
                in_call.wait(10)
                for name in names:
                    __import__(name)
                    if sys.getprofile() is not None:
                        break
                seen.append(sys.getprofile() is not None)

        with gate.call():
            thread = threading.Thread(target=work)
            thread.start()
            in_call.set()
            # The hook parks the thread for MAX_PAUSE_S at most, then slices: it ends.
            thread.join(10)
    finally:
        gc.set_threshold(*old_threshold)
        sys.path.remove(str(tmp_path))
        for name in names:
            sys.modules.pop(name, None)
    assert seen == [True]


def test_close_parks_hooked_gated_threads_for_good() -> None:
    gate = ServingGate()
    hold = GateHold(gate, expect_call=True)  # hooked from its start
    spinner = Spinner(gate)
    spinner.thread.start()
    assert spinner.begun.wait(10)
    assert spinner.hooked_at_start
    assert gate.close(timeout=10)  # the spinner parked at its next event
    assert spinner.thread.is_alive()
    assert spinner.turns_in(MAX_PAUSE_S) == 0  # and stays parked (daemon: dies at exit)
    hold.release()
    with pytest.raises(GateClosed), gate.background():
        pass


def test_close_ends_unhooked_gated_threads_with_gate_closed() -> None:
    gate = ServingGate()
    spinner = Spinner(gate)  # nobody calls: unhooked, and it leaves no garbage
    ended: list[BaseException] = []

    def run() -> None:
        try:
            spinner._run()
        except GateClosed as exc:
            ended.append(exc)

    spinner.thread = threading.Thread(target=run, daemon=True)
    spinner.thread.start()
    assert spinner.begun.wait(10)
    assert spinner.hooked_at_start is False
    assert gate.close(timeout=10)
    spinner.thread.join(10)
    assert not spinner.thread.is_alive()
    assert len(ended) == 1
    assert gate.working == 0


@pytest.mark.parametrize("run", range(2))
def test_a_script_exiting_while_gated_work_runs_torch_ops_exits_cleanly(
    tmp_path: Path, run: int
) -> None:
    # A daemon thread inside a torch op (GIL released) when the interpreter finalizes is
    # ended by pthread_exit, and the forced unwind through pybind11's noexcept GIL guard
    # aborts ("terminate called without an active exception", status 134). The gate's
    # atexit handler parks gated threads first. The script exits once both threads are
    # inside their gated blocks: a thread still in a torch op before its block (the gate
    # cannot see it) aborts the same way, and waiting for the first thread alone made
    # this test fail once in CI that way.
    script = tmp_path / "exit_during_work.py"
    script.write_text(
        textwrap.dedent(
            """
            import threading
            import torch
            from pwdaemon.serving.gate import GATE, GateClosed

            inside = threading.Semaphore(0)

            def work():
                try:
                    with GATE.background():
                        inside.release()
                        while True:  # no garbage: no collection ever hooks it
                            a = torch.empty_strided((128, 128), (128, 1))
                            torch.mm(a, a)
                except GateClosed:
                    pass  # as pwdaemon's own threads do

            for _ in range(2):
                threading.Thread(target=work, daemon=True).start()
            for _ in range(2):
                assert inside.acquire(timeout=30)
            """
        )
    )
    # The checkout first on the path: where pwdaemon is not installed, it still imports.
    root = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=120, env=env
    )
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-2000:])
    assert proc.stderr == ""
