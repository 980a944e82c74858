"""The engine: one anyio loop on a daemon thread owns policy, job queue, workers, loads.

The serving thread never waits on anything here. It bumps the dispatchers' counters
and, when dynamo traces a new graph piece, appends it to a deque. A periodic tick
(`PolicyConfig.tick_s`, 50 ms by default) folds counters into the policy and queues
jobs (`planner.py`); runner tasks, one per worker, take the best ready job off the
queue (`queue.py`), compile it in a worker process, load and validate the result in a
thread, and publish it with one assignment (`runner.py`, `publish.py`). Waits and
callbacks are in `waiters.py`, status and metrics in `report.py`.

Threads: the caller's (attach, detach, `flush`, `wait`, `status`), serving threads
(`add_piece`, and CUDA-graph capture handed to them by `graphs.py`), the loop thread
(everything that changes a job), worker threads the loop sends blocking work to, and
the store watcher's thread (`_on_store_event`, which only hands over to the loop).
"""

from __future__ import annotations

import collections
import contextlib
import importlib
import logging
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import anyio.from_thread
import anyio.to_thread

from pwdaemon.engine import report
from pwdaemon.engine.deferred_start import DeferredStart
from pwdaemon.engine.events import HandleStatus, PlanCompleteEvent, SwapEvent
from pwdaemon.engine.graphs import GraphCapture, wants_graph
from pwdaemon.engine.jobs import (
    Counters,
    Job,
    JobReason,
    JobSource,
    JobState,
    PieceState,
    PriorityBand,
)
from pwdaemon.engine.options import AttachOptions
from pwdaemon.engine.planner import Planner
from pwdaemon.engine.publish import Publisher
from pwdaemon.engine.queue import JobQueue
from pwdaemon.engine.runner import Runner
from pwdaemon.engine.store_link import parse_target
from pwdaemon.engine.torch_thread import run_gated
from pwdaemon.engine.waiters import Waiters
from pwdaemon.metrics.stats import ModelMetrics
from pwdaemon.serving.gate import GATE, GateClosed, GateHold
from pwdaemon.serving.piece import GraphPiece
from pwdaemon.serving.range_table import Tier
from pwdaemon.serving.strategy import ShapeStrategy
from pwdaemon.workers.executor import Executor, ProcessExecutor
from pwdaemon.workers.prewarm import prewarm

log = logging.getLogger(__name__)

# The module anyio imports for the loop `start()` runs (its default backend, asyncio).
_LOOP_BACKEND = "anyio._backends._asyncio"
# How often the tick re-reads the store's size on disk (a directory walk) for metrics.
_STORE_STATS_EVERY_S = 5.0


class Engine:
    """Background compilation for the graph pieces of one attached model: the life
    cycle, the loop and its tick; the parts do the rest."""

    def __init__(
        self,
        options: AttachOptions,
        trace: report.TraceRecords | None = None,
        on_strategy_failed: Callable[[ShapeStrategy, str], None] | None = None,
    ) -> None:
        """`trace`: the tracer's records, read-only, for status and metrics (the handle
        passes its tracer; the engine never changes it). `on_strategy_failed(strategy,
        why)`: remember a strategy whose general compile failed, for the model's next
        start (the handle passes its store's memory, which never raises)."""
        self.options = options
        self.trace = trace
        self.name = options.name
        self.policy = options.policy
        self.config = options.compiler
        self.graphs = options.graphs
        self.store = options.store
        env = self.store.store.inductor_env() if self.store is not None else {}
        self.executor: Executor = (
            options.executor if options.executor is not None else ProcessExecutor(self.config, env)
        )
        self.closed = False
        self._deferred: DeferredStart | None = None
        # Traced pieces, appended by a serving thread, planned by the tick (deque
        # append and popleft are atomic: no lock between the two threads).
        self._new_pieces: collections.deque[GraphPiece] = collections.deque()
        self._pieces: list[PieceState] = []
        self.counters = Counters()
        self.queue = JobQueue()
        self.waiters = Waiters(
            self.name,
            self._pieces,
            planning=lambda: bool(self._new_pieces),
            call_soon=self._call_soon,
            wants_graph=lambda st: wants_graph(self.graphs, st.piece),
            settled_on_nothing=lambda: (
                self.trace is not None and self.trace.settled and not self.trace.pieces
            ),
        )
        self.planner = Planner(
            self.policy,
            self.config,
            options.sizes,
            options.ranges,
            self.store,
            self._pieces,
            self.queue,
            self.counters,
        )
        self.publisher = Publisher(
            self.config, self.graphs, self.queue, self.waiters, self.counters, lambda: self.closed
        )
        self.publisher.on_strategy_failed = on_strategy_failed
        self.graph_capture = GraphCapture(self.graphs, self.queue, self.publisher)
        self._workdir = Path(tempfile.mkdtemp(prefix="pwdaemon-"))
        self.runner = Runner(
            self.name,
            self.config,
            self.executor,
            self.store,
            self._pieces,
            self.queue,
            self.publisher,
            self.graph_capture,
            self.counters,
            self._workdir,
        )
        self._watcher: Any = None
        self._plan_hold: GateHold | None = None
        self._store_stats = (0, 0)
        self._store_stats_at = 0.0
        self._portal_cm: AbstractContextManager[anyio.from_thread.BlockingPortal] | None = None
        self._portal: anyio.from_thread.BlockingPortal | None = None
        self._main_future: Any = None
        self._closing: anyio.Event | None = None
        self._tg: anyio.abc.TaskGroup | None = None
        self._loop_thread: int | None = None
        # Pieces judged for "on eager after the plan" (loop thread): each warned once.
        self._eager_checked: set[int] = set()
        self.waiters.on_plan_complete(self._log_plan_complete)

    # ---- counters read by tests, the bench and the metrics (same objects) -----------

    @property
    def jobs_by_outcome(self) -> collections.Counter[tuple[str, str]]:
        """(target kind, outcome) -> jobs; outcome "ok" for a publish."""
        return self.counters.jobs_by_outcome

    @property
    def rejects_by_reason(self) -> collections.Counter[str]:
        """Validation rejects by category (mismatch, nan, shape...)."""
        return self.counters.rejects_by_reason

    @property
    def loads_by_source(self) -> collections.Counter[str]:
        """Published runnables by `JobSource`."""
        return self.counters.loads_by_source

    @property
    def capture_pauses(self) -> list[float]:
        """Seconds serving threads spent capturing CUDA graphs, one per capture."""
        return self.graph_capture.pauses

    # ---- life cycle (caller's thread) ------------------------------------------------

    def start(self) -> None:
        """Start the loop thread and, with a store, its watcher."""
        # Held until the plan completes: every serving call from now on is counted, so
        # the gated work the loop starts (the loader's set-up, the trace, loads) parks
        # for calls already in progress when it begins (`pwdaemon.serving.gate`). Taken
        # at attach already where the start waits for the first call.
        if self._plan_hold is None:
            self._plan_hold = GateHold(GATE, expect_call=True)
        self._portal_cm = anyio.from_thread.start_blocking_portal(name=f"pwdaemon-{self.name}")
        self._portal = self._portal_cm.__enter__()
        self._main_future = self._portal.start_task_soon(self._main)

    def start_after_first_call(self, first_call_returned: threading.Event) -> None:
        """`start()` once the model's first call has returned (the serving path sets
        `first_call_returned`), or soon after without one; at once on `wait` or `flush`.
        See `pwdaemon.engine.deferred_start` for why."""
        # The gate is held from now, not from the start: a call that begins before the
        # gate is held is never counted, so gated work the start begins during such a
        # call (a second call right after the first) would not park for it.
        self._plan_hold = GateHold(GATE, expect_call=True)
        self._deferred = DeferredStart(self._start_deferred, first_call_returned, self.name)

    def _start_deferred(self) -> None:
        # On the deferred-start thread, right after the first call returned, so the next
        # calls come while the loop starts. anyio imports its event-loop backend when
        # its first loop runs, on the loop thread, which is not gated: ~13 ms of
        # imports (`anyio._backends._asyncio`, its streams and sockets) that a second
        # call 10 ms after the first shared the GIL with (Llama: 10.8 ms against 2 ms).
        # Imported here first, gated, they park while a call runs. (An anyio whose backend
        # lives elsewhere imports it on the loop thread, ungated, as before.)
        with GATE.background(), contextlib.suppress(ImportError):
            importlib.import_module(_LOOP_BACKEND)
        self.start()

    @property
    def started(self) -> bool:
        """Whether the loop has been started (by `start` or a deferred start)."""
        return self._portal is not None

    def wait_started(self, timeout: float) -> bool:
        """Block up to `timeout` until the loop has been started; whether it has."""
        if self._deferred is not None:
            return self._deferred.started.wait(timeout)
        return self.started

    def _start_if_deferred(self) -> None:
        if self._deferred is not None:
            self._deferred.start_now()

    def _start_watcher(self) -> None:
        # On a loop worker thread, not in attach(): importing watchdog and starting its
        # observer thread cost ~30 ms, a third of attach()'s whole budget. Gated: that
        # import, ungated, was what the first call after attach() shared the GIL with
        # in 8 of 8 slow first calls (16-48 ms against 7 ms).
        if not (self.options.watch_store and self.store is not None) or self.closed:
            return
        try:
            with GATE.background():
                self._watcher = self.store.store.watch(
                    self._on_store_event, polling=self.options.watch_polling
                )
        except OSError as exc:
            log.warning("pwdaemon: not watching the artifact store: %s", exc)

    def close(self, timeout: float = 10.0) -> None:
        """Stop everything: watcher, workers, loop; unfinished jobs end cancelled."""
        if self.closed:
            return
        self.closed = True
        if self._deferred is not None:  # not started yet: it never will be
            self._deferred.cancel(timeout)
        if self._watcher is not None:
            self._watcher.stop(timeout)
        self._save_profiles()
        # Kill workers first: that unblocks any thread waiting on a job's pipe.
        self.executor.close(min(timeout, 5.0))
        if self._portal is not None:
            try:
                self._portal.call(self._request_stop)
                self._main_future.result(timeout)
            except Exception as exc:
                log.warning("pwdaemon engine did not stop cleanly: %s", exc)
            assert self._portal_cm is not None
            self._portal_cm.__exit__(None, None, None)
        if self._watcher is not None:  # started by the loop while this close began
            self._watcher.stop(timeout)
        # The loop is gone: this thread is the only one left changing jobs.
        with self.waiters.changing():
            for st in self._pieces:
                for job in st.jobs.values():
                    if not job.terminal:
                        job.state, job.reason = JobState.CANCELLED, "detached"
        if self._plan_hold is not None:
            self._plan_hold.release()
        shutil.rmtree(self._workdir, ignore_errors=True)

    def _save_profiles(self) -> None:
        if self.store is None:
            return
        for st in list(self._pieces):
            try:
                self.store.save_profile(st.piece, st.piece.histogram())
            except OSError as exc:
                log.warning("pwdaemon: could not save the size profile: %s", exc)

    def add_piece(self, piece: GraphPiece) -> None:
        """Called on the serving thread from the dynamo backend: an append, no more."""
        self._new_pieces.append(piece)

    def flush(self) -> None:
        """Run one tick on the loop now: counters folded into metrics and policy."""
        self._start_if_deferred()
        if self._portal is not None and not self.closed:
            self._portal.call(self._tick_now)

    # ---- the loop (loop thread) ----------------------------------------------------

    async def _request_stop(self) -> None:
        if self._closing is not None:
            self._closing.set()

    async def _main(self) -> None:
        self._loop_thread = threading.get_ident()
        self._closing = anyio.Event()
        self.queue.bind()
        try:
            async with anyio.create_task_group() as tg:
                self._tg = tg
                self.runner.bind(tg)
                # Started at attach: it overlaps dynamo's trace of the first call (the
                # one-time work is mostly a compiler subprocess and file hashing).
                tg.start_soon(self._prewarm_loader)
                tg.start_soon(anyio.to_thread.run_sync, self._start_watcher)
                if self.store is None:
                    # With a store, workers start on the first compile actually needed, so a
                    # warm restart spends no CPU on starting processes it will not use.
                    tg.start_soon(self.runner.start_executor)
                tg.start_soon(self._tick_loop)
                for _ in range(self.config.workers):
                    tg.start_soon(self.runner.run_forever)
                await self._closing.wait()
                tg.cancel_scope.cancel()
        except* GateClosed:
            # The interpreter exits with a job under way (a script that ends without
            # detach): `ServingGate.close` raised this in its gated work, and the
            # task group cancelled the rest. Nothing to report (asyncio printed each
            # task's traceback, ~150 lines, at every such exit).
            pass

    async def _prewarm_loader(self) -> None:
        # The first artifact load pays ~3 s of one-time set-up; see `prewarm`.
        await anyio.to_thread.run_sync(prewarm().join, abandon_on_cancel=True)

    async def _tick_loop(self) -> None:
        while True:
            try:
                self._tick(time.monotonic())
            except Exception:
                log.exception("pwdaemon tick failed")
            await anyio.sleep(self.policy.tick_s)

    async def _tick_now(self) -> None:
        self._tick(time.monotonic())

    def _tick(self, now: float) -> None:
        while self._new_pieces:
            self.planner.plan(self._new_pieces.popleft(), self._tg)
        self.planner.tick(now)
        self.waiters.check_plan_complete()
        if self.waiters.plan_done:
            if self._plan_hold is not None:
                self._plan_hold.release()
            report.warn_on_eager(self.name, self._pieces, self._eager_checked)
        if self.store is not None and now - self._store_stats_at > _STORE_STATS_EVERY_S:
            self._store_stats_at = now
            with contextlib.suppress(OSError):
                self._store_stats = self.store.store.stats()

    def _log_plan_complete(self, event: PlanCompleteEvent) -> None:
        log.info(
            "pwdaemon: %s: plan complete after %.1f s: %d live, %d failed",
            self.name,
            event.seconds_since_attach,
            event.live,
            event.failed,
        )

    def _call_soon(self, fn: Callable[[], None]) -> None:
        """Run `fn` on the loop thread soon (from any thread); dropped once closed."""
        if self._portal is not None and not self.closed:
            with contextlib.suppress(RuntimeError):  # the loop is shutting down
                self._portal.start_task_soon(self._run_soon, fn)

    @staticmethod
    async def _run_soon(fn: Callable[[], None]) -> None:
        fn()

    # ---- artifacts other processes publish -----------------------------------------

    def _on_store_event(self, digest: str, path: Path) -> None:
        # On the watcher's thread: hand over to the loop, never load here.
        if self._portal is not None and not self.closed:
            # A RuntimeError here means the loop is shutting down.
            with contextlib.suppress(RuntimeError):
                self._portal.start_task_soon(self._peer_artifact, digest)

    async def _peer_artifact(self, digest: str) -> None:
        assert self.store is not None
        manifest = await run_gated(self.store.store.manifest, digest)
        if manifest is None:
            return
        target = parse_target(manifest.key.target)
        if target is None:
            return
        for st in self._pieces:
            probe = self.store.key(st.piece, target)
            if probe.digest != digest:
                continue
            job = st.jobs.get(target.label)
            if job is not None and job.state in (JobState.LIVE, JobState.COMPILING):
                return  # ours is live, or ours will be (the claim kept the peer out)
            if job is None:
                job = st.add(Job(st.piece, target, JobReason.PEER, (PriorityBand.STORE, 0)))
            elif job.state is JobState.QUEUED:
                self.queue.remove(job)
            await self.runner.load_stored(st, job, probe, JobSource.PEER)
            return

    # ---- API used by the handle (any thread) -----------------------------------------

    def on_swap(self, cb: Callable[[SwapEvent], None]) -> None:
        """Call `cb(event)` once per published runnable (on the loop thread)."""
        self.waiters.on_swap(cb)

    def on_plan_complete(self, cb: Callable[[PlanCompleteEvent], None]) -> None:
        """Call `cb(event)` once every planned job has ended (on the loop thread)."""
        self.waiters.on_plan_complete(cb)

    def wait(
        self, sizes: Iterable[int] | None, timeout: float | None, tier: Tier | None = None
    ) -> bool:
        """See `Waiters.wait` (never call it on the loop thread: it blocks)."""
        self._start_if_deferred()
        return self.waiters.wait(sizes, timeout, tier)

    def status(self) -> HandleStatus:
        """Per graph piece: table version and every entry's tier, state, hits, timings."""
        if self._new_pieces and threading.get_ident() != self._loop_thread:
            # Traced but not planned yet (the next tick would): plan them now, so a status
            # taken right after a call shows the pieces that call traced. Not on the loop
            # thread (a callback asking for status), where a portal call would deadlock.
            with contextlib.suppress(RuntimeError):  # the loop is shutting down
                self.flush()
        return report.status(
            self.name,
            self._pieces,
            queue_depth=len(self.queue),
            in_flight=self.counters.in_flight,
            plan_complete=self.waiters.plan_done,
            worker_pids=self.executor.pids(),
            trace=self.trace,
        )

    def metrics_snapshot(self) -> ModelMetrics:
        """The model's metrics now (runs on the scraping thread)."""
        return report.metrics_snapshot(
            self.name,
            self._pieces,
            self.counters,
            queue_depth=len(self.queue),
            worker_restarts=self.executor.restarts,
            store_stats=self._store_stats,
            store_write_errors=self.store.store.write_errors if self.store is not None else 0,
            plan_complete=self.waiters.plan_done,
            trace=self.trace,
        )
