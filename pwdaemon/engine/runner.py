"""Running jobs: store lookup, claims, compile in a worker, load, then publish or fail.

One runner task per worker, on the engine's loop thread, takes the best ready job off
the queue. Everything that blocks (the store's file I/O, a worker's compile, loading
an artifact) runs on another thread, gated (`pwdaemon.engine.torch_thread`), so the loop
keeps ticking and the serving threads never wait on any of it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import anyio.to_thread

from pwdaemon.config import CompileConfig
from pwdaemon.engine.graphs import GraphCapture
from pwdaemon.engine.jobs import (
    Counters,
    Job,
    JobReason,
    JobSource,
    JobState,
    PieceState,
    PriorityBand,
)
from pwdaemon.engine.publish import Publisher
from pwdaemon.engine.queue import JobQueue
from pwdaemon.engine.store_link import StoreLink, compile_options
from pwdaemon.engine.torch_thread import run_gated, run_torch_work
from pwdaemon.serving.gate import GATE
from pwdaemon.serving.piece import wrap_compiled
from pwdaemon.serving.range_table import OPEN_END, Range, Target, TargetKind
from pwdaemon.store import ArtifactKey
from pwdaemon.workers.compiler import (
    ABOVE_ONE,
    AT_ONE_ONLY,
    JobSpec,
    SpecializedCompileError,
    load_artifact,
)
from pwdaemon.workers.executor import Executor
from pwdaemon.workers.process import CompileError, Outcome
from pwdaemon.workers.shipping import UnshippableGraphError, graph_for_worker

log = logging.getLogger(__name__)

# The sizes a general that holds above 1 only is replaced by: every size a 32-bit index
# can count (`_plan_above_one`).
ABOVE_ONE_RANGE = Range(2, OPEN_END)

# A job whose key another process holds the claim for waits this long before it looks
# again (the peer's artifact usually arrives sooner, through the store watcher).
_CLAIMED_RETRY_S = 2.0


class Faults:
    """Faults to inject into the next compiles of a target (see `pwdaemon.testing`).

    Armed from a test's thread, taken on the loop thread: a lock keeps the count exact.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._armed: dict[str, list[Any]] = {}  # label -> [fault, compiles left]

    def arm(self, label: str, fault: str, times: int) -> None:
        """Make the next `times` compiles of target `label` fail with `fault`."""
        with self._lock:
            self._armed[label] = [fault, times]

    def take(self, label: str) -> str | None:
        """The fault for this compile of `label`, if one is armed (uses one up)."""
        with self._lock:
            armed = self._armed.get(label)
            if armed is None or armed[1] <= 0:
                return None
            armed[1] -= 1
            return str(armed[0])


class Runner:
    """Runs the queue's jobs: loads what the store has, compiles the rest in workers."""

    def __init__(
        self,
        name: str,
        config: CompileConfig,
        executor: Executor,
        store: StoreLink | None,
        pieces: Sequence[PieceState],
        queue: JobQueue,
        publisher: Publisher,
        graphs: GraphCapture,
        counters: Counters,
        workdir: Path,
    ) -> None:
        self.name = name
        self.config = config
        self.executor = executor
        self.store = store
        self._pieces = pieces
        self.queue = queue
        self.publisher = publisher
        self.graphs = graphs
        self.counters = counters
        self.workdir = workdir
        self.faults = Faults()
        self._tg: anyio.abc.TaskGroup | None = None
        self._executor_ready: anyio.Event | None = None
        self._executor_starting = False
        # Pieces whose graph cannot be shipped to a worker, and why (tried once each).
        self._unshippable: dict[int, str] = {}

    # ---- workers -------------------------------------------------------------------

    def bind(self, tg: anyio.abc.TaskGroup) -> None:
        """Attach to the loop's task group (on the loop thread, before any job runs)."""
        self._tg = tg
        self._executor_ready = anyio.Event()

    async def start_executor(self) -> None:
        """Start the worker processes (on a thread: spawning takes seconds)."""
        assert self._executor_ready is not None
        self._executor_starting = True
        try:
            await run_gated(self.executor.start, abandon_on_cancel=True)
        except CompileError as exc:
            # A detach while workers start closes the pool under them: expected, not news.
            level = logging.DEBUG if exc.outcome == Outcome.CANCELLED else logging.WARNING
            log.log(level, "pwdaemon: compile workers did not start: %s", exc)
        finally:
            self._executor_ready.set()

    async def _executor_started(self) -> None:
        assert self._executor_ready is not None
        if not self._executor_starting and self._tg is not None:
            self._executor_starting = True
            self._tg.start_soon(self.start_executor)
        await self._executor_ready.wait()

    # ---- running jobs --------------------------------------------------------------

    async def run_forever(self) -> None:
        """One runner: take the best ready job, run it, repeat (until cancelled)."""
        while True:
            job = await self.queue.next_ready()
            try:
                # Held from the job's start: the gated work it ends with (a load, a
                # validation) then parks for calls that began before that work did.
                with GATE.held():
                    await self.run(job)
            except Exception as exc:
                log.exception("pwdaemon: job %s crashed the runner", job.target.label)
                self.publisher.fail(job, "failed", f"internal error: {type(exc).__name__}: {exc}")

    async def run(self, job: Job) -> None:
        """Run one job to its end (or back onto the queue to wait for something)."""
        if job.state is not JobState.QUEUED:
            return  # a stale queue entry: this job was re-queued or finished elsewhere
        # Pieces are planned in trace order, so a piece's index is its position.
        st = self._pieces[job.piece.index]
        if job.target.kind is TargetKind.GRAPH:
            await self.graphs.run(st, job)
            return
        key = self.store.key(job.piece, job.target) if self.store is not None else None
        # Taken before the first await: a peer's artifact announced by the store watcher
        # while this job looks the key up must not load beside it (seen in CI: a replica
        # loaded one key twice, from the store and as the peer's). `_peer_artifact`
        # leaves a compiling job alone; the lookup after the claim finds what it left.
        job.state, job.reason = JobState.COMPILING, None
        if key is not None and self.store is not None:
            path = await run_gated(self.store.lookup, key)
            if path is not None:
                await self.load_stored(st, job, key, JobSource.STORE)
                return
            refused = await run_gated(self.store.refusal, key)
            if refused is not None:
                self._refused(st, job, f"refused in an earlier run: {refused}")
                return
        await self._executor_started()
        claim = None
        if key is not None and self.store is not None and self.store.enabled:
            claim = await run_gated(self.store.store.claim, key)
            # Looked up again after the claim, whoever holds it. Ours: a peer that
            # published the key between the lookup above and this claim has released its
            # claim already, and compiling now would build the key twice (seen in CI: two
            # replicas, 4 compiles of 3). The peer's: it may have published and not yet
            # released, and the watcher's word of it came while this job was taken
            # (ignored above), so without this look the job would wait out its retry.
            path = await run_gated(self.store.lookup, key)
            if path is not None:
                if claim is not None:
                    claim.release()
                await self.load_stored(st, job, key, JobSource.STORE)
                return
            if claim is None:
                # Another process compiles this key; its artifact arrives through the
                # watcher (or the store, on this job's next turn).
                job.state, job.reason = JobState.QUEUED, "another process is compiling it"
                job.not_before = time.monotonic() + _CLAIMED_RETRY_S
                self.queue.push(job)
                return
        try:
            await self._compile(st, job, key)
        finally:
            if claim is not None:
                claim.release()  # a few file operations; must run even when cancelled

    async def load_stored(
        self, st: PieceState, job: Job, key: ArtifactKey, source: JobSource
    ) -> None:
        """Load `key`'s artifact from the store and publish it (a previous run's, or a
        peer process's)."""
        assert self.store is not None
        job.state, job.reason = JobState.COMPILING, None
        path = await run_gated(self.store.lookup, key)
        if path is None:
            job.state, job.reason = JobState.QUEUED, "stored artifact failed verification"
            self.queue.push(job)
            return
        manifest = await run_gated(self.store.store.manifest, key)
        seconds = manifest.compile_seconds if manifest is not None else 0.0
        try:
            runnable = await run_torch_work(
                load_artifact, str(path), switch_interval=self.config.switch_interval_s
            )
        except Exception as exc:
            reason = f"stored artifact did not load: {type(exc).__name__}: {exc}"
            self.publisher.fail(job, "failed", reason)
            return
        await self.publisher.publish(st, job, wrap_compiled(runnable, job.piece), seconds, source)

    async def _compile(self, st: PieceState, job: Job, key: ArtifactKey | None) -> None:
        job.state, job.reason = JobState.COMPILING, None
        job.attempts += 1
        name = f"g{job.piece.index}-{job.target.label.replace(':', '_')}-{job.attempts}.bin"
        try:
            graph = await self._graph_bytes(st)
        except UnshippableGraphError as exc:
            # No retry can ship it: give the job up now, with the reason.
            self.publisher.fail(job, "failed", str(exc), retry=False)
            return
        spec = JobSpec(
            graph,
            job.target,
            str(self.workdir / name),
            compile_options(self.config.options, job.piece),
            self.faults.take(job.target.label),
        )
        self.counters.in_flight += 1
        try:
            result = await run_gated(
                self.executor.run, spec, self.config.timeout_s, abandon_on_cancel=True
            )
        except CompileError as exc:
            if exc.reason.startswith(SpecializedCompileError.__name__):
                # The worker refused what it compiled (it holds for some sizes only): as a
                # failed validation, a retry compiles the same graph to the same answer,
                # and so does the next run (remembered in the store).
                if key is not None and self.store is not None:
                    await run_gated(self.store.remember_refusal, key, exc.reason)
                self._refused(st, job, exc.reason)
            else:
                self.publisher.fail(job, exc.outcome, exc.reason)
            return
        finally:
            self.counters.in_flight -= 1
        seconds = float(result.get("seconds", 0.0))
        if key is not None and self.store is not None and "path" in result:
            stored = await run_gated(
                self.store.publish,
                key,
                result["path"],
                seconds,
                self.store.extra(job.piece, self.name),
            )
            if stored is not None:
                result = {**result, "path": str(stored)}
        try:
            runnable = await run_torch_work(
                _load, result, switch_interval=self.config.switch_interval_s
            )
        except Exception as exc:
            reason = f"artifact did not load: {type(exc).__name__}: {exc}"
            self.publisher.fail(job, "failed", reason)
            return
        runnable = wrap_compiled(runnable, job.piece)
        await self.publisher.publish(st, job, runnable, seconds, JobSource.COMPILED)

    def _refused(self, st: PieceState, job: Job, reason: str) -> None:
        if job.target.kind is TargetKind.GENERAL and (ABOVE_ONE in reason or AT_ONE_ONLY in reason):
            self._plan_above_one(st, job)  # first: the plan is not complete yet
        self.publisher.fail(job, "rejected", reason, retry=False)

    def _plan_above_one(self, st: PieceState, general: Job) -> None:
        # A general whose compile assumed a size above 1 (conv nets: Inductor's conv
        # lowering guards the batch with `s >= 2` under the backed strategy) was refused,
        # and every size without its own compile stayed on eager. The range of every
        # size above 1 compiles with that known (`_constrain_range`) and takes the
        # general's place, and size 1 gets its own compile. The same for a general whose
        # compile at the hint 1 pinned the size to 1 (`AT_ONE_ONLY`): the range compiles
        # from the hint 2.
        piece = general.piece
        planned = [
            (Target.of_range(ABOVE_ONE_RANGE), JobReason.GENERAL),
            (Target.size(1), JobReason.CONFIGURED),
        ]
        queued = []
        for i, (target, why) in enumerate(planned):
            known = st.jobs.get(target.label)
            if known is not None:
                # Loaded from the store on a warm restart, or configured: part of the
                # plan now, so that it completes once they are live, as with a general.
                if not known.why.planned:
                    known.why = why
                continue
            if not piece.admits(target.start):
                continue
            if target.kind is TargetKind.SIZE:
                st.policy.reserve([target.start])
            job = Job(piece, target, why, (PriorityBand.GENERAL, i))
            self.queue.push(st.add(job))
            queued.append(target.label)
        if queued:
            log.info(
                "pwdaemon: graph %d: its general holds for size 1 or above it only; compiling "
                "%s in its place",
                piece.index,
                " and ".join(queued),
            )

    async def _graph_bytes(self, st: PieceState) -> bytes:
        # Pickled once per piece, on a thread (GraphPickler takes a while on big graphs).
        # A loaded trace's piece comes with its bytes (`graph_for_worker`).
        if st.graph_bytes is None:
            index = st.piece.index
            if index in self._unshippable:
                raise UnshippableGraphError(self._unshippable[index])
            try:
                st.graph_bytes = await run_torch_work(
                    graph_for_worker,
                    st.piece,
                    f"graph piece {index} of {self.name}",
                    switch_interval=self.config.switch_interval_s,
                )
            except UnshippableGraphError as exc:
                self._unshippable[index] = str(exc)
                log.warning("pwdaemon: %s; it keeps serving as it does now", exc)
                raise
        return st.graph_bytes


def _load(result: dict[str, Any]) -> Any:
    # An in-process executor (`pwdaemon.testing.FakeExecutor`) hands the runnable over.
    if "runnable" in result:
        return result["runnable"]
    return load_artifact(result["path"])
