"""A graph piece: one graph dynamo handed to pwdaemon's backend, and what serving it needs.

The tracer (trace.py) creates pieces through a `PieceMaker`; the engine plans, compiles
and swaps runnables for them; status and metrics read them.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx

from pwdaemon.serving.dispatch import Dispatcher, match_output_structure
from pwdaemon.serving.graph_facts import GraphFacts, admits, only_size
from pwdaemon.serving.size_hint import ExtraDim, dynamic_spec, general_only_hint
from pwdaemon.serving.strategy import ShapeStrategy, mark_size

__all__ = ("GraphPiece", "PieceMaker", "fact_fields", "wrap_compiled")

log = logging.getLogger(__name__)

# Every field of GraphFacts is a field of GraphPiece of the same name and meaning.
_FACT_FIELDS = tuple(f.name for f in dataclasses.fields(GraphFacts))


def fact_fields(facts: GraphFacts) -> dict[str, Any]:
    """`facts` as GraphPiece's keyword arguments (`GraphPiece(**fact_fields(facts), ...)`)."""
    return {name: getattr(facts, name) for name in _FACT_FIELDS}


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
    device: str = "cpu"  # see GraphFacts.device
    size_dims: tuple[tuple[int, ...], ...] | None = None  # see GraphFacts.size_dims
    extra_dims: tuple[ExtraDim, ...] = ()  # see GraphFacts.extra_dims
    tensor_free: bool = False  # see GraphFacts.tensor_free: nothing to compile
    traced_size: int | None = None  # see GraphFacts.traced_size
    # With `extra_symbols`: why the piece is general-only and the `dynamic=` that would
    # size it on them (`serving.size_hint`), for the log and the status.
    size_hint: str = ""
    # The graph as `dump_graph` ships it to a compile worker, where it came ready-made (a
    # loaded trace: `engine.saved_traces`); `gm` then carries no fake metadata, and the
    # serving process never unpickles it.
    shipped: bytes | None = None

    @property
    def facts(self) -> GraphFacts:
        """The facts this piece was made from (`GraphFacts`), as they were at capture."""
        return GraphFacts(**{name: getattr(self, name) for name in _FACT_FIELDS})

    @property
    def specializable(self) -> bool:
        return self.size_index is not None and not self.extra_symbols and not self.tensor_free

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


def wrap_compiled(fn: Callable[..., Any], piece: GraphPiece) -> Callable[..., Any]:
    """A compiled artifact shaped like the piece's graph output."""
    return match_output_structure(fn, piece.returns_tuple)


@dataclass(frozen=True)
class PieceMaker:
    """Makes one tracer's pieces: each with its dispatcher, all sharing the tracer's
    `served` thread-local (a call sees which piece served it) and `calls_before_trace`."""

    size_cap: int
    sample_bytes: int
    served: threading.local
    calls_before_trace: dict[int, int]
    shape_id: str
    name: str = ""  # the model's, for the log
    params: tuple[str, ...] = ()  # the model's forward arguments, for `size_hint`

    def make(
        self,
        gm: torch.fx.GraphModule,
        facts: GraphFacts,
        strategy: ShapeStrategy,
        index: int,
        shipped: bytes | None = None,
    ) -> GraphPiece:
        dispatcher = Dispatcher(
            index,
            gm.forward,
            facts.size_index,
            size_cap=self.size_cap,
            sample_bytes=self.sample_bytes,
            served=self.served,
        )
        piece = GraphPiece(
            index=index,
            gm=gm,
            dispatcher=dispatcher,
            strategy=strategy,
            shipped=shipped,
            calls_before_trace=self.calls_before_trace,
            **fact_fields(facts),
        )
        if facts.extra_symbols:
            # Once per piece: a piece is made once per trace (or load) in a process. A
            # warning only with advice the user can take (`size_hint`).
            spec = dynamic_spec(facts.extra_dims, self.params)
            piece.size_hint = general_only_hint(
                facts.extra_dims, facts.extra_symbols, self.params, spec
            )
            level = logging.WARNING if spec is not None else logging.INFO
            log.log(level, "pwdaemon: %s: graph %d has %s", self.name, index, piece.size_hint)
        return piece

    def output_marker(
        self, marks: tuple[tuple[int, int], ...], strategy: ShapeStrategy
    ) -> Callable[[Any], None]:
        """Marks the size on a piece's outputs `marks` ((output index, dim) pairs), weak
        under the backed strategy (`mark_size`): on torch 2.11 Llama's resumed decoder
        layer specialized `position_embeddings[0].size()[0]`, and a strict mark made
        every such call raise ConstraintViolationError (answered eager)."""
        shape_id = self.shape_id

        def mark(out: Any) -> None:
            for i, d in marks:
                t = out[i]
                if isinstance(t, torch.Tensor):
                    mark_size(t, d, strategy, shape_id, weak=True)

        return mark
