"""Dynamic-shape strategies: how the size dimension is marked for dynamo, in fallback order.

- `UNBACKED` (first from torch 2.12 on): `mark_unbacked` with one shared shape id. Sound
  (dynamo raises on a guard it cannot decide instead of assuming), one symbol for every
  input sharing the size, no 0/1 specialisation: one graph serves every size, size 1
  included. Marked at least 1 (`_UNBACKED_MIN`). On torch 2.13 CPU it captures
  transformers' BERT, GPT-2 and Llama, nn.Sequential and nn.TransformerEncoder as one
  piece; on torch 2.11 and 2.12 the SDPA attention of BERT's, GPT-2's and Llama's
  forward hits "Could not guard on data-dependent expression Eq(u0, 1)" (the backed
  strategy follows); on 2.11 it is not tried at all (`ORDER` says why).
- `BACKED_OBLIVIOUS` (the only one on torch 2.11): `mark_dynamic` (backed) while
  `torch.fx.experimental._config.backed_size_oblivious` is on during the tracing call
  only: framework code (broadcasting, contiguity) no longer specialises sizes 0/1, so no
  retrace at size 1 either. Captures all five models above as one piece on torch 2.13
  (before it, BERT, GPT-2 and Llama gain a second piece for size 1: attention's
  `Eq(s, 1)` is a guard there); inputs may get separate symbols (each marked dim is the
  size: see graph_facts).

A piece records the strategy it was traced with. What keeps every size correct is not
the strategy: dynamo keeps every guard it installed (a branch on the size routes other
sizes to their own piece or to eager), and a compiled runnable is validated against the
tier it replaces before a swap.
"""

from __future__ import annotations

import contextlib
import enum
import inspect
import threading
from collections.abc import Iterator

import torch
from torch._dynamo import decorators as dynamo_decorators

from pwdaemon.serving import guard_latency, random_state


class ShapeStrategy(enum.Enum):
    UNBACKED = "unbacked"
    BACKED_OBLIVIOUS = "backed_oblivious"


def torch_release() -> tuple[int, int]:
    """This torch's (major, minor): for behaviour a feature test cannot see (a bug fixed
    in a release)."""
    major, minor = torch.__version__.split(".")[:2]
    return int(major), int(minor)


_MARK_PARAMS = inspect.signature(dynamo_decorators.mark_unbacked).parameters
# shape_id (torch >= 2.11) makes every marked input share one symbol.
_HAS_SHAPE_ID = "shape_id" in _MARK_PARAMS
# The unbacked size is marked at least 1. A second dim that varies (a transformer sized on
# its batch, with lengths that vary too) is made dynamic by dynamo's automatic dynamic
# when a hot input traces; an unbacked size that may be 0 then left a reshape to -1
# undecidable ("Could not guard on data-dependent expression Ne(16*s16*u0, 0)" in BERT's
# attention), dynamo dropped the whole call's frame, and BERT gained a piece pinned to
# each length (10 pieces on 7 lengths). nn.TransformerEncoder's fast path asked
# `Eq(80*u0, 0)` and fell back to the backed strategy. A size of 0 is an empty call: no
# piece's guards accept it, and it runs eager.
_UNBACKED_MIN = {"min": 1} if "min" in _MARK_PARAMS else {}

try:  # the flag exists on torch 2.11-2.13; guard anyway so an older torch keeps UNBACKED
    import torch.fx.experimental._config as _fx_config

    _HAS_OBLIVIOUS = hasattr(_fx_config, "backed_size_oblivious")
except ImportError:  # pragma: no cover - older torch
    _HAS_OBLIVIOUS = False

# Before torch 2.13 the unbacked strategy fails where 2.13 traces:
# scaled_dot_product_attention asks `Eq(u0, 1)` inside transformers' BERT, GPT-2 and
# Llama (torch 2.11 and 2.12, CPU here, 2.11 CUDA on the H200), and on 2.11 a model's own
# guard on the size (`if x.shape[0] == 1`) raises instead of breaking the graph. There
# the backed strategy captured every model the unbacked one did (nn.Sequential, the demo)
# as one piece too, and trying unbacked first cost a whole failed trace (BERT on an
# H200: 25 of the 32 s to its first piece, under traffic). So on 2.11 the backed
# strategy is the only one, and the tracer's handling of the last strategy (a size-1
# trace that broke apart is traced again at size 2, `Tracer._widens`) applies to it as
# on 2.13. Not on 2.12: there the backed strategy breaks transformers' generate() (the
# decode step's pieces of GPT-2 and Llama get a general compile that holds for batches
# above 1 only, `Ne(s, 1)`, and their size 1 fails validation: each decode step at
# batch 1 on eager), where the unbacked one traces every piece with one general, as on
# 2.13 (tests/integration/test_generate.py, CPU, 2026-12-06). A model the unbacked trace
# fails on costs that failed trace at its first start only: the store remembers the
# failed strategy, and a restart skips it.
_UNBACKED_FIRST = torch_release() >= (2, 12)

# Strategies in the order a failing one falls back to the next.
ORDER: tuple[ShapeStrategy, ...]
if not _HAS_OBLIVIOUS:  # pragma: no cover - older torch
    ORDER = (ShapeStrategy.UNBACKED,)
elif _UNBACKED_FIRST:
    ORDER = (ShapeStrategy.UNBACKED, ShapeStrategy.BACKED_OBLIVIOUS)
else:
    ORDER = (ShapeStrategy.BACKED_OBLIVIOUS,)

# A tracing call may need more cache entries than dynamo's default recompile limit (8)
# on code objects that every attach shares: the `forward` of a model class with a graph
# break inside it, and its resumed frames, collect one entry per attach.
RECOMPILE_LIMIT = 64

# Patches of process-global configuration (dynamo's and fx's config modules are plain
# module state, not thread-local) are made only inside tracing calls, which hold this
# lock: two tracers patching and restoring at once could otherwise leave a value stuck.
TRACE_LOCK = threading.RLock()


def next_strategy(strategy: ShapeStrategy) -> ShapeStrategy | None:
    i = ORDER.index(strategy)
    return ORDER[i + 1] if i + 1 < len(ORDER) else None


def mark_size(
    t: torch.Tensor, dim: int, strategy: ShapeStrategy, shape_id: str, *, weak: bool = False
) -> None:
    """Mark `t`'s size dimension for dynamo the way `strategy` traces it.

    Marks are attributes on the tensor that dynamo's guards check, so every call (not
    only tracing calls) must mark exactly as the tracing call did. `weak` (the backed
    strategy only): a hint dynamo may drop where the code specializes the dim, for
    tensors pwdaemon found inside a call's objects (`SizeMarks`), whose dim 0 equals the
    size without being sure to be it, and for a piece's outputs that carry the size into
    a resumed frame (`PieceMaker.output_marker`). A strict mark there failed the whole trace on
    torch 2.11: GPT-2's decode step specialized its cache's batch ("You marked
    L['past_key_values'].layers[0].keys.size()[0] as dynamic but your code specialized
    it to be a constant (2)"), every decode step ran eager.
    """
    if weak and strategy is not ShapeStrategy.UNBACKED:
        torch._dynamo.maybe_mark_dynamic(t, dim)
    elif strategy is ShapeStrategy.UNBACKED:
        if _HAS_SHAPE_ID:
            dynamo_decorators.mark_unbacked(t, dim, shape_id=shape_id, **_UNBACKED_MIN)
        else:  # pragma: no cover - older torch: symbols unify through the graph's ops
            dynamo_decorators.mark_unbacked(t, dim, **_UNBACKED_MIN)
    else:
        torch._dynamo.mark_dynamic(t, dim)


@contextlib.contextmanager
def tracing(strategy: ShapeStrategy) -> Iterator[None]:
    """Configuration for one tracing call under `strategy`; the caller holds TRACE_LOCK."""
    with contextlib.ExitStack() as stack:
        # Guard latency timed without dynamo's cache flush: a GIL-held C stretch of
        # 30-90 ms (this thread only: `guard_latency`).
        stack.enter_context(guard_latency.unflushed())
        # Serving threads' random draws made during the trace stay drawn (`random_state`).
        stack.enter_context(random_state.kept())
        limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
        stack.enter_context(torch._dynamo.config.patch(recompile_limit=limit))
        if strategy is ShapeStrategy.BACKED_OBLIVIOUS:
            # a config module: patch() exists at run time, not in its type stubs
            stack.enter_context(_fx_config.patch(backed_size_oblivious=True))  # type: ignore[attr-defined]
        yield


_DATA_DEPENDENT = (
    "data-dependent",
    "data dependent",
    "GuardOnDataDependentSymNode",
    "unbacked",
)


def is_data_dependent(reason: str) -> bool:
    """Whether dynamo's reason for a graph break or a skipped frame is a size guard that
    the strategy could not decide (the case the next strategy exists for)."""
    return any(word in reason for word in _DATA_DEPENDENT)
