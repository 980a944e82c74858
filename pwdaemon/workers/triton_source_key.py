"""Triton's source key, replayed from a record while Triton's files are unchanged.

Triton names every kernel in its cache by a key that begins with `triton_key()`: a sha256
of its compiler, backend and language sources and of `libtriton.so`, computed on the
first kernel compile or load of every process and cached for that process
(`functools.lru_cache`). On the H200 machine (torch 2.11) it took 1.2 s of a warm
restart of about 2 s from attach to every size specialized (a sampled profile,
2026-12-04); the pre-warm computes it beside Inductor's imports
(`pwdaemon.workers.prewarm.start_triton_key`), and the restart still waited for it.

`prime()` replays it as `setup_record.torch_key()` replays torch's source key: keyed by
Triton's version, its directory and the name, size and modification time of every file
under it (a walk of stat calls), recorded beside Inductor's cache
(`TORCHINDUCTOR_CACHE_DIR`, which `attach()` points into the store).

Triton has no setter for its key (torch's has `set()`), and the cache belongs to the
lru_cache wrapper. `fill_cache()` fills it by calling the wrapper once while the wrapped
function's body is one that returns the recorded key (its code and defaults swapped for
that call, then put back): the wrapper caches what the function returned, so every later
call in the process, Triton's own included, gets the key without hashing. Only a
zero-argument function without a closure behind an lru_cache is treated so; any other
shape of `triton_key` is computed as Triton would.

What a replay cannot see: a file under Triton's directory rewritten with its size and
modification time kept.
"""

from __future__ import annotations

import importlib.machinery
import logging
import os
import threading
import types
from collections.abc import Callable
from pathlib import Path

from pwdaemon.workers.setup_record import RECORD_DIR, SetupRecord, digest, source_files

log = logging.getLogger(__name__)

# One file for the key, not the machine-fingerprinted record of `setup_record`: that
# fingerprint needs Inductor's modules, and the key is wanted while they import.
_RECORD_NAME = "triton-key.json"
# What `triton_key()` reads (Python sources, `libtriton.so`) is among these files; a
# superset is safe: an unrelated change only costs one recomputed key.
_SUFFIXES = tuple(importlib.machinery.all_suffixes())

# One swap at a time: two overlapping swaps could put back each other's body.
_SWAP_LOCK = threading.Lock()


def record_for_environment() -> SetupRecord | None:
    """Where this process's Triton key is recorded: beside Inductor's cache, as the
    environment names it (None without one: the key is then computed, not recorded)."""
    cache = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if not cache:
        return None
    return SetupRecord(Path(cache) / RECORD_DIR / _RECORD_NAME)


def question(root: str, version: str) -> str:
    """Which Triton key is asked for: Triton's version, its directory and its files."""
    return "triton_key|" + digest([version, root, source_files(root, _SUFFIXES)])


def prime(
    key_fn: Callable[[], object], root: str, version: str, record: SetupRecord | None
) -> object:
    """Triton's key for this process, cached in `key_fn` (Triton's `triton_key`, its
    package directory `root` and `version`): replayed from `record` where Triton's files
    are the ones it was computed from, else computed and recorded."""
    if record is None:
        return key_fn()
    try:
        asked = question(root, version)
    except OSError:
        return key_fn()
    known = record.lookup(asked)
    if isinstance(known, str) and fill_cache(key_fn, known):
        log.debug("pwdaemon: Triton's source key replayed from %s", record.path)
        return key_fn()
    key = key_fn()
    if isinstance(key, str):
        record.add(asked, key)
    return key


def fill_cache(key_fn: Callable[[], object], key: str) -> bool:
    """Put `key` in the cache of `key_fn`, a zero-argument function behind an lru_cache,
    without running its body; False (nothing changed) for any other kind of function."""
    function = getattr(key_fn, "__wrapped__", None)
    code = getattr(function, "__code__", None)
    if (
        not callable(getattr(key_fn, "cache_info", None))
        or not isinstance(function, types.FunctionType)
        or not isinstance(code, types.CodeType)
        or code.co_argcount
        or code.co_kwonlyargcount
        or code.co_freevars
    ):
        return False
    defaults = function.__defaults__
    with _SWAP_LOCK:
        # A call on another thread meanwhile gets the same key from the swapped body; one
        # already running its real body keeps its own code object.
        function.__code__, function.__defaults__ = _recorded.__code__, (key,)
        try:
            key_fn()
        finally:
            function.__code__, function.__defaults__ = code, defaults
    return True


def _recorded(key: object = None) -> object:
    # The body `fill_cache` lends Triton's function for one call: its default is the key.
    return key
