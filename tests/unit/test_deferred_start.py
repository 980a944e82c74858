"""The engine starts once the model's first call has returned, not inside it.

Proves: `DeferredStart` calls its start once, when the first call's event is set, when
its wait runs out without one, or at once on `start_now`; a cancel before the start
means never, and its thread ends. End to end (fake executor, real engine and tracer):
`attach()` leaves the engine unstarted, the first call starts it once it has returned,
`flush()` starts it without a call, and a detach before any call starts nothing; in a
fresh interpreter, the event loop's backend is imported gated on the start's thread, not
by the loop thread while the next calls run.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import threading

import pytest
import torch
from torch import nn

import pwdaemon as pwd
from pwdaemon.engine import deferred_start
from pwdaemon.engine.deferred_start import DeferredStart
from pwdaemon.testing import FakeExecutor

TIMEOUT = 20.0
NEVER_S = 3600.0  # a wait that does not run out within a test


class Starts:
    def __init__(self) -> None:
        self.count = 0

    def __call__(self) -> None:
        self.count += 1


def _starter_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("pwdaemon-start-")]


def test_the_start_runs_once_when_the_first_call_returned(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(deferred_start, "FIRST_CALL_WAIT_S", NEVER_S)
    returned, starts = threading.Event(), Starts()
    deferred = DeferredStart(starts, returned, "t")
    assert not deferred.started.wait(0.05)
    returned.set()
    assert deferred.started.wait(TIMEOUT)
    deferred.start_now()  # started already: nothing more
    assert starts.count == 1


def test_the_start_runs_without_a_call_once_its_wait_ran_out(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(deferred_start, "FIRST_CALL_WAIT_S", 0.01)
    starts = Starts()
    deferred = DeferredStart(starts, threading.Event(), "t")
    assert deferred.started.wait(TIMEOUT)
    assert starts.count == 1


def test_a_cancel_before_the_start_means_never(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(deferred_start, "FIRST_CALL_WAIT_S", NEVER_S)
    returned, starts = threading.Event(), Starts()
    deferred = DeferredStart(starts, returned, "t")
    deferred.cancel(TIMEOUT)
    assert not _starter_threads()
    deferred.start_now()
    assert starts.count == 0
    assert not deferred.started.is_set()


@pytest.fixture
def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4)).eval()


def _attach_unstarted(model: nn.Module, monkeypatch: pytest.MonkeyPatch) -> pwd.Handle:
    """Attached with the default background trace and a start that waits for a call."""
    monkeypatch.setattr(deferred_start, "FIRST_CALL_WAIT_S", NEVER_S)
    handle = pwd.attach(model, executor=FakeExecutor(), store=False, trace="background")
    assert not handle.engine.started
    return handle


def test_attach_starts_the_engine_once_the_first_call_returned(
    model: nn.Module, monkeypatch: pytest.MonkeyPatch
) -> None:
    handle = _attach_unstarted(model, monkeypatch)
    try:
        with torch.inference_mode():
            model(torch.randn(3, 16))
        assert handle.engine.wait_started(TIMEOUT)
        assert handle.engine.started
    finally:
        handle.detach()
    assert not _starter_threads()


def test_flush_starts_the_engine_without_a_call(
    model: nn.Module, monkeypatch: pytest.MonkeyPatch
) -> None:
    handle = _attach_unstarted(model, monkeypatch)
    try:
        handle.engine.flush()
        assert handle.engine.started
    finally:
        handle.detach()


def test_a_detach_before_any_call_starts_nothing(
    model: nn.Module, monkeypatch: pytest.MonkeyPatch
) -> None:
    handle = _attach_unstarted(model, monkeypatch)
    handle.detach()
    assert not handle.engine.started
    assert not _starter_threads()


def test_an_inline_trace_starts_the_engine_at_attach(model: nn.Module) -> None:
    # The first call traces inline, for seconds: the engine's set-up overlaps it.
    handle = pwd.attach(model, executor=FakeExecutor(), store=False, trace="inline")
    try:
        assert handle.engine.started
    finally:
        handle.detach()


# A fresh interpreter (anyio's backend is imported in this one already): who imports the
# loop's backend first, and whether that thread runs gated.
_FIRST_BACKEND_IMPORT = textwrap.dedent(
    """
    import json, sys, threading
    import torch
    import pwdaemon as pwd
    from pwdaemon.engine import loop
    from pwdaemon.serving.gate import GATE
    from pwdaemon.testing import FakeExecutor

    seen = []

    class Watch:
        def find_spec(self, name, path=None, target=None):
            if name == loop._LOOP_BACKEND and not seen:
                seen.append([threading.current_thread().name, GATE.gates_this_thread()])
            return None

    assert loop._LOOP_BACKEND not in sys.modules
    sys.meta_path.insert(0, Watch())
    model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.ReLU())
    handle = pwd.attach(model, executor=FakeExecutor(), store=False, trace="background")
    with torch.inference_mode():
        model(torch.randn(3, 16))
    assert handle.engine.wait_started(60.0)
    handle.detach()
    print(json.dumps(seen))
    """
)


def test_the_loop_backend_is_imported_gated_before_the_loop_thread_starts() -> None:
    # Imported by the loop thread (not gated), those ~13 ms of imports shared the GIL
    # with the second call after attach(): Llama's took 10.8 ms against 2 ms.
    proc = subprocess.run(
        [sys.executable, "-c", _FIRST_BACKEND_IMPORT],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(seen) == 1, seen
    thread_name, gated = seen[0]
    assert thread_name.startswith("pwdaemon-start-"), seen
    assert gated, seen
