"""Who waits on the engine: `handle.wait()`, swap and plan-complete callbacks.

Three kinds of thread meet here. The loop thread changes job states and fires events;
a caller's thread (often a serving thread, or a test) blocks in `wait()`; any thread
registers callbacks. Job state changes a waiter can block on are made inside
`changing()`, which holds the condition and wakes every waiter; `wait()` reads the
states under the same condition, so it never sees half of a change nor misses one.
Callbacks run on the loop thread, one at a time; one that raises is logged and skipped.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

from pwdaemon.engine.events import PlanCompleteEvent, SwapEvent
from pwdaemon.engine.jobs import JobState, PieceState
from pwdaemon.serving.range_table import Target, Tier

log = logging.getLogger(__name__)

_GAVE_UP = (JobState.FAILED, JobState.DROPPED, JobState.CANCELLED)


class Waiters:
    """Blocking waits and callbacks over the jobs of one engine."""

    def __init__(
        self,
        name: str,
        pieces: Sequence[PieceState],
        *,
        planning: Callable[[], bool],
        call_soon: Callable[[Callable[[], None]], None],
        wants_graph: Callable[[PieceState], bool] = lambda st: False,
        settled_on_nothing: Callable[[], bool] = lambda: False,
    ) -> None:
        """`pieces` is the engine's list (read, never changed, here); `planning()` says
        whether traced pieces wait to be planned; `call_soon(fn)` runs `fn` on the loop;
        `wants_graph(st)` says whether a piece's sizes go on to a CUDA graph (tier 3);
        `settled_on_nothing()` whether the trace settled with no piece (an LSTM: dynamo
        captures nothing), whose plan, empty, is then complete: `wait()` waited for it
        until its timeout, or for ever."""
        self._wants_graph = wants_graph
        self._settled_on_nothing = settled_on_nothing
        self.name = name
        self.attached_at = time.monotonic()
        self._pieces = pieces
        self._planning = planning
        self._call_soon = call_soon
        self.cond = threading.Condition()
        self._swap_callbacks: list[Callable[[SwapEvent], None]] = []
        self._plan_callbacks: list[Callable[[PlanCompleteEvent], None]] = []
        self._plan_event: PlanCompleteEvent | None = None

    @contextlib.contextmanager
    def changing(self) -> Iterator[None]:
        """Change job states inside this block: waiters see the change whole, and wake."""
        with self.cond:
            yield
            self.cond.notify_all()

    # ---- callbacks (registered on any thread, fired on the loop thread) --------------

    def on_swap(self, cb: Callable[[SwapEvent], None]) -> None:
        """Call `cb(event)` for every runnable published from now on."""
        self._swap_callbacks.append(cb)  # a list append is atomic: no lock needed

    def on_plan_complete(self, cb: Callable[[PlanCompleteEvent], None]) -> None:
        """Call `cb(event)` when the plan completes, or soon if it already has."""
        self._plan_callbacks.append(cb)
        event = self._plan_event
        if event is not None:  # registered late: it gets the event that fired
            self._call_soon(lambda: fire([cb], event))

    def swapped(self, event: SwapEvent) -> None:
        """A runnable was published: tell the swap callbacks (loop thread)."""
        fire(self._swap_callbacks, event)

    # ---- the plan ------------------------------------------------------------------

    @property
    def plan_done(self) -> bool:
        """Every planned job (general, configured) reached an end."""
        return self._plan_event is not None

    def check_plan_complete(self) -> None:
        """Fire `PlanCompleteEvent` once, when the last planned job ends (loop thread)."""
        if self.plan_done or self._unfinished():
            return
        if not self._pieces and not self._settled_on_nothing():
            return  # not traced yet
        planned = [j for st in self._pieces for j in st.jobs.values() if j.why.planned]
        event = PlanCompleteEvent(
            self.name,
            live=sum(j.state is JobState.LIVE for j in planned),
            failed=sum(j.state is JobState.FAILED for j in planned),
            seconds_since_attach=time.monotonic() - self.attached_at,
        )
        with self.changing():
            self._plan_event = event
        fire(self._plan_callbacks, event)

    def _unfinished(self) -> bool:
        """Traced pieces wait to be planned, or a planned job has not reached an end. Any
        thread: the loop adds jobs without a lock, so each dict is copied first (one C
        call, which no other thread interrupts)."""
        if self._planning():
            return True
        return any(
            not j.terminal
            for st in list(self._pieces)
            for j in list(st.jobs.values())
            if j.why.planned
        )

    # ---- blocking waits (any thread but the loop's) ----------------------------------

    def wait(
        self, sizes: Iterable[int] | None, timeout: float | None, tier: Tier | None = None
    ) -> bool:
        """Block until `sizes` serve at `tier` (None: until the plan completes, and the
        planned jobs of every piece traced since have ended too).

        `tier` None means the best tier the device supports for each piece: `Tier.GRAPH`
        for a piece whose sizes get CUDA graphs, else `Tier.SIZE`. True when done; False
        on timeout, or as soon as a wanted size was given up at that tier (failed,
        dropped or cancelled), never later.
        """
        wanted = None if sizes is None else list(sizes)
        deadline = None if timeout is None else time.monotonic() + timeout

        def done() -> bool | None:
            if wanted is None:
                # The plan, and those of pieces traced since it completed (a hot input's
                # trace): their planned jobs too have reached an end.
                return True if self.plan_done and not self._unfinished() else None
            if self._planning():
                return None  # a piece traced but not planned yet may serve these sizes
            states = [self.size_state(s, tier) for s in wanted]
            if all(s == JobState.LIVE for s in states):
                return True
            if any(s in _GAVE_UP for s in states):
                return False
            return None

        with self.cond:
            while True:
                result = done()
                if result is not None:
                    return result
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                # Woken by `changing()`; the 1 s cap re-checks pieces planned meanwhile.
                self.cond.wait(left if left is not None else 1.0)

    def size_state(self, size: int, tier: Tier | None = None) -> str:
        """One size at `tier` across the specializable pieces: "none" (no job),
        "pending", the first of failed/dropped/cancelled any piece reached, or "live"
        when all are. A CUDA-graph wait needs the size's compile too: a size whose
        compile was given up can never get a graph."""
        states: list[str] = []
        # Pieces that served a call of this size. A graph is captured by replaying such a
        # call, so a piece that never sees the size (pieces told apart by their guards,
        # e.g. size 1 and n > 1 under a backed strategy) cannot get its graph: for the
        # graph tier it counts as done once compiled, while another piece serves the size.
        seen = [st for st in self._pieces if size in st.piece.dispatcher.counts]
        for st in self._pieces:
            if not st.piece.specializable:
                # No size of its own: it serves the size it was captured at on its
                # general, all it will get (pinned to that size: GPT-2's length-1 pieces,
                # sized on its sequence dim, which no wait for length 1 counted, so the
                # wait ran to its timeout). Nothing to wait for without a general job.
                general = st.jobs.get(Target.general().label)
                if st.piece.traced_size == size and general is not None:
                    states.append(general.state)
                continue
            if not st.piece.admits(size):
                continue  # no size jobs for this size here (guards)
            if tier is Tier.GRAPH and not self._wants_graph(st):
                states.append(JobState.FAILED)  # no CUDA graphs here: it will never come
                continue
            graph = tier is Tier.GRAPH or (tier is None and self._wants_graph(st))
            size_job = st.jobs.get(Target.size(size).label)
            state: str = size_job.state if size_job is not None else "none"
            # A compiled size waits for its graph only on a piece that serves the size
            # (see `seen`); on another piece the compiled size is all there will be.
            if graph and state == JobState.LIVE and (not seen or st in seen):
                graph_job = st.jobs.get(Target.graph(size).label)
                # No graph job yet: publishing the size queues one (pending till then).
                state = graph_job.state if graph_job is not None else "pending"
            states.append(state)
        if not states:
            return "none"
        for s in _GAVE_UP:
            if s in states:
                return s
        return JobState.LIVE if all(s == JobState.LIVE for s in states) else "pending"


def fire(callbacks: Iterable[Callable[[Any], None]], event: Any) -> None:
    """Call each callback with `event`; one that raises is logged, the rest still run."""
    for cb in list(callbacks):
        try:
            cb(event)
        except Exception:
            log.exception("pwdaemon: callback %r raised", cb)
