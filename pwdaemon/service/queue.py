"""The service's job queue: one job per key, priority by summed hotness, fair to clients.

Pure bookkeeping, no I/O and no locks: the server calls it from its one event loop.

- One job per artifact key: a submit of a key already queued or running joins it (its
  client becomes one more requester) instead of compiling it again.
- Priority: a job's hotness is the sum over its requesters of the hotness each last
  sent, so a size many replicas need goes before a size one replica needs.
- Fairness: each client has a `served` credit, raised by 1/n for each job started on
  behalf of n requesters. The next job is the hottest among the jobs of the clients
  with the least credit, so a client that queues a hundred sizes gets one compile,
  then the others get theirs (deficit round robin with unit cost).
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from enum import StrEnum

from pwdaemon.service.protocol import SubmitRequest, SubmitResult


class JobState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"


@dataclass(eq=False)
class ServiceJob:
    """One key's compile, shared by every client that asked for it."""

    request: SubmitRequest  # the first submit's graph and options
    seq: int
    submitted_at: float
    requesters: dict[str, float] = field(default_factory=dict)  # client id -> hotness
    state: JobState = JobState.QUEUED
    started_at: float | None = None

    @property
    def digest(self) -> str:
        return self.request.key.digest

    @property
    def hotness(self) -> float:
        return sum(self.requesters.values())


class JobQueue:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._jobs: dict[str, ServiceJob] = {}
        self._served: dict[str, float] = {}
        self._seq = itertools.count()
        self._clock = clock

    # ---- submits and withdrawals

    def submit(self, client: str, request: SubmitRequest) -> tuple[SubmitResult, ServiceJob]:
        digest = request.key.digest
        job = self._jobs.get(digest)
        if client not in self._served:
            # A newcomer starts level with the least-served active client: it is not
            # owed every compile that ran before it connected.
            active = [self._served[c] for c in self._active_clients()]
            self._served[client] = min(active) if active else 0.0
        if job is not None:
            job.requesters[client] = request.hotness
            return SubmitResult.DEDUPLICATED, job
        job = ServiceJob(request, next(self._seq), self._clock(), {client: request.hotness})
        self._jobs[digest] = job
        return SubmitResult.QUEUED, job

    def withdraw(self, client: str, digests: Iterable[str]) -> list[ServiceJob]:
        """`client` no longer waits for these jobs: it stops adding hotness, and queued
        jobs nobody else wants are dropped (returned). Running jobs finish: their
        artifact lands in the store for whoever asks next."""
        dropped: list[ServiceJob] = []
        for digest in digests:
            job = self._jobs.get(digest)
            if job is None:
                continue
            job.requesters.pop(client, None)
            if job.state is JobState.QUEUED and not job.requesters:
                del self._jobs[digest]
                dropped.append(job)
        if client not in self._active_clients():
            self._served.pop(client, None)
        return dropped

    # ---- scheduling

    def _active_clients(self) -> set[str]:
        return {c for job in self._jobs.values() for c in job.requesters}

    def queued(self) -> Iterator[ServiceJob]:
        return (j for j in self._jobs.values() if j.state is JobState.QUEUED)

    def pop_next(self) -> ServiceJob | None:
        """The job to start now (marked running), or None when nothing is queued."""
        waiting = list(self.queued())
        if not waiting:
            return None
        clients = {c for j in waiting for c in j.requesters}
        least = min(self._served.get(c, 0.0) for c in clients)
        neediest = {c for c in clients if self._served.get(c, 0.0) == least}
        candidates = [j for j in waiting if neediest & j.requesters.keys()]
        # Hottest first; among equals, the oldest.
        job = min(candidates, key=lambda j: (-j.hotness, j.seq))
        share = 1.0 / len(job.requesters)
        for c in job.requesters:
            self._served[c] = self._served.get(c, 0.0) + share
        job.state = JobState.RUNNING
        job.started_at = self._clock()
        return job

    def finish(self, job: ServiceJob) -> None:
        self._jobs.pop(job.digest, None)

    def cancel_queued(self) -> list[ServiceJob]:
        """Drop every queued job (the service is stopping); returns them."""
        out = list(self.queued())
        for job in out:
            del self._jobs[job.digest]
        return out

    def jobs(self) -> list[ServiceJob]:
        return list(self._jobs.values())

    def get(self, digest: str) -> ServiceJob | None:
        return self._jobs.get(digest)

    # ---- figures

    @property
    def depth(self) -> int:
        return sum(1 for _ in self.queued())

    @property
    def running(self) -> int:
        return sum(1 for j in self._jobs.values() if j.state is JobState.RUNNING)

    def served(self) -> dict[str, float]:
        return dict(self._served)
