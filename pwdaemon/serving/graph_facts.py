"""What serving a captured graph needs to know about it: where the size is, what comes out.

The size is every symbol that sits on a marked dimension of an input. Only tensors whose
size dimension matches are marked, so those symbols are all equal at run time: with the
unbacked strategy they are one symbol (one shape id), with the backed strategy each
input may get its own (`s52`, `s92`), and both count as the size. Any other symbol (a
dimension dynamo made dynamic after a recompile, say a sequence length) leaves the piece
to the general tier.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx


@dataclass(frozen=True)
class GraphFacts:
    size_index: int | None  # flat-argument index of the (first) size SymInt
    size_indices: tuple[int, ...]  # every SymInt placeholder that is the size
    size_symbol: str | None
    size_symbols: tuple[str, ...]
    extra_symbols: tuple[str, ...]  # other dynamic symbols (then: general tier only)
    returns_tuple: bool
    output_marks: tuple[tuple[int, int], ...]  # (output index, dim) carrying the size
    fingerprint: str
    placeholder_specs: tuple[str, ...]

    def __getitem__(self, name: str) -> Any:
        # Older callers read the facts as a dict (`analyse_graph(gm)["fingerprint"]`).
        return getattr(self, name)


def _placeholder_spec(node: torch.fx.Node) -> str:
    v = node.meta.get("example_value")
    if isinstance(v, torch.Tensor):
        return f"{node.name}:tensor{tuple(str(s) for s in v.shape)}:{v.dtype}:{v.device}"
    if isinstance(v, torch.SymInt):
        return f"{node.name}:symint:{v.node.expr}"
    return f"{node.name}:{type(v).__name__}"


def _marked_dims(node: torch.fx.Node) -> set[int]:
    # The real tensor dynamo saw (GraphArg.example) carries the marks we put on it.
    grapharg = node.meta.get("grapharg")
    example = getattr(grapharg, "example", None) if grapharg is not None else None
    if not isinstance(example, torch.Tensor):
        return set()
    dims: set[int] = set()
    for attr in ("_dynamo_unbacked_indices", "_dynamo_dynamic_indices"):
        dims |= set(getattr(example, attr, ()) or ())
    return dims


def _size_symbols(placeholders: list[torch.fx.Node]) -> set[Any]:
    symbols: set[Any] = set()
    for node in placeholders:
        v = node.meta.get("example_value")
        if not isinstance(v, torch.Tensor):
            continue
        for d in _marked_dims(node):
            if d < v.dim():
                s = v.shape[d]
                if isinstance(s, torch.SymInt) and s.node.expr.is_symbol:
                    symbols.add(s.node.expr)
    return symbols


def analyse_graph(gm: torch.fx.GraphModule) -> GraphFacts:
    """Find the size SymInt placeholders, other symbols, output structure and marks."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    marked = _size_symbols(placeholders)
    size_indices: list[int] = []
    size_exprs: list[Any] = []
    extra: list[str] = []
    for i, node in enumerate(placeholders):
        v = node.meta.get("example_value")
        if not (isinstance(v, torch.SymInt) and v.node.expr.is_symbol):
            continue
        expr = v.node.expr
        # Without mark information (a graph built by hand) the first symbol is the size.
        if expr in marked or (not marked and not size_exprs) or expr in size_exprs:
            size_indices.append(i)
            if expr not in size_exprs:
                size_exprs.append(expr)
        elif str(expr) not in extra:
            extra.append(str(expr))
    output_node = next(n for n in gm.graph.nodes if n.op == "output")
    result = output_node.args[0]
    returns_tuple = isinstance(result, tuple | list)
    marks: list[tuple[int, int]] = []
    if size_exprs and returns_tuple:
        for i, out in enumerate(result):
            v = out.meta.get("example_value") if isinstance(out, torch.fx.Node) else None
            if isinstance(v, torch.Tensor):
                for d, s in enumerate(v.shape):
                    if isinstance(s, torch.SymInt) and s.node.expr in size_exprs:
                        marks.append((i, d))
                        break
    specs = tuple(_placeholder_spec(n) for n in placeholders)
    fingerprint = hashlib.sha256((gm.code + "\n" + "\n".join(specs)).encode()).hexdigest()
    return GraphFacts(
        size_index=size_indices[0] if size_indices else None,
        size_indices=tuple(size_indices),
        size_symbol=str(size_exprs[0]) if size_exprs else None,
        size_symbols=tuple(str(e) for e in size_exprs),
        extra_symbols=tuple(extra),
        returns_tuple=returns_tuple,
        output_marks=tuple(marks),
        fingerprint=fingerprint,
        placeholder_specs=specs,
    )
