"""Long-lived compile worker processes: spawned, kept warm, niced, killed when stuck.

Compiles run in other processes, never in a thread of the serving process: dynamo holds
a global compile lock and Inductor config patches are process-global (DESIGN.md). Each
worker imports torch once and then serves jobs over a pipe. A job that outlives its
timeout, or a worker that dies, costs that worker: it is killed and replaced, and the
job fails with a reason a person can read.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing as mp
import os
import signal
import threading
import traceback
from collections.abc import Mapping
from multiprocessing.connection import Connection
from typing import Any

from pwdaemon.workers.compiler import JobSpec

log = logging.getLogger("pwdaemon.worker")


class CompileError(Exception):
    """A job did not produce an artifact; `outcome` is failed | crashed | timeout."""

    def __init__(self, outcome: str, reason: str) -> None:
        super().__init__(f"{outcome}: {reason}")
        self.outcome = outcome
        self.reason = reason


def _worker_main(conn: Connection, niceness: int, env: Mapping[str, str]) -> None:
    os.environ.update(env)
    if niceness:
        with contextlib.suppress(OSError):
            os.nice(niceness)
    # A Ctrl-C in the terminal belongs to the serving process; it stops us.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # Imports paid once per worker, before it says ready, not inside the first job.
    import torch
    import torch._inductor.compile_fx
    import torch._inductor.standalone_compile
    import torch.fx._graph_pickler  # noqa: F401

    from pwdaemon.workers.compiler import compile_job

    conn.send(("ready", os.getpid()))
    while True:
        try:
            spec = conn.recv()
        except (EOFError, OSError):
            return
        if spec is None:
            return
        try:
            conn.send(("ok", compile_job(spec)))
        except BaseException as exc:
            tb = traceback.format_exc(limit=8)
            conn.send(("error", f"{type(exc).__name__}: {exc}", tb))


class Worker:
    """One worker process and its pipe. Not thread-safe: one job at a time."""

    def __init__(self, ctx: Any, niceness: int, env: Mapping[str, str]) -> None:
        self._ctx = ctx
        self._niceness = niceness
        self._env = dict(env)
        self.process: Any = None
        self._conn: Connection | None = None
        self._kill_lock = threading.Lock()

    def start(self, timeout: float = 120.0) -> None:
        parent, child = self._ctx.Pipe()
        proc = self._ctx.Process(
            target=_worker_main,
            args=(child, self._niceness, self._env),
            daemon=True,
            name="pwdaemon-worker",
        )
        proc.start()
        child.close()
        self.process, self._conn = proc, parent
        # close() on another thread (a detach) may shut the pipe while we wait: that is
        # an OSError here, reported as a failed start, never an unhandled error.
        try:
            started = parent.poll(timeout)
        except OSError as exc:
            self.kill()
            raise CompileError("cancelled", f"worker start interrupted: {exc}") from exc
        if not started:
            self.kill()
            raise CompileError("crashed", f"worker did not start within {timeout:.0f} s")
        try:
            parent.recv()
        except (EOFError, OSError) as exc:
            self.kill()
            raise CompileError("crashed", f"worker exited at start (code {proc.exitcode})") from exc

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def alive(self) -> bool:
        return self.process is not None and self.process.is_alive()

    def run(self, spec: JobSpec, timeout: float) -> dict[str, Any]:
        """Run one job; raises CompileError. Blocking: call from a worker thread."""
        conn = self._conn
        if conn is None or not self.alive():
            raise CompileError("crashed", "worker is not running")
        try:
            conn.send(spec)
            if not conn.poll(timeout):
                self.kill()
                raise CompileError("timeout", f"compile did not finish within {timeout:g} s")
            msg = conn.recv()
        except (EOFError, OSError, BrokenPipeError) as exc:
            code = self.process.exitcode if self.process is not None else None
            if self.process is not None:
                self.process.join(5)
                code = self.process.exitcode
            self.kill()
            how = f"killed by signal {-code}" if code is not None and code < 0 else f"exit {code}"
            raise CompileError("crashed", f"worker died mid-job ({how})") from exc
        if msg[0] == "ok":
            result: dict[str, Any] = msg[1]
            return result
        raise CompileError("failed", msg[1])

    def stop(self, timeout: float = 5.0) -> None:
        conn, proc = self._conn, self.process
        if conn is not None:
            with contextlib.suppress(OSError, BrokenPipeError):
                conn.send(None)
        if proc is not None:
            proc.join(timeout)
        self.kill()

    def kill(self) -> None:
        # Called from the job's thread and from close() on another: idempotent.
        with self._kill_lock:
            proc, conn = self.process, self._conn
            self._conn = None
            if proc is not None and proc.is_alive():
                proc.kill()
                proc.join(10)
            if conn is not None:
                with contextlib.suppress(OSError):
                    conn.close()


class WorkerPool:
    """A fixed number of warm workers; a dead one is replaced on its next job."""

    def __init__(
        self, size: int, *, niceness: int, env: Mapping[str, str], start_method: str = "spawn"
    ) -> None:
        self._ctx = mp.get_context(start_method)
        self._niceness = niceness
        self._env = dict(env)
        self._idle: list[Worker] = []
        self._all: list[Worker] = []
        self._lock = threading.Lock()
        self.size = size
        self.restarts = 0
        self.closed = False

    def _new(self) -> Worker:
        w = Worker(self._ctx, self._niceness, self._env)
        with self._lock:
            self._all.append(w)
        w.start()
        return w

    def checkout(self) -> Worker:
        """An idle warm worker, a restarted one, or a new one (blocking)."""
        with self._lock:
            if self.closed:
                raise CompileError("cancelled", "worker pool is closed")
            w = self._idle.pop() if self._idle else None
        if w is not None and w.alive():
            return w
        if w is not None:
            with self._lock:
                self.restarts += 1
                self._all.remove(w)
        return self._new()

    def checkin(self, w: Worker) -> None:
        """Return a worker after a job; a dead one is replaced at once, kept warm."""
        with self._lock:
            closed = self.closed
            if not closed and w.alive():
                self._idle.append(w)
                return
            if w in self._all:
                self._all.remove(w)
            if not closed:
                self.restarts += 1
        w.kill()
        if closed:
            return
        try:
            replacement = self._new()
        except CompileError as exc:
            log.warning("could not restart a compile worker: %s", exc)
            return
        self.checkin(replacement)

    def warm_up(self) -> None:
        """Start every worker now (torch import is paid before the first job)."""
        for _ in range(self.size):
            self.checkin(self._new())

    def pids(self) -> list[int]:
        with self._lock:
            return [w.pid for w in self._all if w.pid is not None and w.alive()]

    def close(self, timeout: float = 5.0) -> None:
        with self._lock:
            self.closed = True
            workers = list(self._all)
        for w in workers:
            w.stop(timeout)
