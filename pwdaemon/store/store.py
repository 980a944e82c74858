"""The artifact store: compiled runnables on disk, shared by every process of a host.

A compiled artifact is addressed by a key that covers everything that makes it valid
(graph code and placeholder specs, compile target, device and capability, torch and
triton versions, Inductor options), so the same key means the same artifact in any
process. The store is a plain directory:

    root/
      artifacts/<digest[:2]>/<digest>.bin    the artifact (CompiledArtifact, "binary")
      artifacts/<digest[:2]>/<digest>.json   its manifest, written after the artifact
      quarantine/                            corrupt entries moved out of the way
      claims/<digest>.claim                  "I am compiling this key" (pid, host, time)
      inductor/                              TORCHINDUCTOR_CACHE_DIR for workers and servers
      profiles/                              per-model size histograms for warm restarts

Writes go to a `.tmp-` name in the destination directory, are fsynced and renamed into
place, so a reader that only opens final names never sees a partial file. A manifest
appearing means its artifact is complete, which is what `watch()` relies on.

Artifacts are code that the loading process runs, so the store refuses to load from a
directory that someone other than us (or root, or an explicitly trusted uid such as the
host service's) could write to.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import functools
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import re
import shutil
import socket
import stat
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

if TYPE_CHECKING:
    import torch
    from watchdog.events import FileSystemEvent
    from watchdog.observers.api import BaseObserver

__all__ = [
    "CACHE_DIR_ENV",
    "SERVICE_CACHE_DIR",
    "ArtifactKey",
    "ArtifactStore",
    "Claim",
    "Manifest",
    "StoreWatcher",
    "UnsafeStoreError",
    "VerifyResult",
    "default_store_dir",
    "device_fingerprint",
    "make_key",
    "options_hash",
    "detect_torch_version",
    "detect_triton_version",
]

_log = logging.getLogger(__name__)

SERVICE_CACHE_DIR = Path("/var/cache/pwdaemon")
CACHE_DIR_ENV = "PWDAEMON_CACHE_DIR"

# Bumped when the meaning of a key or the artifact format changes, so old entries
# stop matching instead of being loaded under new assumptions.
_KEY_SCHEMA = "pwdaemon-artifact-key-v1"
_MANIFEST_FORMAT = 1

TMP_PREFIX = ".tmp-"
_ARTIFACT_SUFFIX = ".bin"
_MANIFEST_SUFFIX = ".json"
_CLAIM_SUFFIX = ".claim"
_DIGEST_RE = re.compile(r"^[0-9a-f]{64}$")
# A device string that is already a fingerprint ("cuda:sm90", "rocm:gfx942") rather than
# a torch device spec ("cuda", "cuda:0").
_FINGERPRINT_RE = re.compile(r"^[a-z_]+:(sm\d+|gfx\w+)$")

# A manifest is a few hundred bytes; refuse to parse anything absurd.
_MAX_MANIFEST_BYTES = 1 << 20
_COPY_CHUNK = 1 << 20
# A `.bin` without a manifest, or a `.tmp-` file, younger than this may belong to a
# publish in progress (on file systems where our flock is a no-op), so it is left alone.
ORPHAN_GRACE_S = 600.0
# A claim older than this is broken even if its pid looks alive (pid reuse, another
# host). Compiles can take many minutes; long ones should call Claim.refresh().
DEFAULT_STALE_CLAIM_S = 3600.0
# Rewriting a manifest on every lookup would cost an fsync per load; last-used only
# needs to be good enough to order entries for gc.
DEFAULT_TOUCH_INTERVAL_S = 60.0


class UnsafeStoreError(RuntimeError):
    """The store directory could be written by someone we do not trust; nothing is loaded."""


# --------------------------------------------------------------------------- keys


def _canonical_json(obj: object) -> str:
    """JSON with a single spelling for equal values, so hashes do not depend on dict order."""
    try:
        return json.dumps(
            obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
        )
    except (TypeError, ValueError) as exc:
        raise TypeError(f"value is not canonical JSON (str keys, finite numbers): {exc}") from exc


def _sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def options_hash(options: Mapping[str, object] | None) -> str:
    """Hash of Inductor/compiler options; None and {} are the same (no options)."""
    return _sha256_text(_canonical_json(dict(options or {})))


@functools.cache
def detect_torch_version() -> str:
    """The running torch version (imports torch on first use)."""
    import torch

    return str(torch.__version__)


@functools.cache
def detect_triton_version() -> str:
    """The installed triton version, or "none"; read from package metadata so that
    computing a key does not pay for importing triton."""
    for dist in ("triton", "pytorch-triton", "pytorch-triton-rocm", "pytorch-triton-xpu"):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    # A triton built into the environment without dist metadata.
    if importlib.util.find_spec("triton") is not None:
        try:
            import triton

            return str(getattr(triton, "__version__", "unknown"))
        except Exception:  # a broken triton install must not break keying
            return "unknown"
    return "none"


def device_fingerprint(device: torch.device | str) -> str:
    """What about a device decides whether an artifact runs on it.

    "cpu" for the CPU; "cuda:sm90" (compute capability) for an NVIDIA GPU, so every GPU of
    the same kind shares artifacts whatever its index; "rocm:gfx942" on ROCm. A string that
    is already a fingerprint is returned unchanged.
    """
    if isinstance(device, str) and (device == "cpu" or _FINGERPRINT_RE.match(device)):
        return device  # without importing torch: the CLI and helper processes stay light
    import torch

    dev = torch.device(device)
    if dev.type == "cuda":
        index = dev.index if dev.index is not None else torch.cuda.current_device()
        if torch.version.hip:
            arch = str(torch.cuda.get_device_properties(index).gcnArchName).split(":")[0]
            return f"rocm:{arch}"
        major, minor = torch.cuda.get_device_capability(index)
        return f"cuda:sm{major}{minor}"
    return dev.type


@dataclass(frozen=True)
class ArtifactKey:
    """Everything an artifact's validity depends on. `digest` names it on disk."""

    graph_hash: str
    target: str
    device: str
    torch_version: str
    triton_version: str
    options_hash: str

    def fields(self) -> dict[str, str]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @functools.cached_property
    def digest(self) -> str:
        """sha256 hex of all fields (and the key schema version)."""
        return _sha256_text(_canonical_json({"schema": _KEY_SCHEMA, **self.fields()}))

    @property
    def short(self) -> str:
        return self.digest[:12]

    @classmethod
    def from_fields(cls, data: Mapping[str, object]) -> ArtifactKey:
        """Rebuild a key from `fields()` output; ValueError when a field is missing or not a str."""
        values: dict[str, str] = {}
        for f in dataclasses.fields(cls):
            value = data.get(f.name)
            if not isinstance(value, str):
                raise ValueError(f"key field {f.name!r} missing or not a string")
            values[f.name] = value
        return cls(**values)


def make_key(
    graph_fingerprint: str,
    target: str,
    *,
    device: torch.device | str,
    options: Mapping[str, object] | None = None,
    torch_version: str | None = None,
    triton_version: str | None = None,
) -> ArtifactKey:
    """Key for compiling `graph_fingerprint` (graph code + placeholder specs, any string)
    for `target` ("general", "size:8", "range:1-16", "graph:8") on `device`.

    `device` is a fingerprint ("cpu", "cuda:sm90") or a torch device, which is
    fingerprinted. Versions default to the running process's; pass them to compute a key
    for another process (e.g. a client of the host service).
    """
    if not target:
        raise ValueError("target must be a non-empty string")
    return ArtifactKey(
        graph_hash=_sha256_text(graph_fingerprint),
        target=target,
        device=device_fingerprint(device),
        torch_version=torch_version if torch_version is not None else detect_torch_version(),
        triton_version=triton_version if triton_version is not None else detect_triton_version(),
        options_hash=options_hash(options),
    )


def _digest_of(key: ArtifactKey | str) -> str:
    digest = key.digest if isinstance(key, ArtifactKey) else key
    # A digest becomes a file name: refuse anything that could walk out of the store.
    if not _DIGEST_RE.match(digest):
        raise ValueError(f"not an artifact digest (64 lowercase hex chars): {digest!r}")
    return digest


# --------------------------------------------------------------------------- manifests


@dataclass(frozen=True)
class Manifest:
    """What the store knows about one artifact. `artifact` is where its bytes live."""

    key: ArtifactKey
    sha256: str
    size: int
    compile_seconds: float
    created: float
    last_used: float
    artifact: Path
    extra: Mapping[str, object] = field(default_factory=dict)

    @property
    def digest(self) -> str:
        return self.key.digest

    def to_json(self) -> dict[str, object]:
        return {
            "format": _MANIFEST_FORMAT,
            "digest": self.digest,
            "key": self.key.fields(),
            "sha256": self.sha256,
            "size": self.size,
            "compile_seconds": self.compile_seconds,
            "created": self.created,
            "last_used": self.last_used,
            "extra": dict(self.extra),
        }

    @classmethod
    def from_json(cls, data: object, artifact: Path) -> Manifest:
        """Parse and validate; ValueError says what is wrong."""
        if not isinstance(data, dict):
            raise ValueError("manifest is not a JSON object")
        if data.get("format") != _MANIFEST_FORMAT:
            raise ValueError(f"unknown manifest format {data.get('format')!r}")
        key_data = data.get("key")
        if not isinstance(key_data, dict):
            raise ValueError("manifest has no key")
        key = ArtifactKey.from_fields(key_data)
        if data.get("digest") != key.digest:
            raise ValueError("manifest digest does not match its key fields")
        sha = data.get("sha256")
        if not isinstance(sha, str) or not _DIGEST_RE.match(sha):
            raise ValueError("manifest sha256 missing or malformed")
        size = data.get("size")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise ValueError("manifest size missing or malformed")
        numbers: dict[str, float] = {}
        for name in ("compile_seconds", "created", "last_used"):
            value = data.get(name)
            if not isinstance(value, int | float) or isinstance(value, bool):
                raise ValueError(f"manifest {name} missing or not a number")
            numbers[name] = float(value)
        extra = data.get("extra", {})
        if not isinstance(extra, dict):
            raise ValueError("manifest extra is not an object")
        return cls(key=key, sha256=sha, size=size, artifact=artifact, extra=extra, **numbers)


class VerifyResult(NamedTuple):
    """One row of `ArtifactStore.verify()`; `manifest` is None when it could not be read."""

    digest: str
    manifest: Manifest | None
    ok: bool
    reason: str


# --------------------------------------------------------------------------- file helpers


@contextlib.contextmanager
def _dir_lock(path: Path, *, exclusive: bool) -> Iterator[int | None]:
    """flock a directory. Yields the directory fd (for fsync), or None if it cannot be opened.

    Locking is an extra guard against a reader checking an artifact while a second
    publisher of the same key swaps it; where flock is unsupported (some network file
    systems) we carry on unlocked, since every write is still atomic by rename.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        fd = -1
    if fd < 0:
        yield None
        return
    try:
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        yield fd
    finally:
        os.close(fd)  # closing the fd drops the lock


def _fsync_dir(path: Path, dir_fd: int | None = None) -> None:
    """Make a rename durable: the directory entry must reach the disk too."""
    if dir_fd is not None:
        os.fsync(dir_fd)
        return
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _tmp_name(final_name: str) -> str:
    return f"{TMP_PREFIX}{final_name}.{os.getpid()}.{uuid.uuid4().hex[:8]}"


def _is_artifact_name(name: str) -> bool:
    return name.endswith(_ARTIFACT_SUFFIX) and bool(
        _DIGEST_RE.match(name[: -len(_ARTIFACT_SUFFIX)])
    )


def _is_manifest_name(name: str) -> bool:
    return name.endswith(_MANIFEST_SUFFIX) and bool(
        _DIGEST_RE.match(name[: -len(_MANIFEST_SUFFIX)])
    )


def default_store_dir(environ: Mapping[str, str] | None = None) -> Path:
    """$PWDAEMON_CACHE_DIR, else $XDG_CACHE_HOME/pwdaemon, else ~/.cache/pwdaemon."""
    env = os.environ if environ is None else environ
    explicit = env.get(CACHE_DIR_ENV)
    if explicit:
        return Path(explicit).expanduser()
    xdg = env.get("XDG_CACHE_HOME")
    # The XDG spec says relative values are invalid and must be ignored.
    if xdg and os.path.isabs(xdg):
        return Path(xdg) / "pwdaemon"
    return Path.home() / ".cache" / "pwdaemon"


# --------------------------------------------------------------------------- claims


class Claim:
    """Exclusive right to compile one key, held by this process until released."""

    def __init__(self, store: ArtifactStore, digest: str, path: Path, token: str) -> None:
        self.store = store
        self.digest = digest
        self.path = path
        self.token = token
        self._held = True

    @property
    def held(self) -> bool:
        return self._held

    def release(self) -> None:
        """Remove the claim if it is still ours (it may have been broken as stale)."""
        if not self._held:
            return
        self._held = False
        with _dir_lock(self.store.claims_dir, exclusive=True):
            info = self.store._read_claim(self.path)
            if info is not None and info.get("token") == self.token:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.path)

    def refresh(self) -> bool:
        """Restart the stale timer for a long compile; False if the claim is no longer ours."""
        if not self._held:
            return False
        with _dir_lock(self.store.claims_dir, exclusive=True) as dir_fd:
            info = self.store._read_claim(self.path)
            if info is None or info.get("token") != self.token:
                self._held = False
                return False
            record = self.store._claim_record(self.token)
            self.store._write_atomically(
                self.path.parent, self.path.name, [json.dumps(record).encode()], dir_fd=dir_fd
            )
            return True

    def __enter__(self) -> Claim:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __repr__(self) -> str:
        return f"Claim({self.digest[:12]}, held={self._held})"


# --------------------------------------------------------------------------- watching


class StoreWatcher:
    """Calls `callback(digest, artifact_path)` when a complete artifact appears in the store.

    A watchdog observer reports manifest events from its own thread; a second thread
    debounces them per digest (a publish produces several events) and calls the callback
    once the digest has been quiet for `debounce_s`. Manifest rewrites that do not change
    the artifact (last-used updates by lookups) are not reported again.
    """

    def __init__(
        self,
        store: ArtifactStore,
        callback: Callable[[str, Path], None],
        *,
        polling: bool = False,
        debounce_s: float = 0.2,
        poll_interval_s: float = 1.0,
    ) -> None:
        self.store = store
        self._callback = callback
        self._debounce_s = debounce_s
        self._poll_interval_s = poll_interval_s
        self._cond = threading.Condition()
        self._pending: dict[str, float] = {}  # digest -> monotonic deadline
        self._reported: dict[str, str] = {}  # digest -> sha256 last reported
        self._stopping = False
        store._ensure_layout()  # the observer needs the directory to exist
        self._observer = self._make_observer(polling)
        self.polling = polling
        self._thread = threading.Thread(
            target=self._run, name="pwdaemon-store-watcher", daemon=True
        )

    def _make_observer(self, polling: bool) -> BaseObserver:
        from watchdog.events import (
            DirCreatedEvent,
            DirMovedEvent,
            FileClosedEvent,
            FileCreatedEvent,
            FileDeletedEvent,
            FileMovedEvent,
            FileSystemEventHandler,
        )
        from watchdog.observers import Observer
        from watchdog.observers.polling import PollingObserver

        watcher = self

        class _Handler(FileSystemEventHandler):
            def on_any_event(self, event: FileSystemEvent) -> None:
                watcher._on_event(event)

        observer = PollingObserver(timeout=self._poll_interval_s) if polling else Observer()
        observer.schedule(
            _Handler(),
            str(self.store.artifacts_dir),
            recursive=True,
            # Opens and no-write closes (every lookup reads manifests) are not wanted.
            event_filter=[
                FileCreatedEvent,
                FileMovedEvent,
                FileClosedEvent,
                FileDeletedEvent,
                DirCreatedEvent,
                DirMovedEvent,
            ],
        )
        return observer

    def start(self) -> StoreWatcher:
        try:
            self._observer.start()
        except OSError as exc:
            if self.polling:
                raise
            # Typically the inotify watch or instance limit: polling still works.
            _log.warning(
                "cannot watch %s with inotify (%s); polling every %.1f s instead",
                self.store.artifacts_dir,
                exc,
                self._poll_interval_s,
            )
            self.polling = True
            self._observer = self._make_observer(polling=True)
            self._observer.start()
        self._thread.start()
        return self

    def stop(self, timeout: float | None = 10.0) -> None:
        """Stop watching and join both threads; pending (not yet quiet) events are dropped."""
        self._observer.stop()
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._observer.is_alive():
            self._observer.join(timeout)
        # A callback may stop its own watcher; a thread cannot join itself.
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    def __enter__(self) -> StoreWatcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # Called on the observer thread.
    def _on_event(self, event: FileSystemEvent) -> None:
        if event.is_directory:
            return
        src = os.path.basename(os.fsdecode(event.src_path))
        dest = os.path.basename(os.fsdecode(event.dest_path)) if event.dest_path else ""
        kind = event.event_type
        if kind in ("deleted", "moved") and _is_manifest_name(src):
            # Quarantined or removed: forget it, so a republish is reported even when it
            # has the same checksum as before.
            with self._cond:
                digest = src[: -len(_MANIFEST_SUFFIX)]
                self._pending.pop(digest, None)
                self._reported.pop(digest, None)
        name = dest if kind == "moved" else src
        if kind in ("created", "moved", "closed") and _is_manifest_name(name):
            with self._cond:
                self._pending[name[: -len(_MANIFEST_SUFFIX)]] = time.monotonic() + self._debounce_s
                self._cond.notify_all()

    # The debounce thread.
    def _run(self) -> None:
        while True:
            with self._cond:
                while True:
                    if self._stopping:
                        return
                    now = time.monotonic()
                    due = [d for d, t in self._pending.items() if t <= now]
                    if due:
                        for digest in due:
                            del self._pending[digest]
                        break
                    wait = min(self._pending.values()) - now if self._pending else None
                    self._cond.wait(wait)
            for digest in due:
                self._fire(digest)

    def _fire(self, digest: str) -> None:
        manifest = self.store.manifest(digest)
        if manifest is None:
            return  # unreadable or gone: a later event (if any) tries again
        with self._cond:
            if self._reported.get(digest) == manifest.sha256:
                return
            self._reported[digest] = manifest.sha256
        try:
            self._callback(digest, manifest.artifact)
        except Exception:
            _log.exception("artifact watcher callback failed for %s", digest[:12])


# --------------------------------------------------------------------------- the store


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
        self._clock = clock
        self._trusted_uids = frozenset({0, os.geteuid(), *trusted_uids})
        self._host = socket.gethostname()
        # Counters read by metrics; plain ints, bumped from whatever thread notices.
        self.quarantined = 0
        self.write_errors = 0
        self._write_warned = False
        if create:
            try:
                self._ensure_layout()
            except OSError as exc:
                # A cache that cannot be created must not stop serving: lookups miss,
                # publishes fail and are counted.
                self._note_write_error(exc, "create the store directories")
        if check:
            self.check_permissions()

    # ---- layout

    @property
    def artifacts_dir(self) -> Path:
        return self.root / "artifacts"

    @property
    def quarantine_dir(self) -> Path:
        return self.root / "quarantine"

    @property
    def claims_dir(self) -> Path:
        return self.root / "claims"

    @property
    def inductor_cache_dir(self) -> Path:
        """Set TORCHINDUCTOR_CACHE_DIR to this in workers and serving processes: a CPU
        CompiledArtifact does not bundle its C++ kernels, they live in this cache."""
        return self.root / "inductor"

    @property
    def profiles_dir(self) -> Path:
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

    def _shard_dir(self, digest: str) -> Path:
        return self.artifacts_dir / digest[:2]

    def artifact_path(self, key: ArtifactKey | str) -> Path:
        digest = _digest_of(key)
        return self._shard_dir(digest) / f"{digest}{_ARTIFACT_SUFFIX}"

    def manifest_path(self, key: ArtifactKey | str) -> Path:
        digest = _digest_of(key)
        return self._shard_dir(digest) / f"{digest}{_MANIFEST_SUFFIX}"

    def _ensure_layout(self) -> None:
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
            self._check_stat(d, st, what="directory")

    def _check_stat(self, path: Path, st: os.stat_result, *, what: str) -> None:
        if st.st_uid not in self._trusted_uids:
            raise UnsafeStoreError(
                f"refusing artifact store {what} {path}: it is owned by uid {st.st_uid}, not by "
                f"you (uid {os.geteuid()}) or root, and artifacts are code this process would "
                f"run. Fix: `chown -R {os.geteuid()} {path}`, or use a store you own "
                f"(--dir or ${CACHE_DIR_ENV})."
            )
        if st.st_mode & 0o022:
            raise UnsafeStoreError(
                f"refusing artifact store {what} {path}: it is writable by group or others "
                f"(mode {stat.S_IMODE(st.st_mode):o}), so anyone could plant code this process "
                f"would run. Fix: `chmod go-w {path}`."
            )

    def _check_chain(self, shard: Path) -> None:
        self.check_permissions()
        with contextlib.suppress(FileNotFoundError):
            self._check_stat(shard, os.stat(shard), what="directory")

    # ---- errors

    def _note_write_error(self, exc: OSError, what: str) -> None:
        self.write_errors += 1
        # A read-only or full store fails every write the same way: say it once.
        if not self._write_warned:
            self._write_warned = True
            _log.warning(
                "artifact store %s is not writable (%s while trying to %s); compiled "
                "artifacts will not be cached until this is fixed. Further write errors "
                "are counted, not logged.",
                self.root,
                exc,
                what,
            )
        else:
            _log.debug("artifact store write error (%s): %s", what, exc)

    # ---- writing

    def _write_atomically(
        self,
        directory: Path,
        name: str,
        chunks: Iterable[bytes],
        *,
        dir_fd: int | None = None,
        durable: bool = True,
    ) -> tuple[str, int]:
        """Write `chunks` to directory/name via a `.tmp-` file and a rename.

        Returns (sha256, size) of what was written. The temporary file is removed on
        any failure, so a full disk leaves nothing behind.
        """
        tmp = directory / _tmp_name(name)
        fd = os.open(
            tmp,
            os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW,
            self.file_mode,
        )
        hasher = hashlib.sha256()
        size = 0
        try:
            try:
                os.fchmod(fd, self.file_mode)  # undo the umask, as for directories
                for chunk in chunks:
                    _write_all(fd, chunk)
                    hasher.update(chunk)
                    size += len(chunk)
                if durable:
                    os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, directory / name)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        if durable:
            _fsync_dir(directory, dir_fd)
        return hasher.hexdigest(), size

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
        _canonical_json(extra_dict)  # fail before touching the store
        digest = key.digest
        shard = self._shard_dir(digest)
        final = shard / f"{digest}{_ARTIFACT_SUFFIX}"
        with open(src, "rb") as source:
            try:
                self._ensure_dir(self.artifacts_dir)
                self._ensure_dir(shard)
                # Exclusive against readers verifying this shard, so nobody checks our new
                # artifact against the previous manifest of the same key.
                with _dir_lock(shard, exclusive=True) as dir_fd:
                    sha, size = self._write_atomically(
                        shard,
                        final.name,
                        iter(lambda: source.read(_COPY_CHUNK), b""),
                        dir_fd=dir_fd,
                    )
                    now = self._clock()
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
                self._note_write_error(exc, f"publish {digest[:12]}")
                return None
        return final

    def _write_manifest(
        self, manifest: Manifest, *, dir_fd: int | None = None, durable: bool = True
    ) -> None:
        data = (json.dumps(manifest.to_json(), indent=1, sort_keys=True) + "\n").encode()
        self._write_atomically(
            manifest.artifact.parent,
            f"{manifest.digest}{_MANIFEST_SUFFIX}",
            [data],
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
        digest = _digest_of(key)
        try:
            return self._read_manifest_file(digest)
        except (OSError, ValueError):
            return None

    def _verify_entry(self, digest: str) -> tuple[Manifest | None, str]:
        """(manifest, "ok") or (manifest-or-None, why not). "missing" means a plain miss.

        Raises UnsafeStoreError for an artifact file someone else could have written.
        """
        apath = self.artifact_path(digest)
        try:
            manifest = self._read_manifest_file(digest)
        except FileNotFoundError:
            try:
                age = time.time() - os.lstat(apath).st_mtime
            except FileNotFoundError:
                return None, "missing"
            if age < ORPHAN_GRACE_S:
                return None, "missing"  # maybe a publish in progress
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
            self._check_stat(apath, st, what="file")
            if st.st_size != manifest.size:
                return manifest, f"size {st.st_size} != {manifest.size} in manifest (truncated?)"
            hasher = hashlib.sha256()
            with os.fdopen(fd, "rb", closefd=False) as f:
                for chunk in iter(lambda: f.read(_COPY_CHUNK), b""):
                    hasher.update(chunk)
            if hasher.hexdigest() != manifest.sha256:
                return manifest, "checksum mismatch"
        except OSError as exc:
            return manifest, f"artifact unreadable ({exc})"
        finally:
            os.close(fd)
        return manifest, "ok"

    def lookup(self, key: ArtifactKey | str) -> Path | None:
        """Path of the artifact for `key` if it is present and its checksum verifies.

        A corrupt or incomplete entry is quarantined and None returned (the caller
        recompiles). Raises UnsafeStoreError when the store is not safe to load from.
        """
        digest = _digest_of(key)
        apath = self.artifact_path(digest)
        mpath = self.manifest_path(digest)
        if not os.path.lexists(mpath) and not os.path.lexists(apath):
            return None  # the common miss, without locks or permission checks
        shard = self._shard_dir(digest)
        self._check_chain(shard)
        with _dir_lock(shard, exclusive=False):
            manifest, reason = self._verify_entry(digest)
            if reason == "missing":
                return None
            if manifest is None or reason != "ok":
                self._quarantine(digest, reason)
                return None
            self._touch(manifest)
        return apath

    def _touch(self, manifest: Manifest) -> None:
        now = self._clock()
        if now - manifest.last_used < self.touch_interval_s:
            return
        try:
            # Not fsynced: losing a last-used update in a crash only makes gc less precise.
            self._write_manifest(dataclasses.replace(manifest, last_used=now), durable=False)
        except OSError as exc:
            _log.debug("could not update last-used of %s: %s", manifest.digest[:12], exc)

    def _quarantine(self, digest: str, reason: str) -> None:
        self.quarantined += 1
        _log.warning("quarantining artifact %s: %s", digest[:12], reason)
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
            self._note_write_error(exc, f"quarantine {digest[:12]}")

    # ---- listing and maintenance

    def _iter_names(self) -> Iterator[tuple[Path, os.DirEntry[str]]]:
        """(shard dir, entry) for every file in the artifacts tree."""
        try:
            shards = [e for e in os.scandir(self.artifacts_dir) if e.is_dir(follow_symlinks=False)]
        except FileNotFoundError:
            return
        for shard in sorted(shards, key=lambda e: e.name):
            try:
                files = list(os.scandir(shard.path))
            except FileNotFoundError:
                continue
            for entry in files:
                yield Path(shard.path), entry

    def entries(self) -> list[Manifest]:
        """Every readable manifest, oldest first (not verified: see `verify`)."""
        found = []
        for _shard, entry in self._iter_names():
            if _is_manifest_name(entry.name):
                m = self.manifest(entry.name[: -len(_MANIFEST_SUFFIX)])
                if m is not None:
                    found.append(m)
        found.sort(key=lambda m: (m.created, m.digest))
        return found

    def stats(self) -> tuple[int, int]:
        """(bytes on disk under artifacts/, number of artifacts with a manifest)."""
        total = count = 0
        for _shard, entry in self._iter_names():
            with contextlib.suppress(FileNotFoundError):
                total += entry.stat(follow_symlinks=False).st_size
            if _is_manifest_name(entry.name):
                count += 1
        return total, count

    def verify(self) -> list[VerifyResult]:
        """Check every entry's checksum; bad ones are quarantined."""
        self.check_permissions()
        digests = sorted(
            {
                entry.name.rsplit(".", 1)[0]
                for _shard, entry in self._iter_names()
                if _is_manifest_name(entry.name) or _is_artifact_name(entry.name)
            }
        )
        results = []
        for digest in digests:
            shard = self._shard_dir(digest)
            with _dir_lock(shard, exclusive=False):
                try:
                    manifest, reason = self._verify_entry(digest)
                except UnsafeStoreError as exc:
                    manifest, reason = self.manifest(digest), f"unsafe: {exc}"
                if reason == "missing":
                    continue
                ok = reason == "ok"
                if not ok:
                    self._quarantine(digest, reason)
            results.append(VerifyResult(digest, manifest, ok, reason))
        return results

    def _remove_entry(self, manifest: Manifest) -> int:
        """Delete an entry (manifest first); returns bytes freed."""
        freed = 0
        shard = manifest.artifact.parent
        with _dir_lock(shard, exclusive=True):
            for path in (self.manifest_path(manifest.digest), manifest.artifact):
                try:
                    freed += os.lstat(path).st_size
                    os.unlink(path)
                except FileNotFoundError:
                    continue
        return freed

    def gc(self, max_bytes: int | None = None, max_age_s: float | None = None) -> list[Manifest]:
        """Remove entries unused for longer than `max_age_s`, then least recently used ones
        until the artifacts take at most `max_bytes`. Also drops leftover `.tmp-` files and
        old quarantined files. Returns the removed entries, least recently used first.

        A process that looked an entry up just before gc removes it gets FileNotFoundError
        when loading; it should treat that as a miss.
        """
        now = self._clock()
        removed: list[Manifest] = []
        try:
            self._sweep_leftovers(max_age_s)
            total, _count = self.stats()
            for m in sorted(self.entries(), key=lambda m: (m.last_used, m.digest)):
                too_old = max_age_s is not None and now - m.last_used > max_age_s
                too_big = max_bytes is not None and total > max_bytes
                if not (too_old or too_big):
                    break  # sorted by last use: everything after is newer
                total -= self._remove_entry(m)
                removed.append(m)
        except OSError as exc:
            self._note_write_error(exc, "gc")
        return removed

    def _sweep_leftovers(self, max_age_s: float | None) -> None:
        wall = time.time()  # compared with file mtimes, which are wall-clock
        for _shard, entry in self._iter_names():
            if not entry.name.startswith(TMP_PREFIX):
                continue
            with contextlib.suppress(FileNotFoundError):
                if wall - entry.stat(follow_symlinks=False).st_mtime > ORPHAN_GRACE_S:
                    os.unlink(entry.path)
        if max_age_s is None:
            return
        with contextlib.suppress(FileNotFoundError):
            for entry in os.scandir(self.quarantine_dir):
                with contextlib.suppress(FileNotFoundError):
                    if wall - entry.stat(follow_symlinks=False).st_mtime > max_age_s:
                        os.unlink(entry.path)

    def clear(self, *, include_inductor: bool = True) -> int:
        """Delete every artifact, the quarantine and (by default) the Inductor cache.
        Profiles and claims are kept. Returns the number of artifacts removed."""
        _total, count = self.stats()
        targets = [self.artifacts_dir, self.quarantine_dir]
        if include_inductor:
            targets.append(self.inductor_cache_dir)
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

    # ---- claims

    def _claim_path(self, digest: str) -> Path:
        return self.claims_dir / f"{digest}{_CLAIM_SUFFIX}"

    def _claim_record(self, token: str) -> dict[str, object]:
        return {"pid": os.getpid(), "host": self._host, "time": self._clock(), "token": token}

    def _read_claim(self, path: Path) -> dict[str, Any] | None:
        """The claim's record, {} if unreadable, None if there is no claim."""
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError:
            return {}
        try:
            data = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError):
            return {}
        return data if isinstance(data, dict) else {}

    def _stale_reason(self, path: Path, info: Mapping[str, Any]) -> str | None:
        """Why a claim may be broken, or None if its holder may still be compiling."""
        pid, host, created = info.get("pid"), info.get("host"), info.get("time")
        if not isinstance(pid, int) or not isinstance(created, int | float):
            # Unreadable: judge by the file's age (wall clock, like mtimes).
            try:
                age = time.time() - os.stat(path).st_mtime
            except FileNotFoundError:
                return "gone"
            return f"unreadable claim {age:.0f} s old" if age > self.stale_claim_s else None
        if host == self._host:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return f"holder pid {pid} is gone"
            except PermissionError:
                pass  # alive, another user's
        age = self._clock() - created
        if age > self.stale_claim_s:
            return f"claim is {age:.0f} s old (stale after {self.stale_claim_s:.0f} s)"
        return None

    def _create_claim_file(self, path: Path, record: Mapping[str, object]) -> bool:
        """Create `path` holding `record` iff it does not exist; complete on appearance."""
        data = json.dumps(record).encode()
        tmp = path.parent / _tmp_name(path.name)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, self.file_mode)
        try:
            try:
                _write_all(fd, data)
            finally:
                os.close(fd)
            # link() fails if the name exists, atomically, and readers never see the
            # claim half-written (as they could with O_EXCL + write).
            try:
                os.link(tmp, path)
                return True
            except FileExistsError:
                return False
            except OSError as exc:
                if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP):
                    raise
            # File systems without hard links.
            try:
                fd = os.open(
                    path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, self.file_mode
                )
            except FileExistsError:
                return False
            try:
                _write_all(fd, data)
            finally:
                os.close(fd)
            return True
        finally:
            with contextlib.suppress(OSError):
                os.unlink(tmp)

    def claim(self, key: ArtifactKey | str) -> Claim | None:
        """Claim the right to compile `key`; None if a live process holds it.

        A claim whose holder died (same host, pid gone) or that is older than
        `stale_claim_s` is broken. Raises OSError if claims cannot be written at all.
        """
        digest = _digest_of(key)
        self._ensure_dir(self.claims_dir)
        path = self._claim_path(digest)
        # One lock over check-break-create, so two processes breaking the same stale
        # claim cannot remove each other's fresh one.
        with _dir_lock(self.claims_dir, exclusive=True):
            for _attempt in range(2):
                info = self._read_claim(path)
                if info is not None:
                    why = self._stale_reason(path, info)
                    if why is None:
                        return None
                    _log.info("breaking claim on %s: %s", digest[:12], why)
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(path)
                token = uuid.uuid4().hex
                if self._create_claim_file(path, self._claim_record(token)):
                    return Claim(self, digest, path, token)
                # Lost to a process that could not take the lock (no flock): look again.
        return None

    # ---- profiles

    def _profile_path(self, model_fingerprint: str) -> Path:
        return self.profiles_dir / f"{_sha256_text(model_fingerprint)[:40]}.json"

    def save_profile(self, model_fingerprint: str, counts: Mapping[int, int]) -> Path | None:
        """Store a model's size histogram (size -> calls) for the next start. Like publish,
        a store that cannot be written gives None and a counted write error."""
        record = {
            "model": model_fingerprint,
            "updated": self._clock(),
            "counts": {str(int(size)): int(n) for size, n in sorted(counts.items())},
        }
        path = self._profile_path(model_fingerprint)
        try:
            self._ensure_dir(self.profiles_dir)
            self._write_atomically(path.parent, path.name, [json.dumps(record).encode()])
        except OSError as exc:
            self._note_write_error(exc, "save a profile")
            return None
        return path

    def load_profile(self, model_fingerprint: str) -> dict[int, int]:
        """The saved histogram, or {} if there is none or it cannot be read."""
        path = self._profile_path(model_fingerprint)
        try:
            data = json.loads(path.read_bytes())
            if data.get("model") != model_fingerprint:
                raise ValueError("profile belongs to another model")
            return {int(size): int(n) for size, n in data["counts"].items()}
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            _log.warning("ignoring unreadable profile %s: %s", path, exc)
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
