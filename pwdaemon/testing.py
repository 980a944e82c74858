"""Fakes and fault injection for tests of code that uses pwdaemon (and of pwdaemon).

`FakeExecutor` stands in for the worker-process pool: it "compiles" in-process by
running the shipped graph eagerly, in microseconds, and can be told to fail, hang on a
gate, or tag its runnables so a test can see which one served a call. It is in addition
to the real path (real Inductor in real workers), which pwdaemon's own tests also run.

`inject_fault` makes the next compiles of one target fail, on either path: the fault
travels in the job (`JobSpec.fault`) to the executor, and a real worker process acts
it out (raises, dies, or hangs past the job timeout).

`wait_for_prewarm` is for a test suite's teardown: the first `attach()` of a process
starts the loader's pre-warm, which imports Inductor on a thread of its own, creating
loggers while pytest's logging plugin may be walking them ("dictionary changed size
during iteration" in a later test's teardown, about 1 run in 4 of two of our files).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from pwdaemon.workers.compiler import JobSpec, Target
from pwdaemon.workers.process import CompileError
from pwdaemon.workers.shipping import load_graph

if TYPE_CHECKING:
    from pwdaemon.handle import Handle

__all__ = ("FAULTS", "FakeExecutor", "inject_fault", "wait_for_prewarm")

FAULTS = ("raise", "crash", "hang")
"""What a worker does with an injected fault: raise in the compile, die mid-job
(reported as crashed), or hang until the job timeout kills it (reported as timeout)."""


def inject_fault(handle: Handle, label: str, fault: str, *, times: int = 1 << 30) -> None:
    """Make the next `times` compiles of target `label` ("size:3", "general",
    "range:1-16") of `handle`'s model fail with `fault` (one of `FAULTS`).

    Every compile attempt counts, retries included; the default is every one.
    """
    if fault not in FAULTS:
        raise ValueError(f"fault must be one of {', '.join(FAULTS)}, got {fault!r}")
    if times < 0:
        raise ValueError(f"times must be >= 0, got {times}")
    Target.parse(label)  # a typo would otherwise inject nothing, silently
    handle.engine.runner.faults.arm(label, fault, times)


class FakeExecutor:
    """An in-process executor: jobs return the graph's eager forward as the "artifact".

    - `fail`: target label ("general", "size:8", "range:1-16") -> outcome to raise
      (failed | crashed | timeout), every time; or (outcome, reason) to raise with the
      worker's reason as given (a refused or unlowerable general, say).
    - `gate`: when given, every job waits for it (up to the job timeout) before
      finishing, so a test can hold compiles "in flight".
    - `transform(target, runnable) -> runnable`: wrap what a job returns (e.g. add a
      constant so the test sees which runnable served).
    """

    def __init__(
        self,
        *,
        fail: Mapping[str, str | tuple[str, str]] | None = None,
        gate: threading.Event | None = None,
        transform: Callable[[Target, Callable[..., Any]], Callable[..., Any]] | None = None,
        seconds: float = 0.0,
    ) -> None:
        self.fail = dict(fail or {})
        self.gate = gate
        self.transform = transform
        self.seconds = seconds
        self.restarts = 0
        self.jobs: list[Target] = []
        self._lock = threading.Lock()

    def start(self) -> None:
        """Nothing to start: jobs run in the calling thread."""
        pass

    def run(self, spec: JobSpec, timeout: float) -> dict[str, Any]:
        """Run one job in-process: act out `spec.fault`, wait on the gate, fail or "compile"."""
        with self._lock:
            self.jobs.append(spec.target)
        if spec.fault == "raise":
            raise CompileError("failed", "RuntimeError: injected compile failure")
        if spec.fault == "crash":
            self.restarts += 1
            raise CompileError("crashed", "worker died mid-job (killed by signal 9)")
        if spec.fault == "hang":
            raise CompileError("timeout", f"compile did not finish within {timeout:g} s")
        if self.gate is not None and not self.gate.wait(timeout):
            raise CompileError("timeout", f"compile did not finish within {timeout:g} s")
        failure = self.fail.get(spec.target.label)
        if isinstance(failure, tuple):
            raise CompileError(*failure)
        if failure is not None:
            raise CompileError(failure, f"injected {failure} for {spec.target.label}")
        gm, _ = load_graph(spec.graph)  # under the pickler's lock, as a real ship is
        gm.recompile()
        runnable: Callable[..., Any] = gm.forward
        if self.transform is not None:
            runnable = self.transform(spec.target, runnable)
        return {"runnable": runnable, "seconds": self.seconds}

    def pids(self) -> list[int]:
        """No worker processes."""
        return []

    def close(self, timeout: float) -> None:
        """Open the gate so no job stays blocked."""
        if self.gate is not None:
            self.gate.set()


def wait_for_prewarm(timeout: float = 120.0) -> bool:
    """Wait until the loader's pre-warm (started by the process's first attach, or by
    `pwdaemon.prewarm()`) has ended; True if it has, or never started.

    Call it before a test's teardown, where pytest's logging plugin walks every logger:
    in a conftest, `@pytest.hookimpl(wrapper=True, tryfirst=True)` on
    `pytest_runtest_teardown`, calling this before `yield` (pwdaemon's own conftest does).
    """
    from pwdaemon.workers import prewarm

    thread = prewarm.started()
    if thread is None:
        return True
    thread.join(timeout)
    return not thread.is_alive()
