"""Kernels a killed compile left half-written in Inductor's cache, and their rebuild.

Inductor builds a C++ kernel by running g++ with the cache's final path as its output
and skips the build wherever that path exists (`_worker_compile_cpp`, torch 2.11-2.13).
pwdaemon kills compile workers (a timeout, a hung or starved worker, a detach that
cancels a job in flight), and their process group with them: a kill while g++ links
leaves a truncated `.so` at the final path. Every later compile that needs that kernel
then fails to load it ("file too short"), in every worker, after a restart too: the
cache lives in the store. A CI run lost BERT's general that way (three attempts, each
"ImportError: .../inductor/o5/co55....main.so: file too short").

So a compile that fails loading a `.so` inside Inductor's cache removes that file and is
tried once more in the same worker, with Inductor's in-process caches cleared (a kernel's
loader is cached per key and may hold the finished build it would not redo). The rebuild
compiles the kernel again from its source, which the cache keys on: a kernel is rebuilt,
never replaced by another. Only files inside the cache are removed, only the ones the
failure names, and only where they still fail to load here: another worker may have
rebuilt one since (under Inductor's file lock for it); removing a file that another
worker is writing costs that worker one failed attempt, which the engine retries.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ("compile_past_broken_kernels", "broken_kernels")

# The dynamic loader's message names the file first: "<path>.so: file too short",
# "<path>.so: invalid ELF header", "<path>.so: cannot open shared object file".
_LOADER_FAILURE = re.compile(r"(/[^\s:'\"]+\.so): ")


def _cache_root() -> Path:
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    return Path(cache_dir()).resolve()


def _chain(exc: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and all(current is not s for s in seen):
        seen.append(current)
        current = current.__cause__ or current.__context__
    return seen


def broken_kernels(exc: BaseException, cache: Path) -> list[Path]:
    """The `.so` files inside `cache` that `exc` (or an exception it came from) failed
    to load, as the dynamic loader named them."""
    found: list[Path] = []
    for link in _chain(exc):
        for match in _LOADER_FAILURE.finditer(str(link)):
            path = Path(match.group(1)).resolve()
            if path.is_relative_to(cache) and path.is_file() and path not in found:
                found.append(path)
    return found


def _fails_to_load(path: Path) -> bool:
    try:
        ctypes.CDLL(str(path))  # a kernel this process may run anyway: harmless to map
    except OSError:
        return True
    return False


def compile_past_broken_kernels(
    compile_once: Callable[[], tuple[Any, str]],
) -> tuple[Any, str]:
    """`compile_once()` (which returns an artifact and a note), or where it fails loading
    kernels of Inductor's cache, once more after removing them; the note then says which
    kernels were rebuilt."""
    try:
        return compile_once()
    except Exception as exc:
        broken = broken_kernels(exc, _cache_root())
        if not broken:
            raise
    removed = [path for path in broken if _fails_to_load(path)]
    for path in removed:
        with contextlib.suppress(FileNotFoundError):  # another worker removed it
            os.unlink(path)
    from torch._inductor.utils import clear_caches

    clear_caches()
    artifact, note = compile_once()
    if not removed:  # rebuilt by another worker since this compile failed on them
        return artifact, note
    names = ", ".join(p.name for p in removed)
    rebuilt = (
        f"rebuilt {names}: Inductor's cache held it broken (a compile killed while it was written)"
    )
    return artifact, f"{note}; {rebuilt}" if note else rebuilt
