"""The attention backends a compile may pick: the serving process's, in its workers."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence

import torch

# An option the engine adds for the worker (beside compiler.py's): the
# scaled-dot-product-attention backends the serving process turned off
# (`torch.backends.cuda.enable_cudnn_sdp(False)` and its siblings: global flags, which a
# worker, a fresh process, does not share). Inductor picks the attention kernel while it
# compiles, so without it a worker compiled with every backend on: a BERT server on an
# H100 that had turned cuDNN attention off still spent 90 ms of its serving thread on
# the first call of a compiled size (cuDNN plans, 2026-12-05, bench/stalls.py
# --no-cudnn-sdp). Why a server turns it off: torch keeps cuDNN's attention plans per
# thread, and each new shape costs the calling thread a plan (85-95 ms per size and
# thread on an H100, for BERT and Llama: bench/first_calls.py). In the options, so in
# the store key; absent when every backend is on (the default), so keys stay as they were.
SDPA_OFF_OPTION = "pwdaemon.sdpa_off"
# torch.backends.cuda's switch for each backend (eager CPU attention reads them too).
SDPA_BACKENDS = ("cudnn", "flash", "mem_efficient", "math")


def sdpa_flags() -> dict[str, bool]:
    """Whether each attention backend is on in this process, by `SDPA_BACKENDS` name."""
    cuda = torch.backends.cuda
    return {name: getattr(cuda, f"{name}_sdp_enabled")() for name in SDPA_BACKENDS}


def set_sdpa_flags(flags: Mapping[str, bool]) -> None:
    """Turn each named attention backend on or off in this process (global flags)."""
    for name, enabled in flags.items():
        getattr(torch.backends.cuda, f"enable_{name}_sdp")(enabled)


def sdpa_backends_off() -> list[str]:
    """The attention backends turned off in this process, in `SDPA_BACKENDS` order."""
    return [name for name, enabled in sdpa_flags().items() if not enabled]


@contextlib.contextmanager
def sdpa_backends(off: Sequence[str]) -> Iterator[None]:
    """Every backend in `off` turned off (and the others on) while a job compiles; the
    worker's own settings after it. Inductor's cache keys get a tag naming them meanwhile:
    the AOTAutograd cache's key does not hold these flags (torch 2.11-2.13), and would
    serve a compile with a backend off the entry one with it on made. (Bypassing that
    cache is no way out: `CompiledArtifact.save` takes the artifact from it.)"""
    if not off:
        yield
        return
    import torch.compiler.config as compiler_config

    before = sdpa_flags()
    tag = f"{compiler_config.cache_key_tag}pwdaemon-sdpa-off:{','.join(off)}"
    try:
        set_sdpa_flags({name: name not in off for name in SDPA_BACKENDS})
        # a config module: patch() exists at run time, not in its type stubs
        with compiler_config.patch(cache_key_tag=tag):  # type: ignore[attr-defined]
            yield
    finally:
        set_sdpa_flags(before)
