"""Executors: what runs a compile job. The engine sees only the `Executor` protocol.

`ProcessExecutor` is the real one (a pool of worker processes); `pwdaemon.testing` has
in-process fakes for fast tests of the scheduling logic.
"""

from __future__ import annotations

from typing import Any, Protocol

from pwdaemon.config import CompileConfig
from pwdaemon.workers.compiler import JobSpec
from pwdaemon.workers.process import CompileError, Outcome, WorkerPool, WorkerStarved


class Executor(Protocol):
    """Runs one compile job to a result dict: {"path"} or {"runnable"}, and "seconds"."""

    @property
    def restarts(self) -> int: ...

    def start(self) -> None: ...
    def run(self, spec: JobSpec, timeout: float) -> dict[str, Any]: ...
    def pids(self) -> list[int]: ...
    def close(self, timeout: float) -> None: ...


class ProcessExecutor:
    """The real executor: a pool of worker subprocesses (`workers.process`)."""

    def __init__(self, config: CompileConfig, env: dict[str, str] | None = None) -> None:
        self._pool = WorkerPool(
            config.workers,
            niceness=config.niceness,
            env=env or {},
            start_timeout=config.start_timeout_s,
            idle_priority=config.idle_priority,
            pausable=bool(config.pause_during_calls),
        )

    @property
    def restarts(self) -> int:
        return self._pool.restarts

    @property
    def starved(self) -> int:
        """Workers replaced for getting no CPU time (host busy), counted in `restarts` too."""
        return self._pool.starved

    def start(self) -> None:
        self._pool.warm_up()

    def run(self, spec: JobSpec, timeout: float) -> dict[str, Any]:
        # A job whose SCHED_IDLE worker starved runs again, on the worker the pool starts
        # in its place at its niceness; the timeout starts again too (a starved job
        # used almost no CPU). Bounded: each starvation retires one idle worker.
        for _ in range(self._pool.size + 1):
            worker = self._pool.checkout()
            try:
                return worker.run(spec, timeout)
            except WorkerStarved:
                self._pool.starved_now(worker.pid)
            finally:
                self._pool.checkin(worker)
        raise CompileError(Outcome.CRASHED, "compile workers got no CPU time (host busy)")

    def pids(self) -> list[int]:
        return self._pool.pids()

    def close(self, timeout: float) -> None:
        self._pool.close(timeout)
