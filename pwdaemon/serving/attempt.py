"""One shape strategy's attempt at tracing a model: its own entry frame and wrapper.

A strategy that fails hands over to a fresh attempt (the next strategy, or the same one
on a call brought to size 2): a fresh entry code object gives each attempt its own
bucket in dynamo's cache, so the failed attempt's entries are not consulted again.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
import torch.fx

from pwdaemon.serving.entry import make_entry
from pwdaemon.serving.piece import GraphPiece
from pwdaemon.serving.strategy import TRACE_LOCK, ShapeStrategy
from pwdaemon.serving.trace_record import StrategyAttempt

if TYPE_CHECKING:
    from pwdaemon.serving.trace import Tracer

__all__ = ("Attempt",)


class Attempt:
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
            return gm.forward if t is None else t.capture(self, gm)

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
