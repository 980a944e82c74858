"""`attach(trace="background")` (the default): dynamo traces on a thread of its own.

Until the model is traced, calls run the plain module, so the first request costs what
eager costs instead of dynamo's one-time trace (seconds on a transformers model). The
trace runs from private copies of the first call's inputs, under that call's grad and
inference mode (dynamo's guards must hold for the calls it will serve), *gated*
(`serving.gate`): it parks whenever a serving call is in progress. It also settles there,
tracing again until one whole call captures nothing new, so that no serving call traces.

Calls served before the trace is done still count as traffic: `calls_before` holds their
sizes, and the pieces credit them (`GraphPiece.histogram`).
"""

from __future__ import annotations

import _thread
import logging
import sys
import threading
import time
import weakref
from collections.abc import Callable
from types import FrameType
from typing import Any

import torch

from pwdaemon.serving.gate import GATE, GateClosed
from pwdaemon.serving.inputs import copy_call
from pwdaemon.serving.priority import lowest_niceness

log = logging.getLogger(__name__)

# Tracing calls a background trace makes to settle (one call that captures nothing new);
# each extra one is a shape-strategy fallback or a piece a resumed frame first reached.
# Past this, the serving thread settles it inline as in trace="inline".
MAX_SETTLING_CALLS = 4
# Tries of a background trace that fails with an error before the next serving call is
# left to trace inline (which costs that call the whole trace: 3.3 s of a BERT call when
# a race with another thread's imports broke the first try). A failure from a race is
# gone on the next try; one that is not fails every try, so the tries are few. The wait
# before try n is BACKOFF_S * (n - 1).
TRACE_TRIES = 3
BACKOFF_S = 0.5

SettleStep = Callable[[tuple[Any, ...], dict[str, Any]], bool]
"""One tracing call on the given inputs; True once the model is settled."""


def importing_module() -> bool:
    """Whether the calling thread is executing a module's import (its top-level code).

    Dynamo resolves a traced function's globals with `importlib.import_module` of the
    function's module. A model defined in a module being imported (a gunicorn app that
    builds and warms its model at import) is then locked for every other thread until
    that import ends: a trace on pwdaemon's thread waits for the import, and an import
    that waits for the trace (`wait()` at import time) never ends (seen: a gunicorn
    worker waited out its timeout). Walks the stack: only the first call pays it.
    """
    frame: FrameType | None = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_name == "<module>":
            spec = frame.f_globals.get("__spec__")
            if spec is not None and getattr(spec, "_initializing", False):
                return True
        frame = frame.f_back
    return False


# Threads handed to `start_without_waiting`, each with an event set once its helper's
# `start()` returned: until then `join` raises, and a detach that took "not started" for
# "will not run" returned while the helper was about to start it (seen in CI).
_LAUNCHES: weakref.WeakKeyDictionary[threading.Thread, threading.Event] = (
    weakref.WeakKeyDictionary()
)


def start_without_waiting(thread: threading.Thread) -> None:
    """Start `thread` from a helper thread, so that the caller (a serving call) does not
    wait for it: `Thread.start()` blocks until the new thread runs, which took ~2 ms of
    the demo's first call (7 ms in all, 4.7 ms eager) on a busy 2-core box. Join it with
    `join_if_started`: for a while it is not started."""
    launched = _LAUNCHES[thread] = threading.Event()  # before the helper can run

    def start() -> None:
        try:
            thread.start()
        finally:
            launched.set()

    _thread.start_new_thread(start, ())


def join_if_started(thread: threading.Thread, timeout: float) -> bool:
    """Wait up to `timeout` for `thread` to end, its start by `start_without_waiting`
    included (a thread never started must see a stop flag itself); whether it is not
    running now."""
    deadline = time.monotonic() + timeout
    launched = _LAUNCHES.get(thread)
    if launched is not None and not launched.wait(timeout):
        return True  # still not started: it sees the stop flag when it is
    try:
        thread.join(max(0.0, deadline - time.monotonic()))
    except RuntimeError:  # never handed to start_without_waiting, and not started
        return True
    return not thread.is_alive()


class BackgroundTrace:
    """The trace thread of one attached model: started by its first call, once."""

    def __init__(self, step: SettleStep, size_cap: int, name: str = "") -> None:
        self._step = step
        self._name = name
        self._size_cap = size_cap
        self.traced = threading.Event()  # set when the thread is done, settled or not
        self.error: BaseException | None = None
        self.thread: threading.Thread | None = None
        self.calls_before: dict[int, int] = {}  # size -> calls served before traced
        # Set by detach: no further settling call, and a backoff between tries ends.
        self._stopped = threading.Event()
        self._lock = threading.Lock()

    def count(self, size: int | None) -> None:
        """Count one call served before the trace was done (serving thread)."""
        if size is None:
            return
        with self._lock:  # warm-up only: cheap next to the plain module's call
            counts = self.calls_before
            if size in counts or len(counts) < self._size_cap:
                counts[size] = counts.get(size, 0) + 1

    def prepare(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> threading.Thread | None:
        """The trace thread, from copies of this call's inputs, not yet started; None if
        there is one already. The caller starts it once its own call has returned: the
        first request then never shares the process with the trace (on an H200, Llama's
        first call took 1.9 s against eager's 0.43 s with the trace started beside it;
        not pinned down, a lock such as an import lock held by the parked trace thread
        would do it)."""
        with self._lock:
            if self.thread is not None:
                return None
            # Copies: the caller may reuse or mutate its inputs after the call returns,
            # and the call itself may fill one in place (a KV cache): see copy_call.
            args_copy, kwargs_copy = copy_call(args, kwargs, self._name)
            modes = (torch.is_grad_enabled(), torch.is_inference_mode_enabled())
            self.thread = threading.Thread(
                target=self._run,
                args=(args_copy, kwargs_copy, *modes),
                name="pwdaemon-trace",
                daemon=True,
            )
            return self.thread

    def _run(
        self, args: tuple[Any, ...], kwargs: dict[str, Any], grad: bool, inference: bool
    ) -> None:
        try:
            for tries in range(1, TRACE_TRIES + 1):
                try:
                    self._settle(args, kwargs, grad, inference)
                    return
                except GateClosed:
                    raise
                except Exception as exc:
                    if tries == TRACE_TRIES:
                        raise
                    log.info("pwdaemon: background capture failed (%s); trying again", exc)
                    if self._stopped.wait(BACKOFF_S * tries):
                        return  # detached meanwhile: nothing to trace for any more
        except GateClosed as exc:  # the interpreter exits: nothing to tell anyone
            self.error = exc
        except BaseException as exc:
            self.error = exc
            log.warning("pwdaemon: background capture failed; capturing on the next call: %s", exc)
        finally:
            self.traced.set()

    def _settle(
        self, args: tuple[Any, ...], kwargs: dict[str, Any], grad: bool, inference: bool
    ) -> None:
        with (
            GATE.background(),
            lowest_niceness(),  # a thread of pwdaemon's alone, ended after the trace
            torch.inference_mode(inference),
            torch.set_grad_enabled(grad),
        ):
            for _ in range(MAX_SETTLING_CALLS):
                if self._stopped.is_set():
                    break
                # Fresh copies per call: a shape strategy marks the tensors it traces
                # with, and a fallback strategy must not inherit those marks (a
                # TransformerEncoder then failed on the unbacked size left by the
                # first attempt).
                fresh_args, fresh_kwargs = copy_call(args, kwargs, self._name)
                if self._step(fresh_args, fresh_kwargs):
                    break

    def stop(self, timeout: float) -> bool:
        """Detach: no further settling call; wait up to `timeout` for a trace under way
        (dynamo cannot be interrupted mid-trace). False if it is still running."""
        self._stopped.set()
        thread = self.thread
        if thread is None or thread is threading.current_thread():
            return True  # none, or ours
        return join_if_started(thread, timeout)  # not started: it will see `_stopped`

    @property
    def stopping(self) -> bool:
        """Detached: no trace is to start any more."""
        return self._stopped.is_set()
