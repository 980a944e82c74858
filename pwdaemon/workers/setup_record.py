"""Answers of Inductor's per-process set-up, kept on disk for the next process.

Three pieces of Inductor's set-up are worked out again in every process, though their
answers only change with the machine or the torch installation:

- the CPU vector-ISA probe (`VecISA.check_build`): `g++ --version`, a test build (skipped
  when cached) and a dlopen child per candidate ISA, about 0.5 s here even with the build
  cached. A load waits for it (`pwdaemon.workers.compiler.load_artifact`).
- the C++ prefix header's preprocessing (`codecache._precompile_header`): before it
  looks for the precompiled header it already built, Inductor runs `g++ -E` on the
  header and `openssl sha512` on the result to name it, ~0.3 s on the first load of
  every process. On this 2-core VM that compiler, even at niceness 19, kept one vCPU for
  its whole run while serving's two OpenMP threads shared the other (BERT calls of
  57-151 ms during a warm restart, bench/stalls.py).
- torch's source key (`codecache.torch_key`, part of every cache key): a sha256 of every
  module file under torch's directory, read whole, 0.16-0.19 s of a 2-core machine's
  time in every serving process and compile worker, most of it under the GIL that a
  warm restart's trace and loads share. `torch_key()` here replays it keyed by those
  files' names, sizes and modification times (a walk of stat calls, ~0.04 s) and sets it
  with the `set()` torch itself uses to hand the key to its compile workers.

`install()` wraps the first two so that an answer is written next to Inductor's own cache and
replayed by later processes, keyed by what it depends on: the torch build, the compiler
candidates Inductor would search (resolved paths, sizes and modification times), the
CPU's features, the include and library paths, and the question itself (the ISA and
its flags and code; the header, its file and the compile command). A failed probe is
never replayed: it may be a transient one (the dlopen child timing out on a loaded
machine), and a replayed "no" would cost every later kernel its vector ISA; a machine
whose compiler lacks an ISA the CPU has re-probes that one ISA. A header answer is
replayed only while the precompiled header it names is on disk.

What a replay cannot see: system headers changed under an unchanged compiler binary (a
precompiled header would then be stale). Compiler packages ship their headers with the
binary, which is part of the key. A torch source file rewritten with its size and
modification time kept (restored by hand to both) would keep its old source key.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.machinery
import json
import logging
import os
import re
import shutil
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

from pwdaemon.workers.files import replace_file

log = logging.getLogger(__name__)

# Bump when a record's meaning changes: an old record is then simply not found.
_RECORD_VERSION = 2
RECORD_DIR = "pwdaemon-setup"
# Readable by whoever reads the Inductor cache beside it (its kernels are no more private).
_RECORD_MODE = 0o644
# Environment that changes what the compiler finds (headers, libraries) or which one runs.
_ENVIRONMENT = (
    "CXX",
    "TORCH_INDUCTOR_INSTALL_GXX",
    "LD_LIBRARY_PATH",
    "CPATH",
    "C_INCLUDE_PATH",
    "CPLUS_INCLUDE_PATH",
)

# Memory addresses in reprs ("<function f at 0x7f...>"): they differ between processes.
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")

_lock = threading.Lock()
_installed = False
# Set on a thread inside `replay_only()` (a thread-local: a load on another thread may
# probe meanwhile).
_replaying = threading.local()
_record: SetupRecord | None = None  # this machine's record, once installed


def _file_identity(path: str | None) -> list[object]:
    """Where a program or file resolves to and which build of it is there, without
    running it."""
    if path is None:
        return [None]
    found = shutil.which(path) or (path if os.path.exists(path) else None)
    if found is None:
        return [path, None]
    real = os.path.realpath(found)
    try:
        st = os.stat(real)
    except OSError:
        return [path, real, None]
    return [path, real, st.st_size, st.st_mtime_ns]


def machine_fingerprint() -> str:
    """What every recorded answer depends on, apart from its own question."""
    import torch
    from torch._inductor import config, cpu_vec_isa

    cxx = config.cpp.cxx
    candidates = list(cxx) if isinstance(cxx, (list, tuple)) else [cxx]
    facts = {
        "version": _RECORD_VERSION,
        "torch": [torch.__version__, os.path.dirname(torch.__file__)],
        "python": sys.version,
        "compilers": [_file_identity(c) for c in candidates],
        "environment": {name: os.environ.get(name) for name in _ENVIRONMENT},
        "cpu": cpu_vec_isa.x86_isa_checker(),
        "vec_isa_ok": config.cpp.vec_isa_ok,
    }
    return hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()


def _stable(value: object) -> object:
    """A JSON stand-in for a value of a compile command that is the same in every
    process: a vector ISA by its name and flags (its repr shows a function's address)."""
    flags = getattr(value, "build_arch_flags", None)
    if callable(flags):
        return [type(value).__name__, str(value), flags()]
    return _ADDRESS.sub("", repr(value))


def digest(value: object) -> str:
    """A sha256 of `value`'s JSON form: what a recorded question is keyed by."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=_stable).encode()).hexdigest()


class SetupRecord:
    """Recorded answers of one machine fingerprint, in one JSON file: question -> answer
    (true for a probe that succeeded, a path for a preprocessed header)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._known: dict[str, object] | None = None

    def _read(self) -> dict[str, object]:
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        if not isinstance(data, dict):
            return {}
        return {k: v for k, v in data.items() if isinstance(k, str)}

    def lookup(self, question: str) -> object | None:
        """The answer recorded in this or an earlier process, if any."""
        if self._known is None or question not in self._known:
            # A miss reads the file again: a compile worker may have recorded the answer
            # since this process first read it (the serving process's first load then
            # replays the worker's ISA probe instead of probing itself).
            self._known = self._read()
        return self._known.get(question)

    def add(self, question: str, answer: object) -> None:
        """Record an answer. Processes add concurrently: read, merge, replace atomically
        (a lost update costs one later process one probe, nothing else)."""
        known = self._read()
        known[question] = answer
        self._known = known
        with contextlib.suppress(OSError):
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # Unsynced: lost in a crash, the next process asks once more.
            data = json.dumps(known, sort_keys=True).encode()
            replace_file(self.path, data, _RECORD_MODE)


def isa_question(isa: object, arch_flags: str, code: str) -> str:
    """One probe: which ISA class, with which flags, building which program."""
    code_digest = hashlib.sha256(code.encode()).hexdigest()[:16]
    return f"isa|{type(isa).__name__}|{arch_flags}|{code_digest}"


def header_question(header: str, hashable_cmd_line: str, compile_command: dict[str, Any]) -> str:
    """One preprocessing: which header (and which file it is), under which command."""
    import torch

    found = os.path.join(os.path.dirname(torch.__file__), "include", header)
    return "header|" + digest([header, _file_identity(found), hashable_cmd_line, compile_command])


def install() -> None:
    """Wrap Inductor's ISA probe and header preprocessing with the record, once per
    process (before the first `pick_vec_isa()`: its answers are cached in memory after)."""
    global _installed
    with _lock:
        if _installed:
            return
        _installed = True
        try:
            from torch._inductor import codecache, cpu_vec_isa
            from torch._inductor.runtime.cache_dir_utils import cache_dir

            global _record
            name = f"{machine_fingerprint()}.json"
            record = _record = SetupRecord(Path(cache_dir()) / RECORD_DIR / name)
            probe = cpu_vec_isa.VecISA.check_build
            cpu_vec_isa.VecISA.check_build = _recorded_probe(probe, record)  # type: ignore[method-assign,assignment]
            precompile = getattr(codecache, "_precompile_header", None)
            if precompile is not None:
                # An lru_cache in torch 2.13: ours answers before it, from the record.
                codecache._precompile_header = _recorded_header(precompile, record)  # type: ignore[assignment]
        except Exception:  # a torch without these: nothing to keep
            log.debug("pwdaemon: Inductor set-up record not installed", exc_info=True)


class NotRecorded(Exception):
    """Inside `replay_only()`: an ISA probe has no recorded answer (it would have run a
    compiler)."""


@contextlib.contextmanager
def replay_only() -> Iterator[None]:
    """On this thread, ISA probes answer from the record or raise `NotRecorded` instead
    of running a compiler (the serving process's pre-warm: a compile worker records the
    answers soon after, and the first load replays them; `pwdaemon.workers.prewarm`)."""
    _replaying.on = True
    try:
        yield
    finally:
        _replaying.on = False


def _recorded_probe(
    probe: Callable[[Any, str], bool], record: SetupRecord
) -> Callable[[Any, str], bool]:
    def check_build(isa: Any, code: str) -> bool:
        # The flags are read per call: VecAVX512 probes bf16 support by changing its
        # flags for one check_build, so they are part of what is asked.
        question = isa_question(isa, isa.build_arch_flags(), code)
        if record.lookup(question) is True:
            return True
        if getattr(_replaying, "on", False):
            raise NotRecorded(f"no recorded answer for the {isa} probe")
        ok = probe(isa, code)
        if not ok and remove_broken_probe(isa, code):
            ok = probe(isa, code)  # built again from its source
        if ok:
            record.add(question, True)
        return ok

    check_build.__wrapped__ = probe  # type: ignore[attr-defined]
    return check_build


def remove_broken_probe(isa: Any, code: str) -> bool:
    """Remove the probe's `.so` for (`isa`, `code`) from Inductor's cache where it is
    shorter than its own ELF header says (a compile worker killed while g++ linked it:
    pwdaemon kills workers on timeouts, starvation and detach) or not an ELF file; True
    if one was removed.

    Inductor skips the probe's build wherever that file exists and reads a load failure
    as "this CPU lacks the ISA": every kernel of this machine would then be built without
    it, silently, in every process on the cache (`kernel_cache.py` repairs kernels; a probe
    fails quietly instead). The file is read, never loaded: the probe loads it in a child
    process, as a load may fault on a CPU that lacks the ISA."""
    try:
        from torch._inductor.codecache import LOCK_TIMEOUT, get_hash, get_lock_dir, get_path
        from torch._inductor.cpu_vec_isa import _get_isa_dry_compile_fingerprint
        from torch.utils._filelock import FileLock

        # check_build's own naming (its `write` without the write): the source's path in
        # the cache, keyed by the code, the compiler and the ISA's flags; the library
        # beside it, named by the key. The flags are `build_arch_flags()` in torch 2.13
        # and `_arch_flags` in 2.11 (AMX's differ), so both are looked at.
        flags = {isa.build_arch_flags(), getattr(isa, "_arch_flags", None)} - {None}
        keys = [
            get_path(get_hash(code.strip(), _get_isa_dry_compile_fingerprint(f), "code"), "cpp")
            for f in sorted(flags)
        ]
    except Exception:  # another torch: nothing known to repair
        log.debug("pwdaemon: the ISA probe's output path is unknown", exc_info=True)
        return False
    removed = False
    for key, _, source in keys:
        library = Path(source).with_name(f"{key}.so")
        # Under the lock torch's probe builds and loads it in: another process's g++ may
        # be writing the file now, which is cut short until it ends.
        with FileLock(os.path.join(get_lock_dir(), f"{key}.lock"), timeout=LOCK_TIMEOUT):
            if not library.is_file() or elf_complete(library):
                continue
            log.warning(
                "pwdaemon: removing a truncated ISA probe library, to build it again: %s",
                library,
            )
            library.unlink()
            removed = True
    return removed


def elf_complete(path: Path) -> bool:
    """Whether `path` is an ELF file at least as long as its header's tables reach (the
    section headers come last in what g++ links: a cut file ends before them)."""
    with path.open("rb") as f:
        header = f.read(64)
        size = os.fstat(f.fileno()).st_size
    if len(header) < 64 or header[:4] != b"\x7fELF":
        return False
    if header[4] != 2:  # 32-bit: not read further (Inductor builds 64-bit libraries)
        return True
    order: Literal["little", "big"] = "little" if header[5] == 1 else "big"

    def field(offset: int, width: int) -> int:
        return int.from_bytes(header[offset : offset + width], order)

    programs_end = field(0x20, 8) + field(0x36, 2) * field(0x38, 2)
    sections_end = field(0x28, 8) + field(0x3A, 2) * field(0x3C, 2)
    return size >= max(programs_end, sections_end)


def _recorded_header(precompile: Callable[..., str], record: SetupRecord) -> Callable[..., str]:
    def precompile_header(header: str, hashable_cmd_line: str, **compile_command: Any) -> str:
        question = header_question(header, hashable_cmd_line, compile_command)
        known = record.lookup(question)
        # Replayed only while the precompiled header is there (a cleared cache, or a
        # build that failed in the recording process, asks again).
        if isinstance(known, str) and os.path.exists(known) and os.path.exists(known + ".gch"):
            return known
        path = precompile(header, hashable_cmd_line, **compile_command)
        record.add(question, path)
        return path

    precompile_header.__wrapped__ = precompile  # type: ignore[attr-defined]
    return precompile_header


# What `codecache.build_code_hash` reads, or may: every module file (any import suffix)
# and Inductor's two extra files. A superset is safe: an unrelated change only costs a
# recomputed key.
_TORCH_KEY_SUFFIXES = (*importlib.machinery.all_suffixes(), ".cpp", ".ld")


def source_files(root: str, suffixes: tuple[str, ...]) -> list[tuple[str, int, int]]:
    """The name (relative to `root`), size and modification time of every file under
    `root` ending in one of `suffixes`, `__pycache__` left out, sorted: what a source
    key's replay is keyed by (a walk of stat calls, no file read)."""
    files: list[tuple[str, int, int]] = []
    pending = [root]
    while pending:
        directory = pending.pop()
        with os.scandir(directory) as entries:
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    if entry.name != "__pycache__":
                        pending.append(entry.path)
                elif entry.name.endswith(suffixes):
                    st = entry.stat()
                    files.append((os.path.relpath(entry.path, root), st.st_size, st.st_mtime_ns))
    files.sort()
    return files


def torch_source_question(root: str) -> str:
    """Which torch source key is asked for: torch's version and build, its directory, and
    the name, size and modification time of every file the key may read under it."""
    import torch

    files = source_files(root, _TORCH_KEY_SUFFIXES)
    facts = [torch.__version__, getattr(torch.version, "git_version", None), root, files]
    return "torch_key|" + digest(facts)


def torch_key() -> bytes:
    """`codecache.torch_key()`, replayed from the record when torch's files are the ones
    it was computed from (call after `install()`; without a record, or on a torch whose
    key cannot be set, it is computed as Inductor would)."""
    from torch._inductor import codecache

    key_fn = codecache.torch_key
    record = _record
    settable = callable(getattr(key_fn, "set", None))
    if record is None or not settable:
        return key_fn()
    try:
        question = torch_source_question(os.path.dirname(os.path.dirname(codecache.__file__)))
    except OSError:
        return key_fn()
    known = record.lookup(question)
    if isinstance(known, str):
        with contextlib.suppress(ValueError, RuntimeError):  # RuntimeError: computed already
            key_fn.set(bytes.fromhex(known))  # type: ignore[attr-defined]
        return key_fn()
    key = key_fn()
    record.add(question, key.hex())
    return key
