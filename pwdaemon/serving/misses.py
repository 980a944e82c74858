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
from pwdaemon.serving.inputs import Call, copy_small_call
from pwdaemon.serving.priority import lowest_niceness
from pwdaemon.serving.strategy import TRACE_LOCK
from pwdaemon.serving.trace_record import MissRecord, MissState, RecompileCause

if TYPE_CHECKING:
    from pwdaemon.serving.trace import Tracer

__all__ = ("DEFAULT_HOT_CALLS", "Misses")

log = logging.getLogger(__name__)

DEFAULT_HOT_CALLS = 3  # PolicyConfig.hot_calls' default; the handle passes its own
# How often one signature is traced. A signature misses again after its trace when what
# changes between its calls lies outside it: a shape inside an object the call passes (a
# KV cache's length grows by one per decode step). The first trace pins each size it
# saw; the second sees a changed one, and dynamo's automatic dynamic makes it dynamic; a
# third covers a value that changed only after that.
MAX_TRACES_PER_SIGNATURE = 3
# While a signature is hot, each of its calls is copied before it runs, to trace the first
# that no piece serves (see `_trace`). A copy larger than this is not taken on every call
# (a long KV cache on a GPU): the hot call is traced as it runs instead, inline.
HOT_COPY_MAX_BYTES = 256 * 2**20
# Calls of a hot signature that pieces served before it stops being hot: a generate()'s
# decode steps after the one that missed are served, and its next generate() misses
# again at the first step (with up to 63 steps between, each copied).
HOT_SERVED_CALLS = 64
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
        sig = tracer.marks.signature(args, kwargs)
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
            if rec.state in (MissState.TRACED, MissState.SERVED):
                self._missed_after_trace(rec)
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

    def _missed_after_trace(self, rec: MissRecord) -> None:
        # Under _lock: a call of a traced signature that no piece served.
        name = self._tracer.name
        if rec.traces < MAX_TRACES_PER_SIGNATURE:
            rec.state, rec.calls = MissState.COUNTING, 0
            log.info(
                "pwdaemon: %s: input %s missed again though a piece served it before (%d "
                "trace(s) so far): what changed lies outside its signature (a size inside "
                "an object it passes, such as a KV cache's length); traced again once hot",
                name,
                rec.signature,
                rec.traces,
            )
        else:
            rec.state = MissState.STILL_MISSED
            log.warning(
                "pwdaemon: %s: input %s still misses after %d traces: something dynamo "
                "guards on changes between its calls and stays specialized; it stays eager",
                name,
                rec.signature,
                rec.traces,
            )

    def serve(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """A settled call while some signature is hot: every call computes its
        signature, and the hot one's call is traced."""
        tracer = self._tracer
        sig = tracer.marks.signature(args, kwargs)
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
        rec = self.records[sig]
        background = tracer.background is not None and not importing_module()
        if background or rec.traces:
            # The hot signature's calls are served as any other, and the first that no
            # piece serves is traced, from a copy taken before it ran (a call may fill its
            # inputs in place: a KV cache). Tracing the next call regardless traced one a
            # piece served: after a decode step's trace at cache length 9, each later
            # generate() missed at 6, 7 and 8, went hot and traced 9 again, capturing
            # nothing.
            inputs = copy_small_call(args, kwargs, tracer.name, HOT_COPY_MAX_BYTES)
            if inputs is not None:
                out = tracer.serve(args, kwargs)
                if tracer.last_call_served():
                    self._served_while_hot(rec)
                else:
                    self._trace_copy(rec, inputs, background)
                return out
            # Too large to copy on every call: this call is traced as it runs (inline).
        with TRACE_LOCK:
            if self._take(sig):  # not traced by another thread meanwhile
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

    def _take(self, sig: str) -> bool:
        """Take a hot signature's trace: False if another thread took it."""
        with self._lock:
            if sig not in self.hot:
                return False
            self.hot = self.hot - {sig}
            return True

    def _served_while_hot(self, rec: MissRecord) -> None:
        # A piece served a call of the hot signature: nothing to trace in it. After
        # `HOT_SERVED_CALLS` such calls the signature is no longer hot; its calls that
        # miss again count towards a trace anew (`_missed_after_trace`).
        with self._lock:
            rec.hot_served += 1
            if rec.hot_served >= HOT_SERVED_CALLS and rec.signature in self.hot:
                self.hot = self.hot - {rec.signature}
                rec.state, rec.hot_served = MissState.SERVED, 0

    def _trace_copy(self, rec: MissRecord, inputs: Call, background: bool) -> None:
        # A hot signature's call that no piece served: its copy traced on a thread of its
        # own, or (inline) here, after the call; it was served, so a failure only logs.
        if background:
            self._trace_in_background(rec, inputs)
            return
        tracer, sig = self._tracer, rec.signature
        with TRACE_LOCK:
            if not self._take(sig):
                return
            try:
                _, changed = tracer.trace_call(*inputs, RecompileCause.HOT_SIGNATURE, sig)
            except Exception as exc:
                log.warning("pwdaemon: %s: tracing input %s failed: %s", tracer.name, sig, exc)
                rec.state = MissState.NOT_CAPTURED
            else:
                self._trace_ended(rec, changed)

    def _trace_in_background(self, rec: MissRecord, inputs: Call) -> None:
        # trace="background": a hot signature is traced as the first call was, from
        # private copies on a thread of its own, gated; the call that found it hot is
        # served as before (eager). Inline, that call paid dynamo's whole trace: 2.6 s
        # for BERT's size-1 piece on an H200, the worst call of its warm-up.
        tracer = self._tracer
        sig = rec.signature
        if not self._take(sig):
            return  # another thread took it; rec stays HOT until traced
        args_copy, kwargs_copy = inputs
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
        rec.traces += 1
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
