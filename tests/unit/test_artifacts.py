"""Tests for the artifact store: keys, atomic publish, verification and quarantine,
permissions, write failures, gc and profiles (claims and the watchdog observer:
test_store_claims_and_watch.py)."""

from __future__ import annotations

import errno
import json
import logging
import os
import stat
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import cast

import pytest
import torch
from artifact_store import Clock, all_files, corrupt_flip, fake_artifact, key_for

from pwdaemon.engine.store_link import compile_options
from pwdaemon.serving.piece import GraphPiece
from pwdaemon.serving.strategy import ShapeStrategy
from pwdaemon.store import (
    SERVICE_CACHE_DIR,
    ArtifactKey,
    ArtifactStore,
    UnsafeStoreError,
    default_store_dir,
    device_fingerprint,
    make_key,
    options_hash,
)
from pwdaemon.store.files import ORPHAN_GRACE_S, TMP_PREFIX
from pwdaemon.workers.compiler import CPU_THREADS_OPTION


@pytest.fixture
def store(tmp_path: Path) -> ArtifactStore:
    return ArtifactStore(tmp_path / "store")


# --------------------------------------------------------------------------- keys


def test_every_key_input_changes_the_digest() -> None:
    base = key_for()
    variants = {
        "graph_hash": key_for(graph="graph-code "),
        "target": key_for(target="size:16"),
        "device": key_for(device="cuda:sm90"),
        "torch_version": key_for(torch_version="2.13.1+cpu"),
        "triton_version": key_for(triton_version="3.4.0"),
        "options_hash": key_for(options={"max_autotune": True}),
    }
    # Every field of the key has a variant here: a new field needs a new line above.
    assert set(variants) == set(base.fields())
    for name, variant in variants.items():
        changed = {f for f in base.fields() if base.fields()[f] != variant.fields()[f]}
        assert changed == {name}
        assert variant.digest != base.digest, name
    assert len({v.digest for v in variants.values()} | {base.digest}) == len(variants) + 1
    # Options: adding a key, or a value of another type, also changes the digest.
    assert key_for(options={"max_autotune": False, "x": 1}).digest != base.digest
    assert key_for(options={"max_autotune": 0}).digest != base.digest
    for target in ("general", "size:8", "range:1-16", "graph:8"):
        assert key_for(target=target).digest != key_for(target=target, device="cuda:sm80").digest


def test_key_is_canonical_and_round_trips() -> None:
    a = key_for(options={"a": 1, "b": [1, 2], "c": {"y": 2, "x": 1}})
    b = key_for(options={"c": {"x": 1, "y": 2}, "b": [1, 2], "a": 1})
    assert a == b and a.digest == b.digest
    assert len(a.digest) == 64 and int(a.digest, 16) >= 0
    assert options_hash(None) == options_hash({})
    assert ArtifactKey.from_fields(a.fields()) == a
    with pytest.raises(ValueError, match="target"):
        ArtifactKey.from_fields({k: v for k, v in a.fields().items() if k != "target"})
    with pytest.raises(TypeError, match="JSON"):
        key_for(options={"fn": object()})


def test_make_key_detects_versions() -> None:
    import importlib.util

    import torch

    key = make_key("g", "general", device="cpu")
    assert key.torch_version == str(torch.__version__)
    if importlib.util.find_spec("triton") is None:
        assert key.triton_version == "none"
    else:
        assert key.triton_version not in ("", "none")


def test_device_fingerprint(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    assert device_fingerprint("cpu") == "cpu"
    assert device_fingerprint(torch.device("cpu")) == "cpu"
    assert device_fingerprint("cuda:sm90") == "cuda:sm90"
    # No GPU here: stand in for the capability query to check the naming, which must
    # not depend on the device index.
    capability = {0: (9, 0), 1: (9, 0), 2: (8, 0)}
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i: capability[i])
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.version, "hip", None)
    assert device_fingerprint("cuda") == "cuda:sm90"
    assert device_fingerprint(torch.device("cuda", 1)) == "cuda:sm90"
    assert device_fingerprint("cuda:2") == "cuda:sm80"
    assert make_key("g", "general", device="cuda:1").device == "cuda:sm90"


def test_default_store_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    home = tmp_path / "home"
    monkeypatch.setenv("HOME", str(home))
    env = {"PWDAEMON_CACHE_DIR": str(tmp_path / "x"), "XDG_CACHE_HOME": str(tmp_path / "xdg")}
    assert default_store_dir(env) == tmp_path / "x"
    assert default_store_dir({"XDG_CACHE_HOME": str(tmp_path / "xdg")}) == (
        tmp_path / "xdg" / "pwdaemon"
    )
    # A relative XDG_CACHE_HOME is invalid per the spec and ignored.
    assert default_store_dir({"XDG_CACHE_HOME": "rel"}) == home / ".cache" / "pwdaemon"
    assert default_store_dir({}) == home / ".cache" / "pwdaemon"
    monkeypatch.setenv("PWDAEMON_CACHE_DIR", str(tmp_path / "fromenv"))
    assert ArtifactStore().root == tmp_path / "fromenv"
    assert str(SERVICE_CACHE_DIR) == "/var/cache/pwdaemon"


# --------------------------------------------------------------------------- publish / lookup


def test_publish_then_lookup(store: ArtifactStore, tmp_path: Path) -> None:
    src = fake_artifact(tmp_path, 300_000)
    key = key_for()
    path = store.publish(key, src, compile_seconds=3.25, extra={"sizes": [8]})
    assert path == store.root / "artifacts" / key.digest[:2] / f"{key.digest}.bin"
    assert path.read_bytes() == src.read_bytes()
    assert store.lookup(key) == path
    assert store.lookup(key.digest) == path

    manifest = store.manifest(key)
    assert manifest is not None
    assert manifest.key == key and manifest.digest == key.digest
    assert manifest.size == 300_000
    assert manifest.compile_seconds == 3.25
    assert manifest.extra == {"sizes": [8]}
    assert manifest.created <= manifest.last_used
    raw = json.loads(path.with_suffix(".json").read_text())
    assert raw["key"] == key.fields()
    import hashlib

    assert raw["sha256"] == hashlib.sha256(src.read_bytes()).hexdigest()

    # Only final names are left, with private modes.
    names = sorted(p.name for p in (store.artifacts_dir / key.digest[:2]).iterdir())
    assert names == [f"{key.digest}.bin", f"{key.digest}.json"]
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    for d in ("", "artifacts", "quarantine", "claims", "inductor", "profiles"):
        assert stat.S_IMODE((store.root / d).stat().st_mode) == 0o700, d
    assert store.inductor_cache_dir == store.root / "inductor"
    assert store.inductor_env() == {"TORCHINDUCTOR_CACHE_DIR": str(store.root / "inductor")}
    assert store.quarantined == 0 and store.write_errors == 0


def test_service_mode_dirs_and_files_readable_by_all(tmp_path: Path) -> None:
    old = os.umask(0o077)  # a strict umask must not make the service store unreadable
    try:
        store = ArtifactStore(tmp_path / "svc", dir_mode=0o755)
        path = store.publish(key_for(), fake_artifact(tmp_path), compile_seconds=1)
    finally:
        os.umask(old)
    assert path is not None
    assert stat.S_IMODE(store.root.stat().st_mode) == 0o755
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o755
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert store.lookup(key_for()) == path


def test_lookup_miss(store: ArtifactStore) -> None:
    assert store.lookup(key_for()) is None
    assert store.manifest(key_for()) is None
    assert store.quarantined == 0
    with pytest.raises(ValueError, match="digest"):
        store.lookup("../../etc/passwd")


def test_republish_replaces(store: ArtifactStore, tmp_path: Path) -> None:
    key = key_for()
    store.publish(key, fake_artifact(tmp_path, name="a"), compile_seconds=1)
    second = fake_artifact(tmp_path, name="b")
    path = store.publish(key, second, compile_seconds=2)
    assert path is not None and store.lookup(key) == path
    assert path.read_bytes() == second.read_bytes()
    assert store.stats()[1] == 1


def _corrupt_truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:100])


def _manifest_garbage(path: Path) -> None:
    path.with_suffix(".json").write_text('{"format": 1, "key": ')


def _manifest_wrong_digest(path: Path) -> None:
    other = json.loads(path.with_suffix(".json").read_text())
    other["key"]["target"] = "size:9"  # the recorded digest no longer matches its fields
    path.with_suffix(".json").write_text(json.dumps(other))


def _manifest_other_key(path: Path) -> None:
    # A valid manifest of another key placed under this digest's name.
    other = json.loads(path.with_suffix(".json").read_text())
    other_key = key_for(target="size:9")
    other["key"] = other_key.fields()
    other["digest"] = other_key.digest
    path.with_suffix(".json").write_text(json.dumps(other))


def _manifest_missing_old(path: Path) -> None:
    path.with_suffix(".json").unlink()
    old = path.stat().st_mtime - ORPHAN_GRACE_S - 10
    os.utime(path, (old, old))


def _artifact_missing(path: Path) -> None:
    path.unlink()


def _artifact_symlink(path: Path) -> None:
    # Same bytes, but through a link that could point anywhere: never followed.
    real = path.parent.parent.parent / "elsewhere.bin"
    real.write_bytes(path.read_bytes())
    path.unlink()
    path.symlink_to(real)


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (corrupt_flip, "checksum mismatch"),
        (_corrupt_truncate, "truncated"),
        (_manifest_garbage, "bad manifest"),
        (_manifest_wrong_digest, "bad manifest"),
        (_manifest_other_key, "another digest"),
        (_manifest_missing_old, "manifest missing"),
        (_artifact_missing, "artifact missing"),
        (_artifact_symlink, "symlink"),
    ],
)
def test_damaged_entry_is_quarantined_never_returned(
    store: ArtifactStore,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    damage: Callable[[Path], None],
    reason: str,
) -> None:
    key = key_for()
    path = store.publish(key, fake_artifact(tmp_path), compile_seconds=1)
    assert path is not None
    damage(path)
    with caplog.at_level(logging.WARNING, logger="pwdaemon.store.store"):
        assert store.lookup(key) is None
    assert store.quarantined == 1
    assert reason in caplog.text
    assert not os.path.lexists(path) and not path.with_suffix(".json").exists()
    assert any(p.name.startswith(key.digest) for p in store.quarantine_dir.iterdir())
    # Now a plain miss: the caller recompiles and republishes.
    assert store.lookup(key) is None and store.quarantined == 1
    assert store.publish(key, fake_artifact(tmp_path, name="new"), compile_seconds=1) == path
    assert store.lookup(key) == path


def test_young_orphan_artifact_is_a_miss_not_quarantined(
    store: ArtifactStore, tmp_path: Path
) -> None:
    # An artifact whose manifest is not written yet may be a publish in progress.
    key = key_for()
    path = store.publish(key, fake_artifact(tmp_path), compile_seconds=1)
    assert path is not None
    path.with_suffix(".json").unlink()
    assert store.lookup(key) is None
    assert store.quarantined == 0 and path.exists()


def test_last_used_is_updated_by_lookup(tmp_path: Path) -> None:
    clock = Clock()
    store = ArtifactStore(tmp_path / "s", clock=clock, touch_interval_s=60)
    key = key_for()
    store.publish(key, fake_artifact(tmp_path), compile_seconds=1)
    clock.now += 30  # within the interval: no rewrite
    assert store.lookup(key) is not None
    m = store.manifest(key)
    assert m is not None and m.last_used == 1_000_000.0
    clock.now += 100
    assert store.lookup(key) is not None
    m = store.manifest(key)
    assert m is not None and m.last_used == 1_000_130.0 and m.created == 1_000_000.0
    assert store.lookup(key) is not None  # the rewritten manifest still verifies


# --------------------------------------------------------------------------- permissions


def test_group_or_world_writable_store_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "s"
    store = ArtifactStore(root)
    key = key_for()
    assert store.publish(key, fake_artifact(tmp_path), compile_seconds=1) is not None

    for target in (root, store.artifacts_dir, store.inductor_cache_dir):
        os.chmod(target, 0o777)
        with pytest.raises(UnsafeStoreError, match=f"chmod go-w {target}"):
            ArtifactStore(root)
        # A store opened before the change refuses to load too.
        with pytest.raises(UnsafeStoreError, match="writable by group or others"):
            store.lookup(key)
        os.chmod(target, 0o700)
    assert store.lookup(key) is not None

    # Group-writable (not only world) is refused, and so is a writable shard or file.
    os.chmod(root, 0o720)
    with pytest.raises(UnsafeStoreError):
        ArtifactStore(root)
    os.chmod(root, 0o700)
    shard = store.artifacts_dir / key.digest[:2]
    os.chmod(shard, 0o722)
    with pytest.raises(UnsafeStoreError, match="go-w"):
        store.lookup(key)
    os.chmod(shard, 0o700)
    os.chmod(store.artifact_path(key), 0o666)
    with pytest.raises(UnsafeStoreError, match="go-w"):
        store.lookup(key)
    os.chmod(store.artifact_path(key), 0o600)
    assert store.lookup(key) is not None
    # check=False opens it anyway (for repair tools), but loading still refuses.
    os.chmod(root, 0o777)
    lax = ArtifactStore(root, check=False)
    with pytest.raises(UnsafeStoreError):
        lax.lookup(key)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to chown to another user")
def test_store_owned_by_another_user_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "s"
    store = ArtifactStore(root)
    key = key_for()
    store.publish(key, fake_artifact(tmp_path), compile_seconds=1)
    os.chown(store.artifacts_dir, 4242, 4242)
    with pytest.raises(UnsafeStoreError, match="owned by uid 4242"):
        ArtifactStore(root)
    with pytest.raises(UnsafeStoreError, match="owned by uid 4242"):
        store.lookup(key)
    # The host service's uid can be trusted explicitly.
    trusting = ArtifactStore(root, trusted_uids=[4242])
    assert trusting.lookup(key) is not None
    os.chown(store.artifacts_dir, 0, 0)
    os.chown(store.artifact_path(key), 4243, 4243)
    with pytest.raises(UnsafeStoreError, match="owned by uid 4243"):
        store.lookup(key)


# --------------------------------------------------------------------------- write failures


def test_read_only_store_publish_warns_once(
    store: ArtifactStore,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    key = key_for()
    existing = store.publish(key, fake_artifact(tmp_path), compile_seconds=1)
    src = fake_artifact(tmp_path, name="other")
    real_open = os.open

    # Tests run as root, for whom chmod does not stop writes: fail creations the way a
    # read-only mount does.
    def read_only_open(path: object, flags: int, *args: object, **kw: object) -> int:
        if flags & os.O_CREAT:
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_open(path, flags, *args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "open", read_only_open)
    with caplog.at_level(logging.WARNING, logger="pwdaemon.store.store"):
        for i in range(3):
            assert store.publish(key_for(target=f"size:{i}"), src, compile_seconds=1) is None
        assert store.save_profile("model", {8: 1}) is None
        # Reading still works on a read-only store.
        assert store.lookup(key) == existing
    assert store.write_errors == 4
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "not writable" in warnings[0].getMessage()
    assert "Read-only file system" in warnings[0].getMessage()
    monkeypatch.undo()
    assert store.stats()[1] == 1
    assert not [p for p in all_files(store.artifacts_dir) if p.name.startswith(TMP_PREFIX)]


def test_full_disk_leaves_no_partial_files(
    store: ArtifactStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = key_for()
    src = fake_artifact(tmp_path, 3 << 20)  # several copy chunks
    real_write = os.write
    written = [0]

    def filling_write(fd: int, data: bytes) -> int:
        if written[0] >= 1 << 20:
            raise OSError(errno.ENOSPC, "No space left on device")
        n = real_write(fd, data)
        written[0] += n
        return n

    monkeypatch.setattr(os, "write", filling_write)
    assert store.publish(key, src, compile_seconds=1) is None
    monkeypatch.undo()
    assert written[0] >= 1 << 20  # the failure happened mid-copy, after a partial write
    assert store.write_errors == 1
    assert all_files(store.artifacts_dir) == []
    assert store.lookup(key) is None
    assert store.publish(key, src, compile_seconds=1) is not None
    assert store.lookup(key) is not None


def test_unwritable_shard_is_a_write_error_not_an_exception(
    store: ArtifactStore, tmp_path: Path
) -> None:
    # A real OSError without monkeypatching: the shard directory's name is taken by a file.
    key = key_for()
    (store.artifacts_dir / key.digest[:2]).write_bytes(b"")
    assert store.publish(key, fake_artifact(tmp_path), compile_seconds=1) is None
    assert store.write_errors == 1


def test_publish_caller_errors_raise(store: ArtifactStore, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        store.publish(key_for(), tmp_path / "nope", compile_seconds=1)
    with pytest.raises(TypeError):
        store.publish(key_for(), fake_artifact(tmp_path), compile_seconds=1, extra={"x": {1, 2}})
    assert store.write_errors == 0 and store.stats() == (0, 0)


# --------------------------------------------------------------------------- listing, gc, verify


def test_stats_entries_and_gc_lru(tmp_path: Path) -> None:
    clock = Clock()
    store = ArtifactStore(tmp_path / "s", clock=clock, touch_interval_s=0)
    keys = [key_for(target=f"size:{n}") for n in (1, 2, 3, 4)]
    for i, key in enumerate(keys):
        clock.now = 1_000_000.0 + i * 100
        store.publish(key, fake_artifact(tmp_path, 10_000 + i), compile_seconds=i)
    total, count = store.stats()
    assert count == 4
    assert total == sum(p.stat().st_size for p in all_files(store.artifacts_dir))
    assert [m.digest for m in store.entries()] == [k.digest for k in keys]

    # Use the oldest, so the second-oldest becomes least recently used.
    clock.now = 1_000_500.0
    assert store.lookup(keys[0]) is not None
    assert store.gc() == []  # no limits: nothing to do

    # Older than 350 s: keys[1] (last used at +100) and keys[2] (+200).
    clock.now = 1_000_550.0
    removed = store.gc(max_age_s=300)
    assert [m.digest for m in removed] == [keys[1].digest, keys[2].digest]
    assert store.lookup(keys[1]) is None and store.quarantined == 0

    # Over budget: drop least recently used (keys[3], used at +300) until it fits.
    budget = store.stats()[0] - 1
    removed = store.gc(max_bytes=budget)
    assert [m.digest for m in removed] == [keys[3].digest]
    assert store.stats()[0] <= budget
    assert [m.digest for m in store.entries()] == [keys[0].digest]
    assert store.gc(max_bytes=0) and store.stats() == (0, 0)


def test_gc_sweeps_old_temporary_files_only(store: ArtifactStore, tmp_path: Path) -> None:
    key = key_for()
    path = store.publish(key, fake_artifact(tmp_path), compile_seconds=1)
    assert path is not None
    old = path.parent / f"{TMP_PREFIX}{key.digest}.bin.1.dead"
    fresh = path.parent / f"{TMP_PREFIX}{key.digest}.bin.2.live"
    old.write_bytes(b"x")
    fresh.write_bytes(b"y")
    stamp = old.stat().st_mtime - ORPHAN_GRACE_S - 1
    os.utime(old, (stamp, stamp))
    assert store.gc() == []
    assert not old.exists() and fresh.exists() and store.lookup(key) == path


def test_verify_quarantines_bad_entries(store: ArtifactStore, tmp_path: Path) -> None:
    keys = [key_for(target=f"size:{n}") for n in (1, 2, 3)]
    for key in keys:
        store.publish(key, fake_artifact(tmp_path), compile_seconds=1)
    corrupt_flip(store.artifact_path(keys[1]))
    _manifest_garbage(store.artifact_path(keys[2]))
    results = {r.digest: r for r in store.verify()}
    assert set(results) == {k.digest for k in keys}
    assert results[keys[0].digest].ok and results[keys[0].digest].reason == "ok"
    assert not results[keys[1].digest].ok
    assert results[keys[1].digest].reason == "checksum mismatch"
    assert results[keys[1].digest].manifest is not None
    assert not results[keys[2].digest].ok and results[keys[2].digest].manifest is None
    assert store.quarantined == 2
    again = store.verify()
    assert [(r.digest, r.ok) for r in again] == [(keys[0].digest, True)]


def test_clear(store: ArtifactStore, tmp_path: Path) -> None:
    for n in (1, 2):
        store.publish(key_for(target=f"size:{n}"), fake_artifact(tmp_path), compile_seconds=1)
    (store.inductor_cache_dir / "fxgraph").mkdir()
    (store.inductor_cache_dir / "fxgraph" / "k.so").write_bytes(b"so")
    (store.quarantine_dir / "junk.bin").write_bytes(b"q")
    store.save_profile("model", {8: 3})
    assert store.clear() == 2
    assert store.stats() == (0, 0)
    assert all_files(store.inductor_cache_dir) == [] and all_files(store.quarantine_dir) == []
    assert store.load_profile("model") == {8: 3}
    assert stat.S_IMODE(store.artifacts_dir.stat().st_mode) == 0o700
    assert store.publish(key_for(), fake_artifact(tmp_path), compile_seconds=1) is not None


# --------------------------------------------------------------------------- profiles


def test_profiles(store: ArtifactStore, caplog: pytest.LogCaptureFixture) -> None:
    assert store.load_profile("model-a") == {}
    store.save_profile("model-a", {8: 100, 1: 3, 4096: 1})
    store.save_profile("model-b", {16: 2})
    assert store.load_profile("model-a") == {1: 3, 8: 100, 4096: 1}
    store.save_profile("model-a", {8: 101})
    assert store.load_profile("model-a") == {8: 101}
    assert store.load_profile("model-b") == {16: 2}
    files = list(store.profiles_dir.iterdir())
    assert len(files) == 2 and not any(p.name.startswith(TMP_PREFIX) for p in files)
    for p in files:
        p.write_text("{not json")
    with caplog.at_level(logging.WARNING, logger="pwdaemon.store.store"):
        assert store.load_profile("model-a") == {}
    assert "unreadable profile" in caplog.text


def test_store_that_cannot_be_created_degrades_to_misses(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def read_only_mkdir(path: object, *args: object, **kw: object) -> None:
        raise OSError(errno.EROFS, "Read-only file system", str(path))

    monkeypatch.setattr(os, "mkdir", read_only_mkdir)
    with caplog.at_level(logging.WARNING, logger="pwdaemon.store.store"):
        store = ArtifactStore(tmp_path / "ro")
        assert store.lookup(key_for()) is None
        assert store.publish(key_for(), fake_artifact(tmp_path), compile_seconds=1) is None
    assert store.write_errors == 2
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1
    assert not (tmp_path / "ro").exists()


def test_a_cpu_piece_is_compiled_and_keyed_for_this_process_thread_count() -> None:
    # Inductor's C++ kernels are built for the compiling process's thread count (see
    # CPU_THREADS_OPTION): the worker compiles for the serving process's, and artifacts
    # built for one count are not loaded under another. A GPU piece's key is shared.
    cpu = cast(GraphPiece, SimpleNamespace(strategy=ShapeStrategy.UNBACKED, device="cpu"))
    gpu = cast(GraphPiece, SimpleNamespace(strategy=ShapeStrategy.UNBACKED, device="cuda:0"))
    threads = torch.get_num_threads()
    try:
        keys = []
        for n in (threads, threads + 1):
            torch.set_num_threads(n)
            assert compile_options({"max_autotune": False}, cpu) == {
                "max_autotune": False,
                CPU_THREADS_OPTION: n,
            }
            assert compile_options({}, gpu) == {}
            keys.append(make_key("g", "size:4", device="cpu", options=compile_options({}, cpu)))
    finally:
        torch.set_num_threads(threads)
    assert keys[0].digest != keys[1].digest
