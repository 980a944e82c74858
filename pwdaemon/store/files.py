"""Atomic file helpers for the store: directory locks, durable renames, temporary names.

Every write goes to a `.tmp-` name in the destination directory, is fsynced and renamed
into place, so a reader that only opens final names never sees a partial file. These
helpers know nothing about keys or manifests beyond the names the store gives its files.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path

from pwdaemon.store.keys import DIGEST_RE

__all__ = (
    "ARTIFACT_SUFFIX",
    "CLAIM_SUFFIX",
    "COPY_CHUNK",
    "MANIFEST_SUFFIX",
    "ORPHAN_GRACE_S",
    "TMP_PREFIX",
    "create_new",
    "dir_lock",
    "fsync_dir",
    "is_artifact_name",
    "is_manifest_name",
    "tmp_name",
    "write_all",
    "write_atomically",
)

TMP_PREFIX = ".tmp-"
ARTIFACT_SUFFIX = ".bin"
MANIFEST_SUFFIX = ".json"
CLAIM_SUFFIX = ".claim"
# A `.bin` without a manifest, or a `.tmp-` file, younger than this may belong to a
# publish in progress (on file systems where our flock is a no-op), so it is left alone.
ORPHAN_GRACE_S = 600.0
# Large enough that copying an artifact is a few hundred syscalls, small enough to stream.
COPY_CHUNK = 1 << 20


@contextlib.contextmanager
def dir_lock(path: Path, *, exclusive: bool) -> Iterator[int | None]:
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


def fsync_dir(path: Path, dir_fd: int | None = None) -> None:
    """Make a rename durable: the directory entry must reach the disk too."""
    if dir_fd is not None:
        os.fsync(dir_fd)
        return
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_all(fd: int, data: bytes) -> None:
    """os.write until every byte is written (a write may be short)."""
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def tmp_name(final_name: str) -> str:
    """A temporary name for `final_name`, unique per process and call, that gc recognises."""
    return f"{TMP_PREFIX}{final_name}.{os.getpid()}.{uuid.uuid4().hex[:8]}"


def is_artifact_name(name: str) -> bool:
    """Whether a file name is `<digest>.bin`."""
    return name.endswith(ARTIFACT_SUFFIX) and bool(DIGEST_RE.match(name[: -len(ARTIFACT_SUFFIX)]))


def is_manifest_name(name: str) -> bool:
    """Whether a file name is `<digest>.json`."""
    return name.endswith(MANIFEST_SUFFIX) and bool(DIGEST_RE.match(name[: -len(MANIFEST_SUFFIX)]))


def write_atomically(
    directory: Path,
    name: str,
    chunks: Iterable[bytes],
    *,
    file_mode: int,
    dir_fd: int | None = None,
    durable: bool = True,
) -> tuple[str, int]:
    """Write `chunks` to directory/name via a `.tmp-` file and a rename.

    The file gets exactly `file_mode`. Returns (sha256, size) of what was written. The
    temporary file is removed on any failure, so a full disk leaves nothing behind.
    `durable=False` skips the fsyncs, for writes whose loss in a crash is harmless.
    """
    tmp = directory / tmp_name(name)
    fd = os.open(
        tmp,
        os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW,
        file_mode,
    )
    hasher = hashlib.sha256()
    size = 0
    try:
        try:
            os.fchmod(fd, file_mode)  # undo the umask, as for directories
            for chunk in chunks:
                write_all(fd, chunk)
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
        fsync_dir(directory, dir_fd)
    return hasher.hexdigest(), size


def create_new(path: Path, data: bytes, *, file_mode: int) -> bool:
    """Create `path` holding `data` iff it does not exist; False if it already does.

    The file is complete when it appears under its name, so a reader never sees it
    half-written.
    """
    tmp = path.parent / tmp_name(path.name)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, file_mode)
    try:
        try:
            write_all(fd, data)
        finally:
            os.close(fd)
        # link() fails if the name exists, atomically, and readers never see the
        # file half-written (as they could with O_EXCL + write).
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
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, file_mode)
        except FileExistsError:
            return False
        try:
            write_all(fd, data)
        finally:
            os.close(fd)
        return True
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
