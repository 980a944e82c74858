"""What the tracer saw, as plain records: strategies tried, graph breaks, recompiles,
misses (calls no captured piece served) and calls re-run eager after an error.

Everything here is written on slow paths (tracing calls, misses, errors), never on a
call that a captured piece serves.
"""

from __future__ import annotations

import enum
import logging
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import torch

from pwdaemon.serving.strategy import ShapeStrategy


class AttemptOutcome(enum.Enum):
    ACTIVE = "active"  # the strategy serving now
    FELL_BACK = "fell_back"  # failed on its first tracing call; the next one took over
    # Not tried: it failed for this model in an earlier run (the artifact store
    # remembers), and a failed attempt costs a whole trace (BERT on an H200: 25 of 32 s).
    SKIPPED = "skipped"


@dataclass
class StrategyAttempt:
    """One strategy tried for the model, with a fresh entry frame."""

    strategy: ShapeStrategy
    outcome: AttemptOutcome = AttemptOutcome.ACTIVE
    reason: str = ""  # why it fell back (dynamo's words)
    discarded: int = 0  # graphs it captured before failing, never served nor compiled


@dataclass(frozen=True)
class GraphBreak:
    """A graph break dynamo reported during a tracing call (from its counters)."""

    reason: str
    count: int
    strategy: ShapeStrategy
    pieces: tuple[int, ...]  # pieces captured by the call in which it happened

    @property
    def fake_tensor_break(self) -> bool:
        """An operator without a fake-tensor kernel broke the graph (see FASTPATH_HINT)."""
        return "does not support running with fake tensors" in self.reason


# What to do when a fake-tensor graph break left nothing captured: on CUDA that is
# nn.TransformerEncoder's fused fast path, which torch.compile cannot capture either.
FASTPATH_HINT = (
    "torch's fused attention fast path (nn.TransformerEncoderLayer, nn.MultiheadAttention) "
    "cannot be traced on this device; torch.backends.mha.set_fastpath_enabled(False) "
    "before attach, and left off, lets dynamo trace those layers"
)


class RecompileCause(enum.Enum):
    SETTLING = "settling"  # a first call still discovering pieces
    HOT_SIGNATURE = "hot_signature"  # a stray input came often enough to earn a trace


@dataclass(frozen=True)
class Recompile:
    """A tracing call after the first that captured new pieces."""

    cause: RecompileCause
    detail: str  # the input signature for HOT_SIGNATURE
    strategy: ShapeStrategy
    pieces: tuple[int, ...]


class MissState(enum.Enum):
    COUNTING = "counting"  # served eager; not hot yet
    HOT = "hot"  # the next call with this signature is traced
    TRACED = "traced"  # traced; dynamo captured a piece for it
    NOT_CAPTURED = "not_captured"  # traced, but dynamo captured nothing: stays eager
    # Traced, and a piece captured since it became hot serves it (another hot
    # input's trace covered it): nothing new to capture, and its calls hit that piece.
    SERVED = "served"
    # Traced `MAX_TRACES_PER_SIGNATURE` times and its calls still miss: what changes
    # between them is something dynamo guards on that no trace made dynamic. Stays eager.
    STILL_MISSED = "still_missed"


@dataclass
class MissRecord:
    """Calls whose input signature no captured piece served (they ran eager)."""

    signature: str
    calls: int = 0  # since the signature was last traced
    state: MissState = MissState.COUNTING
    traces: int = 0  # tracing calls made for it
    hot_served: int = 0  # calls a piece served while it was hot (`Misses._trace`)


@dataclass
class ErrorFallbacks:
    """Calls where pwdaemon's path raised and the call was re-run eager."""

    calls: int = 0
    by_type: dict[str, int] = field(default_factory=dict)


def input_signature(
    args: tuple[Any, ...],
    kwargs: Mapping[str, Any],
    size_dims: Mapping[int, int],
    size: int | None = None,
) -> str:
    """What makes dynamo's guards tell two calls apart, the size itself excepted.

    `size_dims` maps id(tensor) to its size dimension; `size` is the call's size where no
    tensor it describes is shown (one inside an object). The size is kept only as its
    class (0, 1, many): dynamo treats 0 and 1 specially in places, never 2 versus 9.
    Lists, tuples and dicts are shown item by item (`0.x` for key "x" of argument 0),
    other objects by their type. Computed on misses only.
    """
    parts = [
        f"grad={int(torch.is_grad_enabled())}",
        f"inference={int(torch.is_inference_mode_enabled())}",
    ]
    items: list[tuple[str, Any]] = [*((str(i), a) for i, a in enumerate(args))]
    items = [*items, *sorted(kwargs.items())]
    shown = _show(items, size_dims, parts, _SIGNATURE_DEPTH)
    if size is None:
        size = shown
    size_class = "n=?" if size is None else ("n=0" if size == 0 else "n=1" if size == 1 else "n>1")
    return " ".join([size_class, *parts])


# How deep lists, tuples and dicts are shown in a signature, and how many items of each.
_SIGNATURE_DEPTH = 2
_SIGNATURE_ITEMS = 32


def _show(
    items: Iterable[tuple[str, Any]], size_dims: Mapping[int, int], parts: list[str], depth: int
) -> int | None:
    # Appends each item's description to `parts`; returns the size a marked tensor shows.
    size: int | None = None
    for key, a in items:
        if isinstance(a, torch.Tensor):
            dim = size_dims.get(id(a))
            shape = []
            for d, s in enumerate(a.shape):
                if d == dim:
                    size = int(s)
                    shape.append("n")
                else:
                    shape.append(str(int(s)))
            # The order of the strides, not their values (which scale with the size).
            stride = a.stride()
            order = sorted(range(a.dim()), key=lambda d: -stride[d])
            layout = "c" if a.is_contiguous() else f"strided{tuple(order)}"
            grad = ",grad" if a.requires_grad else ""
            grad += ",inference_tensor" if a.is_inference() else ""
            parts.append(f"{key}:{a.dtype}:{a.device}:[{','.join(shape)}]:{layout}{grad}")
        elif a is None or isinstance(a, bool | int | float | str):
            parts.append(f"{key}={a!r}"[:64])
        elif depth > 0 and isinstance(a, list | tuple | dict) and len(a) <= _SIGNATURE_ITEMS:
            inner = a.items() if isinstance(a, dict) else enumerate(a)
            parts.append(f"{key}:{type(a).__name__}")
            found = _show(((f"{key}.{k}", v) for k, v in inner), size_dims, parts, depth - 1)
            size = found if size is None else size
        else:
            parts.append(f"{key}:{type(a).__name__}")
    return size


# Dynamo's graph-break log (torch's "graph_breaks" artifact): one logger per module that
# reports breaks, at DEBUG, off unless TORCH_LOGS asks for it.
GRAPH_BREAK_LOGS = (
    "torch._dynamo.symbolic_convert.__graph_breaks",
    "torch._dynamo.convert_frame.__graph_breaks",
    "torch._dynamo.exc.__graph_breaks",
)


class TorchWarnings(logging.Handler):
    """Collects torch's warnings and errors, and dynamo's graph-break reasons, logged by
    this thread during a tracing call.

    Dynamo gives up on a frame quietly when fake propagation hits a guard it cannot
    decide (nn.TransformerEncoder's fast path with an unbacked size that might be 0,
    before it was marked at least 1: no graph break is counted, the frame just runs
    eager); the only trace of why is a log record. And a
    graph break on a size guard it cannot decide inside an inlined function is not
    counted either (torch 2.13 counts only `Unsupported` breaks; this one is a
    `UserError`): transformers' BERT sized on its sequence dim broke at `q_length > 1`
    in SDPA attention into 7 pieces under the unbacked strategy, where a backed trace
    makes one. Its reason is only in the graph-break log, which is off by default: it is
    turned on for the block and heard here alone (`graph_breaks`), not printed.
    """

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.thread = threading.get_ident()
        self.messages: list[str] = []
        self.graph_breaks: list[str] = []  # reasons from dynamo's graph-break log
        self._loggers: list[logging.Logger] = []
        self._turned_on: list[tuple[logging.Logger, int, bool]] = []
        self._seen: set[int] = set()

    def emit(self, record: logging.LogRecord) -> None:
        if record.thread != self.thread or id(record) in self._seen:
            return  # another thread's compile (not ours to judge), or seen via a parent
        graph_break = record.name in GRAPH_BREAK_LOGS
        if record.levelno < logging.WARNING and not graph_break:
            return  # a debug log someone turned on: not a warning
        self._seen.add(id(record))
        try:
            text = record.getMessage()
        except Exception:  # a malformed record must not break a tracing call
            text = str(record.msg)
        if record.exc_info and record.exc_info[1] is not None:
            text = f"{text} {record.exc_info[1]}"
        if graph_break:
            # "Graph break in user code at FILE:LINE / Graph Break Reason: ... / User
            # code traceback: ...": the reason alone.
            reason = text.partition("Graph Break Reason:")[2] or text
            reason = reason.split("User code traceback:")[0].split("User Stack")[0]
            self.graph_breaks.append(" ".join(reason.split())[:500])
        else:
            self.messages.append(" ".join(text.split())[:500])

    def __enter__(self) -> TorchWarnings:
        # torch._logging gives its loggers their own handlers and turns propagation
        # off, so a handler on "torch" alone hears nothing from dynamo or fake tensors.
        # list() copies the table's keys in one C call, under the GIL: any import on
        # another thread may add a logger, and iterating the live dict in Python raised
        # "dictionary changed size during iteration" (Inductor's imports on the loader's
        # set-up thread beside the trace thread).
        table = list(logging.Logger.manager.loggerDict)
        names = {n for n in table if n.split(".")[0] == "torch"} | set(GRAPH_BREAK_LOGS)
        self._loggers = [logging.getLogger(n) for n in ("torch", *sorted(names))]
        for logger in self._loggers:
            logger.addHandler(self)
        for name in GRAPH_BREAK_LOGS:
            logger = logging.getLogger(name)
            if not logger.isEnabledFor(logging.DEBUG):
                # Off (torch's default): on for this block, heard by this handler only.
                # Process-wide, but the tracer holds TRACE_LOCK, and a record from
                # another thread's compile goes nowhere (not propagated, filtered here).
                self._turned_on.append((logger, logger.level, logger.propagate))
                logger.setLevel(logging.DEBUG)
                logger.propagate = False
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for logger, level, propagate in self._turned_on:
            logger.setLevel(level)
            logger.propagate = propagate
        self._turned_on = []
        for logger in self._loggers:
            logger.removeHandler(self)


def counter_snapshot(group: str) -> dict[str, int]:
    """A copy of one of dynamo's counter groups (graph breaks, recompiles)."""
    from torch._dynamo.utils import counters

    # dict() copies in one C call, under the GIL: dynamo on another thread (a serving
    # call's frame, another model's trace) may add a key meanwhile, and iterating the
    # live Counter then raised "dictionary changed size during iteration" (seen in the
    # demo). .get(): indexing dynamo's defaultdict would add the group from this thread.
    group_counts = dict(counters.get(group) or {})
    return {str(k): int(v) for k, v in group_counts.items()}


def counter_delta(before: Mapping[str, int], after: Mapping[str, int]) -> dict[str, int]:
    return {k: v - before.get(k, 0) for k, v in after.items() if v > before.get(k, 0)}
