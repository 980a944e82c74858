"""Compiles a worker refused, remembered beside the artifacts a key would have had.

A worker refuses a compile that holds for some sizes only (`SpecializedCompileError`:
a conv net's general, which Inductor's conv lowering compiles for a batch of 2 or more).
The same key (graph, target, device, versions, options) compiles to the same answer
every time, so an earlier run's refusal stands: a warm restart of a conv net spent 2.4 s
of its 3.4 s compiling its general again, to be refused again.

    artifacts/<digest[:2]>/<digest>.refused   {"target", "reason", "created", "rules"}

Kept in the artifacts tree on purpose: `pwdaemon cache clear` removes refusals with the
artifacts (and with the Inductor cache, whose stale entries are one cause of a refusal).
A refusal is not code: a store that others could write can at worst make this process
skip a compile, so reading one needs no permission check.
"""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING

from pwdaemon.store.files import write_atomically
from pwdaemon.store.keys import ArtifactKey

if TYPE_CHECKING:
    from pwdaemon.store.store import ArtifactStore

__all__ = ("REFUSAL_RULES", "REFUSAL_SUFFIX", "load_refusal", "save_refusal")

REFUSAL_SUFFIX = ".refused"
# The revision of the rules a worker refuses by (`workers.compiler`'s pinning check and
# its reasons, which the engine plans from). A refusal made under other rules is not
# taken: its key compiles again, once. Revision 2 (2026-12-06): a general pinned to size
# 1 says so (the engine compiles the range above 1 in its place), and a range open above
# is no longer refused at its end (2**31 - 1) by Inductor's 32-bit indexing guard.
REFUSAL_RULES = 2

log = logging.getLogger(__name__)


def save_refusal(store: ArtifactStore, key: ArtifactKey, reason: str) -> None:
    """Remember that compiling `key` was refused, and why. A store that cannot be written
    counts a write error (as `publish` does) and remembers nothing."""
    shard = store.shard_dir(key.digest)
    record = {
        "target": key.target,
        "reason": reason,
        "created": store.clock(),
        "rules": REFUSAL_RULES,
    }
    try:
        store._ensure_dir(store.artifacts_dir)
        store._ensure_dir(shard)
        write_atomically(
            shard,
            f"{key.digest}{REFUSAL_SUFFIX}",
            [json.dumps(record).encode()],
            file_mode=store.file_mode,
            durable=False,  # lost in a crash: the next run compiles the key once more
        )
    except OSError as exc:
        store.note_write_error(exc, f"save the refusal of {key.short}")


def load_refusal(store: ArtifactStore, key: ArtifactKey) -> str | None:
    """The reason compiling `key` was refused in an earlier run, or None."""
    path = store.shard_dir(key.digest) / f"{key.digest}{REFUSAL_SUFFIX}"
    try:
        record = json.loads(path.read_bytes())
        if record.get("target") != key.target:
            raise ValueError("the record belongs to another key")
        rules = record.get("rules", 1)  # records without it were made by the first rules
        if rules != REFUSAL_RULES:
            log.info(
                "refusal %s was made under other rules (%s, now %d): compiling again",
                path,
                rules,
                REFUSAL_RULES,
            )
            return None
        return str(record["reason"])
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        log.warning("ignoring an unreadable refusal %s: %s", path, exc)
        return None
