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
  counted per input signature; a signature seen `hot_calls` times earns one tracing call
  (misses.py). This path takes no lock on a hit.

What dynamo hands the backend becomes a `GraphPiece` (piece.py) with a dispatcher.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.fx

from pwdaemon.serving import strategy as strategies
from pwdaemon.serving.attempt import Attempt
from pwdaemon.serving.background import (
    BackgroundTrace,
    importing_module,
    join_if_started,
    start_without_waiting,
)
from pwdaemon.serving.direct import DirectCalls, GuardMode, Key, call_key
from pwdaemon.serving.dispatch import Dispatcher
from pwdaemon.serving.entry import call_eager
from pwdaemon.serving.gate import GATE
from pwdaemon.serving.graph_facts import analyse_graph
from pwdaemon.serving.heap import HEAP
from pwdaemon.serving.marks import SizeMarks, forward_params
from pwdaemon.serving.misses import DEFAULT_HOT_CALLS, Misses
from pwdaemon.serving.piece import GraphPiece, PieceMaker
from pwdaemon.serving.saved_slot import SavedTraceSlot
from pwdaemon.serving.saved_trace import SavedTraceOutcome, TraceShelf
from pwdaemon.serving.strategy import (
    TRACE_LOCK,
    ShapeStrategy,
    is_data_dependent,
    next_strategy,
    tracing,
)
from pwdaemon.serving.trace_record import (
    FASTPATH_HINT,
    AttemptOutcome,
    ErrorFallbacks,
    GraphBreak,
    MissRecord,
    Recompile,
    RecompileCause,
    StrategyAttempt,
    TorchWarnings,
    counter_delta,
    counter_snapshot,
)

__all__ = ("Tracer", "analyse_graph")

log = logging.getLogger(__name__)


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
        first_call_returned: threading.Event | None = None,
        shelf: TraceShelf | None = None,
    ) -> None:
        """`guards`: see `serving.direct`. `failed`: strategies an earlier run of this
        model saw fail (with dynamo's reason), skipped here; `on_fall_back(strategy,
        reason)` is told of each failure on a size guard dynamo could not decide (on the
        tracing thread), to remember it for the next run; it must not raise (a tracing
        call may be a serving call's). `first_call_returned` is set
        when the call that starts the background trace returns (the engine starts then).
        `shelf`: where this model's saved traces are kept (`serving.saved_slot`): with a
        background trace, those stored by an earlier run are loaded instead of tracing;
        a trace that settles as one piece is saved for the next run, and so is each
        piece a hot input's trace adds alone."""
        self.model = model
        self._first_call_returned = first_call_returned
        # trace="background": see `serving.background`; None traces inline.
        self.background = (
            BackgroundTrace(self._settle_step, size_cap, self.name) if background else None
        )
        self.shape_id = f"pwdaemon_size_{id(self):x}"
        self.pieces: list[GraphPiece] = []
        self.attempts: list[StrategyAttempt] = []
        self.graph_breaks: list[GraphBreak] = []
        self.recompiles: list[Recompile] = []
        self.miss = Misses(self, hot_calls=hot_calls, configured_sizes=configured_sizes)
        self.errors = ErrorFallbacks()
        self.trace_warnings: list[str] = []
        # False until one whole tracing call captures nothing new. Written under
        # TRACE_LOCK, read without it: a stale False only sends a call to the locked
        # path, which reads it again.
        self.settled = False
        # Set (trace thread, TRACE_LOCK) when a size-1 trace broke up: the background
        # trace's next calls are its copy at size 2 (`_widens`).
        self.widen_to_two = False
        self._on_piece = on_piece
        # The size of the tracing call under way (TRACE_LOCK): its pieces' `traced_size`.
        self._tracing_size: int | None = None
        self._lock = threading.Lock()  # error records
        # Each dispatcher writes itself here when it runs: after a call, the calling
        # thread sees whether any piece served it (no: a miss) and which ran last.
        self._served = threading.local()
        self._maker = PieceMaker(
            size_cap,
            sample_bytes,
            self._served,
            # Shared with every piece: see GraphPiece.calls_before_trace.
            self.background.calls_before if self.background else {},
            self.shape_id,
            self.name,
            forward_params(model),
        )
        self.marks = SizeMarks(model, dynamic, self.shape_id)
        self._on_fall_back = on_fall_back
        # Signatures served before skip dynamo's guard check (serving.direct).
        self.direct = DirectCalls() if guards is GuardMode.RECHECKED else None
        self.saved = SavedTraceSlot(shelf if background else None, self.name)
        failed = failed or {}
        # Read at attach, not import: tests pin the order (`strategies.ORDER`).
        order = strategies.ORDER
        first = next((s for s in order if s not in failed), order[-1])
        for strategy in order[: order.index(first)]:
            reason = f"failed in an earlier run: {failed[strategy]}"
            self.attempts.append(StrategyAttempt(strategy, AttemptOutcome.SKIPPED, reason))
        self._attempt = Attempt(self, first)
        self.attempts.append(self._attempt.record)

    @property
    def strategy(self) -> ShapeStrategy:
        """The strategy serving now (the last one tried)."""
        return self._attempt.strategy

    @property
    def name(self) -> str:
        return type(self.model).__name__

    @property
    def misses(self) -> Mapping[str, MissRecord]:
        """Calls no piece served, per input signature (`serving.misses`)."""
        return self.miss.records

    @property
    def miss_calls(self) -> int:
        return self.miss.calls

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
            for loaded in self.saved.loaded:  # set before `settled`: read unlocked
                try:
                    ran, out = loaded.serve(args, kwargs)
                except Exception as exc:
                    return self._eager_after_error(exc, args, kwargs)
                if ran:
                    return out
            # Every loaded trace's guards refused the call (or none was loaded): dynamo's
            # own path below (a miss, traced if its signature comes often).
            direct = self.direct
            key = None
            if direct is not None and (key := call_key(args, kwargs)) is not None:
                entry = direct.entries.get(key)
                if entry is not None:
                    ran, out = direct.run(entry, key, args, kwargs)
                    if ran:
                        return out
            miss = self.miss
            if miss.hot:
                return miss.serve(args, kwargs)
            return self.serve(args, kwargs, key)
        background = self.background
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
                if self._first_call_returned is not None:
                    self._first_call_returned.set()
        return self._first_call(args, kwargs)

    def serve(self, args: tuple[Any, ...], kwargs: dict[str, Any], key: Key | None = None) -> Any:
        """A settled call through dynamo (run-only). No lock: `_attempt` no longer
        changes once settled."""
        attempt = self._attempt
        self.marks.mark(args, kwargs, attempt.strategy, inside=False)
        served = self._served
        served.last = None
        try:
            out = attempt.run(*args, **kwargs)
        except Exception as exc:
            return self._eager_after_error(exc, args, kwargs)
        if served.last is None:
            if self.pieces:
                self.miss.count(args, kwargs)
        elif key is not None and self.direct is not None:
            # A piece served this signature: later calls of it may skip dynamo's guards.
            self.direct.register(key, attempt.entry, served.last, args, kwargs)
        return out

    def last_call_served(self) -> bool:
        """Whether a piece served the last call this thread made through the tracer
        (dispatchers note themselves in a thread-local as they serve)."""
        return getattr(self._served, "last", None) is not None

    def _first_call(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        # Until the pieces are known, calls trace one at a time in the process: two
        # threads tracing one frame at once would capture it twice, and the
        # configuration a strategy patches is process-global.
        with TRACE_LOCK:
            if not self.settled:
                return self._settling_call(args, kwargs)
        return self.serve(args, kwargs)

    def _settling_call(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        # Under TRACE_LOCK, not yet settled: one tracing call; settled once a whole call
        # captured nothing new.
        out, changed = self.trace_call(args, kwargs, RecompileCause.SETTLING, "")
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

    # ---- tracing calls ---------------------------------------------------------------

    def trace_call(
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
        self._tracing_size = self.marks.size(args, kwargs)  # read by `capture`
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
        if not undecided and any(not p.specializable for p in new):
            # A break on a size guard dynamo could not decide inside an inlined call is
            # named only in its graph-break log (see TorchWarnings). Where it cost a piece
            # the size (no size symbol: pinned to this call's size), the next strategy
            # traces: transformers' BERT sized on its sequence dim came out as 7 pieces
            # under the unbacked strategy, 3 of them pinned, and as one piece backed.
            # Where every piece kept the size (a branch on `n == 1` after a piece that
            # serves every size, run as Python), the break costs nothing and the
            # strategy stays.
            undecided = [r for r in warnings.graph_breaks if is_data_dependent(r)]
        nothing = not self.pieces and not new and error is None
        fallback = next_strategy(attempt.strategy)
        if self._widens(attempt, cause, new, breaks, warnings, args, kwargs):
            changed = True
        elif (undecided or nothing) and not attempt.published and fallback is not None:
            why = undecided[0] if undecided else "dynamo captured no graph"
            if nothing and warnings.messages:
                why = f"{why}: {warnings.messages[0]}"
            # Remembered for the next start only when dynamo could not decide a size
            # guard: that is the model's code meeting the strategy, every time. Capturing
            # nothing can depend on the first call's inputs.
            self._fall_back(attempt, fallback, why, new, remember=bool(undecided))
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

    def _widens(
        self,
        attempt: Attempt,
        cause: RecompileCause,
        new: list[GraphPiece],
        breaks: Mapping[str, int],
        warnings: TorchWarnings,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> bool:
        # A background trace of a size-1 call that broke into pieces under the last
        # strategy is dropped and traced again on a copy of the call at size 2, as
        # torch.compile makes its general graph from a size above 1. Transformers sized
        # on their sequence dim, first called at length 1: `is_causal = q_length > 1 and
        # ...` is then the size test itself (a SymBool), SDPA refuses it, and BERT broke
        # 12 times into 7 pieces whose other lengths ran mostly eager, unseen (no piece
        # missed them). Calls of size 1 then miss (`_hand_over`) and are traced once hot.
        if (
            self.widen_to_two
            or self.background is None
            or cause is not RecompileCause.SETTLING
            or attempt.published
            or next_strategy(attempt.strategy) is not None
            or len(new) < 2
            or not (breaks or warnings.graph_breaks)
            or self.marks.size(args, kwargs) != 1
        ):
            return False
        why = (next(iter(breaks), None) or warnings.graph_breaks[0]).strip()
        reason = (
            f"traced at size 1 it broke into {len(new)} pieces ({why.splitlines()[0][:200]});"
            " traced again at size 2"
        )
        log.warning("pwdaemon: %s: %s", self.name, reason)
        self._hand_over(attempt, attempt.strategy, AttemptOutcome.FELL_BACK, reason, new)
        self.widen_to_two = True
        return True

    def _hand_over(
        self,
        attempt: Attempt,
        strategy: ShapeStrategy,
        outcome: AttemptOutcome,
        reason: str,
        dropped: list[GraphPiece],
    ) -> None:
        # `attempt` ends with `outcome`; a fresh one (a new entry frame) traces with
        # `strategy`. Its `dropped` pieces were never handed on, but dynamo keeps their
        # cache entries on the model's inner code objects (a graph break leaves frames of
        # their own there; shared by every instance of the class, so not reset here). A
        # call the new attempt's pieces refuse runs its entry frame eager and can reach
        # one: it runs right, but must not count as served by a piece. Retired, it counts
        # as a miss, and its input is traced once hot (BERT sized on its sequence dim:
        # calls of length 1 after the trace at length 2, `_widens`).
        attempt.record.outcome, attempt.record.reason = outcome, reason
        attempt.record.discarded = len(dropped)
        for piece in dropped:
            piece.dispatcher.served = threading.local()
        self._attempt = Attempt(self, strategy)
        self.attempts.append(self._attempt.record)

    def _fall_back(
        self,
        attempt: Attempt,
        fallback: ShapeStrategy,
        why: str,
        dropped: list[GraphPiece],
        *,
        remember: bool,
    ) -> None:
        log.warning(
            "pwdaemon: %s: strategy %s failed (%s); the next call traces with %s",
            self.name,
            attempt.strategy.value,
            why,
            fallback.value,
        )
        self._hand_over(attempt, fallback, AttemptOutcome.FELL_BACK, why, dropped)
        if remember and self._on_fall_back is not None:
            self._on_fall_back(attempt.strategy, why)  # never raises (the handle's)

    def _accept(
        self,
        attempt: Attempt,
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
        # On the trace thread: one tracing call; True once settled. The first step loads
        # a saved trace instead where the shelf has one; the step that settles saves one.
        with TRACE_LOCK:
            if not self.settled and not self.pieces:
                self._load_saved()
            if not self.settled:
                if self.widen_to_two and self.marks.size(args, kwargs) == 1:
                    args, kwargs = self.marks.widened(args, kwargs, 2)  # see `_widens`
                self._settling_call(args, kwargs)
                if self.settled:
                    self._save(args, kwargs)
            return self.settled

    def _load_saved(self) -> None:
        # Under TRACE_LOCK on the trace thread, before any tracing call.
        pieces = []
        for index, loaded in enumerate(self.saved.load(self.model, self.strategy)):
            record = loaded.record
            piece = self._maker.make(
                record.gm, record.facts, record.strategy, index, record.shipped
            )
            loaded.bind(piece.dispatcher)
            pieces.append(piece)
        if not pieces:
            return
        saved_with = pieces[0].strategy
        if saved_with is not self._attempt.strategy:
            # An earlier run fell back from this strategy to the one its traces were
            # saved with (`SavedTraceSlot.load`): later misses trace with that one too.
            reason = f"an earlier run fell back from it: its saved trace is {saved_with.value}"
            self._hand_over(self._attempt, saved_with, AttemptOutcome.SKIPPED, reason, [])
        self._accept(self._attempt, pieces, {}, RecompileCause.SETTLING, "")
        self.settled = True
        HEAP.refreeze()

    def _save(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        # Under TRACE_LOCK on the trace thread, once the trace settled. It traces the
        # model again (0.1-2.8 s on this box, gated as the trace is): a restart skips it.
        if not self.saved.active:
            return  # no store, or saved_trace=False: no copies, nothing to report
        if len(self.pieces) != 1 or self.graph_breaks:
            self.saved.note(
                SavedTraceOutcome.NOT_SAVED,
                f"{len(self.pieces)} piece(s), {len(self.graph_breaks)} graph break(s): "
                "only a model traced as one whole graph is saved",
            )
            return
        self.saved.save(self.model, self.pieces[0], (args, kwargs), self.marks)

    @property
    def saved_trace(self) -> SavedTraceOutcome:
        """What became of this model's saved trace (`serving.saved_trace`)."""
        return self.saved.outcome

    @property
    def saved_trace_detail(self) -> str:
        return self.saved.detail

    @property
    def trace_error(self) -> BaseException | None:
        """Why the background trace failed (then the next call traces inline)."""
        return self.background.error if self.background is not None else None

    def stop(self, timeout: float) -> bool:
        """Detach: wait up to `timeout` for a background trace under way; False if it
        is still running."""
        if self.direct is not None:
            self.direct.clear()
        if self.background is None:
            return True
        deadline = time.monotonic() + timeout
        done = self.background.stop(timeout)
        hot = self.miss.thread
        if hot is not None and hot is not threading.current_thread():
            # Not started yet: it sees the background trace stopping and does nothing.
            done = join_if_started(hot, max(0.0, deadline - time.monotonic())) and done
        return done

    def wait_traced(self, timeout: float | None = None) -> bool:
        """Background capture only: block until dynamo captured the model (a model
        first called while its module is imported is traced inline: True at once)."""
        if self.background is None or self.settled:
            return True
        if self.background.thread is None and self.pieces:
            return True  # traced inline: first called while its module was imported
        return self.background.traced.wait(timeout)

    # ---- the backend -----------------------------------------------------------------

    def capture(self, attempt: Attempt, gm: torch.fx.GraphModule) -> Dispatcher:
        # Called by dynamo inside a tracing call (TRACE_LOCK held by this thread).
        facts = dataclasses.replace(analyse_graph(gm), traced_size=self._tracing_size)
        index = len(self.pieces) + len(attempt.captured)
        piece = self._maker.make(gm, facts, attempt.strategy, index)
        if piece.output_marks:
            # Outputs of a piece followed by another (a graph break) must carry the size
            # mark into dynamo's resumed frame, or it would trace that frame static.
            piece.dispatcher.mark_outputs = self._maker.output_marker(
                piece.output_marks, attempt.strategy
            )
        attempt.captured.append(piece)
        return piece.dispatcher
