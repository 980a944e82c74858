"""How a job ends: validated and published into its piece's table, or failed.

Runs on the engine's loop thread. Validation runs the candidate and the runnable it
would replace on a worker thread (the serving process's CPU, hence gated: `serving.gate`);
publishing is one `Dispatcher.install`, an atomic swap that serving threads see on
their next call. A failure is retried with exponential backoff, then given up.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from pwdaemon.config import CompileConfig
from pwdaemon.engine.events import SwapEvent
from pwdaemon.engine.graphs import wants_graph
from pwdaemon.engine.jobs import (
    Counters,
    Job,
    JobReason,
    JobSource,
    JobState,
    PieceState,
    PriorityBand,
)
from pwdaemon.engine.queue import JobQueue
from pwdaemon.engine.torch_thread import run_torch_work
from pwdaemon.engine.validation import reject_category, tile_input, validate
from pwdaemon.engine.waiters import Waiters
from pwdaemon.serving.cudagraph import GraphConfig
from pwdaemon.serving.heap import HEAP
from pwdaemon.serving.range_table import Target, TargetKind
from pwdaemon.serving.strategy import ShapeStrategy, is_data_dependent, next_strategy

log = logging.getLogger(__name__)


class Publisher:
    """Ends jobs: `publish` (validate, swap in, tell the waiters) or `fail` (retry later,
    or give up)."""

    def __init__(
        self,
        config: CompileConfig,
        graphs: GraphConfig,
        queue: JobQueue,
        waiters: Waiters,
        counters: Counters,
        closed: Callable[[], bool],
    ) -> None:
        """`closed()` says whether the model is being detached: failures then cancel."""
        self.config = config
        self.graphs = graphs
        self.queue = queue
        self.waiters = waiters
        self.counters = counters
        self._closed = closed
        # Remembers a strategy as failed for the model's next start (the handle sets it
        # where there is a store): see `_strategy_failed`.
        self.on_strategy_failed: Callable[[ShapeStrategy, str], None] | None = None

    async def publish(
        self, st: PieceState, job: Job, runnable: Any, seconds: float, source: JobSource
    ) -> None:
        """Validate `runnable` against what serves its range now, then swap it in."""
        dispatcher = job.piece.dispatcher
        range_ = job.target.range
        validated = False
        # A general or range runnable is checked at two sizes, the smallest and largest
        # recorded in its range so far: compiled wrong for all but one size (seen: a
        # general compile of a two-symbol backed graph answered batch 1 for every
        # batch), it would pass a check at the one size it got right. No recorded input
        # in the range yet: the recorded input nearest in size, tiled to the range's
        # first size; none at all: nothing to run, and the swap is not counted as
        # validated.
        samples: list[tuple[int, tuple[Any, ...]]] = []
        tiled_from = None
        if self.config.validate:
            samples = dispatcher.samples_for(range_)
            if not samples and range_ is not None:
                samples, tiled_from = await self._tiled_sample(job, range_.start)
        for size, args in samples:
            current = dispatcher.table.lookup(size).runnable
            # A captured graph falls back to tier 2 while a sibling replays; the
            # comparison must run the graph itself, so it waits for the pool instead.
            candidate = getattr(runnable, "replay_exclusive", runnable)
            why = await run_torch_work(
                validate,
                candidate,
                current,
                args,
                dispatcher.table.eager.runnable,
                # A tiled input is the engine's own, made on the stream validation waits for.
                dispatcher.sample_events(size),
                switch_interval=self.config.switch_interval_s,
            )
            if why is not None:
                self.counters.rejects_by_reason[reject_category(why)] += 1
                on = f"size {size}"
                if tiled_from is not None:
                    on += f", an input tiled from a recorded one of size {tiled_from}"
                self.fail(job, "rejected", f"validation on {on}: {why}", retry=False)
                return
            validated = True
        tier = job.target.tier
        info = {"label": job.target.label, "compile_seconds": seconds, "source": source}
        table = dispatcher.install(range_, tier, runnable, info)
        HEAP.refreeze()  # the loaded runnable stays: out of collections' walks
        with self.waiters.changing():
            job.state, job.compile_seconds, job.source = JobState.LIVE, seconds, source
        counters = self.counters
        counters.jobs_by_outcome[(job.target.kind.value, "ok")] += 1
        counters.loads_by_source[source.value] += 1  # metrics labels are plain text
        counters.compile_hist.observe(seconds)
        if job.hot_since is not None:
            counters.hot_to_swap_hist.observe(time.monotonic() - job.hot_since)
        event = SwapEvent(job.piece.index, range_, tier, table.version, seconds, source, validated)
        self.waiters.swapped(event)
        if job.target.kind is TargetKind.SIZE and wants_graph(self.graphs, job.piece):
            n = job.target.start
            graph_job = Job(job.piece, Target.graph(n), JobReason.GRAPH, (PriorityBand.GRAPH, n))
            self.queue.push(st.add(graph_job))
        self.waiters.check_plan_complete()

    async def _tiled_sample(
        self, job: Job, size: int
    ) -> tuple[list[tuple[int, tuple[Any, ...]]], int | None]:
        """No recorded input in the job's range: one of `size` tiled from the recorded
        input nearest in size (`validation.tile_input`), with the size it came from;
        nothing when the piece has none or cannot be tiled."""
        piece = job.piece
        recorded = list(piece.dispatcher.samples.items())  # serving threads add to it
        if piece.size_dims is None or not recorded:
            return [], None
        from_size, args = min(recorded, key=lambda item: abs(item[0] - size))
        # Torch ops, so on a torch-work thread: on this long-lived loop thread a CPU op
        # would leave an OpenMP team beside serving for good (`engine.torch_thread`).
        tiled = await run_torch_work(
            tile_input,
            args,
            from_size,
            size,
            piece.size_indices,
            piece.size_dims,
            piece.dispatcher.sample_events(from_size),
            switch_interval=None,
        )
        return ([(size, tiled)], from_size) if tiled is not None else ([], None)

    def fail(self, job: Job, outcome: str, reason: str, *, retry: bool = True) -> None:
        """Count a failure (`outcome`: failed, crashed, timeout, rejected, skipped...);
        queue a retry after a backoff while attempts last, else give the job up."""
        if self._closed():
            # Detach stopped its worker under it: the compile did not fail, so it is
            # counted as cancelled, not as the crash the worker's end looked like.
            outcome, reason, retry = "cancelled", "detached", False
        self.counters.jobs_by_outcome[(job.target.kind.value, outcome)] += 1
        if outcome != "cancelled":
            self.counters.failures_by_reason[outcome] += 1
        if retry and job.attempts <= self.config.retries:
            delay = self.config.backoff_s * (2 ** (job.attempts - 1))
            job.state = JobState.QUEUED
            job.reason = (
                f"retry {job.attempts}/{self.config.retries} in {delay:g} s "
                f"after {outcome}: {reason}"
            )
            job.not_before = time.monotonic() + delay
            self.queue.push(job)
            return
        with self.waiters.changing():
            job.state = JobState.CANCELLED if outcome == "cancelled" else JobState.FAILED
            # No attempt: refused by an earlier run (`Runner._refused`), as the reason says.
            tries = f" after {job.attempts} attempt{'s' if job.attempts != 1 else ''}"
            tries = tries if job.attempts else ""
            job.reason = f"{outcome}{tries}: {reason}"
        # A job cut short by detach is what the caller asked for: not worth a warning.
        log.log(
            logging.DEBUG if outcome == "cancelled" else logging.WARNING,
            "pwdaemon: gave up on %s of graph %d: %s",
            job.target.label,
            job.piece.index,
            job.reason,
        )
        if job.target.kind is TargetKind.GENERAL and is_data_dependent(reason):
            self._strategy_failed(job, reason)
        self.waiters.check_plan_complete()

    def _strategy_failed(self, job: Job, reason: str) -> None:
        # A general compile that Inductor cannot lower for the piece's symbols: a conv
        # over an unbacked length ("could not extract specialized integer from
        # data-dependent expression 16*Max(1, u0)") traced fine and compiled every size,
        # but without a general every other size served eager. The backed strategy's
        # general compiles. This run keeps its pieces (they serve right, and their size
        # compiles stand); the next start traces with the next strategy.
        strategy = job.piece.strategy
        fallback = next_strategy(strategy)
        if fallback is None or self.on_strategy_failed is None:
            return
        why = f"the general compile of graph {job.piece.index} failed: {reason}"
        self.on_strategy_failed(strategy, why)  # never raises (the handle's)
        log.warning(
            "pwdaemon: graph %d: strategy %s failed its general compile; the next start "
            "traces with %s",
            job.piece.index,
            strategy.value,
            fallback.value,
        )
