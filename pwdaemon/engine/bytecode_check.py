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

# Once per process: torch's installation does not change under it, so every later
# attach would read the same headers and say the same.
_checked = False


def missing_bytecode(torch_root: Path) -> list[Path]:
    """Sample modules under `torch_root` whose cached bytecode the import would not use
    (absent, or stamped for another version of the source): it would compile them."""
    missing: list[Path] = []
    for relative in _SAMPLE:
        source = torch_root / relative
        try:
            stat = source.stat()
        except OSError:
            continue  # another torch layout: not ours to judge
        if not _usable(Path(importlib.util.cache_from_source(str(source))), stat):
            missing.append(source)
    return missing


def _usable(cached: Path, source: os.stat_result) -> bool:
    # The check the import itself makes (PEP 552 header): magic, then either a hash-based
    # pyc (checked against the source's hash, or not at all, never by time) or the
    # source's modification time and size as recorded when it was compiled.
    try:
        with cached.open("rb") as f:
            header = f.read(16)
    except OSError:
        return False
    if len(header) < 16 or header[:4] != importlib.util.MAGIC_NUMBER:
        return False
    if int.from_bytes(header[4:8], "little") & 0b1:
        return True
    mtime, size = (int.from_bytes(header[i : i + 4], "little") for i in (8, 12))
    return mtime == int(source.st_mtime) & 0xFFFFFFFF and size == source.st_size & 0xFFFFFFFF


def check_bytecode_cache(torch_root: Path | None = None) -> None:
    """Warn (once per process) when torch's modules would be compiled on import."""
    global _checked
    if _checked:
        return
    _checked = True
    if torch_root is None:
        import torch

        torch_root = Path(torch.__file__).parent
    missing = missing_bytecode(torch_root)
    if not missing:
        return
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
