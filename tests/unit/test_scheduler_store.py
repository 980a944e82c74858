"""The engine's use of the artifact store, with the in-process FakeExecutor: lookups
gated, a peer's artifact loaded instead of compiled, and loaded once."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import pytest
from scheduling import FAST, HOLDS_ABOVE_ONE, call_sizes, compiler_config, job_labels
from torch import nn

import pwdaemon as pwd
from pwdaemon.engine.runner import ABOVE_ONE_RANGE
from pwdaemon.engine.store_link import StoreLink, model_id
from pwdaemon.serving.gate import GATE
from pwdaemon.serving.range_table import Target
from pwdaemon.serving.strategy import ShapeStrategy
from pwdaemon.store.refusals import REFUSAL_RULES
from pwdaemon.store.store import ArtifactStore
from pwdaemon.testing import FakeExecutor
from pwdaemon.workers.executor import JobSpec


class _GateRecording(FakeExecutor):
    """A fake executor that records whether the engine called it from gated work."""

    def __init__(self) -> None:
        super().__init__()
        self.gated: dict[str, bool] = {}

    def start(self) -> None:
        self.gated["start"] = GATE.gates_this_thread()

    def run(self, spec: JobSpec, timeout: float) -> dict[str, Any]:
        self.gated.setdefault("run", GATE.gates_this_thread())
        return super().run(spec, timeout)


def test_the_engines_store_lookups_and_worker_calls_run_gated(
    mlp: nn.Module, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Off the loop thread but in the serving process: ungated, this Python work held the
    # GIL during a warm restart's first call (31 ms of CPU in a 184 ms BERT call).
    looked: list[bool] = []
    lookup = StoreLink.lookup

    def recording_lookup(self: StoreLink, key: Any) -> Any:
        looked.append(GATE.gates_this_thread())
        return lookup(self, key)

    monkeypatch.setattr(StoreLink, "lookup", recording_lookup)
    ex = _GateRecording()
    h = pwd.attach(
        mlp, sizes=[4], policy=FAST, compiler=compiler_config(), executor=ex, store=tmp_path
    )
    try:
        call_sizes(mlp, [4])
        assert h.wait(sizes=[4], timeout=20)
    finally:
        h.detach()
    assert looked and all(looked)
    assert ex.gated == {"start": True, "run": True}


def _attach_recording_loads(
    mlp: nn.Module, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, workers: int = 1
) -> tuple[pwd.Handle, FakeExecutor, list[str]]:
    """Attach `mlp` (size 4, a store in `tmp_path`, a fake executor, `workers` runners)
    with every artifact load recorded by path; the eager runnable stands in for what was
    loaded."""
    from pwdaemon.engine import runner as runner_module

    handles: list[pwd.Handle] = []
    loaded: list[str] = []

    def load_recorded(path: str) -> Any:
        loaded.append(path)
        return handles[0].table().eager.runnable

    monkeypatch.setattr(runner_module, "load_artifact", load_recorded)
    ex = FakeExecutor()
    h = pwd.attach(
        mlp, sizes=[4], policy=FAST, compiler=compiler_config(workers), executor=ex, store=tmp_path
    )
    handles.append(h)
    return h, ex, loaded


@pytest.mark.parametrize("peer_holds_the_claim", [False, True])
def test_a_key_a_peer_published_before_the_claim_is_loaded_not_compiled(
    mlp: nn.Module, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, peer_holds_the_claim: bool
) -> None:
    # Seen in CI: two replicas compiled one key twice. The job looked the key up (a
    # miss), waited for its workers to start, and by the time it claimed the key the peer
    # had compiled it, published it and released its claim. Or the peer has published
    # and still holds the claim: the job loads at once, not after its retry (an hour
    # here), as the watcher's word of the artifact may have come while it was taken.
    from pwdaemon.engine import runner as runner_module
    from pwdaemon.store.store import ArtifactStore

    published = threading.Event()  # by the "peer", between our lookup and our claim
    peer_artifact = tmp_path / "peer.bin"
    lookup, claim = StoreLink.lookup, ArtifactStore.claim

    def peer_lookup(self: StoreLink, key: Any) -> Any:
        if key.target == "size:4":
            return peer_artifact if published.is_set() else None
        return lookup(self, key)

    def claim_after_the_peer(self: ArtifactStore, key: Any) -> Any:
        if getattr(key, "target", None) != "size:4":
            return claim(self, key)
        published.set()
        return None if peer_holds_the_claim else claim(self, key)

    monkeypatch.setattr(StoreLink, "lookup", peer_lookup)
    monkeypatch.setattr(ArtifactStore, "claim", claim_after_the_peer)
    monkeypatch.setattr(runner_module, "_CLAIMED_RETRY_S", 3600.0)
    h, ex, loaded = _attach_recording_loads(mlp, tmp_path, monkeypatch)
    try:
        call_sizes(mlp, [4])
        assert h.wait(sizes=[4], timeout=20), str(h.status().pieces[0].entries)
        entry = next(e for e in h.status().pieces[0].entries if e.target == "size:4")
        assert entry.source == "store", entry
    finally:
        h.detach()
    assert published.is_set() and loaded == [str(peer_artifact)]
    assert "size:4" not in job_labels(ex.jobs)  # claimed, looked up again, not compiled


def test_a_peer_artifact_announced_during_the_jobs_own_lookup_is_loaded_once(
    mlp: nn.Module, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Seen in CI: a replica loaded one key twice ({"compiled": 1, "store": 2, "peer": 1}
    # for three keys). The watcher announced the peer's artifact while the job's own
    # store lookup ran on a thread, the job still queued: both loaded it.
    from pwdaemon.engine.loop import Engine
    from pwdaemon.store.manifest import Manifest
    from pwdaemon.store.store import ArtifactStore

    peer_artifact = tmp_path / "peer.bin"
    handles: list[pwd.Handle] = []
    announced: list[Any] = []  # the size-4 key, once the "peer" has announced it
    peer_handled = threading.Event()  # the engine has acted on the announcement
    lookup, manifest, peer_task = StoreLink.lookup, ArtifactStore.manifest, Engine._peer_artifact

    def lookup_during_which_the_peer_publishes(self: StoreLink, key: Any) -> Any:
        if key.target != "size:4":
            return lookup(self, key)
        if not announced:  # the job's own lookup: the peer publishes meanwhile
            announced.append(key)
            handles[0].engine._on_store_event(key.digest, peer_artifact)
            assert peer_handled.wait(10), "the engine never acted on the peer's artifact"
        return peer_artifact

    def peer_manifest(self: ArtifactStore, key: Any) -> Any:
        if announced and key in (announced[0], announced[0].digest):
            return Manifest(announced[0], "0" * 64, 0, 1.0, 0.0, 0.0, peer_artifact)
        return manifest(self, key)

    async def recorded_peer_task(self: Engine, digest: str) -> None:
        try:
            await peer_task(self, digest)
        finally:
            peer_handled.set()

    monkeypatch.setattr(StoreLink, "lookup", lookup_during_which_the_peer_publishes)
    monkeypatch.setattr(ArtifactStore, "manifest", peer_manifest)
    monkeypatch.setattr(Engine, "_peer_artifact", recorded_peer_task)
    h, ex, loaded = _attach_recording_loads(mlp, tmp_path, monkeypatch)
    handles.append(h)
    try:
        call_sizes(mlp, [4])
        assert h.wait(sizes=[4], timeout=20), str(h.status().pieces[0].entries)
    finally:
        h.detach()
    assert peer_handled.is_set() and loaded == [str(peer_artifact)]
    assert "size:4" not in job_labels(ex.jobs)


def test_a_job_in_its_own_lookup_is_not_queued_again_by_the_store_plan(
    mlp: nn.Module, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Found reading the code: the warm-restart plan queues a queued planned job again
    # with the store's priority. A job in the middle of its own store lookup was still
    # queued, so it was pushed again and a second runner loaded it beside the first.
    from pwdaemon.engine.planner import Planner
    from pwdaemon.engine.runner import Runner

    stored_artifact = tmp_path / "stored.bin"
    looking = threading.Event()  # size 4's job is in its first lookup
    planned = threading.Event()  # the store's plan for the piece has run
    requeued = threading.Event()  # size 4 was pushed onto the queue a second time
    second_run = threading.Event()  # a runner took size 4's job a second time
    pushes: list[Any] = []
    runs: list[Any] = []
    plan_from_store, enqueue, run = Planner.plan_from_store, Planner.enqueue, Runner.run

    def stored_targets(self: StoreLink, piece: Any) -> list[Target]:
        assert looking.wait(10), "size 4's job never looked itself up"
        return [Target.size(4)]

    async def recorded_plan(self: Planner, st: Any) -> None:
        try:
            await plan_from_store(self, st)
        finally:
            planned.set()

    def recorded_enqueue(self: Planner, st: Any, job: Any) -> None:
        if job.target.label == "size:4":
            pushes.append(job)
            if len(pushes) > 1:
                requeued.set()
        enqueue(self, st, job)

    async def recorded_run(self: Runner, job: Any) -> None:
        if job.target.label == "size:4":
            runs.append(job)
            if len(runs) > 1:
                second_run.set()
        await run(self, job)

    def lookup_outlasting_the_store_plan(self: StoreLink, key: Any) -> Any:
        if key.target != "size:4":
            return None  # the general compiles (fake executor)
        if not looking.is_set():
            looking.set()
            assert planned.wait(10), "the store's plan never ran"
            if requeued.is_set():  # give the second runner its chance to take it too
                second_run.wait(10)
        return stored_artifact

    monkeypatch.setattr(StoreLink, "stored_targets", stored_targets)
    monkeypatch.setattr(StoreLink, "lookup", lookup_outlasting_the_store_plan)
    monkeypatch.setattr(Planner, "plan_from_store", recorded_plan)
    monkeypatch.setattr(Planner, "enqueue", recorded_enqueue)
    monkeypatch.setattr(Runner, "run", recorded_run)
    h, _, loaded = _attach_recording_loads(mlp, tmp_path, monkeypatch, workers=2)
    try:
        call_sizes(mlp, [4])
        assert h.wait(sizes=[4], timeout=20), str(h.status().pieces[0].entries)
    finally:
        h.detach()
    assert looking.is_set() and planned.is_set()
    assert loaded == [str(stored_artifact)], (loaded, len(pushes), len(runs))


# Inductor's reason for failing a conv model's general over an unbacked length.
_UNLOWERABLE = (
    "failed",
    "InductorError: LoweringException: GuardOnDataDependentSymNode: Could not extract "
    "specialized integer from data-dependent expression 16*Max(1, u0)",
)


@pytest.mark.usefixtures("both_strategies")  # remembered only where one falls back
def test_a_general_that_fails_on_a_size_guard_is_remembered_against_its_strategy(
    mlp: nn.Module, tmp_path: Path
) -> None:
    # The store remembers the strategy as failed for the model (the next start skips it:
    # tests/integration/test_background_compile.py runs that with real workers); a
    # general that fails for another reason is not the strategy's doing.
    store = ArtifactStore(tmp_path / "store")
    key = model_id(mlp, None)
    compiler = compiler_config(retries=0)
    with pwd.attach(
        mlp,
        executor=FakeExecutor(fail={"general": _UNLOWERABLE}),
        store=store,
        policy=FAST,
        compiler=compiler,
    ) as h:
        call_sizes(mlp, [4])
        assert h.wait(timeout=60), str(h.status())
    failed = StoreLink(store, {}).failed_strategies(key)
    assert list(failed) == [ShapeStrategy.UNBACKED], failed
    assert "general compile of graph 0 failed" in failed[ShapeStrategy.UNBACKED]
    other = tmp_path / "other"
    with pwd.attach(
        mlp,
        executor=FakeExecutor(fail={"general": "crashed"}),
        store=str(other),
        policy=FAST,
        compiler=compiler,
    ) as h:
        call_sizes(mlp, [4])
        assert h.wait(timeout=60), str(h.status())
    assert StoreLink(ArtifactStore(other), {}).failed_strategies(key) == {}


def test_a_refused_compile_is_remembered_and_not_compiled_again_by_the_next_start(
    mlp: nn.Module, tmp_path: Path
) -> None:
    # A worker's refusal (the compile holds for some sizes only) is the same for the same
    # key every time: a conv net's warm restart spent 2.4 s of its 3.4 s compiling its
    # general again, to be refused again. The next start takes the refusal from the
    # store, and plans what the refusal plans (the range above 1 and size 1).
    store = ArtifactStore(tmp_path / "store")
    above = Target.of_range(ABOVE_ONE_RANGE).label
    first = FakeExecutor(fail={"general": HOLDS_ABOVE_ONE})
    with pwd.attach(mlp, executor=first, store=store, policy=FAST, compiler=compiler_config()) as h:
        call_sizes(mlp, [3])
        assert h.wait(timeout=60), str(h.status())
    assert job_labels(first.jobs)[:3] == ["general", above, "size:1"]
    refusals = list((tmp_path / "store" / "artifacts").glob("*/*.refused"))
    assert len(refusals) == 1, refusals
    again = FakeExecutor()  # would compile the general fine: the refusal must come first
    with pwd.attach(mlp, executor=again, store=store, policy=FAST, compiler=compiler_config()) as h:
        call_sizes(mlp, [3])
        assert h.wait(timeout=60), str(h.status())
        general = {e.target: e for e in h.status().pieces[0].entries}["general"]
        assert general.state == "failed" and general.attempts == 0, general
        assert general.reason is not None
        assert general.reason.startswith("rejected: refused in an earlier run: "), general
        assert h.table().lookup(5).tier is pwd.Tier.RANGE
    assert "general" not in job_labels(again.jobs), job_labels(again.jobs)
    assert job_labels(again.jobs)[:2] == [above, "size:1"]
    # A refusal made under an older pwdaemon's rules is not taken: compiled again.
    (refusal,) = refusals
    record = json.loads(refusal.read_text())
    assert record["rules"] == REFUSAL_RULES
    refusal.write_text(json.dumps({**record, "rules": REFUSAL_RULES - 1}))
    newer = FakeExecutor()
    with pwd.attach(mlp, executor=newer, store=store, policy=FAST, compiler=compiler_config()) as h:
        call_sizes(mlp, [3])
        assert h.wait(timeout=60), str(h.status())
        assert h.table().lookup(5).tier is pwd.Tier.GENERAL, str(h.status())
    assert job_labels(newer.jobs)[0] == "general", job_labels(newer.jobs)
    # `pwdaemon cache clear` forgets refusals with the artifacts (a stale Inductor
    # cache is one cause of a refusal).
    store.clear()
    assert not list((tmp_path / "store" / "artifacts").glob("*/*.refused"))
