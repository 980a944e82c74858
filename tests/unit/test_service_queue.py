"""The service queue: one job per key, hotness summed over clients, fairness."""

from __future__ import annotations

from pwdaemon.service.protocol import SubmitRequest, SubmitResult
from pwdaemon.service.queue import JobQueue, JobState
from pwdaemon.serving.range_table import Target
from pwdaemon.store import make_key


def req(size: int, hotness: float = 1.0) -> SubmitRequest:
    label = f"size:{size}"
    key = make_key("fp", label, device="cpu", options={})
    return SubmitRequest(key, Target.parse(label), b"g", {}, None, hotness)


def test_same_key_from_many_clients_is_one_job() -> None:
    q = JobQueue()
    result, job = q.submit("a", req(8))
    assert result is SubmitResult.QUEUED
    for client in ("b", "c", "a"):
        again, same = q.submit(client, req(8, 2.0))
        assert again is SubmitResult.DEDUPLICATED and same is job
    assert q.depth == 1 and job.hotness == 6.0  # a's latest 2 + b 2 + c 2
    running = q.pop_next()
    assert running is job and job.state is JobState.RUNNING
    # A submit while it runs joins it too.
    assert q.submit("d", req(8))[0] is SubmitResult.DEDUPLICATED
    assert q.pop_next() is None
    q.finish(job)
    assert q.submit("a", req(8))[0] is SubmitResult.QUEUED  # finished: a new job


def test_hotness_summed_over_clients_orders_jobs() -> None:
    q = JobQueue()
    q.submit("a", req(1, 5.0))
    q.submit("a", req(2, 1.0))
    q.submit("b", req(2, 1.0))
    q.submit("c", req(2, 4.0))
    # size 2: 6 over three clients beats size 1: 5 from one.
    first = q.pop_next()
    assert first is not None and first.request.target.label == "size:2"


def test_one_client_cannot_starve_another() -> None:
    q = JobQueue()
    for size in range(1, 21):
        q.submit("greedy", req(size, 100.0))
    q.submit("modest", req(99, 1.0))
    order = []
    while (job := q.pop_next()) is not None:
        order.append(job.request.target.start)
        q.finish(job)
    assert order.index(99) <= 1, order  # not behind twenty hotter jobs


def test_withdraw_drops_unwanted_queued_jobs_only() -> None:
    q = JobQueue()
    _, lone = q.submit("a", req(1))
    _, shared = q.submit("a", req(2))
    q.submit("b", req(2))
    _, running = q.submit("a", req(3, 50.0))
    assert q.pop_next() is running
    dropped = q.withdraw("a", [lone.digest, shared.digest, running.digest])
    assert dropped == [lone]
    assert q.get(shared.digest) is shared and shared.requesters == {"b": 1.0}
    assert q.get(running.digest) is running  # finishes: its artifact lands in the store
    assert q.cancel_queued() == [shared] and q.depth == 0
