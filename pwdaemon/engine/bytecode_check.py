"""Does torch come with its bytecode cache, so that pwdaemon's imports do not compile?

After `attach()`, the serving process imports Inductor (to load artifacts) and dynamo's
trace imports more of torch, on background threads that park while serving calls run.
What they cannot park in is one C call: compiling a module's source to bytecode is one,
and it keeps the GIL for the whole module. Where torch was installed without `.pyc`
files (`pip install --no-compile`, `PYTHONDONTWRITEBYTECODE`, a read-only image that
never ran once), every such import compiles: on an H200 host (2026-12-03,
`bench/gil_holds.py` and a sampler), Inductor's import kept the GIL from a paced caller
62 times over 8 ms, up to 86 ms, 1.2 s in all, each in `source_to_code`. A serving call
arriving then waits for it. The fix is the image's, once: `python -m compileall`.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import sys
from pathlib import Path

log = logging.getLogger(__name__)

# Large modules the serving process imports after attach (Inductor's, for loading
# artifacts): if these have bytecode, the installation has it.
_SAMPLE = (
    "_inductor/lowering.py",
    "_inductor/select_algorithm.py",
    "_inductor/compile_fx.py",
    "_inductor/codegen/triton.py",
)

_warned = False  # once per process: every attach would say the same


def missing_bytecode(torch_root: Path) -> list[Path]:
    """Sample modules under `torch_root` whose cached bytecode is absent or older than
    their source (the import would then compile them)."""
    missing: list[Path] = []
    for relative in _SAMPLE:
        source = torch_root / relative
        try:
            source_mtime = source.stat().st_mtime
        except OSError:
            continue  # another torch layout: not ours to judge
        cached = Path(importlib.util.cache_from_source(str(source)))
        try:
            fresh = cached.stat().st_mtime >= source_mtime
        except OSError:
            fresh = False
        if not fresh:
            missing.append(source)
    return missing


def check_bytecode_cache(torch_root: Path | None = None) -> None:
    """Warn (once per process) when torch's modules would be compiled on import."""
    global _warned
    if _warned:
        return
    if torch_root is None:
        import torch

        torch_root = Path(torch.__file__).parent
    missing = missing_bytecode(torch_root)
    if not missing:
        return
    _warned = True
    why = "PYTHONDONTWRITEBYTECODE is set" if sys.dont_write_bytecode else None
    if why is None and not os.access(missing[0].parent, os.W_OK):
        why = "torch's directory is read-only"
    log.warning(
        "pwdaemon: torch's modules have no bytecode cache (%s has none%s): the imports "
        "pwdaemon makes after attach() compile Python source, holding the GIL for up to "
        "~90 ms at a time, and serving calls wait. Compile them once where torch is "
        "installed: python -m compileall -q %s",
        missing[0].name,
        f"; {why}" if why else "",
        torch_root,
    )
