"""What to compile, in what order: planning a new piece, warm restarts, hot and cold sizes.

Runs on the engine's loop thread: at each tick for the counters the dispatchers keep
(plain ints bumped by serving threads, read here without a lock: a read can be a call
behind, which the next tick sees), and in a task per piece for warm-restart planning
from the store.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import anyio.abc

from pwdaemon.config import CompileConfig, PolicyConfig
from pwdaemon.engine.jobs import (
    Counters,
    Job,
    JobReason,
    JobState,
    PieceState,
    Priority,
    PriorityBand,
)
from pwdaemon.engine.policy import PiecePolicy
from pwdaemon.engine.queue import JobQueue
from pwdaemon.engine.store_link import StoreLink
from pwdaemon.engine.torch_thread import run_gated
from pwdaemon.serving.piece import GraphPiece
from pwdaemon.serving.range_table import Range, Target, TargetKind

# Profile sizes rank after every configured size and range of their band.
_PROFILE_RANK = 10_000


class Planner:
    """Turns traced pieces, the store's contents and traffic into queued jobs."""

    def __init__(
        self,
        policy: PolicyConfig,
        config: CompileConfig,
        sizes: Sequence[int],
        ranges: Sequence[Range],
        store: StoreLink | None,
        pieces: list[PieceState],
        queue: JobQueue,
        counters: Counters,
    ) -> None:
        """`pieces` is the engine's list; the planner appends to it (loop thread)."""
        self.policy = policy
        self.config = config
        self.sizes = tuple(sizes)
        self.ranges = tuple(ranges)
        self.store = store
        self.pieces = pieces
        self.queue = queue
        self.counters = counters

    def enqueue(self, st: PieceState, job: Job) -> None:
        """Make `job` the piece's job for its target and queue it."""
        self.queue.push(st.add(job))

    # ---- a new piece ---------------------------------------------------------------

    def plan(self, piece: GraphPiece, tg: anyio.abc.TaskGroup | None) -> None:
        """Queue a newly traced piece's planned jobs: general, configured sizes and
        ranges; with a store, start warm-restart planning in `tg`."""
        st = PieceState(piece, PiecePolicy(self.policy))
        self.pieces.append(st)
        if piece.tensor_free:
            return  # size arithmetic only: runs as captured, nothing to compile
        order = itertools.count()
        if self.store is not None and tg is not None:
            tg.start_soon(self.plan_from_store, st)
        if self.config.general:
            # A piece that one size alone can reach gets that size in the general's place.
            # Its general would be compiled at that size and may rightly hold for it
            # alone, and Inductor's caches, which key on the graph and not on the guards
            # in front of it, then handed that code to the general of the same graph's
            # other piece (BERT on an H200: "mat1 and mat2 shapes cannot be multiplied").
            only = piece.only_size if piece.specializable else None
            target = Target.general() if only is None else Target.size(only)
            if only is not None:
                st.policy.reserve([only])
            general = (PriorityBand.GENERAL, next(order))
            self.enqueue(st, Job(piece, target, JobReason.GENERAL, general))
        if not piece.specializable:
            return
        # Only the sizes that can reach this piece (`GraphPiece.admits`): guards may give
        # size 1 a piece of its own, whose graph cannot be compiled for any other size.
        for size in [s for s in self.sizes[: self.policy.budget] if piece.admits(s)]:
            if Target.size(size).label in st.jobs:
                continue  # the piece's one size, planned in the general's place
            st.policy.reserve([size])
            prio = (PriorityBand.CONFIGURED, next(order))
            self.enqueue(st, Job(piece, Target.size(size), JobReason.CONFIGURED, prio))
        for r in self.ranges:
            if not (piece.admits(r.start) and piece.admits(r.end)):
                continue
            prio = (PriorityBand.CONFIGURED, next(order))
            self.enqueue(st, Job(piece, Target.of_range(r), JobReason.CONFIGURED, prio))

    async def plan_from_store(self, st: PieceState) -> None:
        """Warm restart: what the store holds for this piece first, then the sizes the
        last run found hot (compiled, or loaded if the store has them)."""
        assert self.store is not None
        stored = await run_gated(self.store.stored_targets, st.piece)
        for i, target in enumerate(stored):
            prio: Priority = (PriorityBand.STORE, i)
            job = st.jobs.get(target.label)
            if job is not None and job.state is not JobState.QUEUED:
                continue
            if job is not None:
                # Planned already (general, configured): load it first instead.
                self.queue.remove(job)
                job.priority = prio
            else:
                if target.kind is TargetKind.SIZE and not st.piece.specializable:
                    continue
                job = Job(st.piece, target, JobReason.STORE, prio)
                if target.kind is TargetKind.SIZE:
                    st.policy.reserve([target.start])
            self.enqueue(st, job)
        if not st.piece.specializable:
            return
        profile = await run_gated(self.store.load_profile, st.piece)
        hot = sorted(
            (s for s, c in profile.items() if c >= self.policy.hot_calls and st.piece.admits(s)),
            key=lambda s: -profile[s],
        )
        room = self.policy.budget - len(st.policy.specialized)
        for size in [s for s in hot if s not in st.policy.specialized][: max(room, 0)]:
            st.policy.reserve([size])
            prio = (PriorityBand.CONFIGURED, _PROFILE_RANK + len(st.jobs))
            self.enqueue(st, Job(st.piece, Target.size(size), JobReason.PROFILE, prio))

    # ---- each tick -----------------------------------------------------------------

    def tick(self, now: float) -> None:
        """Fold traffic into each piece's policy, queue newly hot sizes, re-rank queued
        hot sizes by their calls now, and drop the ones that went cold."""
        queue_len = len(self.queue)
        for st in self.pieces:
            self._account(st, now)
            if st.piece.specializable:
                self._queue_hot(st, queue_len, now)
        self.queue.reprioritise(self._hot_priority)
        self._drop_cold(now)

    def _account(self, st: PieceState, now: float) -> None:
        # Calls since the last tick, credited to the tier and the job that served them.
        hist = st.piece.histogram()
        st.policy.observe(hist, now)
        table = st.piece.dispatcher.table
        for size, calls in hist.items():
            delta = calls - st.last_hist.get(size, 0)
            if delta <= 0:
                continue
            entry = table.lookup(size)
            st.calls_by_tier[entry.tier.value] += delta
            label = entry.info.get("label")
            if label is not None and label in st.jobs:
                st.jobs[label].hits += delta
        st.last_hist = hist

    def _queue_hot(self, st: PieceState, queue_len: int, now: float) -> None:
        for size in st.policy.hot_candidates(queue_len, now):
            if not st.piece.admits(size):
                # Calls made before the trace are shared by every piece (see
                # GraphPiece.calls_before_trace): a size another piece serves.
                continue
            job = Job(st.piece, Target.size(size), JobReason.HOT, self._hot_rank(st, size))
            job.hot_since = st.policy.hot_since(size)
            st.policy.reserve([size])
            self.enqueue(st, job)

    @staticmethod
    def _hot_rank(st: PieceState, size: int) -> Priority:
        return (PriorityBand.HOT, -st.policy.calls(size))  # hotter first

    def _hot_priority(self, job: Job) -> Priority | None:
        # A hot job's priority is its size's calls *now*, not when it was queued: under
        # queue pressure a size that kept getting hotter must not wait behind a cooler one.
        if job.why is not JobReason.HOT:
            return None
        return self._hot_rank(self.pieces[job.piece.index], job.target.start)

    def _drop_cold(self, now: float) -> None:
        def cold(job: Job) -> bool:
            if job.why is not JobReason.HOT:
                return False  # planned work is never dropped
            return self.pieces[job.piece.index].policy.is_cold(job.target.start, now)

        for job in self.queue.drop(cold):
            job.state = JobState.DROPPED
            job.reason = f"size went cold (no call for {self.policy.cold_after_s:g} s)"
            self.pieces[job.piece.index].policy.release(job.target.start)
            self.counters.jobs_by_outcome[(job.target.kind.value, "dropped")] += 1
