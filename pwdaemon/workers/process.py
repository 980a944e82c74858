"""Long-lived compile worker processes: plain subprocesses, kept warm, niced, killed when stuck.

Compiles run in other processes, never in a thread of the serving process: dynamo holds
a global compile lock and Inductor config patches are process-global (DESIGN.md). Each
worker is `python -m pwdaemon.workers.main` started with `subprocess`, not
multiprocessing: spawn re-runs the user's `__main__` script in the child (a script
without a main guard never gets a worker) and leaves a resource-tracker process and
"leaked semaphore" warnings behind. Jobs and replies travel as `framing` frames over two
pipes of their own.

A job that outlives its timeout, or a worker that dies, costs that worker: its process
group is killed and the pool replaces it; the job fails with a reason a person can read.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pwdaemon.serving.pause import PAUSE
from pwdaemon.workers import starvation
from pwdaemon.workers.compiler import JobSpec
from pwdaemon.workers.framing import Frame, FrameError, PeerClosed, encode, fd_writer, read_frame
from pwdaemon.workers.starvation import CHECK_S, StarvationWatch

log = logging.getLogger(__name__)

# Lowers the priority before anything imports torch: `python -m pwdaemon.workers.main`
# would import the `pwdaemon` package (and torch, ~2 s of CPU) at full priority first.
# `-P`: the user's working directory is not put on the worker's import path.
# SCHED_IDLE (Linux): the worker, its threads and its compiler subprocesses run only on
# CPU time nothing else wants. Niceness alone is not enough beside OpenMP: a nice-10
# worker holding one of 2 cores made a serving thread's layer_norm wait for its OpenMP
# partner thread (median call 0.05 -> 2-8 ms while compiles ran).
_BOOTSTRAP = """\
import os, sys
nice = int(sys.argv.pop(1))
if sys.argv.pop(1) == "idle":
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    except (AttributeError, OSError):
        pass
if nice:
    try:
        os.nice(nice)
    except OSError:
        pass
import runpy
runpy.run_module("pwdaemon.workers.main", run_name="__main__", alter_sys=True)
"""

# The directory that holds the `pwdaemon` package, put first on the worker's PYTHONPATH
# so that it imports the same pwdaemon as this process (a checkout, a path added at run
# time) whatever its working directory.
_PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])
_STOP = encode("stop")
# After a worker starved, new workers start at the pool's niceness instead of SCHED_IDLE
# for this long: a host that stayed busy for a whole starvation window is likely to stay
# busy, and every idle worker that starves again costs a window and a start.
BOOST_HOLD_S = 300.0


class Outcome(enum.StrEnum):
    """Why a job produced no artifact (a str: compares equal to "failed", ...)."""

    FAILED = "failed"  # the compile raised in the worker
    CRASHED = "crashed"  # the worker died (or never started)
    TIMEOUT = "timeout"  # the compile outlived its timeout; the worker was killed
    CANCELLED = "cancelled"  # the pool was closed (detach) while the job ran


class CompileError(Exception):
    """A job did not produce an artifact; `outcome` is an `Outcome`.

    `traceback` is the worker's traceback for a failed compile ("" otherwise).
    """

    def __init__(self, outcome: Outcome | str, reason: str, traceback: str = "") -> None:
        outcome = Outcome(outcome)
        super().__init__(f"{outcome}: {reason}")
        self.outcome = outcome
        self.reason = reason
        self.traceback = traceback


class _Deadline(Exception):
    """No complete frame arrived before the deadline."""


class WorkerStarved(Exception):
    """An idle-priority worker got (almost) no CPU for a whole window; it was killed.

    Never leaves the pool: the job runs again on a worker at the pool's niceness.
    """


def _exit_text(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        try:
            return f"killed by signal {-code} ({signal.Signals(-code).name})"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit {code}"


def _stdout_target() -> int:
    # The worker's stdout: our stderr, so a stray print in a compile shows where warnings
    # do; /dev/null when this process has no stderr (a daemon).
    try:
        os.fstat(2)
    except OSError:
        return subprocess.DEVNULL
    return 2


def _lift_out_of_idle(pid: int) -> None:
    """Best effort: move a SCHED_IDLE worker's threads to SCHED_OTHER before a kill.

    A killed task still needs CPU time to exit; starved under SCHED_IDLE, a worker took
    ~10 s to die on a busy host. Only a privileged process may lift another out of
    SCHED_IDLE (RLIMIT_NICE); otherwise nothing changes and the kill just takes longer.
    """
    if not hasattr(os, "SCHED_OTHER"):
        return
    try:
        tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except OSError:
        return
    for tid in tids:
        with contextlib.suppress(OSError):
            os.sched_setscheduler(tid, os.SCHED_OTHER, os.sched_param(0))


class Worker:
    """One worker process and its two pipes. One job at a time (the pool ensures it).

    Threads: `start` and `run` are called on a job thread; `stop`/`kill` may come from
    another thread (a detach) at any time. Only the job thread closes the pipe fds while
    it uses them; another thread only kills the process, which the job thread then sees
    as the end of its pipe.
    """

    def __init__(
        self,
        niceness: int,
        env: Mapping[str, str],
        *,
        idle_priority: bool = False,
        pausable: bool = False,
    ) -> None:
        self._niceness = niceness
        self._idle_priority = idle_priority
        # Stopped during serving calls (`pwdaemon.serving.pause`): SCHED_IDLE workers
        # only. They share the serving process's session, so if it dies while they are
        # stopped, their group is orphaned with stopped members and the kernel sends it
        # SIGHUP and SIGCONT (they exit). A worker in a session of its own (one that
        # replaced a starved worker) would stay stopped for ever.
        self._pausable = pausable and idle_priority
        self._env = dict(env)
        self.process: subprocess.Popen[bytes] | None = None
        self._job_fd = -1  # we write jobs here
        self._result_fd = -1  # we read replies here
        self._lock = threading.Lock()
        self._busy = False
        self._closing = False
        self.start_seconds: float | None = None

    @property
    def idle_priority(self) -> bool:
        """Runs under SCHED_IDLE (and is watched for starvation)."""
        return self._idle_priority

    def _watch(self) -> StarvationWatch | None:
        # Only SCHED_IDLE workers can starve for good; a niced one always gets a share.
        proc = self.process
        if not self._idle_priority or proc is None:
            return None
        # Its own process group (process_group=0); time it spent stopped for serving
        # calls is not time it was denied.
        stopped = PAUSE.stopped_seconds if self._pausable else None
        return StarvationWatch(proc.pid, stopped=stopped)

    # ---- start ---------------------------------------------------------------------

    def _command(self, job_fd: int, result_fd: int) -> list[str]:
        if not sys.executable:
            raise CompileError(
                Outcome.CRASHED,
                "cannot start a compile worker: sys.executable is empty (embedded Python)",
            )
        return [
            sys.executable,
            "-P",
            "-c",
            _BOOTSTRAP,
            str(self._niceness),
            "idle" if self._idle_priority else "normal",
            "--job-fd",
            str(job_fd),
            "--result-fd",
            str(result_fd),
            "--parent-pid",
            str(os.getpid()),
        ]

    def _environ(self) -> dict[str, str]:
        env = {**os.environ, **self._env}
        path = env.get("PYTHONPATH")
        env["PYTHONPATH"] = _PACKAGE_ROOT + (os.pathsep + path if path else "")
        return env

    def start(self, timeout: float) -> None:
        """Start the process and wait (at most `timeout` s) for its ready frame."""
        t0 = time.monotonic()
        job_r, job_w = os.pipe()
        res_r, res_w = os.pipe()
        try:
            with self._lock:
                if self._closing:
                    raise CompileError(Outcome.CANCELLED, "worker pool is closed")
                # The lock makes "closed" and "has a process" one step for stop(): a
                # detach during start kills what we start, never leaves it running.
                self.process = subprocess.Popen(
                    self._command(job_r, res_w),
                    stdin=subprocess.DEVNULL,
                    stdout=_stdout_target(),
                    env=self._environ(),
                    pass_fds=(job_r, res_w),
                    # Own process group: a Ctrl-C at the terminal goes to the serving
                    # process (the foreground group), which stops us; one killpg also
                    # takes any processes Inductor starts inside a worker. Session: with
                    # the kernel's autogroup scheduling, sessions share the CPU as
                    # groups, whatever the policies inside them. A SCHED_IDLE worker
                    # stays in the serving session, so it really yields to serving; any
                    # other worker (one replacing a starved worker, or idle_priority
                    # off) gets a session of its own, hence a fair share: inside the
                    # serving session a nice-5 worker got ~14 % of a core beside a busy
                    # demo and compiled nothing in 150 s.
                    # (A new session is a new process group too; asking for both
                    # fails with EPERM.)
                    process_group=0 if self._idle_priority else None,
                    start_new_session=not self._idle_priority,
                )
                self._job_fd, self._result_fd = job_w, res_r
                self._busy = True
                if self._pausable:
                    PAUSE.add(self.process.pid)  # its start (torch's imports) too
        except BaseException as exc:
            os.close(job_w)
            os.close(res_r)
            if isinstance(exc, OSError):
                raise CompileError(
                    Outcome.CRASHED, f"cannot start a compile worker: {exc}"
                ) from exc
            raise
        finally:
            os.close(job_r)
            os.close(res_w)
        try:
            frame = self._read(time.monotonic() + timeout, self._watch())
        except WorkerStarved:
            self._fail_start()
            raise
        except _Deadline:
            self._fail_start()
            raise CompileError(
                Outcome.CRASHED, f"worker did not start within {timeout:g} s"
            ) from None
        except (PeerClosed, FrameError, OSError) as exc:
            code = self._fail_start()
            if self._closing:
                raise CompileError(Outcome.CANCELLED, "worker start interrupted") from exc
            raise CompileError(
                Outcome.CRASHED, f"worker exited at start ({_exit_text(code)}): {exc}"
            ) from exc
        if frame.type != "ready":
            self._fail_start()
            reason = frame.get("reason", frame.type)
            raise CompileError(
                Outcome.CRASHED, f"worker failed to start: {reason}", frame.get("traceback", "")
            )
        with self._lock:
            self._busy = False
        self.start_seconds = time.monotonic() - t0
        log.debug(
            "compile worker %s ready in %.2f s (imports and set-up %.2f s)",
            self.pid,
            self.start_seconds,
            float(frame.get("start_s", 0.0)),
        )

    def _fail_start(self) -> int | None:
        code = self.kill()
        self._close_fds()
        return code

    # ---- jobs ----------------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def run(self, spec: JobSpec, timeout: float) -> dict[str, Any]:
        """Run one job; raises CompileError. Blocking: call from a job thread.

        `timeout` bounds the compile only: the worker has started (and paid its imports)
        before a job is given to it.
        """
        try:
            data = spec.to_frame()
        except (TypeError, ValueError) as exc:
            raise CompileError(Outcome.FAILED, f"job cannot be sent to a worker: {exc}") from exc
        with self._lock:
            if self._closing:
                raise CompileError(Outcome.CANCELLED, "worker pool is closed")
            if self.process is None or self._result_fd < 0 or self.process.poll() is not None:
                raise CompileError(Outcome.CRASHED, "worker is not running")
            self._busy = True
        try:
            return self._exchange(data, spec, timeout)
        finally:
            with self._lock:
                self._busy = False
            if not self.alive():
                self._close_fds()

    def _exchange(self, data: bytes, spec: JobSpec, timeout: float) -> dict[str, Any]:
        try:
            fd_writer(self._job_fd)(data)
            frame = self._read(time.monotonic() + timeout, self._watch())
        except WorkerStarved:
            self.kill()
            raise
        except _Deadline:
            self.kill()
            raise CompileError(
                Outcome.TIMEOUT, f"compile did not finish within {timeout:g} s"
            ) from None
        except (PeerClosed, FrameError, OSError) as exc:
            # EOF or a broken pipe: the worker died (or was killed by a detach). A frame
            # error means it wrote garbage on the channel: it cannot be trusted either.
            code = self.kill()
            if self._closing:
                raise CompileError(Outcome.CANCELLED, "worker pool closed mid-job") from exc
            detail = f": {exc}" if isinstance(exc, FrameError) else ""
            raise CompileError(
                Outcome.CRASHED, f"worker died mid-job ({_exit_text(code)}){detail}"
            ) from exc
        if frame.type == "result":
            note = str(frame.get("note", ""))
            if note:
                log.warning(
                    "pwdaemon: %s compile in worker %s: %s", spec.target.label, self.pid, note
                )
            return {"path": str(frame.get("path")), "seconds": float(frame.get("seconds", 0.0))}
        reason = str(frame.get("reason", f"unexpected reply {frame.type!r}"))
        tb = str(frame.get("traceback", ""))
        log.info("compile of %s failed in worker %s:\n%s", spec.target.label, self.pid, tb)
        raise CompileError(Outcome.FAILED, reason, tb)

    def _read(self, deadline: float, watch: StarvationWatch | None = None) -> Frame:
        fd = self._result_fd
        poller = select.poll()  # poll, not select: fds past 1024 in a busy server
        poller.register(fd, select.POLLIN | select.POLLHUP | select.POLLERR)

        def wait_readable() -> None:
            # In slices of CHECK_S: between them, a watched worker is checked for
            # starvation (reading /proc, a few ms), raised as WorkerStarved.
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise _Deadline
                slice_s = left if watch is None else min(left, CHECK_S)
                if poller.poll(max(1, int(slice_s * 1000))):
                    return
                if watch is not None and watch.starved():
                    raise WorkerStarved

        def read_exact(n: int) -> bytes:
            chunks: list[bytes] = []
            left = n
            while left > 0:
                wait_readable()
                chunk = os.read(fd, left)
                if not chunk:
                    break
                chunks.append(chunk)
                left -= len(chunk)
            return b"".join(chunks)

        return read_frame(read_exact)

    # ---- stop ----------------------------------------------------------------------

    def stop(self, timeout: float = 5.0) -> None:
        """Ask an idle worker to exit (kill a busy one); never leaves a process behind."""
        with self._lock:
            self._closing = True
            busy, proc = self._busy, self.process
        if proc is None:
            return
        PAUSE.discard(proc.pid)  # continued first: a stopped worker cannot read "stop"
        if not busy and proc.poll() is None:
            with contextlib.suppress(OSError):
                fd_writer(self._job_fd)(_STOP)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout)
        self.kill()
        if not busy:
            self._close_fds()
        # A busy worker's job thread sees its pipe end and closes the fds itself.

    def kill(self) -> int | None:
        """SIGKILL the worker's process group and reap it; returns its exit code.

        Safe from any thread, idempotent.
        """
        proc = self.process
        if proc is None:
            return None
        PAUSE.discard(proc.pid)  # forgotten before its group id can be reused
        if self._idle_priority:
            _lift_out_of_idle(proc.pid)
        # The whole group: processes Inductor started inside the worker go too. The
        # group exists as long as any member does, even after the worker was reaped.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        try:
            return proc.wait(10)
        except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILL not delivered
            log.warning("compile worker %s did not die within 10 s of SIGKILL", proc.pid)
            return None

    def _close_fds(self) -> None:
        with self._lock:
            fds = (self._job_fd, self._result_fd)
            self._job_fd = self._result_fd = -1
        for fd in fds:
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)


class WorkerPool:
    """A fixed number of warm workers; a dead one is replaced on its next job.

    With `idle_priority`, workers run under SCHED_IDLE until one starves (`starvation`);
    then new workers start at `niceness` for `BOOST_HOLD_S`, and go back to SCHED_IDLE
    as they are replaced after that. A worker is unprivileged: it cannot leave
    SCHED_IDLE itself (RLIMIT_NICE), so a starved one is killed and started again.
    """

    def __init__(
        self,
        size: int,
        *,
        niceness: int,
        env: Mapping[str, str],
        start_timeout: float = 120.0,
        idle_priority: bool = False,
        pausable: bool = False,
    ) -> None:
        self._niceness = niceness
        self._idle_priority = idle_priority
        self._pausable = pausable
        self._env = dict(env)
        self._start_timeout = start_timeout
        self._idle: list[Worker] = []
        self._all: list[Worker] = []
        self._lock = threading.Lock()
        self.size = size
        self.restarts = 0
        self.starved = 0  # workers killed for getting no CPU (each also a restart)
        self._boost_until = 0.0
        self.closed = False

    def _idle_now(self) -> bool:
        return self._idle_priority and time.monotonic() >= self._boost_until

    def starved_now(self, pid: int | None) -> None:
        """Worker `pid` starved (and was killed): start the next ones at `niceness`."""
        with self._lock:
            first = time.monotonic() >= self._boost_until
            self.starved += 1
            self._boost_until = time.monotonic() + BOOST_HOLD_S
        (log.warning if first else log.debug)(
            "pwdaemon: compile worker %s got no CPU time for %g s under SCHED_IDLE (every "
            "core busy); compiles run at nice %d for the next %g s",
            pid,
            starvation.STARVED_WINDOW_S,
            self._niceness,
            BOOST_HOLD_S,
        )

    def _drop(self, w: Worker, *, restart: bool) -> None:
        """Forget a worker that is gone (or going); `restart`: count its replacement."""
        with self._lock:
            if w in self._all:
                self._all.remove(w)
            if restart:
                self.restarts += 1

    def _new(self) -> Worker:
        while True:
            w = Worker(
                self._niceness, self._env, idle_priority=self._idle_now(), pausable=self._pausable
            )
            with self._lock:
                if self.closed:
                    raise CompileError(Outcome.CANCELLED, "worker pool is closed")
                self._all.append(w)
            try:
                w.start(self._start_timeout)
            except CompileError:
                self._drop(w, restart=False)
                raise
            except WorkerStarved:
                self._drop(w, restart=True)
                self.starved_now(w.pid)
                continue  # the next one is not SCHED_IDLE: it never starves
            return w

    def checkout(self) -> Worker:
        """An idle warm worker, a restarted one, or a new one (blocking)."""
        with self._lock:
            if self.closed:
                raise CompileError(Outcome.CANCELLED, "worker pool is closed")
            w = self._idle.pop() if self._idle else None
        if w is not None and w.alive():
            return w
        if w is not None:
            self._drop(w, restart=True)
            w.kill()
        return self._new()

    def checkin(self, w: Worker) -> None:
        """Return a worker after a job; a dead one is replaced at once, kept warm."""
        with self._lock:
            closed = self.closed
            retire = not w.idle_priority and self._idle_now()  # the busy spell is over
            if not closed and w.alive() and not retire:
                self._idle.append(w)
                return
            if w in self._all:
                self._all.remove(w)
            if not closed and not retire:
                self.restarts += 1
        if retire:
            w.stop()
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
