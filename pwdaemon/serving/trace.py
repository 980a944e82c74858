"""Dynamo tracing: a torch.compile backend that hands every graph piece a dispatcher.

The live module is patched the way `nn.Module.compile()` does it (its
`_compiled_call_impl`), so callers keep calling `model(...)`. Dynamo traces an entry
frame of pwdaemon's own (entry.py: torch.nn classes and hooks included) with the size
dimension marked by a shape strategy (strategy.py: unbacked first, then backed with
`backed_size_oblivious`). A strategy that fails on its first tracing call (nothing
captured, or a guard it could not decide) hands over to the next with a fresh entry.

Calls go through two paths:

- settling (until one whole call captures nothing new): one tracing call at a time in
  the process, under `TRACE_LOCK`, with dynamo free to capture;
- settled: dynamo in run-only mode (its callback is `False`, a thread-local setting of
  the calling thread): cached pieces serve, and an input that no piece's guards accept
  (new dtype, rank, grad mode, layout) runs eager and creates no piece. Such misses are
  counted per input signature; a signature seen `hot_calls` times earns one tracing call.
  This path takes no lock on a hit.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx

from pwdaemon.serving.background import (
    BackgroundTrace,
    importing_module,
    join_if_started,
    start_without_waiting,
)
from pwdaemon.serving.direct import DirectCalls, GuardMode, Key, call_key
from pwdaemon.serving.dispatch import Dispatcher, match_output_structure
from pwdaemon.serving.entry import call_eager, make_entry
from pwdaemon.serving.gate import GATE, GateClosed
from pwdaemon.serving.graph_facts import GraphFacts, admits, analyse_graph, only_size
from pwdaemon.serving.heap import HEAP
from pwdaemon.serving.inputs import copy_for_trace
from pwdaemon.serving.marks import SizeMarks
from pwdaemon.serving.priority import lowest_niceness
from pwdaemon.serving.strategy import (
    ORDER,
    TRACE_LOCK,
    ShapeStrategy,
    is_data_dependent,
    mark_size,
    next_strategy,
    tracing,
)
from pwdaemon.serving.trace_record import (
    FASTPATH_HINT,
    AttemptOutcome,
    ErrorFallbacks,
    GraphBreak,
    MissRecord,
    MissState,
    Recompile,
    RecompileCause,
    StrategyAttempt,
    TorchWarnings,
    counter_delta,
    counter_snapshot,
    input_signature,
)

__all__ = ("GraphPiece", "ShapeStrategy", "Tracer", "analyse_graph", "wrap_compiled")

log = logging.getLogger(__name__)

DEFAULT_HOT_CALLS = 3  # PolicyConfig.hot_calls' default; the handle passes its own
# A hot signature that does not come back within this many calls stops costing every
# call a signature computation; it can become hot again.
HOT_WINDOW_CALLS = 10_000
# Distinct miss signatures kept; further ones are counted under one "other" record.
MAX_SIGNATURES = 256
_OTHER = "other"


@dataclass(eq=False)
class GraphPiece:
    """One graph dynamo handed to the backend, and what serving it needs."""

    index: int
    gm: torch.fx.GraphModule
    dispatcher: Dispatcher
    size_index: int | None  # flat-argument index of the (first) size SymInt
    size_symbol: str | None
    extra_symbols: tuple[str, ...]  # other dynamic symbols (then: general tier only)
    returns_tuple: bool
    output_marks: tuple[tuple[int, int], ...]  # (output index, dim) carrying the size
    fingerprint: str = ""
    placeholder_specs: tuple[str, ...] = field(default_factory=tuple)
    strategy: ShapeStrategy = ShapeStrategy.UNBACKED
    size_indices: tuple[int, ...] = ()  # every SymInt placeholder that is the size
    size_symbols: tuple[str, ...] = ()
    # Calls per size served by the plain module while a background trace ran (shared by
    # the tracer's pieces; it stops changing once traced). They count as traffic: sizes
    # that came before the trace was done are as hot as the ones after.
    calls_before_trace: dict[int, int] = field(default_factory=dict)
    size_guards: tuple[Any, ...] = ()  # see GraphFacts.size_guards

    @property
    def specializable(self) -> bool:
        return self.size_index is not None and not self.extra_symbols

    def admits(self, size: int) -> bool:
        """Whether a call of `size` can reach this piece: it served one, or its guards
        on the size hold (a piece traced at size 1 behind a `batch == 1` guard admits 1
        alone). A size served wins over the guards as read here: dynamo let it through."""
        return size in self.dispatcher.counts or admits(self.size_guards, size)

    @property
    def only_size(self) -> int | None:
        """The one size that can reach this piece (a piece traced at size 1 behind a
        `batch == 1` guard), or None when its guards admit more."""
        n = only_size(self.size_guards)
        # list(): serving threads add sizes to `counts` while the engine reads it
        served = list(self.dispatcher.counts)
        return n if n is not None and all(s == n for s in served) else None

    def histogram(self) -> dict[int, int]:
        """Calls per size of this piece, those before the trace included."""
        hist = self.dispatcher.histogram()
        for size, calls in list(self.calls_before_trace.items()):
            hist[size] = hist.get(size, 0) + calls
        return hist


class _Attempt:
    """One strategy with its own entry frame and torch.compile wrapper."""

    def __init__(self, tracer: Tracer, strategy: ShapeStrategy) -> None:
        self.strategy = strategy
        self.record = StrategyAttempt(strategy)
        self.entry = make_entry(tracer.model, strategy.value)
        # The backend holds the tracer weakly: dynamo's cache entries keep the backend
        # alive as long as the entry's code object lives.
        ref = weakref.ref(tracer)

        def backend(gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Any:
            t = ref()
            return gm.forward if t is None else t._capture(self, gm)

        self._backend = backend
        self._compiled: Callable[..., Any] | None = None
        # Run-only mode: cached entries serve, a miss runs the frame eager, nothing is
        # compiled. Per thread, unlike torch.compiler.set_stance (a process global).
        # Set with `compiled`; until then the first call builds both.
        self.run: Callable[..., Any] = self._compile_then_run
        self.captured: list[GraphPiece] = []  # by the tracing call under way
        self.published = False  # some piece of this attempt was handed to on_piece

    @property
    def compiled(self) -> Callable[..., Any]:
        """The torch.compile wrapper of the entry frame (traces; under TRACE_LOCK).

        Built on first use, not at attach: the first torch.compile() in a process imports
        dynamo's backends (aot_autograd, networkx: ~0.25 s), which belongs on the trace
        thread, not in attach() on the caller's.
        """
        if self._compiled is None:
            # No isolate_recompiles: its region id is a process-global that every
            # compiled call sets on entry and restores on exit, so with threads one call's
            # exit reset it under another call still inside, whose resumed frame then
            # missed its cache and traced a duplicate piece (issue 15). The fresh entry
            # code object gives each attempt its own cache bucket instead.
            compiled = torch.compile(self.entry, backend=self._backend)
            self.run = torch._dynamo.run(compiled)
            self._compiled = compiled
        return self._compiled

    def _compile_then_run(self, *args: Any, **kwargs: Any) -> Any:
        with TRACE_LOCK:
            self.compiled  # noqa: B018 - builds `run`
        return self.run(*args, **kwargs)


class Tracer:
    """Owns the dynamo side of one attached module: entry frames, strategy, pieces.

    Plain attributes for status and metrics (read them from any thread; lists only grow):
    `pieces`, `strategy`, `attempts`, `graph_breaks`, `recompiles`, `misses`,
    `miss_calls`, `errors`, `trace_warnings`, `settled`, `trace_error`.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        dynamic: Mapping[str, int] | None,
        on_piece: Callable[[GraphPiece], None],
        size_cap: int,
        sample_bytes: int,
        background: bool = False,
        hot_calls: int = DEFAULT_HOT_CALLS,
        configured_sizes: frozenset[int] = frozenset(),
        failed: Mapping[ShapeStrategy, str] | None = None,
        on_fall_back: Callable[[ShapeStrategy, str], None] | None = None,
        guards: GuardMode = GuardMode.EVERY_CALL,
    ) -> None:
        """`guards`: see `serving.direct`. `failed`: strategies an earlier run of this
        model saw fail (with dynamo's reason), skipped here; `on_fall_back(strategy,
        reason)` is told of each failure on a size guard dynamo could not decide (on the
        tracing thread), to remember it for the next run."""
        self.model = model
        # trace="background": see `serving.background`; None traces inline.
        self._background = BackgroundTrace(self._settle_step, size_cap) if background else None
        self.shape_id = f"pwdaemon_size_{id(self):x}"
        self.hot_calls = hot_calls
        # attach(sizes=...): the user named these sizes, so a call of one that no piece
        # serves is hot at its first miss (under a backed strategy size 1 is a piece
        # of its own, and would otherwise wait for `hot_calls` misses).
        self.configured_sizes = configured_sizes
        # Set when the last background trace of a hot signature ended (for waiters).
        self.hot_traced = threading.Event()
        self.hot_traced.set()
        self._hot_thread: threading.Thread | None = None
        self.pieces: list[GraphPiece] = []
        self.attempts: list[StrategyAttempt] = []
        self.graph_breaks: list[GraphBreak] = []
        self.recompiles: list[Recompile] = []
        self.misses: dict[str, MissRecord] = {}
        self.miss_calls = 0
        self.errors = ErrorFallbacks()
        self.trace_warnings: list[str] = []
        # False until one whole tracing call captures nothing new. Written under
        # TRACE_LOCK, read without it: a stale False only sends a call to the locked
        # path, which reads it again.
        self.settled = False
        self._on_piece = on_piece
        self._size_cap = size_cap
        self._sample_bytes = sample_bytes
        self._lock = threading.Lock()  # miss and error records
        # Each dispatcher writes itself here when it runs: after a call, the calling
        # thread sees whether any piece served it (no: a miss) and which ran last.
        self._served = threading.local()
        # Signatures whose next call is traced. Replaced whole (a frozenset), so the
        # serving path reads it without a lock; empty almost always.
        self._hot: frozenset[str] = frozenset()
        self._hot_window = 0
        self.marks = SizeMarks(model, dynamic, self.shape_id)
        self._on_fall_back = on_fall_back
        # Signatures served before skip dynamo's guard check (serving.direct).
        self.direct = DirectCalls() if guards is GuardMode.RECHECKED else None
        failed = failed or {}
        first = next((s for s in ORDER if s not in failed), ORDER[-1])
        for strategy in ORDER[: ORDER.index(first)]:
            reason = f"failed in an earlier run: {failed[strategy]}"
            self.attempts.append(StrategyAttempt(strategy, AttemptOutcome.SKIPPED, reason))
        self._attempt = _Attempt(self, first)
        self.attempts.append(self._attempt.record)

    @property
    def strategy(self) -> ShapeStrategy:
        """The strategy serving now (the last one tried)."""
        return self._attempt.strategy

    @property
    def name(self) -> str:
        return type(self.model).__name__

    # ---- the call path (installed as model._compiled_call_impl) ---------------------

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if GATE.working:
            # pwdaemon runs Python work in this process (a trace, a load): it parks
            # while this call runs, so the call does not wait for the GIL per torch op.
            with GATE.call():
                return self._call(args, kwargs)
        return self._call(args, kwargs)

    def _call(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if self.settled:
            direct = self.direct
            key = None
            if direct is not None and (key := call_key(args, kwargs)) is not None:
                entry = direct.entries.get(key)
                if entry is not None:
                    ran, out = direct.run(entry, key, args, kwargs)
                    if ran:
                        return out
            if self._hot:
                return self._serve_hot_window(args, kwargs)
            return self._serve(args, kwargs, key)
        background = self._background
        if (
            background is not None
            and not background.traced.is_set()
            and (background.thread is not None or not importing_module())
        ):
            background.count(self.marks.size(args, kwargs))
            thread = background.prepare(args, kwargs)
            if thread is None:
                return call_eager(self.model, args, kwargs)
            try:
                return call_eager(self.model, args, kwargs)
            finally:
                start_without_waiting(thread)  # after this call: see BackgroundTrace.prepare
        return self._first_call(args, kwargs)

    def _serve(self, args: tuple[Any, ...], kwargs: dict[str, Any], key: Key | None = None) -> Any:
        # The settled path: no lock. `_attempt` no longer changes once settled.
        attempt = self._attempt
        self.marks.mark(args, kwargs, attempt.strategy)
        served = self._served
        served.last = None
        try:
            out = attempt.run(*args, **kwargs)
        except Exception as exc:
            return self._eager_after_error(exc, args, kwargs)
        if served.last is None:
            if self.pieces:
                self._miss(args, kwargs)
        elif key is not None and self.direct is not None:
            # A piece served this signature: later calls of it may skip dynamo's guards.
            self.direct.register(key, attempt.entry, served.last, args, kwargs)
        return out

    def _first_call(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        # Until the pieces are known, calls trace one at a time in the process: two
        # threads tracing one frame at once would capture it twice, and the
        # configuration a strategy patches is process-global.
        with TRACE_LOCK:
            if not self.settled:
                return self._settling_call(args, kwargs)
        return self._serve(args, kwargs)

    def _settling_call(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        # Under TRACE_LOCK, not yet settled: one tracing call; settled once a whole call
        # captured nothing new.
        out, changed = self._trace_call(args, kwargs, RecompileCause.SETTLING, "")
        if changed:
            return out
        self.settled = True
        HEAP.refreeze()  # dynamo's state of the trace stays: out of collections' walks
        log.info(
            "pwdaemon: %s settled: %d piece(s), strategy %s",
            self.name,
            len(self.pieces),
            self.strategy.value,
        )
        return out

    # ---- misses: inputs no captured piece serves -------------------------------------

    def _miss(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        sig = input_signature(args, kwargs, self.marks.dims(args, kwargs))
        with self._lock:  # the miss path only; a hit never takes it
            self.miss_calls += 1
            rec = self.misses.get(sig)
            if rec is None:
                if len(self.misses) >= MAX_SIGNATURES:
                    sig = _OTHER
                    rec = self.misses.setdefault(_OTHER, MissRecord(_OTHER))
                else:
                    rec = self.misses[sig] = MissRecord(sig)
                    log.info(
                        "pwdaemon: %s: no captured piece serves input %s; served eager",
                        self.name,
                        sig,
                    )
            rec.calls += 1
            hot_at = self.hot_calls
            if self.configured_sizes and self.marks.size(args, kwargs) in self.configured_sizes:
                hot_at = 1
            if rec.state is MissState.COUNTING and rec.calls >= hot_at and sig != _OTHER:
                rec.state = MissState.HOT
                self._hot_window = 0
                self._hot = self._hot | {sig}
                log.info(
                    "pwdaemon: %s: input %s is hot (%d calls); its next call is traced",
                    self.name,
                    sig,
                    rec.calls,
                )

    def _serve_hot_window(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        # Only while some stray signature is hot: every call computes its signature.
        sig = input_signature(args, kwargs, self.marks.dims(args, kwargs))
        if sig in self._hot:
            return self._trace_hot(sig, args, kwargs)
        self._hot_window += 1  # a lost update under a race only delays the expiry
        if self._hot_window > HOT_WINDOW_CALLS:
            with self._lock:
                for s in self._hot:
                    rec = self.misses[s]
                    if rec.state is MissState.HOT:
                        rec.state, rec.calls = MissState.COUNTING, 0
                self._hot = frozenset()
        return self._serve(args, kwargs)

    def _trace_hot(self, sig: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if self._background is not None and not importing_module():
            self._trace_hot_in_background(sig, args, kwargs)
            return self._serve(args, kwargs)
        with TRACE_LOCK:
            if sig in self._hot:  # not traced by another thread meanwhile
                with self._lock:
                    self._hot = self._hot - {sig}
                rec = self.misses[sig]
                try:
                    out, changed = self._trace_call(args, kwargs, RecompileCause.HOT_SIGNATURE, sig)
                except BaseException:
                    # A traced call that raised (eager raised too) is not traced again.
                    rec.state = MissState.NOT_CAPTURED
                    raise
                self._hot_trace_ended(rec, changed)
                return out
        return self._serve(args, kwargs)

    def _trace_hot_in_background(
        self, sig: str, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> None:
        # trace="background": a hot signature is traced as the first call was, from
        # private copies on a thread of its own, gated; the call that found it hot is
        # served as before (eager). Inline, that call paid dynamo's whole trace: 2.6 s
        # for BERT's size-1 piece on an H200, the worst call of its warm-up.
        with self._lock:
            if sig not in self._hot:
                return  # another thread took it
            self._hot = self._hot - {sig}
        rec = self.misses[sig]  # stays HOT until traced: no second trace meanwhile
        args_copy = tuple(copy_for_trace(a) for a in args)
        kwargs_copy = {k: copy_for_trace(v) for k, v in kwargs.items()}
        modes = (torch.is_grad_enabled(), torch.is_inference_mode_enabled())

        def run() -> None:
            background = self._background
            if background is not None and background.stopping:
                self.hot_traced.set()  # detached before this thread began
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
                    _, changed = self._trace_call(
                        args_copy, kwargs_copy, RecompileCause.HOT_SIGNATURE, sig
                    )
            except GateClosed:
                pass  # the interpreter exits
            except BaseException as exc:  # a thread of ours: log, never raise
                log.warning("pwdaemon: %s: tracing input %s failed: %s", self.name, sig, exc)
            try:
                self._hot_trace_ended(rec, changed)
            finally:
                self.hot_traced.set()

        self.hot_traced.clear()
        self._hot_thread = threading.Thread(target=run, name="pwdaemon-trace-hot", daemon=True)
        start_without_waiting(self._hot_thread)

    def _hot_trace_ended(self, rec: MissRecord, changed: bool) -> None:
        """Record how the trace of a hot signature ended: traced, or left eager."""
        rec.state = MissState.TRACED if changed else MissState.NOT_CAPTURED
        if not changed:
            log.warning(
                "pwdaemon: %s: input %s was traced but dynamo captured no piece; it stays eager",
                self.name,
                rec.signature,
            )

    # ---- tracing calls ---------------------------------------------------------------

    def _trace_call(
        self,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        cause: RecompileCause,
        detail: str,
    ) -> tuple[Any, bool]:
        """One call with dynamo free to capture; the caller holds TRACE_LOCK.

        Returns the output and whether the call changed what is captured (new pieces, or
        a strategy that fell back).
        """
        attempt = self._attempt
        self.marks.mark(args, kwargs, attempt.strategy)
        breaks_before = counter_snapshot("graph_break")
        served = self._served
        served.last = None
        error: Exception | None = None
        out: Any = None
        with tracing(attempt.strategy), TorchWarnings() as warnings:
            try:
                out = attempt.compiled(*args, **kwargs)
            except Exception as exc:  # dynamo's wrappers (TorchRuntimeError...) included
                error = exc
        new, attempt.captured = attempt.captured, []
        breaks = counter_delta(breaks_before, counter_snapshot("graph_break"))
        last = served.last
        if isinstance(last, Dispatcher) and any(p.dispatcher is last for p in new):
            # The last piece of the call returns to the caller: its outputs need no
            # mark for a resumed frame (and must not carry one out of pwdaemon).
            last.mark_outputs = None
        reasons = [*breaks, *warnings.messages]
        undecided = [r for r in reasons if is_data_dependent(r)]
        nothing = not self.pieces and not new and error is None
        fallback = next_strategy(attempt.strategy)
        if (undecided or nothing) and not attempt.published and fallback is not None:
            why = undecided[0] if undecided else "dynamo captured no graph"
            if nothing and warnings.messages:
                why = f"{why}: {warnings.messages[0]}"
            attempt.record.discarded = len(new)
            # Remembered for the next start only when dynamo could not decide a size
            # guard: that is the model's code meeting the strategy, every time. Capturing
            # nothing can depend on the first call's inputs.
            self._fall_back(attempt, fallback, why, remember=bool(undecided))
            changed = True
        else:
            changed = self._accept(attempt, new, breaks, cause, detail)
            if undecided:
                log.warning(
                    "pwdaemon: %s: strategy %s could not decide a size guard and has no "
                    "fallback left: %s",
                    self.name,
                    attempt.strategy.value,
                    undecided[0],
                )
            if nothing:
                fake = any(b.fake_tensor_break for b in self.graph_breaks)
                log.warning(
                    "pwdaemon: %s: dynamo captured no graph with any strategy; the model "
                    "serves eager%s",
                    self.name,
                    f" ({FASTPATH_HINT})" if fake else "",
                )
        self.trace_warnings.extend(warnings.messages[:8])
        if error is not None:
            return self._eager_after_error(error, args, kwargs), changed
        return out, changed

    def _fall_back(
        self, attempt: _Attempt, fallback: ShapeStrategy, why: str, *, remember: bool
    ) -> None:
        attempt.record.outcome = AttemptOutcome.FELL_BACK
        attempt.record.reason = why
        log.warning(
            "pwdaemon: %s: strategy %s failed (%s); the next call traces with %s",
            self.name,
            attempt.strategy.value,
            why,
            fallback.value,
        )
        # The failed attempt's pieces were never handed on; its entry and dynamo's
        # cache entries on it are dropped with it.
        self._attempt = _Attempt(self, fallback)
        self.attempts.append(self._attempt.record)
        if remember and self._on_fall_back is not None:
            try:
                self._on_fall_back(attempt.strategy, why)
            except Exception as exc:  # on a serving call when tracing inline: never raise
                log.warning("pwdaemon: %s: failed strategy not remembered: %s", self.name, exc)

    def _accept(
        self,
        attempt: _Attempt,
        new: list[GraphPiece],
        breaks: Mapping[str, int],
        cause: RecompileCause,
        detail: str,
    ) -> bool:
        first = not self.pieces
        indices = tuple(p.index for p in new)
        for reason, count in breaks.items():
            self.graph_breaks.append(GraphBreak(reason, count, attempt.strategy, indices))
            log.warning("pwdaemon: %s: graph break: %s", self.name, reason)
        for piece in new:
            self.pieces.append(piece)
            log.info(
                "pwdaemon: %s: piece %d captured (strategy %s, size %s%s)",
                self.name,
                piece.index,
                piece.strategy.value,
                ",".join(piece.size_symbols) or "none",
                f", other symbols {','.join(piece.extra_symbols)}" if piece.extra_symbols else "",
            )
            self._on_piece(piece)
        if new:
            attempt.published = True
            if not first or cause is RecompileCause.HOT_SIGNATURE:
                self.recompiles.append(Recompile(cause, detail, attempt.strategy, indices))
                log.info(
                    "pwdaemon: %s: recompile (%s%s): piece(s) %s",
                    self.name,
                    cause.value,
                    f" {detail}" if detail else "",
                    list(indices),
                )
        return bool(new)

    def _eager_after_error(
        self, exc: Exception, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        # A call that raised on pwdaemon's path (dynamo's wrappers, a runtime assert of
        # a captured graph, a compiled kernel) is answered by eager: its output, or the
        # exception eager raises. An error eager raises too costs one run more.
        name = type(exc).__name__
        with self._lock:
            self.errors.calls += 1
            first = name not in self.errors.by_type
            self.errors.by_type[name] = self.errors.by_type.get(name, 0) + 1
        if first:
            log.warning(
                "pwdaemon: %s: a call raised %s on pwdaemon's path (%s); answering it "
                "eager (logged once per exception type)",
                self.name,
                name,
                " ".join(str(exc).split())[:200],
            )
        return call_eager(self.model, args, kwargs)

    # ---- background tracing (serving.background) -----------------------------------

    def _settle_step(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
        # On the trace thread: one tracing call; True once settled.
        with TRACE_LOCK:
            if not self.settled:
                self._settling_call(args, kwargs)
            return self.settled

    @property
    def trace_error(self) -> BaseException | None:
        """Why the background trace failed (then the next call traces inline)."""
        return self._background.error if self._background is not None else None

    def stop(self, timeout: float) -> bool:
        """Detach: wait up to `timeout` for a background trace under way; False if it
        is still running."""
        if self.direct is not None:
            self.direct.clear()
        if self._background is None:
            return True
        deadline = time.monotonic() + timeout
        done = self._background.stop(timeout)
        hot = self._hot_thread
        if hot is not None and hot is not threading.current_thread():
            # Not started yet: it sees the background trace stopping and does nothing.
            done = join_if_started(hot, max(0.0, deadline - time.monotonic())) and done
        return done

    def wait_traced(self, timeout: float | None = None) -> bool:
        """Background capture only: block until dynamo captured the model (a model
        first called while its module is imported is traced inline: True at once)."""
        if self._background is None or self.settled:
            return True
        if self._background.thread is None and self.pieces:
            return True  # traced inline: first called while its module was imported
        return self._background.traced.wait(timeout)

    # ---- the backend -----------------------------------------------------------------

    def _capture(self, attempt: _Attempt, gm: torch.fx.GraphModule) -> Dispatcher:
        # Called by dynamo inside a tracing call (TRACE_LOCK held by this thread).
        facts: GraphFacts = analyse_graph(gm)
        index = len(self.pieces) + len(attempt.captured)
        dispatcher = Dispatcher(
            index,
            gm.forward,
            facts.size_index,
            size_cap=self._size_cap,
            sample_bytes=self._sample_bytes,
            served=self._served,
        )
        piece = GraphPiece(
            index=index,
            gm=gm,
            dispatcher=dispatcher,
            size_index=facts.size_index,
            size_symbol=facts.size_symbol,
            extra_symbols=facts.extra_symbols,
            returns_tuple=facts.returns_tuple,
            output_marks=facts.output_marks,
            fingerprint=facts.fingerprint,
            placeholder_specs=facts.placeholder_specs,
            strategy=attempt.strategy,
            size_indices=facts.size_indices,
            size_symbols=facts.size_symbols,
            size_guards=facts.size_guards,
            # Shared with every piece: see GraphPiece.calls_before_trace.
            calls_before_trace=self._background.calls_before if self._background else {},
        )
        if piece.output_marks:
            # Outputs of a piece followed by another (a graph break) must carry the size
            # mark into dynamo's resumed frame, or it would trace that frame static.
            dispatcher.mark_outputs = self._output_marker(piece.output_marks, attempt.strategy)
        attempt.captured.append(piece)
        return dispatcher

    def _output_marker(
        self, marks: tuple[tuple[int, int], ...], strategy: ShapeStrategy
    ) -> Callable[[Any], None]:
        shape_id = self.shape_id

        def mark(out: Any) -> None:
            for i, d in marks:
                t = out[i]
                if isinstance(t, torch.Tensor):
                    mark_size(t, d, strategy, shape_id)

        return mark


def wrap_compiled(fn: Callable[..., Any], piece: GraphPiece) -> Callable[..., Any]:
    """A compiled artifact shaped like the piece's graph output."""
    return match_output_structure(fn, piece.returns_tuple)
