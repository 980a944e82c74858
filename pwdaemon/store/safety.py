"""Who may have written a store: artifacts are code the loading process runs.

The store refuses to load from a directory or file that someone other than us, root, or
an explicitly trusted uid (such as the host service's) owns or could write to.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Collection
from pathlib import Path

from pwdaemon.store.paths import CACHE_DIR_ENV

__all__ = ("UnsafeStoreError", "check_stat")


class UnsafeStoreError(RuntimeError):
    """The store directory could be written by someone we do not trust; nothing is loaded."""


def check_stat(path: Path, st: os.stat_result, *, trusted_uids: Collection[int], what: str) -> None:
    """Raise UnsafeStoreError, saying how to fix it, if `path` (whose stat is `st`) is
    owned by an untrusted uid or writable by group or others. `what` names it."""
    if st.st_uid not in trusted_uids:
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
