"""Tier 3: capture a size's live tier-2 runnable into a CUDA graph.

Capture cannot run on the engine's threads. While a graph is being captured, any other
use of the CUDA RNG in the process fails ("offset increment outside graph capture"), so
capture must not overlap a serving thread's work. The job hands the capture to the
piece's dispatcher as a pending task; the next serving call runs it first, on its own
thread, and the loop waits for it on a worker thread (never blocking the loop).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import anyio.to_thread
import torch

from pwdaemon.engine.jobs import Job, JobSource, JobState, PieceState
from pwdaemon.engine.queue import JobQueue
from pwdaemon.engine.torch_thread import run_torch_work
from pwdaemon.serving.cudagraph import (
    CudaGraphRunnable,
    GraphConfig,
    GraphPool,
    NothingToCapture,
    warm_up,
)
from pwdaemon.serving.cudagraph import capture as capture_graph
from pwdaemon.serving.inputs import is_caller_tensor
from pwdaemon.serving.piece import GraphPiece
from pwdaemon.serving.range_table import Range, Target, TargetKind, Tier

if TYPE_CHECKING:  # publish.py imports `wants_graph` from here
    from pwdaemon.engine.publish import Publisher

log = logging.getLogger(__name__)

# How long a queued capture waits for a serving call before it is withdrawn and retried.
_HANDOFF_WAIT_S = 5.0
# How soon a capture that found its piece's hand-off slot taken looks again: a capture
# pauses one serving call for ~10-30 ms, so the slot frees within a call or two.
_SLOT_RETRY_S = 0.1


def wants_graph(config: GraphConfig, piece: GraphPiece) -> bool:
    """Whether sizes of `piece` get a CUDA-graph job once their tier-2 runnable is live."""
    return config.enabled and torch.cuda.is_available() and piece.device.startswith("cuda")


class GraphCapture:
    """Runs graph jobs: one shared graph memory pool per engine, within its budget."""

    def __init__(self, config: GraphConfig, queue: JobQueue, publisher: Publisher) -> None:
        self.config = config
        self.queue = queue
        self.publisher = publisher
        self.pool: GraphPool | None = None  # made on the first capture, on its device
        self.pauses: list[float] = []  # seconds a serving thread spent capturing
        # Live graphs, for the budget's LRU eviction (loop thread only).
        self.live: list[tuple[Job, CudaGraphRunnable]] = []

    @property
    def graph_bytes(self) -> int:
        """Pool memory the live graphs took when captured (what the budget counts)."""
        return sum(r.nbytes for _, r in self.live)

    def _evict_for_budget(self) -> bool:
        """Evict the live graph with the fewest replays (LRU by hits); False if none.

        Its size goes back to its tier-2 runnable in one table swap. The memory stays in
        the model's pool, where the next capture reuses it, so the budget is counted
        from what live graphs took, not from what the pool holds.
        """
        if not self.live:
            return False
        victim = min(self.live, key=lambda item: item[1].replays)
        self.live.remove(victim)
        job, graph = victim
        n = job.target.start
        job.piece.dispatcher.install(
            Range.of(n), Tier.SIZE, graph.fallback, {"label": Target.size(n).label}
        )
        if self.pool is not None:
            self.pool.bytes -= graph.nbytes
            self.pool.graphs -= 1
        with self.publisher.waiters.changing():
            job.graph_bytes = None
            job.state = JobState.DROPPED
            job.reason = (
                f"evicted after {graph.replays} replays: graph memory budget "
                f"({self.config.memory_budget_bytes} bytes) reached"
            )
        log.info("pwdaemon: %s of graph %d evicted: %s", job.target.label, job.piece.index,
                 job.reason)  # fmt: skip
        return True

    async def run(self, st: PieceState, job: Job) -> None:
        """Capture, validate and publish the graph of `job`'s size (loop thread)."""
        n = job.target.start
        dispatcher = job.piece.dispatcher
        sample = dispatcher.sample_for(Range.of(n))
        if sample is None:
            # Capture replays a real input of this size: wait until traffic brings one.
            job.reason = "waiting for a call of this size to capture with"
            job.not_before = time.monotonic() + 1.0
            self.queue.push(job)
            return
        if self.pool is None:
            device = next(a.device for a in sample[1] if isinstance(a, torch.Tensor))
            self.pool = GraphPool(device)
        pool = self.pool
        while self.graph_bytes >= self.config.memory_budget_bytes and self._evict_for_budget():
            pass
        if self.graph_bytes >= self.config.memory_budget_bytes:  # a budget of 0: no graphs
            self.publisher.fail(
                job,
                "skipped",
                f"graph memory budget reached ({pool.bytes} bytes in {pool.graphs} graphs)",
                retry=False,
            )
            return
        if dispatcher.pending is not None:
            # Another capture of this piece waits for its serving call (the engine runs
            # one job per worker at once). One slot per dispatcher: taking it over left
            # the other capture waiting forever, "compiling" (seen on an H200: sizes 2
            # and 8 of nn.Sequential, size 16 of Llama never got their graphs).
            self._wait_for_slot(job)
            return
        tier2 = dispatcher.table.lookup(n).runnable
        args = sample[1]
        size_index = job.piece.size_index
        assert size_index is not None  # only specializable pieces get size jobs
        state = dispatcher.state_ids
        copy_indices = [i for i, a in enumerate(args) if is_caller_tensor(a, state)]
        job.state, job.reason = JobState.COMPILING, None
        job.attempts += 1
        if self.config.warmup_iters > 1:
            # Off the serving call: all warm-up runs but the capture's own (`warm_up`).
            iters = self.config.warmup_iters - 1
            if not await self._off_the_call(
                job,
                "warm-up",
                warm_up,
                tier2,
                args,
                copy_indices,
                iters,
                dispatcher.sample_events(n),
            ):
                return
        if dispatcher.pending is not None:
            # Checked again: the warm-up above awaited, and another capture of this
            # piece may have taken the slot meanwhile. Between this check and taking the
            # slot below nothing awaits, so the loop runs no other job in between.
            job.state, job.attempts = JobState.QUEUED, job.attempts - 1
            self._wait_for_slot(job)
            return
        # `done` and `box` are the hand-off: the serving thread fills `box` and sets
        # `done`; the loop reads `box` only after `done` is set.
        done = threading.Event()
        box: dict[str, Any] = {}

        def task() -> None:  # runs on a serving thread, before its call
            t0 = time.monotonic()
            try:
                box["runnable"] = capture_graph(
                    tier2,
                    args,
                    n,
                    size_index,
                    copy_indices,
                    pool,
                    warmup_iters=1,
                    instantiate=False,
                )
            except BaseException as exc:
                box["error"] = exc
            finally:
                box["pause"] = time.monotonic() - t0
                done.set()

        dispatcher.pending = task
        job.reason = "waiting for a serving call to capture on"
        started = time.monotonic()
        taken = await anyio.to_thread.run_sync(done.wait, _HANDOFF_WAIT_S, abandon_on_cancel=True)
        if not taken:
            # No call came: withdraw the task, unless a serving thread took it just now
            # (the dispatcher clears `pending` under this lock when it takes it).
            with dispatcher._pending_lock:
                withdrawn = dispatcher.pending is task
                if withdrawn:
                    dispatcher.pending = None
            if withdrawn:
                job.state, job.attempts = JobState.QUEUED, job.attempts - 1
                job.reason = "waiting for a serving call to capture on"
                job.not_before = time.monotonic() + 1.0
                self.queue.push(job)
                return
            await anyio.to_thread.run_sync(done.wait, abandon_on_cancel=True)
        job.reason = None  # taken: no longer waiting (a live entry kept saying it was)
        if "error" in box:
            exc = box["error"]
            if isinstance(exc, NothingToCapture):
                self.publisher.fail(job, "skipped", str(exc), retry=False)
                return
            # A capture that failed midway may leave its private pool in a state later
            # captures trip over (seen on an H200: "use_count > 0 INTERNAL ASSERT FAILED
            # at CUDACachingAllocator.cpp"). Later captures get a fresh pool; graphs
            # already live keep theirs alive. One retry, then tier 2 stays with a reason.
            self.pool = None
            self.publisher.fail(
                job,
                "failed",
                f"CUDA graph capture: {type(exc).__name__}: {exc}",
                retry=job.attempts == 1,
            )
            return
        runnable = box["runnable"]
        self.pauses.append(box["pause"])
        # Here, not in the serving call that captured: instantiating is a C call of its
        # own (cudaGraphInstantiate) that needs no quiet CUDA RNG.
        if not await self._off_the_call(job, "instantiation", runnable.instantiate):
            return
        seconds = time.monotonic() - started
        await self.publisher.publish(st, job, runnable, seconds, JobSource.CAPTURED)
        if job.state is JobState.LIVE:
            job.graph_bytes = runnable.nbytes
            self.live.append((job, runnable))
        if self.config.pad and job.state is JobState.LIVE:
            # Sizes between the next smaller captured size and n pad up to n's graph.
            below = [s for s in captured_sizes(st) if s < n]
            lo = max(below) + 1 if below else 1
            if lo <= n - 1:
                info = {"label": job.target.label, "padded": True}
                dispatcher.install(Range(lo, n - 1), Tier.GRAPH, runnable, info)

    async def _off_the_call(
        self, job: Job, step: str, fn: Callable[..., object], *args: Any
    ) -> bool:
        """Run a step of `job`'s capture on the engine's torch thread; False (the job
        failed, retried once) if it raised."""
        try:
            await run_torch_work(fn, *args, switch_interval=None)
        except Exception as exc:
            self.publisher.fail(
                job,
                "failed",
                f"CUDA graph {step}: {type(exc).__name__}: {exc}",
                retry=job.attempts == 1,
            )
            return False
        return True

    def _wait_for_slot(self, job: Job) -> None:
        """Queue `job` again: another capture of its piece holds the hand-off slot."""
        job.reason = "waiting for another capture of this piece"
        job.not_before = time.monotonic() + _SLOT_RETRY_S
        self.queue.push(job)


def captured_sizes(st: PieceState) -> list[int]:
    """Sizes of `st`'s piece that serve from a live CUDA graph."""
    return [
        j.target.start
        for j in st.jobs.values()
        if j.target.kind is TargetKind.GRAPH and j.state is JobState.LIVE
    ]
