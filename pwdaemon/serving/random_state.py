"""Dynamo's random-state restore, skipped on pwdaemon's tracing threads.

Dynamo saves the process's random state when it starts converting a frame and sets it
back when it ends: torch's CPU and CUDA generators (`convert_frame.preserve_global_state`,
through `torch.random.set_rng_state` and `torch.cuda.set_rng_state`) and Python's
`random` (from eval_frame's C++, through `random.setstate`). On the thread that traces,
as `torch.compile` runs it, nothing else drew meanwhile. pwdaemon traces on a thread of
its own while serving threads run (trace="background", a hot input's trace, saving a
trace): every number a serving thread drew during the trace (sampling in
`generate(do_sample=True)`, Python's `random`) was undone when it ended, and the same
numbers came again. Seen in a test whose inputs came from torch's global generator: they
differed from the reference's in 3 runs of 15; a checked case rewound both generators.

Inside `kept()` (entered by pwdaemon's tracing calls, on their thread only), those
restores are skipped: the three functions are wrapped once per process, and the wrapper
calls through on every other thread and outside the block. A trace in eval mode draws
nothing of its own; what it does draw now advances the shared stream, as any draw does.
"""

from __future__ import annotations

import contextlib
import random
import threading
from collections.abc import Callable, Iterator
from typing import Any

import torch

from pwdaemon.serving.thread_block import ThreadBlock

_INSIDE = ThreadBlock()
_lock = threading.Lock()
_installed = False


def _skipped_here(restore: Callable[[Any], None]) -> Callable[[Any], None]:
    def wrapper(state: Any) -> None:
        if not _INSIDE.active():
            restore(state)

    wrapper.__wrapped__ = restore  # type: ignore[attr-defined]
    wrapper.__name__ = getattr(restore, "__name__", "restore")
    wrapper.__doc__ = restore.__doc__
    return wrapper


def install() -> None:
    """Wrap the three restores dynamo calls (once per process)."""
    global _installed
    with _lock:
        if _installed:
            return
        random.setstate = _skipped_here(random.setstate)  # type: ignore[assignment]
        torch.random.set_rng_state = _skipped_here(torch.random.set_rng_state)  # type: ignore[assignment]
        torch.cuda.set_rng_state = _skipped_here(torch.cuda.set_rng_state)  # type: ignore[assignment]
        _installed = True


@contextlib.contextmanager
def kept() -> Iterator[None]:
    """On this thread, inside the block, dynamo does not set the random state back."""
    install()
    with _INSIDE.entered():
        yield
