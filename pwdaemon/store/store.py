"""The artifact store: compiled runnables on disk, shared by every process of a host.

An artifact is addressed by its key's digest (see `keys`), so the same key means the
same artifact in any process. The store is a plain directory:

    root/
      artifacts/<digest[:2]>/<digest>.bin    the artifact (CompiledArtifact, "binary")
      artifacts/<digest[:2]>/<digest>.json   its manifest, written after the artifact
      artifacts/<digest[:2]>/<digest>.refused  a worker refused to compile it (`refusals`)
      quarantine/                            corrupt entries moved out of the way
      claims/<digest>.claim                  "I am compiling this key" (pid, host, time)
      inductor/                              TORCHINDUCTOR_CACHE_DIR for workers and servers
      profiles/                              per-model size histograms, failed shape
                                             strategies and saved traces, for warm
                                             restarts

Writes are atomic (see `files`): a manifest appearing means its artifact is complete,
which is what `watch()` relies on. Artifacts are code that the loading process runs, so
loading checks who could have written them (see `safety`).

This module holds the per-key paths (publish, lookup, quarantine) and the layout;
listing and maintenance live in `maintenance`, claims in `claims`, the watcher in
`watcher`.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import logging
import os
import socket
import stat
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from pwdaemon.store import maintenance
from pwdaemon.store.claims import Claim, ClaimBook
from pwdaemon.store.files import (
    ARTIFACT_SUFFIX,
    COPY_CHUNK,
    MANIFEST_SUFFIX,
    ORPHAN_GRACE_S,
    dir_lock,
    write_atomically,
)
from pwdaemon.store.keys import ArtifactKey, canonical_json, digest_of, sha256_text
from pwdaemon.store.manifest import Manifest, VerifyResult
from pwdaemon.store.paths import default_store_dir
from pwdaemon.store.safety import check_stat
from pwdaemon.store.watcher import StoreWatcher

__all__ = ("DEFAULT_STALE_CLAIM_S", "DEFAULT_TOUCH_INTERVAL_S", "ArtifactStore")

log = logging.getLogger(__name__)

# A manifest is a few hundred bytes; refuse to parse anything absurd.
_MAX_MANIFEST_BYTES = 1 << 20
# A claim older than this is broken even if its pid looks alive (pid reuse, another
# host). Compiles can take many minutes; long ones should call Claim.refresh().
DEFAULT_STALE_CLAIM_S = 3600.0
# Rewriting a manifest on every lookup would cost an fsync per load; last-used only
# needs to be good enough to order entries for gc.
DEFAULT_TOUCH_INTERVAL_S = 60.0
# A saved trace's file: `<magic> <model id> <sha256 of the payload>\n<payload>`.
_TRACE_MAGIC = "pwdaemon-trace-1"
_TRACE_SUFFIX = ".trace"
# `verify_entry` verdicts that are not a problem with the entry.
_OK = "ok"
_MISSING = "missing"


class ArtifactStore:
    """A directory of compiled artifacts. Safe to use from many processes and threads.

    `root`: explicit, else `default_store_dir()`. `dir_mode`: mode of directories the
    store creates (0o700; the host service passes 0o755 so clients can read); files get
    the same bits minus execute. `create`: make the layout now (False for read-only
    tools such as `pwdaemon cache ls`). `check`: verify permissions now (loading always
    checks). `trusted_uids`: owners besides us and root whose directories and files we
    load from (a client of the host service passes the service's uid, known from the
    socket's peer credentials). `stale_claim_s`: age after which a claim is broken even
    if its pid looks alive. `touch_interval_s`: how stale last-used may get before a
    lookup rewrites the manifest. `clock`: wall-clock source for manifest and claim
    times (tests inject one).

    Counters for metrics: `quarantined` (corrupt entries found), `write_errors`
    (writes that failed: read-only store, full disk).
    """

    def __init__(
        self,
        root: str | os.PathLike[str] | None = None,
        *,
        dir_mode: int = 0o700,
        create: bool = True,
        check: bool = True,
        trusted_uids: Iterable[int] = (),
        stale_claim_s: float = DEFAULT_STALE_CLAIM_S,
        touch_interval_s: float = DEFAULT_TOUCH_INTERVAL_S,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.root = Path(root) if root is not None else default_store_dir()
        self.root = self.root.expanduser().absolute()
        self.dir_mode = dir_mode
        self.file_mode = dir_mode & 0o666
        self.stale_claim_s = stale_claim_s
        self.touch_interval_s = touch_interval_s
        self.clock = clock
        self._trusted_uids = frozenset({0, os.geteuid(), *trusted_uids})
        self.claims = ClaimBook(
            self.claims_dir,
            file_mode=self.file_mode,
            stale_claim_s=stale_claim_s,
            clock=clock,
            host=socket.gethostname(),
        )
        # Counters read by metrics; plain ints, bumped from whatever thread notices.
        self.quarantined = 0
        self.write_errors = 0
        self._write_warned = False
        if create:
            try:
                self.ensure_layout()
            except OSError as exc:
                # A cache that cannot be created must not stop serving: lookups miss,
                # publishes fail and are counted.
                self.note_write_error(exc, "create the store directories")
        if check:
            self.check_permissions()

    # ---- layout

    @property
    def artifacts_dir(self) -> Path:
        """Where artifacts and their manifests live, in shards by digest prefix."""
        return self.root / "artifacts"

    @property
    def quarantine_dir(self) -> Path:
        """Where corrupt entries are moved (kept for inspection until gc)."""
        return self.root / "quarantine"

    @property
    def claims_dir(self) -> Path:
        """Where claims (who is compiling which key) live."""
        return self.root / "claims"

    @property
    def inductor_cache_dir(self) -> Path:
        """Set TORCHINDUCTOR_CACHE_DIR to this in workers and serving processes: a CPU
        CompiledArtifact does not bundle its C++ kernels, they live in this cache."""
        return self.root / "inductor"

    @property
    def profiles_dir(self) -> Path:
        """Where per-model size histograms for warm restarts live."""
        return self.root / "profiles"

    def inductor_env(self) -> dict[str, str]:
        """Environment for a worker process so it shares the Inductor cache."""
        return {"TORCHINDUCTOR_CACHE_DIR": str(self.inductor_cache_dir)}

    def _dirs(self) -> list[Path]:
        return [
            self.root,
            self.artifacts_dir,
            self.quarantine_dir,
            self.claims_dir,
            self.inductor_cache_dir,
            self.profiles_dir,
        ]

    def shard_dir(self, digest: str) -> Path:
        """The artifacts subdirectory that holds `digest`'s files."""
        return self.artifacts_dir / digest[:2]

    def artifact_path(self, key: ArtifactKey | str) -> Path:
        """Where the artifact of `key` (or digest) lives, whether or not it exists."""
        digest = digest_of(key)
        return self.shard_dir(digest) / f"{digest}{ARTIFACT_SUFFIX}"

    def manifest_path(self, key: ArtifactKey | str) -> Path:
        """Where the manifest of `key` (or digest) lives, whether or not it exists."""
        digest = digest_of(key)
        return self.shard_dir(digest) / f"{digest}{MANIFEST_SUFFIX}"

    def ensure_layout(self) -> None:
        """Create the store's directories that are missing, with `dir_mode`."""
        # Parents of the root get default modes, like any cache dir (~/.cache).
        self.root.parent.mkdir(parents=True, exist_ok=True)
        for d in self._dirs():
            self._ensure_dir(d)

    def _ensure_dir(self, path: Path) -> None:
        try:
            os.mkdir(path, self.dir_mode)
        except FileExistsError:
            return
        # mkdir's mode is filtered by the umask; the service wants exactly dir_mode.
        os.chmod(path, self.dir_mode)

    # ---- security

    def check_permissions(self) -> None:
        """Raise UnsafeStoreError if any store directory could be written by someone else."""
        for d in self._dirs():
            try:
                st = os.stat(d)
            except FileNotFoundError:
                continue
            check_stat(d, st, trusted_uids=self._trusted_uids, what="directory")

    def _check_chain(self, shard: Path) -> None:
        self.check_permissions()
        try:
            st = os.stat(shard)
        except FileNotFoundError:
            return
        check_stat(shard, st, trusted_uids=self._trusted_uids, what="directory")

    # ---- errors

    def note_write_error(self, exc: OSError, what: str) -> None:
        """Count a failed write (`what` says which) and warn about the first one."""
        self.write_errors += 1
        # A read-only or full store fails every write the same way: say it once.
        if not self._write_warned:
            self._write_warned = True
            log.warning(
                "artifact store %s is not writable (%s while trying to %s); compiled "
                "artifacts will not be cached until this is fixed. Further write errors "
                "are counted, not logged.",
                self.root,
                exc,
                what,
            )
        else:
            log.debug("artifact store write error (%s): %s", what, exc)

    # ---- writing

    def publish(
        self,
        key: ArtifactKey,
        src: str | os.PathLike[str],
        *,
        compile_seconds: float,
        extra: Mapping[str, object] | None = None,
    ) -> Path | None:
        """Copy the file `src` into the store under `key`; returns the stored path.

        Never raises for a store that cannot be written (read-only, full disk): returns
        None, counts `write_errors` and warns once. A missing `src` or non-JSON `extra`
        is a caller bug and raises.
        """
        extra_dict = dict(extra or {})
        canonical_json(extra_dict)  # fail before touching the store
        digest = key.digest
        shard = self.shard_dir(digest)
        final = shard / f"{digest}{ARTIFACT_SUFFIX}"
        with open(src, "rb") as source:
            try:
                self._ensure_dir(self.artifacts_dir)
                self._ensure_dir(shard)
                # Exclusive against readers verifying this shard, so nobody checks our new
                # artifact against the previous manifest of the same key.
                with dir_lock(shard, exclusive=True) as dir_fd:
                    sha, size = write_atomically(
                        shard,
                        final.name,
                        iter(lambda: source.read(COPY_CHUNK), b""),
                        file_mode=self.file_mode,
                        dir_fd=dir_fd,
                    )
                    now = self.clock()
                    manifest = Manifest(
                        key=key,
                        sha256=sha,
                        size=size,
                        compile_seconds=float(compile_seconds),
                        created=now,
                        last_used=now,
                        artifact=final,
                        extra=extra_dict,
                    )
                    self._write_manifest(manifest, dir_fd=dir_fd)
            except OSError as exc:
                self.note_write_error(exc, f"publish {digest[:12]}")
                return None
        return final

    def _write_manifest(
        self, manifest: Manifest, *, dir_fd: int | None = None, durable: bool = True
    ) -> None:
        data = (json.dumps(manifest.to_json(), indent=1, sort_keys=True) + "\n").encode()
        write_atomically(
            manifest.artifact.parent,
            f"{manifest.digest}{MANIFEST_SUFFIX}",
            [data],
            file_mode=self.file_mode,
            dir_fd=dir_fd,
            durable=durable,
        )

    # ---- reading

    def _read_manifest_file(self, digest: str) -> Manifest:
        """Raises FileNotFoundError, or ValueError saying what is wrong."""
        path = self.manifest_path(digest)
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            with os.fdopen(fd, "rb", closefd=False) as f:
                raw = f.read(_MAX_MANIFEST_BYTES + 1)
        finally:
            os.close(fd)
        if len(raw) > _MAX_MANIFEST_BYTES:
            raise ValueError("manifest too large")
        try:
            data = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"manifest is not valid JSON ({exc})") from None
        manifest = Manifest.from_json(data, self.artifact_path(digest))
        if manifest.digest != digest:
            raise ValueError("manifest belongs to another digest")
        return manifest

    def manifest(self, key: ArtifactKey | str) -> Manifest | None:
        """The manifest of `key` (or digest), or None if absent or unreadable. Not verified."""
        digest = digest_of(key)
        try:
            return self._read_manifest_file(digest)
        except (OSError, ValueError):
            return None

    def verify_entry(self, digest: str) -> tuple[Manifest | None, str]:
        """(manifest, "ok") or (manifest-or-None, why not). "missing" means a plain miss.

        Raises UnsafeStoreError for an artifact file someone else could have written.
        The caller holds the shard's lock.
        """
        apath = self.artifact_path(digest)
        try:
            manifest = self._read_manifest_file(digest)
        except FileNotFoundError:
            try:
                age = time.time() - os.lstat(apath).st_mtime
            except FileNotFoundError:
                return None, _MISSING
            if age < ORPHAN_GRACE_S:
                return None, _MISSING  # maybe a publish in progress
            return None, "manifest missing"
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                return None, "manifest is a symlink"
            return None, f"manifest unreadable ({exc})"
        except ValueError as exc:
            return None, f"bad manifest: {exc}"
        try:
            fd = os.open(apath, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            return manifest, "artifact missing"
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                return manifest, "artifact is a symlink"
            return manifest, f"artifact unreadable ({exc})"
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                return manifest, "artifact is not a regular file"
            check_stat(apath, st, trusted_uids=self._trusted_uids, what="file")
            if st.st_size != manifest.size:
                return manifest, f"size {st.st_size} != {manifest.size} in manifest (truncated?)"
            hasher = hashlib.sha256()
            with os.fdopen(fd, "rb", closefd=False) as f:
                for chunk in iter(lambda: f.read(COPY_CHUNK), b""):
                    hasher.update(chunk)
            if hasher.hexdigest() != manifest.sha256:
                return manifest, "checksum mismatch"
        except OSError as exc:
            return manifest, f"artifact unreadable ({exc})"
        finally:
            os.close(fd)
        return manifest, _OK

    def lookup(self, key: ArtifactKey | str) -> Path | None:
        """Path of the artifact for `key` if it is present and its checksum verifies.

        A corrupt or incomplete entry is quarantined and None returned (the caller
        recompiles). Raises UnsafeStoreError when the store is not safe to load from.
        """
        digest = digest_of(key)
        apath = self.artifact_path(digest)
        mpath = self.manifest_path(digest)
        if not os.path.lexists(mpath) and not os.path.lexists(apath):
            return None  # the common miss, without locks or permission checks
        shard = self.shard_dir(digest)
        self._check_chain(shard)
        with dir_lock(shard, exclusive=False):
            manifest, reason = self.verify_entry(digest)
            if reason == _MISSING:
                return None
            if manifest is None or reason != _OK:
                self.quarantine_entry(digest, reason)
                return None
            self._touch(manifest)
        return apath

    def _touch(self, manifest: Manifest) -> None:
        now = self.clock()
        if now - manifest.last_used < self.touch_interval_s:
            return
        try:
            # Not fsynced: losing a last-used update in a crash only makes gc less precise.
            self._write_manifest(dataclasses.replace(manifest, last_used=now), durable=False)
        except OSError as exc:
            log.debug("could not update last-used of %s: %s", manifest.digest[:12], exc)

    def quarantine_entry(self, digest: str, reason: str) -> None:
        """Move a corrupt entry out of the artifacts tree (logged and counted)."""
        self.quarantined += 1
        log.warning("quarantining artifact %s: %s", digest[:12], reason)
        stamp = time.time_ns()
        try:
            self._ensure_dir(self.quarantine_dir)
            # Manifest first: without it nobody treats the entry as complete any more.
            for src in (self.manifest_path(digest), self.artifact_path(digest)):
                dest = self.quarantine_dir / f"{digest}.{stamp}{src.suffix}"
                try:
                    os.replace(src, dest)
                except FileNotFoundError:
                    continue
                except OSError as exc:
                    if exc.errno != errno.EXDEV:
                        raise
                    os.unlink(src)  # quarantine on another file system: just drop it
        except OSError as exc:
            self.note_write_error(exc, f"quarantine {digest[:12]}")

    # ---- listing and maintenance (see `maintenance`)

    def entries(self) -> list[Manifest]:
        """Every readable manifest, oldest first (not verified: see `verify`)."""
        return maintenance.entries(self)

    def stats(self) -> tuple[int, int]:
        """(bytes on disk under artifacts/, number of artifacts with a manifest)."""
        return maintenance.stats(self)

    def verify(self) -> list[VerifyResult]:
        """Check every entry's checksum; bad ones are quarantined."""
        return maintenance.verify(self)

    def gc(self, max_bytes: int | None = None, max_age_s: float | None = None) -> list[Manifest]:
        """Remove entries unused for longer than `max_age_s`, then least recently used
        ones until the artifacts take at most `max_bytes` (see `maintenance.gc`)."""
        return maintenance.gc(self, max_bytes, max_age_s)

    def clear(self, *, include_inductor: bool = True) -> int:
        """Delete every artifact, the quarantine and (by default) the Inductor cache.
        Profiles and claims are kept. Returns the number of artifacts removed."""
        return maintenance.clear(self, include_inductor=include_inductor)

    # ---- claims

    def claim(self, key: ArtifactKey | str) -> Claim | None:
        """Claim the right to compile `key`; None if a live process holds it.

        A claim whose holder died (same host, pid gone) or that is older than
        `stale_claim_s` is broken. Raises OSError if claims cannot be written at all.
        """
        digest = digest_of(key)
        self._ensure_dir(self.claims_dir)
        return self.claims.take(digest)

    # ---- profiles

    def _profile_path(self, model_fingerprint: str) -> Path:
        return self.profiles_dir / f"{sha256_text(model_fingerprint)[:40]}.json"

    def save_profile(self, model_fingerprint: str, counts: Mapping[int, int]) -> Path | None:
        """Store a model's size histogram (size -> calls) for the next start. Like publish,
        a store that cannot be written gives None and a counted write error."""
        counts_ = {str(int(size)): int(n) for size, n in sorted(counts.items())}
        return self._save_record(model_fingerprint, "counts", counts_, "save a profile")

    def load_profile(self, model_fingerprint: str) -> dict[int, int]:
        """The saved histogram, or {} if there is none or it cannot be read."""
        counts = self._load_record(model_fingerprint, "counts")
        try:
            return {int(size): int(n) for size, n in counts.items()}
        except (ValueError, TypeError) as exc:
            log.warning("ignoring an unreadable profile of %s: %s", model_fingerprint, exc)
            return {}

    def save_strategy_failures(self, model_id: str, failures: Mapping[str, str]) -> Path | None:
        """Store which shape strategies failed to trace a model (strategy -> dynamo's
        reason), so that its next start does not trace with them again."""
        record = {str(k): str(v) for k, v in failures.items()}
        return self._save_record(f"strategies:{model_id}", "failed", record, "save strategies")

    def load_strategy_failures(self, model_id: str) -> dict[str, str]:
        """The saved strategy failures, or {} if there are none or they cannot be read."""
        failed = self._load_record(f"strategies:{model_id}", "failed")
        return {str(k): str(v) for k, v in failed.items()}

    # ---- saved traces (pwdaemon.serving.saved_trace)

    def _trace_path(self, model_id: str) -> Path:
        return self.profiles_dir / f"{sha256_text(f'trace:{model_id}')[:40]}{_TRACE_SUFFIX}"

    def save_trace(self, model_id: str, payload: bytes) -> Path | None:
        """Store a model's saved trace for its next start (None: a counted write error)."""
        header = f"{_TRACE_MAGIC} {model_id} {hashlib.sha256(payload).hexdigest()}\n"
        path = self._trace_path(model_id)
        try:
            self._ensure_dir(self.profiles_dir)
            write_atomically(
                path.parent, path.name, [header.encode(), payload], file_mode=self.file_mode
            )
        except OSError as exc:
            self.note_write_error(exc, "save a trace")
            return None
        return path

    def load_trace(self, model_id: str) -> bytes | None:
        """The saved trace's bytes if present, the model's and intact, else None (a
        corrupt one is logged). A trace is code this process runs: raises
        UnsafeStoreError when the store or the file could be written by others."""
        path = self._trace_path(model_id)
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return None
        self.check_permissions()
        check_stat(path, st, trusted_uids=self._trusted_uids, what="file")
        try:
            data = path.read_bytes()
            line, _, payload = data.partition(b"\n")
            magic, model, digest = line.decode().split(" ")
            if magic != _TRACE_MAGIC or model != model_id:
                raise ValueError("not this model's trace")
            if hashlib.sha256(payload).hexdigest() != digest:
                raise ValueError("checksum mismatch")
        except (OSError, ValueError, UnicodeDecodeError) as exc:
            log.warning("ignoring unreadable saved trace %s: %s", path, exc)
            return None
        return payload

    def _save_record(self, model: str, field: str, value: Any, what: str) -> Path | None:
        record = {"model": model, "updated": self.clock(), field: value}
        path = self._profile_path(model)
        try:
            self._ensure_dir(self.profiles_dir)
            write_atomically(
                path.parent, path.name, [json.dumps(record).encode()], file_mode=self.file_mode
            )
        except OSError as exc:
            self.note_write_error(exc, what)
            return None
        return path

    def _load_record(self, model: str, field: str) -> dict[str, Any]:
        path = self._profile_path(model)
        try:
            data = json.loads(path.read_bytes())
            if data.get("model") != model:
                raise ValueError("the record belongs to another model")
            value = data[field]
            if not isinstance(value, dict):
                raise ValueError(f"{field} is not a mapping")
            return value
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            log.warning("ignoring unreadable profile %s: %s", path, exc)
            return {}

    # ---- watching

    def watch(
        self,
        callback: Callable[[str, Path], None],
        *,
        polling: bool = False,
        debounce_s: float = 0.2,
        poll_interval_s: float = 1.0,
    ) -> StoreWatcher:
        """Start calling `callback(digest, artifact_path)` for artifacts published from now
        on, by any process. `polling=True` for file systems without inotify (NFS).
        The callback runs on the watcher's thread; it should `lookup()` before loading."""
        return StoreWatcher(
            self, callback, polling=polling, debounce_s=debounce_s, poll_interval_s=poll_interval_s
        ).start()

    def __repr__(self) -> str:
        return f"ArtifactStore({str(self.root)!r})"
