"""The engine: one anyio loop on a daemon thread owns policy, job queue, workers, loads.

The serving thread never waits on anything here. It bumps the dispatchers' counters
and, when dynamo captures a new graph piece, appends it to a deque. A periodic tick
(`PolicyConfig.tick_s`, 50 ms by default) folds counters into the policy and queues
jobs; runner tasks, one per worker, take the best ready job, compile it in a worker
process, load and validate the result in a thread, and publish it with one assignment.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import heapq
import itertools
import logging
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import anyio.from_thread
import torch

from pwdaemon.config import CompileConfig, PolicyConfig
from pwdaemon.engine.events import (
    EntryStatus,
    HandleStatus,
    PieceStatus,
    PlanCompleteEvent,
    SwapEvent,
)
from pwdaemon.engine.policy import PiecePolicy
from pwdaemon.engine.store_link import StoreLink, parse_target, piece_device
from pwdaemon.engine.validation import reject_category, validate
from pwdaemon.metrics.stats import HistogramCounts, ModelMetrics, PieceMetrics
from pwdaemon.serving.cudagraph import GraphConfig, GraphPool
from pwdaemon.serving.cudagraph import capture as capture_graph
from pwdaemon.serving.inputs import is_caller_tensor
from pwdaemon.serving.range_table import Range, Target, TargetKind, Tier
from pwdaemon.serving.trace import GraphPiece, wrap_compiled
from pwdaemon.workers.compiler import JobSpec, dump_graph, load_artifact
from pwdaemon.workers.executor import Executor, ProcessExecutor
from pwdaemon.workers.prewarm import prewarm
from pwdaemon.workers.process import CompileError

log = logging.getLogger("pwdaemon")


# Engines of all attached models share the process-wide switch interval.
_switch_lock = threading.Lock()
_switch_users = 0
_switch_saved = 0.005


@dataclass
class Job:
    """One (graph piece, target) and its life: queued -> compiling -> live | failed."""

    piece: GraphPiece
    target: Target
    why: str  # general | configured | hot | profile
    priority: tuple[int, int]
    state: str = "queued"
    attempts: int = 0
    not_before: float = 0.0
    reason: str | None = None
    compile_seconds: float | None = None
    source: str | None = None
    hot_since: float | None = None
    hits: int = 0
    fault: str | None = None
    fault_times: int = 0
    skip_store: bool = False  # its stored artifact failed to load: compile instead

    @property
    def terminal(self) -> bool:
        return self.state in ("live", "failed", "dropped", "cancelled")


@dataclass
class PieceState:
    piece: GraphPiece
    policy: PiecePolicy
    jobs: dict[str, Job] = field(default_factory=dict)  # by target label
    last_hist: dict[int, int] = field(default_factory=dict)
    calls_by_tier: collections.Counter[str] = field(default_factory=collections.Counter)
    graph_bytes: bytes | None = None


class Engine:
    """Background compilation for the graph pieces of one attached model."""

    def __init__(
        self,
        name: str,
        *,
        policy: PolicyConfig,
        compile_config: CompileConfig,
        sizes: tuple[int, ...],
        ranges: tuple[Range, ...],
        executor: Executor | None = None,
        store: StoreLink | None = None,
        watch_store: bool = True,
        polling: bool = False,
        graphs: GraphConfig | None = None,
    ) -> None:
        self.name = name
        self.graphs = graphs or GraphConfig()
        self._graph_pool: Any = None
        self.capture_pauses: list[float] = []  # seconds a serving thread spent capturing
        self.store = store
        self._watch_store = watch_store and store is not None
        self._polling = polling
        self._watcher: Any = None
        self._store_stats = (0, 0)
        self._store_stats_at = 0.0
        self.policy = policy
        self.config = compile_config
        self.sizes = sizes
        self.ranges = ranges
        env = store.store.inductor_env() if store is not None else {}
        self.executor: Executor = (
            executor if executor is not None else ProcessExecutor(compile_config, env)
        )
        self.attached_at = time.monotonic()
        self._new_pieces: collections.deque[GraphPiece] = collections.deque()
        self._pieces: list[PieceState] = []
        self._heap: list[tuple[tuple[int, int], int, Job]] = []
        self._seq = itertools.count()
        self._in_flight = 0
        self._swap_callbacks: list[Callable[[SwapEvent], None]] = []
        self._plan_callbacks: list[Callable[[PlanCompleteEvent], None]] = []
        self._plan_event: PlanCompleteEvent | None = None
        self._cond = threading.Condition()
        self._workdir = Path(tempfile.mkdtemp(prefix="pwdaemon-"))
        self._faults: dict[str, tuple[str, int]] = {}
        # Metrics: plain counters, read at scrape time.
        self.jobs_by_outcome: collections.Counter[tuple[str, str]] = collections.Counter()
        self.failures_by_reason: collections.Counter[str] = collections.Counter()
        self.rejects_by_reason: collections.Counter[str] = collections.Counter()
        self.loads_by_source: collections.Counter[str] = collections.Counter()
        self.compile_hist = HistogramCounts()
        self.hot_to_swap_hist = HistogramCounts()
        self._portal_cm: AbstractContextManager[anyio.from_thread.BlockingPortal] | None = None
        self._portal: anyio.from_thread.BlockingPortal | None = None
        self._main_future: Any = None
        self._closing: anyio.Event | None = None
        self._wake: anyio.Event | None = None
        self._executor_ready: anyio.Event | None = None
        self._executor_starting = False
        self._tg: anyio.abc.TaskGroup | None = None
        self.closed = False

    # ---- life cycle (caller's thread) ------------------------------------------------

    def start(self) -> None:
        self._portal_cm = anyio.from_thread.start_blocking_portal(name=f"pwdaemon-{self.name}")
        self._portal = self._portal_cm.__enter__()
        self._main_future = self._portal.start_task_soon(self._main)
        if self._watch_store and self.store is not None:
            try:
                self._watcher = self.store.store.watch(self._on_store_event, polling=self._polling)
            except OSError as exc:
                log.warning("pwdaemon: not watching the artifact store: %s", exc)

    def close(self, timeout: float = 10.0) -> None:
        if self.closed:
            return
        self.closed = True
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
        with self._cond:
            for st in self._pieces:
                for job in st.jobs.values():
                    if not job.terminal:
                        job.state, job.reason = "cancelled", "detached"
            self._cond.notify_all()
        shutil.rmtree(self._workdir, ignore_errors=True)

    def _save_profiles(self) -> None:
        if self.store is None:
            return
        for st in list(self._pieces):
            try:
                self.store.save_profile(st.piece, st.piece.dispatcher.histogram())
            except OSError as exc:
                log.warning("pwdaemon: could not save the size profile: %s", exc)

    def _on_store_event(self, digest: str, path: Path) -> None:
        # On the watcher's thread: hand over to the loop, never load here.
        if self._portal is not None and not self.closed:
            # A RuntimeError here means the loop is shutting down.
            with contextlib.suppress(RuntimeError):
                self._portal.start_task_soon(self._peer_artifact, digest)

    async def _peer_artifact(self, digest: str) -> None:
        assert self.store is not None
        manifest = await anyio.to_thread.run_sync(self.store.store.manifest, digest)
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
            if job is not None and job.state in ("live", "compiling"):
                return  # ours is live, or ours will be (the claim kept the peer out)
            if job is None:
                job = Job(st.piece, target, "peer", (-1, 0))
                st.jobs[target.label] = job
            elif job.state == "queued":
                self._remove_queued(job)
            await self._load_stored(st, job, probe, "peer")
            return

    def _remove_queued(self, job: Job) -> None:
        kept = [item for item in self._heap if item[2] is not job]
        if len(kept) != len(self._heap):
            heapq.heapify(kept)
            self._heap = kept

    def flush(self) -> None:
        """Run one tick on the loop now: counters folded into metrics and policy."""
        if self._portal is not None and not self.closed:
            self._portal.call(self._tick_now)

    async def _tick_now(self) -> None:
        self._tick(time.monotonic())

    def add_piece(self, piece: GraphPiece) -> None:
        """Called on the serving thread from the dynamo backend: an append, no more."""
        self._new_pieces.append(piece)

    def inject_fault(self, target: str, fault: str, times: int = 1 << 30) -> None:
        """Testing hook: make jobs for `target` fail with `fault` (raise|crash|hang)."""
        self._faults[target] = (fault, times)

    # ---- the loop -------------------------------------------------------------------

    async def _request_stop(self) -> None:
        if self._closing is not None:
            self._closing.set()

    async def _main(self) -> None:
        self._closing = anyio.Event()
        self._wake = anyio.Event()
        self._executor_ready = anyio.Event()
        async with anyio.create_task_group() as tg:
            self._tg = tg
            # Started at attach: it overlaps dynamo's capture of the first call (the
            # one-time work is mostly a compiler subprocess and file hashing).
            tg.start_soon(self._prewarm_loader)
            if self.store is None:
                # With a store, workers start on the first compile actually needed, so a
                # warm restart spends no CPU on starting processes it will not use.
                tg.start_soon(self._start_executor)
            tg.start_soon(self._tick_loop)
            for _ in range(self.config.workers):
                tg.start_soon(self._runner)
            await self._closing.wait()
            tg.cancel_scope.cancel()

    async def _start_executor(self) -> None:
        assert self._executor_ready is not None
        self._executor_starting = True
        try:
            await anyio.to_thread.run_sync(self.executor.start, abandon_on_cancel=True)
        except CompileError as exc:
            log.warning("pwdaemon: compile workers did not start: %s", exc)
        finally:
            self._executor_ready.set()

    async def _prewarm_loader(self) -> None:
        # The first artifact load pays ~3 s of one-time set-up; see `_prewarm`.
        await anyio.to_thread.run_sync(prewarm().join, abandon_on_cancel=True)

    async def _tick_loop(self) -> None:
        while True:
            try:
                self._tick(time.monotonic())
            except Exception:
                log.exception("pwdaemon tick failed")
            await anyio.sleep(self.policy.tick_s)

    def _tick(self, now: float) -> None:
        while self._new_pieces:
            self._plan_piece(self._new_pieces.popleft())
        queue_len = len(self._heap)
        for st in self._pieces:
            self._account(st, now)
            if not st.piece.specializable:
                continue
            for size in st.policy.hot_candidates(queue_len, now):
                target = Target.size(size)
                job = Job(st.piece, target, "hot", (2, -st.policy.calls(size)))
                job.hot_since = st.policy.hot_since(size)
                st.policy.reserve([size])
                self._push(st, job)
        self._reprioritise()
        self._drop_cold(now)
        self._check_plan_complete()
        if self.store is not None and now - self._store_stats_at > 5.0:
            self._store_stats_at = now
            with contextlib.suppress(OSError):
                self._store_stats = self.store.store.stats()

    def _reprioritise(self) -> None:
        # A hot job's priority is its size's calls *now*, not when it was queued: under
        # queue pressure a size that kept getting hotter must not wait behind a cooler one.
        changed = False
        items = []
        for prio, seq, job in self._heap:
            if job.why == "hot":
                calls = self._state_of(job.piece).policy.calls(job.target.start)
                if (2, -calls) != prio:
                    job.priority, prio, changed = (2, -calls), (2, -calls), True
            items.append((prio, seq, job))
        if changed:
            heapq.heapify(items)
            self._heap = items

    def _account(self, st: PieceState, now: float) -> None:
        hist = st.piece.dispatcher.histogram()
        st.policy.observe(hist, now)
        table = st.piece.dispatcher.table
        for size, calls in hist.items():
            delta = calls - st.last_hist.get(size, 0)
            if delta <= 0:
                continue
            entry = table.lookup(size)
            st.calls_by_tier[entry.tier.value] += delta
            label = entry.info.get("target")
            if label is not None and label in st.jobs:
                st.jobs[label].hits += delta
        st.last_hist = hist

    def _plan_piece(self, piece: GraphPiece) -> None:
        st = PieceState(piece, PiecePolicy(self.policy))
        self._pieces.append(st)
        order = itertools.count()
        if self.store is not None and self._tg is not None:
            self._tg.start_soon(self._plan_from_store, st)
        if self.config.general:
            self._push(st, Job(piece, Target.general(), "general", (0, next(order))))
        if not piece.specializable:
            return
        for size in self.sizes[: self.policy.budget]:
            st.policy.reserve([size])
            self._push(st, Job(piece, Target.size(size), "configured", (1, next(order))))
        for r in self.ranges:
            self._push(st, Job(piece, Target.of_range(r), "configured", (1, next(order))))

    async def _plan_from_store(self, st: PieceState) -> None:
        """Warm restart: what the store holds for this piece first, then the sizes the
        last run found hot (compiled, or loaded if the store has them)."""
        assert self.store is not None
        stored = await anyio.to_thread.run_sync(self.store.stored_targets, st.piece)
        for i, target in enumerate(stored):
            job = st.jobs.get(target.label)
            if job is not None and job.state != "queued":
                continue
            if job is not None:
                self._remove_queued(job)
                job.priority = (-1, i)
            else:
                if target.kind is TargetKind.SIZE and not st.piece.specializable:
                    continue
                job = Job(st.piece, target, "store", (-1, i))
                if target.kind is TargetKind.SIZE:
                    st.policy.reserve([target.start])
            self._push(st, job)
        if not st.piece.specializable:
            return
        profile = await anyio.to_thread.run_sync(self.store.load_profile, st.piece)
        hot = sorted(
            (s for s, c in profile.items() if c >= self.policy.hot_calls), key=lambda s: -profile[s]
        )
        room = self.policy.budget - len(st.policy.specialized)
        for size in [s for s in hot if s not in st.policy.specialized][: max(room, 0)]:
            st.policy.reserve([size])
            self._push(st, Job(st.piece, Target.size(size), "profile", (1, 10_000 + len(st.jobs))))

    def _push(self, st: PieceState, job: Job) -> None:
        st.jobs[job.target.label] = job
        fault = self._faults.get(job.target.label)
        if fault is not None:
            job.fault, job.fault_times = fault
        heapq.heappush(self._heap, (job.priority, next(self._seq), job))
        if self._wake is not None:
            self._wake.set()

    def _drop_cold(self, now: float) -> None:
        kept = []
        for item in self._heap:
            job = item[2]
            st = self._state_of(job.piece)
            if job.why == "hot" and st.policy.is_cold(job.target.start, now):
                job.state = "dropped"
                job.reason = f"size went cold (no call for {self.policy.cold_after_s:g} s)"
                st.policy.release(job.target.start)
                self.jobs_by_outcome[(job.target.kind.value, "dropped")] += 1
            else:
                kept.append(item)
        if len(kept) != len(self._heap):
            heapq.heapify(kept)
            self._heap = kept

    def _state_of(self, piece: GraphPiece) -> PieceState:
        # Pieces are planned in capture order, so a piece's index is its position.
        return self._pieces[piece.index]

    async def _next_job(self) -> Job:
        while True:
            now = time.monotonic()
            waiting = [item for item in self._heap if item[2].not_before > now]
            ready = [item for item in self._heap if item[2].not_before <= now]
            if ready:
                best = min(ready)
                self._heap = waiting + [i for i in ready if i is not best]
                heapq.heapify(self._heap)
                return best[2]
            assert self._wake is not None
            if self._wake.is_set():
                self._wake = anyio.Event()
            delay = min((i[2].not_before - now for i in waiting), default=1.0)
            with anyio.move_on_after(max(delay, 0.01)):
                await self._wake.wait()

    async def _runner(self) -> None:
        while True:
            job = await self._next_job()
            try:
                await self._run_job(job)
            except Exception:
                log.exception("pwdaemon: job %s crashed the runner", job.target.label)
                exc = sys.exc_info()[1]
                self._fail(job, "failed", f"internal error: {type(exc).__name__}: {exc}")

    async def _graph_bytes(self, st: PieceState) -> bytes:
        if st.graph_bytes is None:
            st.graph_bytes = await anyio.to_thread.run_sync(dump_graph, st.piece.gm)
        return st.graph_bytes

    async def _run_job(self, job: Job) -> None:
        if job.state != "queued":
            return  # a stale heap entry: this job was re-queued or finished elsewhere
        st = self._state_of(job.piece)
        if job.target.kind is TargetKind.GRAPH:
            await self._capture_graph(st, job)
            return
        key = self.store.key(job.piece, job.target) if self.store is not None else None
        if key is not None and self.store is not None and not job.skip_store:
            path = await anyio.to_thread.run_sync(self.store.lookup, key)
            if path is not None:
                await self._load_stored(st, job, key, "store")
                return
        assert self._executor_ready is not None
        if not self._executor_starting and self._tg is not None:
            self._executor_starting = True
            self._tg.start_soon(self._start_executor)
        await self._executor_ready.wait()
        claim = None
        if key is not None and self.store is not None and self.store.enabled:
            claim = await anyio.to_thread.run_sync(self.store.store.claim, key)
            if claim is None:
                # Another process compiles this key; its artifact arrives through the
                # watcher (or the store, on this job's next turn).
                job.state, job.reason = "queued", "another process is compiling it"
                job.not_before = time.monotonic() + 2.0
                self._push(st, job)
                return
        try:
            await self._compile_and_publish(st, job, key)
        finally:
            if claim is not None:
                claim.release()  # a few file operations; must run even when cancelled

    async def _load_stored(self, st: PieceState, job: Job, key: Any, source: str) -> None:
        assert self.store is not None
        job.state, job.reason = "compiling", None
        path = await anyio.to_thread.run_sync(self.store.lookup, key)
        if path is None:
            job.state, job.reason = "queued", "stored artifact failed verification"
            self._push(st, job)
            return
        manifest = await anyio.to_thread.run_sync(self.store.store.manifest, key)
        seconds = manifest.compile_seconds if manifest is not None else 0.0
        try:
            with self._gil_friendly():
                runnable = await anyio.to_thread.run_sync(load_artifact, str(path))
        except Exception as exc:
            self._fail(job, "failed", f"stored artifact did not load: {type(exc).__name__}: {exc}")
            return
        await self._validate_and_publish(
            st, job, wrap_compiled(runnable, job.piece), seconds, source
        )

    async def _compile_and_publish(self, st: PieceState, job: Job, key: Any) -> None:
        job.state, job.reason = "compiling", None
        job.attempts += 1
        fault = None
        if job.fault is not None and job.fault_times > 0:
            fault, job.fault_times = job.fault, job.fault_times - 1
        name = f"g{job.piece.index}-{job.target.label.replace(':', '_')}-{job.attempts}.bin"
        out = self._workdir / name
        spec = JobSpec(
            await self._graph_bytes(st), job.target, str(out), dict(self.config.options), fault
        )
        self._in_flight += 1
        try:
            result = await anyio.to_thread.run_sync(
                self.executor.run, spec, self.config.timeout_s, abandon_on_cancel=True
            )
        except CompileError as exc:
            self._fail(job, exc.outcome, exc.reason)
            return
        finally:
            self._in_flight -= 1
        seconds = float(result.get("seconds", 0.0))
        if key is not None and self.store is not None and "path" in result:
            stored = await anyio.to_thread.run_sync(
                self.store.publish,
                key,
                result["path"],
                seconds,
                self.store.extra(job.piece, self.name),
            )
            if stored is not None:
                result = {**result, "path": str(stored)}
        try:
            with self._gil_friendly():
                runnable = await anyio.to_thread.run_sync(self._load, result)
        except Exception as exc:
            self._fail(job, "failed", f"artifact did not load: {type(exc).__name__}: {exc}")
            return
        runnable = wrap_compiled(runnable, job.piece)
        await self._validate_and_publish(st, job, runnable, seconds, "compiled")

    def _wants_graph(self, piece: GraphPiece) -> bool:
        return (
            self.graphs.enabled
            and torch.cuda.is_available()
            and piece_device(piece).startswith("cuda")
        )

    async def _capture_graph(self, st: PieceState, job: Job) -> None:
        """Tier 3: capture the size's live tier-2 runnable into a CUDA graph, here."""
        n = job.target.start
        dispatcher = job.piece.dispatcher
        sample = dispatcher.sample_for(Range.of(n))
        if sample is None:
            # Capture replays a real input of this size: wait until traffic brings one.
            job.reason = "waiting for a call of this size to capture with"
            job.not_before = time.monotonic() + 1.0
            self._push(st, job)
            return
        if self._graph_pool is None:
            device = next(a.device for a in sample[1] if isinstance(a, torch.Tensor))
            self._graph_pool = GraphPool(device)
        pool = self._graph_pool
        if pool.bytes >= self.graphs.memory_budget_bytes:
            self._fail(
                job,
                "skipped",
                f"graph memory budget reached ({pool.bytes} bytes in {pool.graphs} graphs)",
                retry=False,
            )
            return
        tier2 = dispatcher.table.lookup(n).runnable
        args = sample[1]
        size_index = job.piece.size_index
        assert size_index is not None  # only specializable pieces get size jobs
        state = dispatcher.state_ids
        copy_indices = [i for i, a in enumerate(args) if is_caller_tensor(a, state)]
        job.state, job.reason = "compiling", None
        job.attempts += 1
        # Capture runs on a serving thread, at the start of its next call: while a graph
        # is being captured, any other use of the CUDA RNG in the process fails ("offset
        # increment outside graph capture"), so it must not overlap that thread's work.
        done = threading.Event()
        box: dict[str, Any] = {}

        def task() -> None:
            t0 = time.monotonic()
            try:
                box["runnable"] = capture_graph(
                    tier2, args, n, size_index, copy_indices, pool, self.graphs.warmup_iters
                )
            except BaseException as exc:
                box["error"] = exc
            finally:
                box["pause"] = time.monotonic() - t0
                done.set()

        dispatcher.pending = task
        job.reason = "waiting for a serving call to capture on"
        started = time.monotonic()
        taken = await anyio.to_thread.run_sync(done.wait, 5.0, abandon_on_cancel=True)
        if not taken:
            with dispatcher._pending_lock:  # withdraw it, unless a thread took it
                withdrawn = dispatcher.pending is task
                if withdrawn:
                    dispatcher.pending = None
            if withdrawn:
                job.state, job.attempts = "queued", job.attempts - 1
                job.reason = "waiting for a serving call to capture on"
                job.not_before = time.monotonic() + 1.0
                self._push(st, job)
                return
            await anyio.to_thread.run_sync(done.wait, abandon_on_cancel=True)
        if "error" in box:
            exc = box["error"]
            self._fail(
                job, "failed", f"CUDA graph capture: {type(exc).__name__}: {exc}", retry=False
            )
            return
        runnable = box["runnable"]
        self.capture_pauses.append(box["pause"])
        seconds = time.monotonic() - started
        await self._validate_and_publish(st, job, runnable, seconds, "captured")
        if self.graphs.pad and job.state == "live":
            below = [s for s in self._captured_sizes(st) if s < n]
            lo = max(below) + 1 if below else 1
            if lo <= n - 1:
                dispatcher.install(
                    Range(lo, n - 1), Tier.GRAPH, runnable, {"target": f"graph:{n}", "padded": True}
                )

    @staticmethod
    def _captured_sizes(st: PieceState) -> list[int]:
        return [
            j.target.start
            for j in st.jobs.values()
            if j.target.kind is TargetKind.GRAPH and j.state == "live"
        ]

    @contextlib.contextmanager
    def _gil_friendly(self) -> Iterator[None]:
        """While the engine runs Python in this process (loads, validation), hand the
        GIL back to serving threads sooner: CPython's default switch interval (5 ms)
        lets a background load add up to 5 ms to a request each time it holds the GIL."""
        interval = self.config.switch_interval_s
        if interval is None:
            yield
            return
        with _switch_lock:
            global _switch_users, _switch_saved
            if _switch_users == 0:
                _switch_saved = sys.getswitchinterval()
                sys.setswitchinterval(min(interval, _switch_saved))
            _switch_users += 1
        try:
            yield
        finally:
            with _switch_lock:
                _switch_users -= 1
                if _switch_users == 0:
                    sys.setswitchinterval(_switch_saved)

    @staticmethod
    def _load(result: dict[str, Any]) -> Any:
        if "runnable" in result:
            return result["runnable"]
        return load_artifact(result["path"])

    async def _validate_and_publish(
        self, st: PieceState, job: Job, runnable: Any, seconds: float, source: str
    ) -> None:
        dispatcher = job.piece.dispatcher
        range_ = job.target.range
        validated = False
        if self.config.validate:
            sample = dispatcher.sample_for(range_)
            if sample is not None:
                size, args = sample
                current = dispatcher.table.lookup(size).runnable
                candidate = getattr(runnable, "replay_exclusive", runnable)
                with self._gil_friendly():
                    why = await anyio.to_thread.run_sync(validate, candidate, current, args)
                if why is not None:
                    self.rejects_by_reason[reject_category(why)] += 1
                    self._fail(job, "rejected", f"validation on size {size}: {why}", retry=False)
                    return
                validated = True
        tier = job.target.tier
        info = {"target": job.target.label, "compile_seconds": seconds, "source": source}
        table = dispatcher.install(range_, tier, runnable, info)
        with self._cond:
            job.state, job.compile_seconds, job.source = "live", seconds, source
            self._cond.notify_all()
        self.jobs_by_outcome[(job.target.kind.value, "ok")] += 1
        self.loads_by_source[source] += 1
        self.compile_hist.observe(seconds)
        if job.hot_since is not None:
            self.hot_to_swap_hist.observe(time.monotonic() - job.hot_since)
        event = SwapEvent(job.piece.index, range_, tier, table.version, seconds, source, validated)
        self._fire(self._swap_callbacks, event)
        if job.target.kind is TargetKind.SIZE and self._wants_graph(job.piece):
            n = job.target.start
            self._push(st, Job(job.piece, Target.graph(n), "graph", (3, n)))
        self._check_plan_complete()

    def _fail(self, job: Job, outcome: str, reason: str, *, retry: bool = True) -> None:
        self.jobs_by_outcome[(job.target.kind.value, outcome)] += 1
        self.failures_by_reason[outcome] += 1
        if self.closed:
            outcome, reason, retry = "cancelled", "detached", False
        if retry and job.attempts <= self.config.retries:
            delay = self.config.backoff_s * (2 ** (job.attempts - 1))
            job.state = "queued"
            job.reason = (
                f"retry {job.attempts}/{self.config.retries} in {delay:g} s "
                f"after {outcome}: {reason}"
            )
            job.not_before = time.monotonic() + delay
            heapq.heappush(self._heap, (job.priority, next(self._seq), job))
            if self._wake is not None:
                self._wake.set()
            return
        with self._cond:
            job.state = "failed" if outcome != "cancelled" else "cancelled"
            tries = f" after {job.attempts} attempt{'s' if job.attempts != 1 else ''}"
            job.reason = f"{outcome}{tries}: {reason}"
            self._cond.notify_all()
        log.warning(
            "pwdaemon: gave up on %s of graph %d: %s", job.target.label, job.piece.index, job.reason
        )
        self._check_plan_complete()

    def _fire(self, callbacks: Iterable[Callable[[Any], None]], event: Any) -> None:
        for cb in list(callbacks):
            try:
                cb(event)
            except Exception:
                log.exception("pwdaemon: callback %r raised", cb)

    def _check_plan_complete(self) -> None:
        if self._plan_done or not self._pieces or self._new_pieces:
            return
        planned = [
            j for st in self._pieces for j in st.jobs.values() if j.why in ("general", "configured")
        ]
        if not all(j.terminal for j in planned):
            return
        event = PlanCompleteEvent(
            self.name,
            live=sum(j.state == "live" for j in planned),
            failed=sum(j.state == "failed" for j in planned),
            seconds_since_attach=time.monotonic() - self.attached_at,
        )
        with self._cond:
            self._plan_event = event
            self._cond.notify_all()
        self._fire(self._plan_callbacks, event)

    @property
    def _plan_done(self) -> bool:
        return self._plan_event is not None

    # ---- API used by the handle (any thread) -----------------------------------------

    def on_swap(self, cb: Callable[[SwapEvent], None]) -> None:
        self._swap_callbacks.append(cb)

    def on_plan_complete(self, cb: Callable[[PlanCompleteEvent], None]) -> None:
        self._plan_callbacks.append(cb)
        if self._plan_event is not None:  # registered late: the event that fired
            self._call_soon(cb, self._plan_event)

    def _call_soon(self, cb: Callable[[Any], None], event: Any) -> None:
        if self._portal is not None and not self.closed:
            self._portal.start_task_soon(self._fire_async, [cb], event)

    async def _fire_async(self, cbs: list[Callable[[Any], None]], event: Any) -> None:
        self._fire(cbs, event)

    def wait(self, sizes: Iterable[int] | None, timeout: float | None) -> bool:
        wanted = None if sizes is None else list(sizes)
        deadline = None if timeout is None else time.monotonic() + timeout

        def done() -> bool | None:
            if wanted is None:
                return True if self._plan_done else None
            states = [self._size_state(s) for s in wanted]
            if all(s == "live" for s in states):
                return True
            if any(s in ("failed", "dropped", "cancelled") for s in states):
                return False
            return None

        with self._cond:
            while True:
                result = done()
                if result is not None:
                    return result
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._cond.wait(left if left is not None else 1.0)

    def _size_state(self, size: int) -> str:
        states = []
        for st in self._pieces:
            if not st.piece.specializable:
                continue
            job = st.jobs.get(Target.size(size).label)
            states.append(job.state if job is not None else "none")
        if not states:
            return "none"
        for s in ("failed", "dropped", "cancelled"):
            if s in states:
                return s
        return "live" if all(s == "live" for s in states) else "pending"

    def status(self) -> HandleStatus:
        pieces = []
        for st in list(self._pieces):
            d = st.piece.dispatcher
            entries = [
                EntryStatus(
                    target="eager",
                    range=None,
                    tier=Tier.EAGER,
                    state="live",
                    why="capture",
                    hits=st.calls_by_tier.get("eager", 0),
                    compile_seconds=None,
                    attempts=0,
                    reason=None,
                    source=None,
                )
            ]
            for job in sorted(st.jobs.values(), key=lambda j: j.priority):
                entries.append(
                    EntryStatus(
                        target=job.target.label,
                        range=job.target.range,
                        tier=job.target.tier,
                        state=job.state,
                        why=job.why,
                        hits=job.hits,
                        compile_seconds=job.compile_seconds,
                        attempts=job.attempts,
                        reason=job.reason,
                        source=job.source,
                    )
                )
            note = None
            if st.piece.size_index is None:
                note = "no dynamic size: general tier only"
            elif st.piece.extra_symbols:
                note = (
                    f"more than one dynamic size ({', '.join(st.piece.extra_symbols)}): "
                    "general tier only"
                )
            pieces.append(
                PieceStatus(
                    st.piece.index,
                    d.table.version,
                    st.piece.specializable,
                    note,
                    len(d.counts),
                    tuple(entries),
                )
            )
        return HandleStatus(
            self.name,
            tuple(pieces),
            len(self._heap),
            self._in_flight,
            self._plan_done,
            tuple(self.executor.pids()),
        )

    def metrics_snapshot(self) -> ModelMetrics:
        pieces = []
        for st in list(self._pieces):
            d = st.piece.dispatcher
            live: collections.Counter[str] = collections.Counter(
                e.tier.value for e in d.table.entries()
            )
            pieces.append(
                PieceMetrics(
                    st.piece.index,
                    d.table.version,
                    dict(st.calls_by_tier),
                    len(d.counts),
                    d.overflow_calls,
                    dict(live),
                )
            )
        return ModelMetrics(
            model=self.name,
            pieces=pieces,
            jobs_by_outcome=dict(self.jobs_by_outcome),
            compile_seconds=copy.deepcopy(self.compile_hist),
            hot_to_swap_seconds=copy.deepcopy(self.hot_to_swap_hist),
            queue_depth=len(self._heap),
            in_flight=self._in_flight,
            validation_rejects_by_reason=dict(self.rejects_by_reason),
            failures_by_reason=dict(self.failures_by_reason),
            worker_restarts=self.executor.restarts,
            loads_by_source=dict(self.loads_by_source),
            store_bytes=self._store_stats[0],
            store_artifacts=self._store_stats[1],
            store_write_errors=self.store.store.write_errors if self.store is not None else 0,
        )
