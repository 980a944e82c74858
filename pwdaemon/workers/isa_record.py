"""The CPU vector-ISA probe's answers, kept on disk for the next process.

Inductor decides which vector ISA its C++ kernels use by test-building a small program per
candidate ISA and loading it in a child Python (`VecISA.check_build`): `g++ --version`, the
build (skipped when its output is cached) and the dlopen child, about 0.5 s per process
here even with the build cached. Every process pays it again: each compile worker, and
the serving process before its first artifact load (a load waits for the probe, see
`pwdaemon.workers.compiler.load_artifact`). On a 2-core machine those subprocesses also
took a core from serving during warm-up (BERT calls of 106-161 ms beside them).

`install()` wraps `check_build` so that a successful answer is written next to Inductor's
own cache and replayed by later processes, keyed by everything the answer depends on: the
torch build, the compiler candidates Inductor would search (resolved paths, sizes and
modification times), the CPU's features, the library path and the probe's own code and
flags. A failure is never replayed: it may be a transient one (the dlopen child timing
out on a loaded machine), and a replayed "no" would cost every later kernel its vector
ISA for good; a machine whose compiler lacks an ISA the CPU has re-probes that one ISA.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import sys
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# Bump when the record's meaning changes: an old record is then simply not found.
_RECORD_VERSION = 1
_RECORD_DIR = "pwdaemon-cpu-isa"
# Readable by whoever reads the Inductor cache beside it (its kernels are no more private).
_RECORD_MODE = 0o644

_lock = threading.Lock()
_installed = False


def _file_identity(path: str | None) -> list[object]:
    """Where a compiler resolves to and which build of it is there, without running it."""
    if path is None:
        return [None]
    found = shutil.which(path)
    if found is None:
        return [path, None]
    real = os.path.realpath(found)
    try:
        st = os.stat(real)
    except OSError:
        return [path, real, None]
    return [path, real, st.st_size, st.st_mtime_ns]


def machine_fingerprint() -> str:
    """What the probe's answers depend on, apart from the ISA and code it builds."""
    import torch
    from torch._inductor import config, cpu_vec_isa

    cxx = config.cpp.cxx
    candidates = list(cxx) if isinstance(cxx, (list, tuple)) else [cxx]
    facts = {
        "version": _RECORD_VERSION,
        "torch": [torch.__version__, os.path.dirname(torch.__file__)],
        "python": sys.version,
        "compilers": [_file_identity(c) for c in candidates],
        "install_gxx": os.environ.get("TORCH_INDUCTOR_INSTALL_GXX"),
        "ld_library_path": os.environ.get("LD_LIBRARY_PATH"),
        "cpu": cpu_vec_isa.x86_isa_checker(),
        "vec_isa_ok": config.cpp.vec_isa_ok,
    }
    return hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()


class IsaProbeRecord:
    """The successful probe answers of one machine fingerprint, in one JSON file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._known: dict[str, bool] | None = None

    def _read(self) -> dict[str, bool]:
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        if not isinstance(data, dict):
            return {}
        return {k: v for k, v in data.items() if isinstance(k, str) and v is True}

    def lookup(self, check: str) -> bool:
        """Whether `check` succeeded in this or an earlier process."""
        if self._known is None:
            self._known = self._read()
        return self._known.get(check, False)

    def add(self, check: str) -> None:
        """Record a success. Processes add concurrently: read, merge, replace atomically
        (a lost update costs one later process one probe, nothing else)."""
        known = self._read()
        known[check] = True
        self._known = known
        with contextlib.suppress(OSError):
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".tmp-")
            try:
                with os.fdopen(fd, "w") as out:
                    json.dump(known, out, sort_keys=True)
                os.chmod(tmp, _RECORD_MODE)
                # Unsynced: lost in a crash, the next process probes once more.
                os.replace(tmp, self.path)
            except OSError:
                os.unlink(tmp)
                raise


def check_name(isa: object, arch_flags: str, code: str) -> str:
    """One probe: which ISA class, with which flags, building which program."""
    digest = hashlib.sha256(code.encode()).hexdigest()[:16]
    return f"{type(isa).__name__}|{arch_flags}|{digest}"


def install() -> None:
    """Wrap Inductor's ISA probe with the record, once per process (before the first
    `pick_vec_isa()`: its answers are cached in memory after that)."""
    global _installed
    with _lock:
        if _installed:
            return
        _installed = True
        try:
            from torch._inductor import cpu_vec_isa
            from torch._inductor.runtime.cache_dir_utils import cache_dir

            record = IsaProbeRecord(
                Path(cache_dir()) / _RECORD_DIR / f"{machine_fingerprint()}.json"
            )
            probe = cpu_vec_isa.VecISA.check_build
            cpu_vec_isa.VecISA.check_build = _recorded(probe, record)  # type: ignore[method-assign,assignment]
        except Exception:  # a torch without this probe: nothing to keep
            log.debug("pwdaemon: ISA probe record not installed", exc_info=True)


def _recorded(
    probe: Callable[[Any, str], bool], record: IsaProbeRecord
) -> Callable[[Any, str], bool]:
    def check_build(isa: Any, code: str) -> bool:
        # The flags are read per call: VecAVX512 probes bf16 support by changing its
        # flags for one check_build, so they are part of what is asked.
        check = check_name(isa, isa.build_arch_flags(), code)
        if record.lookup(check):
            return True
        ok = probe(isa, code)
        if ok:
            record.add(check)
        return ok

    check_build.__wrapped__ = probe  # type: ignore[attr-defined]
    return check_build
