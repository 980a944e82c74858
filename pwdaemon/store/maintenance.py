"""Listing and maintaining a store: entries, sizes, verify, gc and clear.

What `pwdaemon cache ls | verify | gc | clear` runs. These walk the whole artifacts tree,
unlike the per-key paths of `ArtifactStore` (publish, lookup), and take the same shard
locks, so they are safe while other processes serve and publish.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from pwdaemon.store.files import (
    MANIFEST_SUFFIX,
    ORPHAN_GRACE_S,
    TMP_PREFIX,
    dir_lock,
    is_artifact_name,
    is_manifest_name,
)
from pwdaemon.store.manifest import Manifest, VerifyResult
from pwdaemon.store.safety import UnsafeStoreError

if TYPE_CHECKING:
    from pwdaemon.store.store import ArtifactStore

__all__ = ("clear", "entries", "gc", "iter_files", "stats", "verify")


def iter_files(store: ArtifactStore) -> Iterator[tuple[Path, os.DirEntry[str]]]:
    """(shard dir, entry) for every file in the artifacts tree."""
    try:
        shards = [e for e in os.scandir(store.artifacts_dir) if e.is_dir(follow_symlinks=False)]
    except FileNotFoundError:
        return
    for shard in sorted(shards, key=lambda e: e.name):
        try:
            files = list(os.scandir(shard.path))
        except FileNotFoundError:
            continue
        for entry in files:
            yield Path(shard.path), entry


def entries(store: ArtifactStore) -> list[Manifest]:
    """Every readable manifest, oldest first (not verified: see `verify`)."""
    found = []
    for _shard, entry in iter_files(store):
        if is_manifest_name(entry.name):
            m = store.manifest(entry.name[: -len(MANIFEST_SUFFIX)])
            if m is not None:
                found.append(m)
    found.sort(key=lambda m: (m.created, m.digest))
    return found


def stats(store: ArtifactStore) -> tuple[int, int]:
    """(bytes on disk under artifacts/, number of artifacts with a manifest)."""
    total = count = 0
    for _shard, entry in iter_files(store):
        with contextlib.suppress(FileNotFoundError):
            total += entry.stat(follow_symlinks=False).st_size
        if is_manifest_name(entry.name):
            count += 1
    return total, count


def verify(store: ArtifactStore) -> list[VerifyResult]:
    """Check every entry's checksum; bad ones are quarantined."""
    store.check_permissions()
    digests = sorted(
        {
            entry.name.rsplit(".", 1)[0]
            for _shard, entry in iter_files(store)
            if is_manifest_name(entry.name) or is_artifact_name(entry.name)
        }
    )
    results = []
    for digest in digests:
        with dir_lock(store.shard_dir(digest), exclusive=False):
            try:
                manifest, reason = store.verify_entry(digest)
            except UnsafeStoreError as exc:
                manifest, reason = store.manifest(digest), f"unsafe: {exc}"
            if reason == "missing":
                continue
            ok = reason == "ok"
            if not ok:
                store.quarantine_entry(digest, reason)
        results.append(VerifyResult(digest, manifest, ok, reason))
    return results


def _remove_entry(store: ArtifactStore, manifest: Manifest) -> int:
    """Delete an entry (manifest first); returns bytes freed."""
    freed = 0
    with dir_lock(manifest.artifact.parent, exclusive=True):
        for path in (store.manifest_path(manifest.digest), manifest.artifact):
            try:
                freed += os.lstat(path).st_size
                os.unlink(path)
            except FileNotFoundError:
                continue
    return freed


def gc(
    store: ArtifactStore, max_bytes: int | None = None, max_age_s: float | None = None
) -> list[Manifest]:
    """Remove entries unused for longer than `max_age_s`, then least recently used ones
    until the artifacts take at most `max_bytes`. Also drops leftover `.tmp-` files and
    old quarantined files. Returns the removed entries, least recently used first.

    A process that looked an entry up just before gc removes it gets FileNotFoundError
    when loading; it should treat that as a miss.
    """
    now = store.clock()
    removed: list[Manifest] = []
    try:
        _sweep_leftovers(store, max_age_s)
        total, _count = stats(store)
        for m in sorted(entries(store), key=lambda m: (m.last_used, m.digest)):
            too_old = max_age_s is not None and now - m.last_used > max_age_s
            too_big = max_bytes is not None and total > max_bytes
            if not (too_old or too_big):
                break  # sorted by last use: everything after is newer
            total -= _remove_entry(store, m)
            removed.append(m)
    except OSError as exc:
        store.note_write_error(exc, "gc")
    return removed


def _sweep_leftovers(store: ArtifactStore, max_age_s: float | None) -> None:
    wall = time.time()  # compared with file mtimes, which are wall-clock
    for _shard, entry in iter_files(store):
        if not entry.name.startswith(TMP_PREFIX):
            continue
        with contextlib.suppress(FileNotFoundError):
            if wall - entry.stat(follow_symlinks=False).st_mtime > ORPHAN_GRACE_S:
                os.unlink(entry.path)
    if max_age_s is None:
        return
    with contextlib.suppress(FileNotFoundError):
        for entry in os.scandir(store.quarantine_dir):
            with contextlib.suppress(FileNotFoundError):
                if wall - entry.stat(follow_symlinks=False).st_mtime > max_age_s:
                    os.unlink(entry.path)


def clear(store: ArtifactStore, *, include_inductor: bool = True) -> int:
    """Delete every artifact, the quarantine and (by default) the Inductor cache.
    Profiles and claims are kept. Returns the number of artifacts removed."""
    _total, count = stats(store)
    targets = [store.artifacts_dir, store.quarantine_dir]
    if include_inductor:
        targets.append(store.inductor_cache_dir)
    for d in targets:
        try:
            children = list(os.scandir(d))
        except FileNotFoundError:
            continue
        # Empty the directories rather than remove them: keeps their checked modes.
        for entry in children:
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)
    return count
