"""The engine's job queue: a priority heap with not-before times and a wake event.

Only the engine's loop thread changes it (the tick, the runners, store events handed
over by the portal); other threads read `len()` for status and metrics, an int read.
"""

from __future__ import annotations

import heapq
import itertools
import time
from collections.abc import Callable

import anyio

from pwdaemon.engine.jobs import Job, Priority


class JobQueue:
    """Jobs by (priority, arrival); a job is handed out once its `not_before` has passed."""

    def __init__(self) -> None:
        self._heap: list[tuple[Priority, int, Job]] = []
        self._seq = itertools.count()  # ties go to the job queued first
        self._wake: anyio.Event | None = None

    def bind(self) -> None:
        """Make the wake event; called on the loop thread (anyio events belong to it)."""
        self._wake = anyio.Event()

    def __len__(self) -> int:
        return len(self._heap)

    def push(self, job: Job) -> None:
        """Queue `job` at its current priority and wake a runner waiting for work."""
        heapq.heappush(self._heap, (job.priority, next(self._seq), job))
        if self._wake is not None:
            self._wake.set()

    def remove(self, job: Job) -> None:
        """Take `job` out (no-op when it is not queued)."""
        self._keep(lambda j: j is not job)

    def drop(self, cold: Callable[[Job], bool]) -> list[Job]:
        """Take out every job `cold(job)` holds for; returns them."""
        dropped = [item[2] for item in self._heap if cold(item[2])]
        if dropped:
            gone = {id(j) for j in dropped}
            self._keep(lambda j: id(j) not in gone)
        return dropped

    def reprioritise(self, priority_now: Callable[[Job], Priority | None]) -> None:
        """Re-rank queued jobs: `priority_now(job)` is its priority now, or None to keep."""
        changed = False
        items = []
        for prio, seq, job in self._heap:
            new = priority_now(job)
            if new is not None and new != prio:
                job.priority, prio, changed = new, new, True
            items.append((prio, seq, job))
        if changed:
            heapq.heapify(items)
            self._heap = items

    async def next_ready(self) -> Job:
        """The best job whose `not_before` has passed; waits (for a push or the earliest
        not-before time) when there is none."""
        while True:
            now = time.monotonic()
            waiting = [item for item in self._heap if item[2].not_before > now]
            ready = [item for item in self._heap if item[2].not_before <= now]
            if ready:
                best = min(ready)
                self._heap = waiting + [i for i in ready if i is not best]
                heapq.heapify(self._heap)
                return best[2]
            assert self._wake is not None, "bind() the queue on the loop first"
            if self._wake.is_set():
                self._wake = anyio.Event()
            delay = min((i[2].not_before - now for i in waiting), default=1.0)
            with anyio.move_on_after(max(delay, 0.01)):
                await self._wake.wait()

    def _keep(self, keep: Callable[[Job], bool]) -> None:
        kept = [item for item in self._heap if keep(item[2])]
        if len(kept) != len(self._heap):
            heapq.heapify(kept)
            self._heap = kept
