"""Files the workers and the serving process share beside Inductor's cache, replaced whole.

Several processes read and write them at once (workers, servers, replicas on one host):
each is written under a temporary name and renamed over the old one, so a reader sees a
whole file or the one before. Unsynced: a file lost in a crash is worked out again by
the next process that needs it.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path


def replace_file(path: Path, data: bytes, mode: int) -> None:
    """Write `data` to `path` atomically, with exactly `mode`. Raises OSError (a read-only
    or full disk) with nothing left behind."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".tmp-{path.name}.")
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
