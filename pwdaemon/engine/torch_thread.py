"""The engine's work off the loop thread, gated: it parks while serving calls are in
progress (`pwdaemon.serving.gate`).

Torch work (validation, loads) runs on a thread that ends when it returns
(`run_torch_work`); other Python work (store lookups and publishes, starting and talking
to compile workers) on anyio's worker threads (`run_gated`). Ungated, that other work ran
beside the first call after a warm restart: an anyio worker thread spent 31 ms of CPU,
most of it holding the GIL, during a 184 ms BERT first call (bench/stalls.py).

Why not anyio's worker threads: a thread that ran a CPU torch op keeps its own OpenMP
thread team for as long as it lives, and anyio keeps its worker threads alive between
jobs. While such a thread lived, the serving thread's CPU kernels ran slower on a 2-core
machine: an idle thread that had run one `addmm` took the main thread's `addmm` from
1.59 to 2.12 ms, and the engine's two validation threads took a compiled BERT call
(size 16) from 0.46 to 2.0 ms until the engine closed. A thread that exits releases its
team, so each piece of torch work gets a thread of its own (starting one costs ~0.1 ms,
nothing beside a compile).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, TypeVar

import anyio.to_thread

from pwdaemon.serving.gate import GATE

T = TypeVar("T")


async def run_torch_work(fn: Callable[..., T], *args: Any, switch_interval: float | None) -> T:
    """`fn(*args)` on a fresh gated thread that exits afterwards; its result or exception.

    `switch_interval`: CPython's switch interval while it runs (None: leave it).
    """
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            with GATE.background(switch_interval):
                box["value"] = fn(*args)
        except BaseException as exc:  # handed to the awaiting task below
            box["error"] = exc

    thread = threading.Thread(target=target, name="pwdaemon-torch-work", daemon=True)
    thread.start()
    # Joined from anyio's pool: that thread only waits, it runs no torch op.
    await anyio.to_thread.run_sync(thread.join, abandon_on_cancel=True)
    if "error" in box:
        raise box["error"]
    value: T = box["value"]
    return value


async def run_gated(fn: Callable[..., T], *args: Any, abandon_on_cancel: bool = False) -> T:
    """`fn(*args)` on one of anyio's worker threads, gated; for work that runs no torch
    op (a torch op would leave that long-lived thread an OpenMP team, see above)."""

    def gated() -> T:
        with GATE.background():
            return fn(*args)

    return await anyio.to_thread.run_sync(gated, abandon_on_cancel=abandon_on_cancel)
