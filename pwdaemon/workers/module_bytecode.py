"""Bytecode kept beside the Python modules Inductor generates, so a load does not compile.

Inductor loads each compiled graph's Python module (its `call` wrapper, its kernels'
sources and launchers) with `compile()` of the whole file, every time, in every process
(`torch._inductor.runtime.compile_tasks._reload_python_module`, torch 2.11-2.13): Python's
own bytecode cache is for imports, and these files are executed, not imported. One
`compile()` is one C call that keeps the GIL from start to end, which the gate cannot
park: a serving call that needs the GIL meanwhile waits for all of it. On this 2-core VM
a 1,100-1,300 line module of CPU kernels compiles in 3-8 ms; `marshal.loads` of its
bytecode takes 0.06-0.10 ms.

So the compile in that function is replaced, for files inside Inductor's cache, by one
that keeps the bytecode in a file beside the source (`<module>.py` ->
`<module>.<cache tag>.pwdaemon.pyc`) and reads it back where it was made from the same
source by the same Python. A compile worker, which loads every module it compiles, writes
it; the serving process, loading that module from the store, reads it. Anything unusual
(no file, another Python, another source, a short or corrupt file, a read-only store)
falls back to `compile()` itself.
"""

from __future__ import annotations

import builtins
import hashlib
import importlib.util
import logging
import marshal
import os
import sys
import threading
from pathlib import Path
from types import CodeType
from typing import Any

from pwdaemon.workers.files import replace_file

__all__ = ("install", "bytecode_path")

log = logging.getLogger(__name__)

# What a bytecode file starts with: Python's magic number for this bytecode format, the
# optimization level (asserts compiled in or not), and a digest of the source it came from
# and of its path (the code names its file: a store moved elsewhere compiles once again,
# so tracebacks name the file where it is).
_DIGEST_BYTES = 16
_MODE = 0o644  # as the modules beside it: readable by whoever reads the cache

_lock = threading.Lock()
_installed = False


def bytecode_path(source_path: str) -> Path:
    """Where the bytecode of the module at `source_path` is kept."""
    return Path(f"{source_path.removesuffix('.py')}.{sys.implementation.cache_tag}.pwdaemon.pyc")


def _header(source: str | bytes, filename: str) -> bytes:
    data = source.encode("utf-8", "surrogatepass") if isinstance(source, str) else source
    named = filename.encode("utf-8", "surrogatepass") + b"\0" + data
    digest = hashlib.sha256(named).digest()[:_DIGEST_BYTES]
    return importlib.util.MAGIC_NUMBER + bytes([sys.flags.optimize]) + digest


def cached_compile(source: Any, filename: Any, mode: str, *args: Any, **kwargs: Any) -> Any:
    """`compile()`, answered from the bytecode file beside `filename` where it holds this
    source's bytecode, and writing that file where it does not; only for whole modules
    (`mode="exec"`, no flags beyond `dont_inherit`) inside Inductor's cache."""
    if (
        mode != "exec"
        or args
        or set(kwargs) - {"dont_inherit"}
        or not isinstance(source, str | bytes)
        or not isinstance(filename, str)
        or not _in_inductor_cache(filename)
    ):
        return builtins.compile(source, filename, mode, *args, **kwargs)
    path = bytecode_path(filename)
    header = _header(source, filename)
    code = _read(path, header)
    if code is not None:
        return code
    code = builtins.compile(source, filename, mode, *args, **kwargs)
    _write(path, header, code)
    return code


def _in_inductor_cache(filename: str) -> bool:
    try:
        from torch._inductor.runtime.cache_dir_utils import cache_dir

        root = os.path.realpath(cache_dir())
    except Exception:
        return False
    return os.path.realpath(filename).startswith(root + os.sep)


def _read(path: Path, header: bytes) -> CodeType | None:
    try:
        data = path.read_bytes()
    except OSError:
        return None
    if not data.startswith(header):
        return None  # another Python, optimization level or source
    try:
        code = marshal.loads(data[len(header) :])
    except (EOFError, ValueError, TypeError):  # cut short or corrupt: compiled again
        return None
    return code if isinstance(code, CodeType) else None


def _write(path: Path, header: bytes, code: CodeType) -> None:
    try:
        replace_file(path, header + marshal.dumps(code), _MODE)
    except OSError as exc:  # a read-only store: loads keep compiling
        log.debug("pwdaemon: bytecode not kept for %s: %s", path, exc)


def install() -> bool:
    """Make Inductor's module loads use `cached_compile` (once per process). False where
    this torch loads its modules otherwise."""
    global _installed
    with _lock:
        if _installed:
            return True
        try:
            from torch._inductor.runtime import compile_tasks
        except ImportError:
            return False
        if not hasattr(compile_tasks, "_reload_python_module"):
            return False
        # A module global shadows the builtin for that module's code alone.
        compile_tasks.compile = cached_compile  # type: ignore[attr-defined]
        _installed = True
        return True
