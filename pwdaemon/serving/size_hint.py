"""Which inputs carry a piece's other dynamic sizes, and what to tell the user about them.

pwdaemon specializes each piece on one size (`marks`: dim 0 by default). Traffic that
varies another dim (sequence lengths of a model sized on its batch) makes dynamo's
automatic dynamic give that dim a symbol of its own, and such a piece gets its general
compile only (`GraphPiece.specializable`). Found on real models, where it was silent: a
tiny BERT fed batches of 2 at lengths 3-16 served its attention piece on the general
tier only (and 302 calls eager while lengths missed), with nothing above INFO logged. The
remedy is `attach(dynamic=...)` naming the dim that carries the size, which only the
user can judge (a batch that varies too would then retrace per batch); so a warning
names the inputs and dims in the words of `forward`'s arguments and the `dynamic=` to
try. A piece of an inner frame (after a graph break) names its own locals, which
`dynamic=` cannot: its note goes to the status and the INFO log only.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import torch.fx

__all__ = ("ExtraDim", "dynamic_spec", "extra_dims", "general_only_hint")

# (symbol, the input's source as dynamo names it, dim): `("s27", "L['input_ids']", 1)`.
ExtraDim = tuple[str, str, int]

# A top-level argument of the traced frame, as dynamo names its source: `L['x']`,
# `L['kwargs']['x']` (a call through `**kwargs`), `L['args'][0]` (through `*args`).
_ARGUMENT = re.compile(
    r"^L\[(?:'kwargs'\]\[)?'(?P<name>[A-Za-z_]\w*)'\]$|^L\['args'\]\[(?P<pos>\d+)\]$"
)


def _source_name(node: torch.fx.Node) -> str | None:
    grapharg = node.meta.get("grapharg")
    source = getattr(grapharg, "source", None)
    if source is None:
        return None
    name = source.name  # a property from torch 2.13 on, a method before it
    return str(name() if callable(name) else name)


def extra_dims(
    placeholders: Sequence[torch.fx.Node], symbols: Sequence[str]
) -> tuple[ExtraDim, ...]:
    """Each tensor input dim whose size is one of `symbols` (a piece's symbols besides
    its size). Empty for a graph without dynamo's sources: a shipped or loaded one, or
    one read after the backend returned (dynamo then drops `grapharg` from the
    placeholders), so the tracer reads them inside its backend and the facts keep them."""
    wanted = set(symbols)
    out: list[ExtraDim] = []
    if not wanted:
        return ()
    for node in placeholders:
        value: Any = node.meta.get("example_value")
        if not isinstance(value, torch.Tensor):
            continue
        source = _source_name(node)
        if source is None:
            continue
        for d, s in enumerate(value.shape):
            if isinstance(s, torch.SymInt) and str(s.node.expr) in wanted:
                out.append((str(s.node.expr), source, d))
    return tuple(out)


def _argument(source: str, params: Sequence[str]) -> str | None:
    """The `forward` argument a source is, or None (an inner frame's local, a tensor
    inside another argument: nothing `dynamic=` can name)."""
    m = _ARGUMENT.match(source)
    if m is None:
        return None
    if m.group("name") is not None:
        return m.group("name") if m.group("name") in params else None
    pos = int(m.group("pos"))
    return params[pos] if pos < len(params) else None


def dynamic_spec(dims: Sequence[ExtraDim], params: Sequence[str]) -> str | None:
    """The `dynamic=` mapping that would size the model on `dims` ("{'input_ids': 1}"),
    or None where it cannot express them: not arguments of `forward` (an inner frame's
    locals, tensors inside an argument), or more than one size (it marks one)."""
    named = [(_argument(src, params), d) for _, src, d in dims]
    arguments = [name for name, _ in named if name is not None]
    if not named or len(arguments) != len(named) or len(set(arguments)) != len(arguments):
        return None
    if len({sym for sym, _, _ in dims}) != 1 or len({d for _, d in named}) != 1:
        return None
    return "{" + ", ".join(f"{name!r}: {d}" for name, d in named) + "}"


def general_only_hint(
    dims: Sequence[ExtraDim], symbols: Sequence[str], params: Sequence[str], spec: str | None
) -> str:
    """Why a piece with other dynamic sizes is general-only, where they come from, and
    `spec` (`dynamic_spec`'s answer), the `dynamic=` that would size the model on them,
    where there is one."""
    if dims:
        shown = ", ".join(
            f"{_argument(src, params) or src} dim {d} ({sym})" for sym, src, d in dims
        )
    else:  # a graph without dynamo's metadata (a loaded trace's)
        shown = ", ".join(symbols)
    text = (
        f"dynamic sizes besides the one pwdaemon specializes on: {shown}; general compile "
        "only, none per size"
    )
    if spec is None:
        return text
    return (
        f"{text}. If that dim carries your traffic's size (lengths, with the batch fixed), "
        f"attach(model, dynamic={spec}) sizes on it instead"
    )
