"""Calls no captured piece serves, counted per input signature; hot ones get traced.

Once a model is settled, dynamo runs in run-only mode: an input whose signature no
piece's guards accept (new dtype, rank, grad mode, layout) runs eager and creates no
piece. `Misses` counts such calls per signature; a signature seen `hot_calls` times (a
size the user configured: once) earns one tracing call, inline or, with
trace="background", on a gated thread of its own while the call itself runs eager.

The serving path reads `hot` (a frozenset replaced whole) without a lock on every settled
call; everything else here runs on misses only, under `_lock`.
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING, Any

import torch

from pwdaemon.serving.background import importing_module, start_without_waiting
from pwdaemon.serving.gate import GATE, GateClosed
from pwdaemon.serving.inputs import copy_for_trace
from pwdaemon.serving.priority import lowest_niceness
from pwdaemon.serving.strategy import TRACE_LOCK
from pwdaemon.serving.trace_record import MissRecord, MissState, RecompileCause, input_signature

if TYPE_CHECKING:
    from pwdaemon.serving.trace import Tracer

__all__ = ("DEFAULT_HOT_CALLS", "Misses")

log = logging.getLogger(__name__)

DEFAULT_HOT_CALLS = 3  # PolicyConfig.hot_calls' default; the handle passes its own
# A hot signature that does not come back within this many calls stops costing every
# call a signature computation; it can become hot again.
HOT_WINDOW_CALLS = 10_000
# Distinct miss signatures kept; further ones are counted under one "other" record.
MAX_SIGNATURES = 256
_OTHER = "other"


class Misses:
    """The miss records of one tracer and the traces of its hot signatures."""

    def __init__(self, tracer: Tracer, *, hot_calls: int, configured_sizes: frozenset[int]) -> None:
        self._tracer = tracer
        self.hot_calls = hot_calls
        # attach(sizes=...): the user named these sizes, so a call of one that no piece
        # serves is hot at its first miss (under a backed strategy size 1 is a piece
        # of its own, and would otherwise wait for `hot_calls` misses).
        self.configured_sizes = configured_sizes
        self.records: dict[str, MissRecord] = {}
        self.calls = 0
        # Set when the last background trace of a hot signature ended (for waiters).
        self.traced = threading.Event()
        self.traced.set()
        self.thread: threading.Thread | None = None
        self._lock = threading.Lock()
        # Signatures whose next call is traced. Replaced whole (a frozenset), so the
        # serving path reads it without a lock; empty almost always.
        self.hot: frozenset[str] = frozenset()
        self._window = 0

    def count(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """A settled call no piece served (it ran eager)."""
        tracer = self._tracer
        sig = input_signature(args, kwargs, tracer.marks.dims(args, kwargs))
        with self._lock:  # the miss path only; a hit never takes it
            self.calls += 1
            rec = self.records.get(sig)
            if rec is None:
                if len(self.records) >= MAX_SIGNATURES:
                    sig = _OTHER
                    rec = self.records.setdefault(_OTHER, MissRecord(_OTHER))
                else:
                    rec = self.records[sig] = MissRecord(sig)
                    log.info(
                        "pwdaemon: %s: no captured piece serves input %s; served eager",
                        tracer.name,
                        sig,
                    )
            rec.calls += 1
            hot_at = self.hot_calls
            if self.configured_sizes and tracer.marks.size(args, kwargs) in self.configured_sizes:
                hot_at = 1
            if rec.state is MissState.COUNTING and rec.calls >= hot_at and sig != _OTHER:
                rec.state = MissState.HOT
                self._window = 0
                self.hot = self.hot | {sig}
                log.info(
                    "pwdaemon: %s: input %s is hot (%d calls); its next call is traced",
                    tracer.name,
                    sig,
                    rec.calls,
                )

    def serve(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """A settled call while some signature is hot: every call computes its
        signature, and the hot one's call is traced."""
        tracer = self._tracer
        sig = input_signature(args, kwargs, tracer.marks.dims(args, kwargs))
        if sig in self.hot:
            return self._trace(sig, args, kwargs)
        self._window += 1  # a lost update under a race only delays the expiry
        if self._window > HOT_WINDOW_CALLS:
            with self._lock:
                for s in self.hot:
                    rec = self.records[s]
                    if rec.state is MissState.HOT:
                        rec.state, rec.calls = MissState.COUNTING, 0
                self.hot = frozenset()
        return tracer.serve(args, kwargs)

    def _trace(self, sig: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        tracer = self._tracer
        if tracer.background is not None and not importing_module():
            self._trace_in_background(sig, args, kwargs)
            return tracer.serve(args, kwargs)
        with TRACE_LOCK:
            if sig in self.hot:  # not traced by another thread meanwhile
                with self._lock:
                    self.hot = self.hot - {sig}
                rec = self.records[sig]
                try:
                    out, changed = tracer.trace_call(
                        args, kwargs, RecompileCause.HOT_SIGNATURE, sig
                    )
                except BaseException:
                    # A traced call that raised (eager raised too) is not traced again.
                    rec.state = MissState.NOT_CAPTURED
                    raise
                self._trace_ended(rec, changed)
                return out
        return tracer.serve(args, kwargs)

    def _trace_in_background(self, sig: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        # trace="background": a hot signature is traced as the first call was, from
        # private copies on a thread of its own, gated; the call that found it hot is
        # served as before (eager). Inline, that call paid dynamo's whole trace: 2.6 s
        # for BERT's size-1 piece on an H200, the worst call of its warm-up.
        tracer = self._tracer
        with self._lock:
            if sig not in self.hot:
                return  # another thread took it
            self.hot = self.hot - {sig}
        rec = self.records[sig]  # stays HOT until traced: no second trace meanwhile
        args_copy = tuple(copy_for_trace(a) for a in args)
        kwargs_copy = {k: copy_for_trace(v) for k, v in kwargs.items()}
        modes = (torch.is_grad_enabled(), torch.is_inference_mode_enabled())

        def run() -> None:
            background = tracer.background
            if background is not None and background.stopping:
                self.traced.set()  # detached before this thread began
                return
            changed = False
            try:
                with (
                    GATE.background(),
                    lowest_niceness(),  # this thread ends after the trace
                    torch.inference_mode(modes[1]),
                    torch.set_grad_enabled(modes[0]),
                    TRACE_LOCK,
                ):
                    pieces, breaks = len(tracer.pieces), len(tracer.graph_breaks)
                    _, changed = tracer.trace_call(
                        args_copy, kwargs_copy, RecompileCause.HOT_SIGNATURE, sig
                    )
                    new = tracer.pieces[pieces:]
                    if len(new) == 1 and len(tracer.graph_breaks) == breaks:
                        # A whole call captured as one piece: saved for the next start
                        # beside the first call's (`saved_slot`), on this thread, gated,
                        # from the private copies (the caller's tensors are its own).
                        call = (args_copy, kwargs_copy)
                        tracer.saved.save(tracer.model, new[0], call, tracer.marks)
            except GateClosed:
                pass  # the interpreter exits
            except BaseException as exc:  # a thread of ours: log, never raise
                log.warning("pwdaemon: %s: tracing input %s failed: %s", tracer.name, sig, exc)
            try:
                self._trace_ended(rec, changed)
            finally:
                self.traced.set()

        self.traced.clear()
        self.thread = threading.Thread(target=run, name="pwdaemon-trace-hot", daemon=True)
        start_without_waiting(self.thread)

    def _trace_ended(self, rec: MissRecord, changed: bool) -> None:
        """Record how the trace of a hot signature ended (on the thread that traced):
        traced, served by a piece captured since, or left eager."""
        if changed:
            rec.state = MissState.TRACED
        elif self._tracer.last_call_served():
            # Two inputs became hot before either was traced (n=1 and n>1 after a
            # restart whose saved trace they both missed), and the first one's piece
            # serves this one too: not a failure, nothing stays eager.
            rec.state = MissState.SERVED
            log.info(
                "pwdaemon: %s: input %s is served by a piece captured since it became hot",
                self._tracer.name,
                rec.signature,
            )
        else:
            rec.state = MissState.NOT_CAPTURED
            log.warning(
                "pwdaemon: %s: input %s was traced but dynamo captured no piece; it stays eager",
                self._tracer.name,
                rec.signature,
            )
