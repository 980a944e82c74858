"""The artifact store across processes: claims (exclusive, broken when stale, raced by
real processes, left by a process that died) and the real watchdog observer seeing
publishes from another process, with its polling fallback."""

from __future__ import annotations

import errno
import json
import logging
import multiprocessing
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from artifact_store import WAIT_S, Clock, corrupt_flip, fake_artifact, key_for, spawn

from pwdaemon.store import (
    ArtifactKey,
    ArtifactStore,
)
from pwdaemon.store.files import TMP_PREFIX


@pytest.fixture
def store(tmp_path: Path) -> ArtifactStore:
    return ArtifactStore(tmp_path / "store")


# --------------------------------------------------------------------------- claims


def test_claim_is_exclusive_and_released(tmp_path: Path) -> None:
    a = ArtifactStore(tmp_path / "s")
    b = ArtifactStore(tmp_path / "s")
    key = key_for()
    claim = a.claim(key)
    assert claim is not None and claim.held
    record = json.loads(claim.path.read_text())
    assert record["pid"] == os.getpid() and record["host"] and record["time"] > 0
    assert b.claim(key) is None  # held by a live process (this one)
    assert b.claim(key_for(target="size:9")) is not None  # other keys are independent
    claim.release()
    claim.release()  # idempotent
    assert not claim.held and not claim.path.exists()
    with b.claim(key) as again:
        assert again is not None and a.claim(key) is None
    assert a.claim(key) is not None


def test_old_claim_of_live_process_is_broken(tmp_path: Path) -> None:
    clock = Clock()  # shared: both "processes" see the same time
    a = ArtifactStore(tmp_path / "s", clock=clock, stale_claim_s=100)
    b = ArtifactStore(tmp_path / "s", clock=clock, stale_claim_s=100)
    key = key_for()
    start = clock.now
    old = a.claim(key)
    assert old is not None
    clock.now = start + 80
    assert b.claim(key) is None
    assert old.refresh()  # restarts the stale timer at +80...
    clock.now = start + 150
    assert b.claim(key) is None  # ...so at +150 (150 s old without it) it is still fresh
    clock.now = start + 181
    new = b.claim(key)
    assert new is not None
    # The old holder finds out, and its release does not remove the new claim.
    assert not old.refresh() and not old.held
    old.release()
    assert new.path.exists() and a.claim(key) is None
    new.release()


def _race_for_claims(
    root: str,
    digests: list[str],
    start: threading.Barrier,
    done: threading.Barrier,
    results: multiprocessing.Queue[tuple[int, int, bool]],
) -> None:
    """Claim each digest at the same moment as the other racer; report who won."""
    store = ArtifactStore(root)
    for i, digest in enumerate(digests):
        start.wait(WAIT_S)
        claim = store.claim(digest)
        results.put((i, os.getpid(), claim is not None))
        done.wait(WAIT_S)  # hold the claim until the other racer has tried too
        if claim is not None:
            claim.release()


def test_two_processes_race_for_a_claim(tmp_path: Path) -> None:
    # This process and a spawned one run the same code, in lockstep, for many keys.
    ctx = spawn()
    store = ArtifactStore(tmp_path / "s")
    digests = [key_for(target=f"size:{n}").digest for n in range(25)]
    start, done = ctx.Barrier(2), ctx.Barrier(2)
    results: multiprocessing.Queue[tuple[int, int, bool]] = ctx.Queue()
    args = (str(store.root), digests, start, done, results)
    proc = ctx.Process(target=_race_for_claims, args=args)
    proc.start()
    _race_for_claims(*args)
    proc.join(WAIT_S)
    assert proc.exitcode == 0
    outcomes = [results.get(timeout=WAIT_S) for _ in range(2 * len(digests))]
    winners: dict[int, list[int]] = {i: [] for i in range(len(digests))}
    for i, pid, won in outcomes:
        assert pid in (os.getpid(), proc.pid)
        if won:
            winners[i].append(pid)
    assert all(len(w) == 1 for w in winners.values()), winners
    assert not any(store.claims.path(d).exists() for d in digests)  # winners released
    assert store.claim(digests[0]) is not None


# --------------------------------------------------------------------------- watching


class Recorder:
    """Collects watcher callbacks; `wait_for(digest)` blocks until that digest is seen."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Path]] = []
        self._cond = threading.Condition()

    def __call__(self, digest: str, path: Path) -> None:
        with self._cond:
            self.calls.append((digest, path))
            self._cond.notify_all()

    def wait_for(self, digest: str, times: int = 1) -> bool:
        with self._cond:
            return self._cond.wait_for(
                lambda: sum(d == digest for d, _ in self.calls) >= times, WAIT_S
            )


@pytest.fixture
def watched(store: ArtifactStore) -> Iterator[tuple[ArtifactStore, Recorder]]:
    recorder = Recorder()
    watcher = store.watch(recorder, debounce_s=0.05)
    yield store, recorder
    watcher.stop()
    assert not watcher._thread.is_alive() and not watcher._observer.is_alive()


def _claim_publish_and_crash(root: str, fields: dict[str, str], src: str) -> None:
    store = ArtifactStore(root)
    key = ArtifactKey.from_fields(fields)
    assert store.claim(key) is not None
    assert store.publish(key, src, compile_seconds=2.0) is not None
    os._exit(0)  # exit without releasing the claim, like a worker that crashed


def test_another_process_publishes_then_dies_holding_its_claim(
    watched: tuple[ArtifactStore, Recorder], tmp_path: Path
) -> None:
    # One child process (each costs a torch import) covers two things: the real observer
    # sees another process's publish, and the claim it left behind is broken as dead.
    store, recorder = watched
    key = key_for()
    src = fake_artifact(tmp_path)
    proc = spawn().Process(
        target=_claim_publish_and_crash, args=(str(store.root), key.fields(), str(src))
    )
    proc.start()
    proc.join(WAIT_S)
    assert proc.exitcode == 0

    assert recorder.wait_for(key.digest)
    digest, path = recorder.calls[0]
    assert digest == key.digest and path == store.artifact_path(key)
    assert store.lookup(digest) == path and path.read_bytes() == src.read_bytes()

    assert json.loads(store.claims.path(key.digest).read_text())["pid"] == proc.pid
    claim = store.claim(key)
    assert claim is not None
    assert json.loads(claim.path.read_text())["pid"] == os.getpid()
    claim.release()


def test_watch_with_polling_observer(store: ArtifactStore, tmp_path: Path) -> None:
    recorder = Recorder()
    other = ArtifactStore(store.root)
    key = key_for()
    with store.watch(recorder, polling=True, poll_interval_s=0.05, debounce_s=0.05):
        thread = threading.Thread(
            target=other.publish, args=(key, fake_artifact(tmp_path)), kwargs={"compile_seconds": 1}
        )
        thread.start()
        thread.join()
        assert recorder.wait_for(key.digest)
    assert recorder.calls == [(key.digest, store.artifact_path(key))]


def test_watch_reports_each_artifact_once(
    watched: tuple[ArtifactStore, Recorder], tmp_path: Path
) -> None:
    store, recorder = watched
    a, b, c = (key_for(target=f"size:{n}") for n in (1, 2, 3))
    store.publish(a, fake_artifact(tmp_path), compile_seconds=1)
    # Temporary files, even with manifest-like names, are never reported.
    shard = store.artifacts_dir / b.digest[:2]
    shard.mkdir(exist_ok=True)
    (shard / f"{TMP_PREFIX}{b.digest}.json").write_text("{}")
    store.publish(b, fake_artifact(tmp_path), compile_seconds=1)
    # Events arrive in order, so once b is reported every event about a has been seen.
    assert recorder.wait_for(b.digest)
    # A lookup that rewrites a's manifest (last-used) is not a new artifact.
    toucher = ArtifactStore(store.root, touch_interval_s=0, clock=lambda: 2e9)
    assert toucher.lookup(a) is not None
    manifest = store.manifest(a)
    assert manifest is not None and manifest.last_used == 2e9
    store.publish(c, fake_artifact(tmp_path), compile_seconds=1)
    assert recorder.wait_for(c.digest)
    assert sorted(d for d, _ in recorder.calls) == sorted([a.digest, b.digest, c.digest])


def test_watch_reports_republish_after_quarantine(
    watched: tuple[ArtifactStore, Recorder], tmp_path: Path
) -> None:
    store, recorder = watched
    key = key_for()
    src = fake_artifact(tmp_path)
    path = store.publish(key, src, compile_seconds=1)
    assert path is not None and recorder.wait_for(key.digest)
    corrupt_flip(path)
    assert store.lookup(key) is None and store.quarantined == 1
    # The recompile produces the same bytes: still reported, the old copy was dropped.
    assert store.publish(key, src, compile_seconds=1) == path
    assert recorder.wait_for(key.digest, times=2)


def test_watch_callback_errors_do_not_stop_the_watcher(
    store: ArtifactStore, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    recorder = Recorder()
    first = key_for(target="size:1")

    def flaky(digest: str, path: Path) -> None:
        recorder(digest, path)
        if digest == first.digest:
            raise RuntimeError("callback bug")

    second = key_for(target="size:2")
    with (
        caplog.at_level(logging.ERROR, logger="pwdaemon.store.watcher"),
        store.watch(flaky, debounce_s=0.01),
    ):
        store.publish(first, fake_artifact(tmp_path), compile_seconds=1)
        assert recorder.wait_for(first.digest)
        store.publish(second, fake_artifact(tmp_path), compile_seconds=1)
        assert recorder.wait_for(second.digest)
    assert "callback bug" in caplog.text


def test_watch_falls_back_to_polling_without_inotify(
    store: ArtifactStore,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    from watchdog.observers import Observer

    def no_inotify(self: object) -> None:
        raise OSError(errno.ENOSPC, "inotify watch limit reached")

    # The limit cannot be exhausted safely on a shared machine: fail inotify's start.
    monkeypatch.setattr(Observer, "start", no_inotify)
    recorder = Recorder()
    key = key_for()
    with caplog.at_level(logging.WARNING, logger="pwdaemon.store.watcher"):
        watcher = store.watch(recorder, poll_interval_s=0.05, debounce_s=0.01)
    with watcher:
        assert watcher.polling
        store.publish(key, fake_artifact(tmp_path), compile_seconds=1)
        assert recorder.wait_for(key.digest)
    assert "polling" in caplog.text
