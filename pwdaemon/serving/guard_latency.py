"""Dynamo's guard-latency measurement without its cache flush, in pwdaemon's traces.

After building a frame's guards, dynamo measures how long they take to check
(`torch._C._dynamo.guards.profile_guard_manager`, reported as the `guard_latency_us`
metric and in the guards log). To time a cold check it first flushes the CPU's caches by
writing a large buffer, in C++, holding the GIL all the while: 33 ms for the demo model,
38 ms for issue-sized BERT and 89 ms for Llama on the 2-core CPU here, and longer on a
server with a large last-level cache. No serving call can run during it, so it was one
of the longest single waits a background trace imposed on serving.

Inside `unflushed()` (entered by pwdaemon's tracing calls, on their thread only), the
measurement times the same guard check without the flush: a warm-cache figure for the
metric, microseconds of GIL instead of tens of milliseconds. Other threads, and the
user's own `torch.compile` calls, keep torch's measurement.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from pwdaemon.serving.thread_block import ThreadBlock

_INSIDE = ThreadBlock()
_lock = threading.Lock()
_installed = False


def _torch_profiler() -> Callable[..., float]:
    from torch._C._dynamo import guards as compiled_guards

    profiler: Callable[..., float] = compiled_guards.profile_guard_manager
    return profiler


# Arguments as torch passes them: (root, f_locals, n_iters) on torch 2.11-2.13; older
# versions passed no n_iters.
def profile_guard_manager(root: Any, f_locals: Any, *rest: Any) -> float:
    """What dynamo calls in place of torch's profiler once `install()` ran."""
    if not _INSIDE.active():
        return _torch_profiler()(root, f_locals, *rest)
    runs = max(1, int(rest[0])) if rest else 1
    start = time.perf_counter()
    for _ in range(runs):
        root.check(f_locals)
    return (time.perf_counter() - start) * 1e6 / runs


def install() -> bool:
    """Wrap dynamo's guard profiler (once per process). False where this torch has none
    to wrap; the wrapper calls torch's own outside `unflushed()`."""
    global _installed
    with _lock:
        if _installed:
            return True
        try:
            from torch._dynamo import guards

            _torch_profiler()
        except (ImportError, AttributeError):  # pragma: no cover - another torch
            return False
        if not callable(getattr(guards, "profile_guard_manager", None)):
            return False  # pragma: no cover - another torch
        guards.profile_guard_manager = profile_guard_manager  # type: ignore[assignment]
        _installed = True
        return True


@contextlib.contextmanager
def unflushed() -> Iterator[None]:
    """Guards built on this thread inside the block are timed without the cache flush."""
    install()
    with _INSIDE.entered():
        yield
